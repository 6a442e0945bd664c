"""Activation matching: one pass of each model over the data, streaming cross-moments per group.

Taps: for every group, the graph nodes whose output carries the group on one dim while every other dim
is a sample dim (batch, spatial positions, tokens) — preferring post-nonlinearity activations, then
residual sums, then norm outputs, then layer outputs. Groups without such a tap (attention heads and the
within-head query/key and value dims, whose tensors also carry the head dim) are matched by weight
matching afterwards, with the activation-matched groups held fixed.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from ._solver import assign
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


class _Taps:
    """The exported graph of one input shape, cut down to return the tapped activations."""

    def __init__(self, spec: PermutationSpec, a: nn.Module, b: nn.Module, x: torch.Tensor):
        from ._trace import Propagator, _tied_keys, _tree, export

        ep = export(a, (x,))
        prop = Propagator(ep, _tied_keys(a))
        prop.run()
        gid: dict[int, str] = {}
        mapping: dict[str, str] = {}
        for key, lab in prop.param_labels.items():
            if key in spec.axes:
                for atom, t_spec in zip(lab, spec.axes[key]):
                    _match_trees(_tree(prop.atoms, atom, gid), t_spec, mapping)
        best: dict[str, tuple[int, list[tuple[str, int]]]] = {}
        for node, lab in prop.env.items():
            if node.op != "call_function" or not isinstance(lab, tuple) or not lab:
                continue
            trees = [_tree(prop.atoms, a_, gid) for a_ in lab]
            grouped = [d for d, t in enumerate(trees) if not isinstance(t, int)]
            if len(grouped) != 1 or not isinstance(trees[grouped[0]], str):
                continue
            g = mapping.get(trees[grouped[0]])
            if g is None:
                continue
            cat = _category(prop.opname(node))
            cur = best.get(g)
            if cur is None or cat < cur[0]:
                best[g] = (cat, [(node.name, grouped[0])])
            elif cat == cur[0]:
                cur[1].append((node.name, grouped[0]))
        self.taps = {g: v[1] for g, v in best.items()}
        names = {n for taps in self.taps.values() for n, _ in taps}
        self.order = sorted(names)
        gm = ep.module()
        self.gm_a = _cut(gm, self.order)
        self.gm_b = copy.deepcopy(self.gm_a)
        missing, unexpected = self.gm_b.load_state_dict(b.state_dict(), strict=False)
        if unexpected:
            raise ValueError(f"model B has tensors model A does not ({unexpected[:3]})")

    def run(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        with torch.no_grad():
            oa, ob = self.gm_a(x), self.gm_b(x)
        return dict(zip(self.order, oa)), dict(zip(self.order, ob))


def _cut(gm: torch.fx.GraphModule, names: list[str]) -> torch.fx.GraphModule:
    """A GraphModule computing only what the named nodes need, returning them as a tuple."""
    graph = copy.deepcopy(gm.graph)
    graph._codegen = torch.fx.graph.CodeGen()
    nodes = {n.name: n for n in graph.nodes}
    out = next(n for n in graph.nodes if n.op == "output")
    out.args = (tuple(nodes[n] for n in names),)
    new = torch.fx.GraphModule(gm, graph)
    new.graph.eliminate_dead_code()
    new.recompile()
    new.eval()
    return new


class _Moments:
    """Streaming first/second moments and cross-moments of two activation sets.

    Accumulators are float64; each batch's products are computed in the activations' dtype. Values are
    shifted by the first batch's means before the products (the shifted-data algorithm), which keeps the
    covariance accurate when means are large next to standard deviations (GELU/ReLU outputs).
    """

    def __init__(self, n: int, device):
        z = dict(dtype=torch.float64, device=device)
        self.count = 0
        self.shift_a: torch.Tensor | None = None
        self.shift_b: torch.Tensor | None = None
        self.sa = torch.zeros(n, **z)
        self.sb = torch.zeros(n, **z)
        self.saa = torch.zeros(n, **z)
        self.sbb = torch.zeros(n, **z)
        self.sab = torch.zeros(n, n, **z)

    def update(self, xa: torch.Tensor, xb: torch.Tensor) -> None:
        if self.shift_a is None:
            self.shift_a, self.shift_b = xa.mean(0), xb.mean(0)
        xa, xb = xa - self.shift_a, xb - self.shift_b
        self.count += xa.shape[0]
        self.sa += xa.sum(0).double()
        self.sb += xb.sum(0).double()
        self.saa += (xa * xa).sum(0).double()
        self.sbb += (xb * xb).sum(0).double()
        self.sab += (xa.T @ xb).double()

    def _stats(self):
        n = max(self.count, 1)
        ma, mb = self.sa / n, self.sb / n  # means of the shifted values
        va = (self.saa / n - ma * ma).clamp_min(0)
        vb = (self.sbb / n - mb * mb).clamp_min(0)
        return n, ma, mb, va, vb

    def constant_units(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Units whose activation is (numerically) constant on the data, in A and in B."""
        n, ma, mb, va, vb = self._stats()
        ea = (ma + self.shift_a.double()) ** 2 + va
        eb = (mb + self.shift_b.double()) ** 2 + vb
        return va <= 1e-7 * ea + 1e-30, vb <= 1e-7 * eb + 1e-30

    def similarity(self, kind: str) -> torch.Tensor:
        n, ma, mb, va, vb = self._stats()
        cov = self.sab / n - ma[:, None] * mb[None, :]
        if kind == "pearson":
            da, db = self.constant_units()
            sim = cov / (va.sqrt()[:, None] * vb.sqrt()[None, :]).clamp_min(1e-30)
            sim[da, :] = 0.0
            sim[:, db] = 0.0
            return sim.clamp(-1.0, 1.0)
        sa, sb = self.shift_a.double(), self.shift_b.double()
        ua, ub = ma + sa, mb + sb  # true means
        inner = cov + ua[:, None] * ub[None, :]
        if kind == "inner":
            return inner
        na = (va + ua * ua).sqrt()
        nb = (vb + ub * ub).sqrt()
        return inner / (na[:, None] * nb[None, :]).clamp_min(1e-30)


def _input(batch):
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict) and "input" in batch:
        return batch["input"]
    raise TypeError(f"loader batches must be tensors or (input, target) pairs, got {type(batch).__name__}")


def activation_matching(spec: PermutationSpec, a: nn.Module, b: nn.Module, loader: Iterable, *,
                        num_samples: int | None = None, device=None, progress: bool = False, seed: int = 0,
                        max_iter: int = 100, similarity: str = "pearson"):
    if similarity not in ("pearson", "inner", "cosine"):
        raise ValueError(f"similarity must be 'pearson', 'inner' or 'cosine', got {similarity!r}")
    dev_a = next((p.device for p in a.parameters()), torch.device("cpu"))
    dev_b = next((p.device for p in b.parameters()), torch.device("cpu"))
    if dev_a != dev_b:
        from .errors import SpecMismatchError

        raise SpecMismatchError(f"model A is on {dev_a} and model B on {dev_b}; move both to one device")
    dev = torch.device(device) if device is not None else dev_a
    if dev != dev_a:  # compute where asked, on copies (the caller's models stay where they are)
        a, b = copy.deepcopy(a).to(dev), copy.deepcopy(b).to(dev)
    cache: dict[tuple, _Taps] = {}
    moments: dict[str, _Moments] = {}
    seen = 0
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=num_samples, desc="activation matching (inputs)", leave=False, unit="ex", disable=None)
        except ImportError:
            bar = None
    for batch in loader:
        x = _input(batch).to(dev)
        if num_samples is not None:
            x = x[: num_samples - seen]
        if x.shape[0] == 0:
            break
        shape = tuple(x.shape)
        if shape not in cache:
            try:
                cache[shape] = _Taps(spec, a, b, x)
            except Exception as e:
                raise ValueError(f"a batch of shape {shape} does not fit the model "
                                 f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
        taps = cache[shape]
        oa, ob = taps.run(x)
        for g, lst in taps.taps.items():
            n = spec.groups[g].size
            m = moments.setdefault(g, _Moments(n, dev))
            for name, dim in lst:
                xa = oa[name].movedim(dim, -1).reshape(-1, n)
                xb = ob[name].movedim(dim, -1).reshape(-1, n)
                m.update(xa, xb)
        seen += x.shape[0]
        if bar is not None:
            bar.update(x.shape[0])
        if num_samples is not None and seen >= num_samples:
            break
    if bar is not None:
        bar.close()
    if seen == 0:
        raise ValueError("the loader yielded no inputs")
    perm = {g: torch.arange(grp.size) for g, grp in spec.groups.items()}
    diag = {}
    degenerate: dict[str, torch.Tensor] = {}
    for g, m in moments.items():
        s = m.similarity(similarity)
        p = assign(s)
        # units constant on the data (dead ReLUs) cannot be told apart by activations: weights decide
        dead_a, dead_b = m.constant_units()
        rows = (dead_a | dead_b[p]).nonzero().squeeze(1).cpu()
        if len(rows) > 1:
            degenerate[g] = rows
        ar = torch.arange(len(p))
        diag[g] = {"similarity_before": float(s[ar, ar].mean()), "similarity_after": float(s[ar, p].mean()),
                   "moved_fraction": float((p != ar).float().mean()), "samples": m.count}
        perm[g] = p
    rest = [g for g in spec.groups if g not in moments]
    log = [{"inputs": seen, "groups_by_activation": len(moments), "groups_by_weight": len(rest),
            "constant_units": {g: len(r) for g, r in degenerate.items()}}]
    if rest or degenerate:
        from .align import weight_matching

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
                s = moments[g].similarity(similarity)
                ar = torch.arange(len(perm[g]))
                diag[g].update({"similarity_after": float(s[ar, perm[g]].mean()),
                                "moved_fraction": float((perm[g] != ar).float().mean()),
                                "constant_units": len(degenerate[g])})
    return Permutation(perm), diag, log
