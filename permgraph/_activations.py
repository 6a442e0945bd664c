"""Activation matching: one pass of each model over the data, streaming cross-moments per tap of each group.

Taps: for every group, the graph nodes whose output carries the group on one dim while every other dim
is a sample dim (batch, spatial positions, tokens) — preferring post-nonlinearity activations, then
residual sums, then norm outputs, then layer outputs. Groups without such a tap (attention heads and the
within-head query/key and value dims, whose tensors also carry the head dim) are matched by weight
matching afterwards, with the activation-matched groups held fixed.
"""

from __future__ import annotations

import copy
import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from . import _blocks
from ._progress import progress_bar
from ._solver import assign, exchange_losses
from .errors import SpecMismatchError
from .permutation import Permutation
from .spec import PermutationSpec, Tree

ACTIVATIONS = {"relu", "relu_", "relu6", "gelu", "gelu_", "silu", "silu_", "mish", "mish_", "hardtanh", "hardtanh_",
               "hardswish", "hardswish_", "sigmoid", "tanh", "elu", "elu_", "leaky_relu", "leaky_relu_",
               "softplus", "selu", "celu", "prelu"}
RESIDUAL = {"add", "add_"}
NORMS = {"batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm",
         "_native_batch_norm_legit_no_training"}
LAYERS = {"linear", "conv1d", "conv2d", "conv3d", "matmul", "bmm", "convolution", "scaled_dot_product_attention"}


def _category(opname: str) -> int:
    if opname in ACTIVATIONS:
        return 0
    if opname in RESIDUAL:
        return 1
    if opname in NORMS:
        return 2
    if opname in LAYERS:
        return 3
    return 9


def _match_trees(t_new: Tree, t_spec: Tree, mapping: dict[str, str]) -> None:
    if isinstance(t_new, str) and isinstance(t_spec, str):
        mapping.setdefault(t_new, t_spec)
    elif isinstance(t_new, dict) and isinstance(t_spec, dict):
        (k1, v1), (k2, v2) = next(iter(t_new.items())), next(iter(t_spec.items()))
        if k1 == k2 and len(v1) == len(v2):
            for x, y in zip(v1, v2):
                _match_trees(x, y, mapping)


class _Template:
    """Model A's exported graph for one input shape, as a graph that runs A and B side by side.

    The paired graph computes each node of A's graph for A and then for B, and as soon as a tapped
    activation exists on both sides it hands the two to a sink (the streaming moments), after which the
    tensors are freed: only one layer's activations are alive at a time. The graph returns both models'
    outputs, which ``activation_matching`` compares with the models' own forward passes on the first batch
    before trusting the taps. The template keeps the graph and the constants the graph creates, never the
    models' tensors (``bind`` attaches them, without copies), so one template serves every pair of models
    with the same structure.
    """

    def __init__(self, spec: PermutationSpec, a: nn.Module, x: torch.Tensor):
        from ._build import _tree, apply_nest, nest_plan
        from ._trace import _tied_keys, export
        from ._walk import Propagator

        ep = export(a, (x,))
        prop = Propagator(ep, _tied_keys(a))
        prop.run()
        gid: dict[int, str] = {}
        mapping: dict[str, str] = {}
        param_trees = {key: [_tree(prop.atoms, atom, gid) for atom in lab]
                       for key, lab in prop.param_labels.items() if key in spec.axes}
        # the dims inside attention heads, as the spec nests them (trace(nested_heads=...))
        plan = nest_plan(prop, param_trees.values(), gid) if spec.nested() else {}
        for key, trees in param_trees.items():
            for t_new, t_spec in zip(trees, spec.axes[key]):
                _match_trees(apply_nest(t_new, plan), t_spec, mapping)
        best: dict[str, tuple[int, list[tuple[str, object]]]] = {}
        for node, lab in prop.env.items():
            if node.op != "call_function" or not isinstance(lab, tuple) or not lab:
                continue
            trees = [apply_nest(_tree(prop.atoms, a_, gid), plan) for a_ in lab]
            grouped = [d for d, t in enumerate(trees) if not isinstance(t, int)]
            where: object = None
            if len(grouped) == 1 and isinstance(trees[grouped[0]], str):
                where, g = grouped[0], mapping.get(trees[grouped[0]])
            elif (len(grouped) == 2 and all(isinstance(trees[d], str) for d in grouped)
                  and plan.get(trees[grouped[1]]) == trees[grouped[0]]):
                # (..., heads, ..., head dims, ...): queries, keys, values, attention outputs per head
                where, g = tuple(grouped), mapping.get(trees[grouped[1]])
            if where is None or g is None or spec.groups.get(g) is None:
                continue
            cat = _category(prop.opname(node))
            cur = best.get(g)
            if cur is None or cat < cur[0]:
                best[g] = (cat, [(node.name, where)])
            elif cat == cur[0]:
                cur[1].append((node.name, where))
        self.taps = {g: v[1] for g, v in best.items()}
        # the category of each group's taps (0 nonlinearity, 1 residual sum, 2 norm, 3 layer, 9 other)
        self.category = {g: v[0] for g, v in best.items()}
        # tapped node -> (group, dim, k) of every group it feeds, k numbering the group's taps in graph
        # order: each tap keeps its own statistics (``_TapMoments``), keyed by (group, k) rather than by
        # node name, so that the graphs exported for other batch shapes feed the same statistics
        self.slots: dict[str, list[tuple[str, int, int]]] = {}
        for g, lst in self.taps.items():
            for k, (name, dim) in enumerate(lst):
                self.slots.setdefault(name, []).append((g, dim, k))
        gm = ep.module()
        own = _named_tensors(a)
        self.targets: list[str] = []  # what the graph reads; side "a"/"b" reads target i as attribute a{i}/b{i}
        self.extras: dict[str, object] = {}  # what the graph reads that is not a model tensor (constants)
        for node in gm.graph.nodes:
            if node.op == "call_module" and node.target == "_guards_fn":
                continue
            if node.op in ("get_attr", "call_module") and node.target not in self.targets:
                self.targets.append(node.target)
                if node.target not in own:
                    self.extras[node.target] = _getattr_path(gm, node.target)
        self.graph = _paired(gm, set(self.slots), {t: i for i, t in enumerate(self.targets)})

        self._idle: torch.fx.GraphModule | None = None  # a compiled paired module, bound to no model

    def bind(self, a: nn.Module, b: nn.Module) -> torch.fx.GraphModule:
        """The paired graph reading A's and B's own parameters and buffers (no copies). Hand it back with
        ``release`` when done: the compiled module is then reused by the next call, unbound."""
        root: dict[str, object] = {}
        for side, model in (("a", a), ("b", b)):
            own = _named_tensors(model)
            for i, t in enumerate(self.targets):
                if t in own:
                    root[f"{side}{i}"] = own[t]
                elif t in self.extras:
                    root[f"{side}{i}"] = self.extras[t]
                else:
                    raise SpecMismatchError(f"model {side.upper()} has no tensor {t!r}, which model A's graph "
                                            "reads; align two models of the same architecture")
        with _LOCK:  # one caller at a time takes the idle module; another builds its own
            gm, self._idle = self._idle, None
        if gm is None:
            root["sink"] = _Sink()
            gm = torch.fx.GraphModule(root, copy.deepcopy(self.graph))
            gm.eval()
        else:
            for name, value in root.items():
                _rebind(gm, name, value)
        return gm

    def release(self, gm: torch.fx.GraphModule) -> None:
        for side in ("a", "b"):
            for i in range(len(self.targets)):
                _rebind(gm, f"{side}{i}", None)
        gm.sink.fn = None
        with _LOCK:
            self._idle = gm


def _rebind(root: nn.Module, name: str, value) -> None:
    """Rebind the tensor (or module) ``name`` of ``root``, keeping whether it is a parameter or buffer."""
    for table in (root._parameters, root._buffers, root._modules):
        if name in table:
            table[name] = value
            return
    object.__setattr__(root, name, value)


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    out = dict(model.named_parameters(remove_duplicate=False))
    out.update(model.named_buffers(remove_duplicate=False))
    return out


def _getattr_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _paired(gm: torch.fx.GraphModule, taps: set[str], index: dict[str, int]) -> torch.fx.Graph:
    """A graph running ``gm``'s graph for models A and B node by node (reading the attribute ``target``
    as ``a{index[target]}`` and ``b{index[target]}``), calling the ``sink`` module with ``(name, A's
    value, B's value)`` right after each tapped node, and returning ``(A's outputs, B's outputs)`` as
    flat tuples."""
    pg = torch.fx.Graph()
    env: tuple[dict, dict] = ({}, {})
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[0][node] = env[1][node] = pg.node_copy(node)
        elif node.op == "output":
            leaves = [n for n in torch.utils._pytree.tree_leaves(node.args[0]) if isinstance(n, torch.fx.Node)]
            pg.output(tuple(tuple(env[side][n] for n in leaves) for side in (0, 1)))
        elif node.op == "call_module" and node.target == "_guards_fn":
            continue  # torch.export's input-shape guard: the template is keyed by the input shape
        else:
            for side, prefix in ((0, "a"), (1, "b")):
                new = pg.node_copy(node, lambda n, _s=side: env[_s][n])
                if node.op in ("get_attr", "call_module"):
                    new.target = f"{prefix}{index[node.target]}"
                env[side][node] = new
            if node.name in taps:
                pg.call_module("sink", (node.name, env[0][node], env[1][node]))
    pg.lint()
    return pg


# structure of a model: what must agree for one exported graph to serve another model
def _structure(model: nn.Module) -> tuple:
    tensors = tuple((k, tuple(t.shape), t.dtype, str(t.device)) for k, t in _named_tensors(model).items())
    return (type(model).__module__, type(model).__qualname__, hashlib.sha256(repr(model).encode()).hexdigest(),
            tensors)


_TEMPLATES: OrderedDict[tuple, _Template] = OrderedDict()
_MAX_TEMPLATES = 8
_LOCK = threading.Lock()


def _does_not_fit(x: torch.Tensor, e: Exception) -> ValueError:
    first = str(e).splitlines()[0][:200] if str(e) else ""
    return ValueError(f"a batch of shape {tuple(x.shape)} does not fit the model ({type(e).__name__}: {first})")


def _template(key: tuple, spec: PermutationSpec, a: nn.Module, x: torch.Tensor, fresh: bool) -> _Template:
    """The cached template for ``key`` (or a freshly exported one), most recently used last. The cache is
    read and written under ``_LOCK``; the export itself (slow) runs outside it."""
    if not fresh:
        with _LOCK:
            tpl = _TEMPLATES.get(key)
            if tpl is not None:
                _TEMPLATES.move_to_end(key)
                return tpl
    try:
        tpl = _Template(spec, a, x)
    except Exception as e:  # any failure of the export: the batch does not fit the model (named in the error)
        raise _does_not_fit(x, e) from e
    with _LOCK:
        _TEMPLATES[key] = tpl
        _TEMPLATES.move_to_end(key)
        while len(_TEMPLATES) > _MAX_TEMPLATES:
            _TEMPLATES.popitem(last=False)
    return tpl


def _is_cached(key: tuple) -> bool:
    with _LOCK:
        return key in _TEMPLATES


def _forget(key: tuple) -> None:
    with _LOCK:
        _TEMPLATES.pop(key, None)


def _model_outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The model's output tensors (pytree leaves) in eval mode; the train/eval flags are restored."""
    from ._inputs import kept_modes

    with kept_modes(model), torch.no_grad():
        model.eval()
        out = model(x)
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _mismatch(got: tuple, want: list[torch.Tensor]) -> str | None:
    """Why the graph's outputs ``got`` are not the model's outputs ``want`` (None when they agree)."""
    if len(got) != len(want):
        return f"{len(got)} outputs against {len(want)}"
    for g, w in zip(got, want):
        if g.shape != w.shape:
            return f"output shape {tuple(g.shape)} against {tuple(w.shape)}"
        if not w.numel():
            continue
        tol = 1e-2 if w.dtype in (torch.float16, torch.bfloat16) else 1e-4
        w, g = w.double(), g.double()
        same = (g == w) | (g.isnan() & w.isnan())  # equal infinities and NaN in both agree
        finite = w[torch.isfinite(w)]
        scale = float(finite.abs().max()) if finite.numel() else 0.0
        tol *= max(scale, 1e-6)
        err = float(torch.where(same, 0.0, (g - w).abs()).max())
        if not err <= tol:  # a NaN on one side only fails too
            return f"largest difference {err:.3g} (output scale {scale:.3g})"
    return None


class _Sink(nn.Module):
    """Receives the tapped activations of both models while the paired graph runs."""

    def __init__(self):
        super().__init__()
        self.fn = None

    def forward(self, name: str, ta: torch.Tensor, tb: torch.Tensor) -> None:
        self.fn(name, ta, tb)


class _Pair:
    """A template bound to models A and B (``close`` unbinds it)."""

    def __init__(self, tpl: _Template, a: nn.Module, b: nn.Module):
        self.tpl = tpl
        self.gm = tpl.bind(a, b)

    def run(self, x: torch.Tensor, sink) -> tuple[tuple, tuple]:
        """Both models' outputs on ``x``; each tapped activation pair goes to ``sink(name, ta, tb)``."""
        self.gm.sink.fn = sink
        with torch.no_grad():
            return self.gm(x)

    def close(self) -> None:
        if self.gm is not None:
            self.tpl.release(self.gm)
            self.gm = None


class _Moments:
    """Streaming first/second moments and cross-moments of two activation sets (one tap of a group).

    Accumulators are float64; each batch's products are computed in the activations' dtype. Values are
    shifted by the first batch's means before the products (the shifted-data algorithm), which keeps the
    covariance accurate when means are large next to standard deviations (GELU/ReLU outputs). One matrix
    product per batch gives the cross-moments and both sums: each side is written, shifted, into a buffer
    whose last column is ones, so ``[xa 1]^T [xb 1]`` holds ``sum xa xb^T``, ``sum xa``, ``sum xb`` and
    the count. Products are computed in the activations' dtype over chunks of ``CHUNK_ROWS`` sample rows
    (as if the batches were that large) and then added to the float64 accumulators.
    """

    def __init__(self, n: int, device, pool: dict):
        self.n = n
        self.count = 0
        self.pool = pool  # work buffers shared by all taps of one call, keyed by shape and dtype
        self.shift_a: torch.Tensor | None = None
        self.shift_b: torch.Tensor | None = None
        # float64 accumulators, created by the first flush: [xa 1]^T [xb 1], and the sums of squares
        self.s: torch.Tensor | None = None
        self.saa: torch.Tensor | None = None
        self.sbb: torch.Tensor | None = None
        # sums over the rows not yet added to the float64 accumulators, in the activations' dtype
        self.chunk: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.pending = 0  # rows in ``chunk``
        self._key: tuple | None = None
        self._bufs: tuple | None = None

    def _buffers(self, rows: int, dtype, device) -> tuple:
        key = (rows, self.n, dtype, device)
        if key not in self.pool:
            ld = -(-(self.n + 1) // 16) * 16  # a row length that keeps rows aligned for the matrix product
            full = []
            for _ in range(2):
                buf = torch.empty(rows, ld, dtype=dtype, device=device)
                buf[:, self.n:] = 1.0
                full.append(buf[:, : self.n + 1])
            ones = torch.ones(rows, dtype=dtype, device=device)
            self.pool[key] = (full[0], full[1], full[0][:, : self.n], full[1][:, : self.n], ones)
        self._key, self._bufs = (rows, dtype), self.pool[key]
        return self._bufs

    def update(self, ta: torch.Tensor, tb: torch.Tensor, dim: int) -> None:
        """Add one batch: ``ta``/``tb`` carry the units on ``dim``; every other dim is a sample dim."""
        if dim != ta.ndim - 1:
            ta, tb = ta.movedim(dim, -1), tb.movedim(dim, -1)
        if self.shift_a is None:
            sample_dims = tuple(range(ta.ndim - 1))
            self.shift_a, self.shift_b = ta.mean(sample_dims), tb.mean(sample_dims)
        rows = ta.numel() // self.n
        if self._key == (rows, ta.dtype) and self.pool:
            ba, bb, va, vb, ones = self._bufs
        else:
            ba, bb, va, vb, ones = self._buffers(rows, ta.dtype, ta.device)
        # one pass per side: shift, and gather into rows x units (beside the column of ones)
        torch.sub(ta, self.shift_a, out=va if ta.ndim == 2 else va.view(ta.shape))
        torch.sub(tb, self.shift_b, out=vb if tb.ndim == 2 else vb.view(tb.shape))
        if self.pending == 0:
            if self.chunk is None or self.chunk[0].dtype != ta.dtype:
                self.chunk = (torch.empty(self.n + 1, self.n + 1, dtype=ta.dtype, device=ta.device),
                              torch.empty(self.n, dtype=ta.dtype, device=ta.device),
                              torch.empty(self.n, dtype=ta.dtype, device=ta.device))
            prod, qa, qb = self.chunk
            torch.mm(ba.T, bb, out=prod)
            torch.mv(va.square_().T, ones, out=qa)  # sums of squares: the squares times a column of ones
            torch.mv(vb.square_().T, ones, out=qb)
        else:
            prod, qa, qb = self.chunk
            prod.addmm_(ba.T, bb)
            qa.addmv_(va.square_().T, ones)
            qb.addmv_(vb.square_().T, ones)
        self.pending += rows
        self.count += rows
        if self.pending >= self.CHUNK_ROWS or ta.dtype.itemsize < 4:
            self._flush()

    # float32 sums run over at least this many sample rows (one batch, or a few small ones) before they
    # are added to the float64 accumulators; half-precision sums are added after every batch
    CHUNK_ROWS = 16384

    def _flush(self) -> None:
        if self.pending:
            prod, qa, qb = self.chunk
            if self.s is None:
                self.s, self.saa, self.sbb = prod.double(), qa.double(), qb.double()
            else:
                self.s += prod
                self.saa += qa
                self.sbb += qb
            self.pending = 0

    def _stats(self):
        """Count, means of the shifted values, variances, and the constant units of A and of B."""
        self._flush()
        n = max(self.count, 1)
        ma, mb = self.s[: self.n, self.n] / n, self.s[self.n, : self.n] / n
        va = (self.saa / n - ma * ma).clamp_min_(0)
        vb = (self.sbb / n - mb * mb).clamp_min_(0)
        # units whose activation is (numerically) constant on the data
        da = va <= 1e-7 * ((ma + self.shift_a.double()) ** 2 + va) + 1e-30
        db = vb <= 1e-7 * ((mb + self.shift_b.double()) ** 2 + vb) + 1e-30
        return n, ma, mb, va, vb, da, db

    def constant_units(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Units whose activation is (numerically) constant on the data, in A and in B."""
        return self._stats()[5:]

    def similarity(self, kind: str) -> torch.Tensor:
        n, ma, mb, va, vb, da, db = self._stats()
        out = self.s[: self.n, : self.n] / n
        out.addr_(ma, mb, alpha=-1.0)  # the covariance
        if kind == "pearson":
            # constant units get 0 against every unit
            ia = torch.where(da, 0.0, va.rsqrt())
            ib = torch.where(db, 0.0, vb.rsqrt())
            return out.mul_(ia[:, None]).mul_(ib[None, :]).clamp_(-1.0, 1.0)
        ua, ub = ma + self.shift_a.double(), mb + self.shift_b.double()  # the true means
        out.addr_(ua, ub)  # the inner products (per sample)
        if kind == "inner":
            return out
        ia = (va + ua * ua).sqrt().clamp_min_(1e-30).reciprocal_()
        ib = (vb + ub * ub).sqrt().clamp_min_(1e-30).reciprocal_()
        return out.mul_(ia[:, None]).mul_(ib[None, :])


class _TapMoments:
    """The statistics of one group: one ``_Moments`` per tap, each with its own means and scales.

    The taps of a group (the ReLUs after every residual addition of a stage, say) see the same units
    at different places in the network, with different means and scales. Pooled into one set of
    moments, a tap whose mean differs from another's adds the spread of the means to every unit's
    variance and covariance: a unit constant in each tap but at different levels looks like a varying
    unit (and escapes the constant-unit fallback), and the differences of means leak into Pearson and
    cosine scores and can outweigh the within-tap correlations. So every tap keeps its own moments, and
    the group's similarity is the mean of the taps' own similarity matrices (each centred and scaled by
    its own statistics); a unit is constant for the group when it is constant in every tap.
    """

    def __init__(self, n: int, device, pool: dict):
        self.n, self.device, self.pool = n, device, pool
        self.taps: dict[int, _Moments] = {}

    def update(self, k: int, ta: torch.Tensor, tb: torch.Tensor, dim: int) -> None:
        m = self.taps.get(k)
        if m is None:
            m = self.taps[k] = _Moments(self.n, self.device, self.pool)
        m.update(ta, tb, dim)

    @property
    def count(self) -> int:
        """Sample rows over all taps."""
        return sum(m.count for m in self.taps.values())

    def constant_units(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Units constant in every tap, in A and in B: a unit that varies in any tap can be matched by it."""
        da = db = None
        for m in self.taps.values():
            ca, cb = m.constant_units()
            da, db = (ca, cb) if da is None else (da & ca, db & cb)
        return da, db

    def similarity(self, kind: str) -> torch.Tensor:
        ms = list(self.taps.values())
        if kind == "inner":
            # E[a b] over all sample rows of all taps, as a pooled mean: nothing is centred or scaled,
            # so pooling mixes no statistics of one tap into another
            total = self.count
            out = ms[0].similarity(kind).mul_(ms[0].count / total)
            for m in ms[1:]:
                out.add_(m.similarity(kind), alpha=m.count / total)
            return out
        # Pearson and cosine: the mean over taps of each tap's own matrix. Unweighted: a correlation is
        # scale-free, and a tap with fewer positions (after a stride) tells as much about which unit is
        # which as one with many. With Pearson, a unit's row (or column) gets 0 from the taps where it is
        # constant: the same for every candidate partner, which leaves the choice to the other taps.
        out = ms[0].similarity(kind)
        for m in ms[1:]:
            out.add_(m.similarity(kind))
        return out.div_(len(ms))


def _input(batch):
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict) and "input" in batch:
        return batch["input"]
    raise TypeError(f"loader batches must be tensors or (input, target) pairs, got {type(batch).__name__}")


def _disagreement(got: tuple, model: nn.Module, x: torch.Tensor) -> str | None:
    """Why the graph's outputs ``got`` on ``x`` are not ``model``'s own (None when they agree).

    Checked first on a few leading samples, which costs a fraction of a batch, and on the whole batch
    only when that does not settle it (outputs without a leading batch dim, models that mix samples)."""
    k = min(4, x.shape[0])
    batched = all(getattr(o, "ndim", 0) >= 1 and o.shape[0] == x.shape[0] for o in got)
    if k < x.shape[0] and batched:
        try:
            few = _model_outputs(model, x[:k])
        except (RuntimeError, ValueError):  # a model that cannot run on k samples: the whole batch decides
            few = None
        if few is not None and _mismatch(tuple(o[:k] for o in got), few) is None:
            return None
    try:
        want = _model_outputs(model, x)
    except Exception as e:
        raise _does_not_fit(x, e) from e
    return _mismatch(got, want)


def _checked_pair(key: tuple, spec: PermutationSpec, a: nn.Module, b: nn.Module,
                  x: torch.Tensor) -> tuple[_Pair, list[tuple]]:
    """Bind the template for ``key`` to A and B, run the batch ``x`` and check that the graph reproduces
    both models' outputs; returns the pair (still bound) and the taps of ``x``. A cached template that
    does not is exported afresh; a model B that computes a different function of its tensors than model
    A's graph is an error."""
    for fresh in (not _is_cached(key), True):
        pair = _Pair(_template(key, spec, a, x, fresh), a, b)
        held: list[tuple] = []
        try:
            out_a, out_b = pair.run(x, lambda *t, _held=held: _held.append(t))
            why = _disagreement(out_a, a, x)
            if why is None:
                why_b = _disagreement(out_b, b, x)
                if why_b is not None:
                    raise SpecMismatchError(
                        f"model B does not compute the same function of its tensors as model A ({why_b} when "
                        "B's tensors run through A's graph): the models share a spec but not an architecture. "
                        "Align models of one architecture, or use method='weight'")
                return pair, held
        except BaseException:
            pair.close()
            raise
        pair.close()
        _forget(key)
        if fresh:
            raise ValueError(f"model A's exported graph does not reproduce its output on a batch of shape "
                             f"{tuple(x.shape)} ({why}); activation matching needs a model that computes the "
                             "same function in eval mode every time it runs")
    raise AssertionError("unreachable: the second try exports afresh")


TIE_TOL = 1e-4
"""Activation matching: an exchange of two units that loses at most this share of the similarity's largest
magnitude counts as a tie, and weights decide between the units (``_tied_units``)."""


def _tied_units(s: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A's units (a bool mask) that the similarity ``s`` cannot tell apart under the assignment ``p``:
    unit ``i`` is tied when exchanging its partner with some unit ``j``'s (``i`` takes ``p[j]``, ``j``
    takes ``p[i]``) loses at most ``TIE_TOL`` times ``max |s|``. With Pearson or cosine similarity two
    nearly dead units that fire on the same one or two inputs correlate perfectly with each other's
    partners; a planted permutation of MobileNetV2 with random BatchNorm statistics lost 26 of its 9,128
    units that way."""
    tol = TIE_TOL * max(float(s.abs().max()), 1e-30)
    return exchange_losses(s.double(), p) <= tol


def activation_matching(spec: PermutationSpec, a: nn.Module, b: nn.Module, loader: Iterable, *,
                        num_samples: int | None = None, device=None, progress: bool = False, seed: int = 0,
                        max_iter: int = 100, similarity: str = "pearson", residual: str = "activation"):
    if similarity not in ("pearson", "inner", "cosine"):
        raise ValueError(f"similarity must be 'pearson', 'inner' or 'cosine', got {similarity!r}")
    if residual not in ("activation", "weight"):
        raise ValueError(f"residual must be 'activation' or 'weight', got {residual!r}")
    dev_a = next((p.device for p in a.parameters()), torch.device("cpu"))
    dev_b = next((p.device for p in b.parameters()), torch.device("cpu"))
    if dev_a != dev_b:
        from .errors import SpecMismatchError

        raise SpecMismatchError(f"model A is on {dev_a} and model B on {dev_b}; move both to one device")
    dev = torch.device(device) if device is not None else dev_a
    if dev != dev_a:  # compute where asked, on copies (the caller's models stay where they are)
        a, b = copy.deepcopy(a).to(dev), copy.deepcopy(b).to(dev)
    structure = None
    pairs: dict[tuple, _Pair] = {}
    moments: dict[str, _TapMoments] = {}
    pool: dict = {}
    seen = 0
    bar = progress_bar(progress, num_samples, "activation matching (inputs)", unit="ex")
    slots: dict[str, list[tuple[str, int, int]]] = {}

    def consume(name: str, ta: torch.Tensor, tb: torch.Tensor) -> None:
        for g, dim, k in slots[name]:
            m = moments.get(g)
            if m is None:
                m = moments[g] = _TapMoments(spec.groups[g].size, dev, pool)
            if isinstance(dim, tuple):  # heads and head dims: units (head, dim) in row-major order
                xa = ta.movedim(dim, (-2, -1)).flatten(-2)
                xb = tb.movedim(dim, (-2, -1)).flatten(-2)
                m.update(k, xa, xb, xa.ndim - 1)
            else:
                m.update(k, ta, tb, dim)

    try:
        for batch in loader:
            x = _input(batch).to(dev)
            if num_samples is not None:
                x = x[: num_samples - seen]
            if x.shape[0] == 0:
                break
            shape = (tuple(x.shape), x.dtype)
            pair = pairs.get(shape)
            if pair is None:
                if structure is None:
                    structure = (spec.fingerprint(), _structure(a))
                pairs[shape], held = _checked_pair(structure + shape + (str(dev),), spec, a, b, x)
                slots = pairs[shape].tpl.slots
                for t in held:
                    consume(*t)
                del held
            else:
                slots = pair.tpl.slots
                pair.run(x, consume)
            seen += x.shape[0]
            if bar is not None:
                bar.update(x.shape[0])
            if num_samples is not None and seen >= num_samples:
                break
    finally:
        for pair in pairs.values():
            pair.close()
        if bar is not None:
            bar.close()
    pool.clear()
    if seen == 0:
        raise ValueError("the loader yielded no inputs")
    if residual == "weight":
        # groups read only at residual sums (a transformer's residual stream, which no nonlinearity
        # follows): their activations correlate across independently trained models without telling
        # which unit is which, so they go to the weight matching below, with every other group held at
        # its activation-matched permutation (docs/alignment.md, "Residual streams")
        category: dict[str, int] = {}
        for pair in pairs.values():
            category.update(pair.tpl.category)
        for g in [g for g in moments if category.get(g) == 1]:
            del moments[g]
    perm = {g: torch.arange(grp.size) for g, grp in spec.groups.items()}
    diag = {}
    degenerate: dict[str, torch.Tensor] = {}
    sims = {g: m.similarity(similarity) for g, m in moments.items()}
    # attention heads (nested groups): the heads and the dims inside each head at once, from the
    # queries/keys and values/outputs per head (and the head group's own taps, when it has any)
    nested = {h: [g for g in gs if g in sims] for h, gs in spec.nested().items()}
    nested = {h: gs for h, gs in nested.items() if gs}
    solved: dict[str, torch.Tensor] = {}
    for h, gs in nested.items():
        nb = spec.groups[h].size
        solved[h], full = _blocks.heads({g: sims[g] for g in gs}, nb, {g: sims[g].shape[0] // nb for g in gs},
                                        sims.get(h))
        solved.update(full)
    plain = {g: s for g, s in sims.items() if g not in solved}
    # the solver releases the GIL: solve the groups' assignments side by side
    with ThreadPoolExecutor(max_workers=max(1, min(len(plain), os.cpu_count() or 1))) as ex:
        solved.update(zip(plain, ex.map(assign, plain.values())))
    for h in nested:
        if h not in moments:
            p = solved[h]
            perm[h] = p
            diag[h] = {"moved_fraction": float((p != torch.arange(len(p))).float().mean()),
                       "matched_by": "activation (heads of " + ", ".join(nested[h]) + ")"}
    head_of = {g: h for h, gs in nested.items() for g in gs}
    tied_counts: dict[str, int] = {}
    for g, m in moments.items():
        s, p = sims[g], solved[g]
        # units constant on the data (dead ReLUs) cannot be told apart by activations, nor can units whose
        # exchange costs nothing on the similarity (nearly dead units active on the same few inputs): weights
        # decide among them
        dead_a, dead_b = m.constant_units()
        constant = dead_a | dead_b[p]
        tied = _tied_units(s, p).to(constant.device) if g not in head_of else torch.zeros_like(constant)
        tied_counts[g] = int((tied & ~constant).sum())
        rows = (constant | tied).nonzero().squeeze(1).cpu()
        if len(rows) > 1:
            degenerate[g] = rows
        ar = torch.arange(len(p))
        diag[g] = {"similarity_before": float(s[ar, ar].mean()), "similarity_after": float(s[ar, p].mean()),
                   "moved_fraction": float((p != ar).float().mean()), "samples": m.count}
        perm[g] = p
    rest = [g for g in spec.groups if g not in moments and g not in nested]
    log = [{"inputs": seen, "groups_by_activation": len(moments) + len(set(nested) - set(moments)),
            "groups_by_weight": len(rest),
            "constant_units": {g: len(r) - tied_counts.get(g, 0) for g, r in degenerate.items()},
            "tied_units": {g: n for g, n in tied_counts.items() if n}}]
    if rest or degenerate:
        from ._weight import weight_matching

        if rest:
            perm2, diag2, log2 = weight_matching(spec, a.state_dict(), b.state_dict(), groups=rest, init=perm,
                                                 seed=seed, device=device, max_iter=max_iter)
            perm = dict(perm2)
            for g in rest:
                if g in diag2:
                    diag[g] = {**diag2[g], "matched_by": "weight"}
            log += log2
        if degenerate:
            perm2, _, log2 = weight_matching(spec, a.state_dict(), b.state_dict(), groups=list(degenerate),
                                             init=perm, seed=seed, device=device, free_units=degenerate,
                                             max_iter=max_iter)
            perm = dict(perm2)
            log += log2
            for g in degenerate:
                s = sims[g]
                ar = torch.arange(len(perm[g]))
                diag[g].update({"similarity_after": float(s[ar, perm[g]].mean()),
                                "moved_fraction": float((perm[g] != ar).float().mean()),
                                "constant_units": len(degenerate[g]) - tied_counts.get(g, 0)})
                if tied_counts.get(g):
                    diag[g]["tied_units"] = tied_counts[g]
    # how clearly each final assignment beats every other on the activation similarity it was matched by
    # (groups matched by weights carry weight matching's); docs/alignment.md, "How sure is each group?"
    from ._weight import _certainty, _head_certainty

    for g in diag:
        if g in nested:
            diag[g].update(_head_certainty(perm[g], sims.get(g), [(sims[n], perm[n]) for n in nested[g]]))
        elif g in sims:  # (a nested group: over the alternatives inside its heads)
            diag[g].update(_certainty(sims[g], perm[g], perm[head_of[g]] if g in head_of else None))
    return Permutation(perm), diag, log
