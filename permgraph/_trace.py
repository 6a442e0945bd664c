"""Tracing: torch.export -> axis propagation over the ATen graph -> PermutationSpec (-> verification)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Iterable, Iterator, Sequence

import networkx as nx
import torch
from torch import nn
from torch.export.graph_signature import InputKind, OutputKind

from ._atoms import Atoms, StructureError
from ._inputs import (
    _reason,
    describe_inputs,
    kept_modes,
    record_inputs,
    resolve_inputs,
)
from ._rules import lookup
from .errors import TraceError
from .spec import AxisRef, FrozenPart, PermutationSpec

Label = tuple  # tuple[int, ...]


# Strict mode (the test suite sets it): an exception other than StructureError inside a rule is a bug in
# permgraph and raises RuleError, instead of freezing the op with a warning. PERMGRAPH_STRICT_RULES=1 sets it.
STRICT_RULES = os.environ.get("PERMGRAPH_STRICT_RULES", "") not in ("", "0")


class RuleError(RuntimeError):
    """A rule of permgraph failed on an op (a bug: please report it)."""


class RuleWarning(UserWarning):
    """A rule of permgraph failed on an op, which was frozen so that the spec stays correct."""


class Propagator:
    """Walks the exported graph once, labelling every tensor dim with an atom (an fx-Interpreter-like
    pass that needs no real tensors: shapes come from ``node.meta["val"]``)."""

    def __init__(self, exported: torch.export.ExportedProgram, tied: dict[str, str] | None = None):
        self.ep = exported
        self.tied = tied or {}  # state-dict key -> the key it shares storage with
        self.atoms = Atoms()
        self.env: dict[torch.fx.Node, object] = {}
        self.param_labels: dict[str, Label] = {}
        self.unknown_ops: dict[str, int] = {}
        self.locations: dict[str, tuple[str, str]] = {}  # reason text -> (reason, location), see located()
        self.node: torch.fx.Node | None = None

    # ------------------------------------------------------------------ context API used by rules
    def meta(self, node):
        return node.meta.get("val") if isinstance(node, torch.fx.Node) else None

    def shape(self, node) -> tuple[int, ...] | None:
        v = self.meta(node)
        if isinstance(v, torch.Tensor):
            return tuple(int(s) for s in v.shape)
        return None

    def opname(self, node) -> str:
        t = node.target
        if isinstance(t, torch._ops.OpOverload):
            return t.overloadpacket.__name__
        return getattr(t, "__name__", str(t))

    def label(self, arg) -> Label:
        lab = self.env.get(arg)
        if not isinstance(lab, tuple):
            raise StructureError(f"no tensor label for argument {arg}")
        return lab

    def tensor_args(self, node) -> list[torch.fx.Node]:
        out = []
        for a in list(node.args) + list(node.kwargs.values()):
            if isinstance(a, torch.fx.Node) and isinstance(self.env.get(a), tuple):
                out.append(a)
        return out

    def size(self, a: int) -> int:
        return self.atoms.size(a)

    def fresh(self, shape: Sequence[int], frozen: str | None = None) -> Label:
        return tuple(self.atoms.new(int(s), frozen) for s in shape)

    def located(self, why: str, node=None) -> str:
        """The atoms' reason text for ``why`` at ``node`` (default: the node in progress); the reason and its
        location are remembered apart (``locations``), so that FrozenPart gets them as two fields."""
        where = self._where(node)
        msg = f"{why} ({where})"
        self.locations[msg] = (why, where)
        return msg

    def freeze(self, a: int, reason: str) -> None:
        self.atoms.freeze(a, self.located(reason))

    def unify(self, a: int, b: int) -> None:
        try:
            self.atoms.unify(a, b)
        except StructureError as e:
            reason = self.located(f"conflicting structure: {e}")
            self.atoms.freeze(a, reason)
            self.atoms.freeze(b, reason)

    def split(self, a: int, sizes: list[int]) -> list[int]:
        """Refine atom ``a`` into a product of the given sizes; one atom per factor."""
        chunks = self.atoms.split_product(self.atoms.factors(a), sizes)
        return [self.atoms.compose("prod", c) if c else self.atoms.new(1) for c in chunks]

    def select(self, a: int, index: int, reason: str) -> None:
        """Index ``index`` of atom ``a`` is picked out: that position must not move."""
        r = self.atoms.find(a)
        ref = self.atoms.refinement(r)
        if ref is not None and ref.kind == "sum":
            for seg in self.atoms.summands(r):
                n = self.size(seg)
                if index < n:
                    if n > 1:
                        self.select(seg, index, reason)
                    return
                index -= n
        if self.size(r) > 1:
            self.freeze(r, reason)

    def unstack(self, lx: Label, dim: int, reason: str) -> list[Label] | None:
        """Per-slice labels when slicing along ``dim`` can give each slice its own atoms (fused qkv)."""
        maps = self.atoms.unstack(lx[dim], f"{reason} ({self._where()})")
        if maps is None:
            return None
        rest = lx[:dim] + lx[dim + 1:]
        return [tuple(m.get(self.atoms.find(a), a) for a in rest) for m in maps]

    def broadcast(self, labels: list[Label], out_shape: Sequence[int]) -> Label:
        nd = len(out_shape)
        out = []
        for i, size in enumerate(out_shape):
            cands = []
            for lab in labels:
                j = i - (nd - len(lab))
                if j >= 0 and self.size(lab[j]) == size:
                    cands.append(lab[j])
            if cands:
                for c in cands[1:]:
                    self.unify(cands[0], c)
                out.append(cands[0])
            else:
                out.append(self.atoms.new(size))
        return tuple(out)

    def matmul(self, a: Label, b: Label, out_shape) -> Label:
        if len(a) == 1 and len(b) == 1:
            self.unify(a[0], b[0])
            return ()
        if len(a) == 1:
            self.unify(a[0], b[-2])
            return b[:-2] + (b[-1],)
        if len(b) == 1:
            self.unify(a[-1], b[0])
            return a[:-1]
        self.unify(a[-1], b[-2])
        batch = self.broadcast([a[:-2], b[:-2]], out_shape[:-2])
        return batch + (a[-2], b[-1])

    def reshape(self, lx: Label, in_shape, out_shape) -> Label:
        """Reshape: group dims into runs with equal products; within a run, factor the atoms."""
        out: list[int] = []
        i = j = 0
        nin, nout = len(in_shape), len(out_shape)
        while i < nin or j < nout:
            # size-1 dims carry nothing
            if j < nout and out_shape[j] == 1:
                out.append(self.atoms.new(1))
                j += 1
                continue
            if i < nin and in_shape[i] == 1:
                i += 1
                continue
            if i >= nin or j >= nout:
                raise StructureError("reshape sizes do not match")
            ins, outs = [i], [j]
            pi, po = in_shape[i], out_shape[j]
            while pi != po:
                if pi < po:
                    i += 1
                    ins.append(i)
                    pi *= in_shape[i]
                else:
                    j += 1
                    outs.append(j)
                    po *= out_shape[j]
            i += 1
            j += 1
            real_outs = [o for o in outs if out_shape[o] != 1]
            if len(ins) == 1 and len(real_outs) == 1:
                for o in outs:
                    out.append(lx[ins[0]] if out_shape[o] != 1 else self.atoms.new(1))
                continue
            factors = [f for d in ins for f in self.atoms.factors(lx[d])]
            try:
                chunks = self.atoms.split_product(factors, [out_shape[o] for o in real_outs])
            except StructureError as e:
                reason = f"reshape that cuts through structured units ({e}) ({self._where()})"
                for d in ins:
                    self.atoms.freeze(lx[d], reason)
                chunks = [[self.atoms.new(out_shape[o], reason)] for o in real_outs]
            it = iter(chunks)
            for o in outs:
                out.append(self.atoms.new(1) if out_shape[o] == 1 else self.atoms.compose("prod", next(it)))
        return tuple(out)

    def unknown(self, node, reason: str | None = None):
        """An op permgraph does not understand: freeze every atom it touches; fresh frozen outputs."""
        why = reason or f"unsupported op {self.opname(node)}"
        self.unknown_ops[why] = self.unknown_ops.get(why, 0) + 1
        msg = self.located(why, node)

        def freeze_all(x):
            if isinstance(x, tuple):
                for a in x:
                    self.atoms.freeze(a, msg)
            elif isinstance(x, list):
                for y in x:
                    freeze_all(y)

        for a in node.all_input_nodes:
            freeze_all(self.env.get(a))
        return self._fresh_like(self.meta(node), msg)

    def _fresh_like(self, val, frozen):
        if isinstance(val, torch.Tensor):
            return self.fresh(tuple(val.shape), frozen)
        if isinstance(val, (list, tuple)):
            return [self._fresh_like(v, frozen) for v in val]
        return None

    def _where(self, node=None) -> str:
        node = node or self.node
        if node is None:
            return "?"
        stack = node.meta.get("nn_module_stack")
        mod = ""
        if stack:
            mod = list(stack.values())[-1][0]
        return f"node {node.name}" + (f" in {mod}" if mod else "")

    # ------------------------------------------------------------------ the walk
    def run(self) -> None:
        sig = self.ep.graph_signature
        specs = {s.arg.name: s for s in sig.input_specs if hasattr(s.arg, "name")}
        for node in self.ep.graph.nodes:
            self.node = node
            if node.op == "placeholder":
                self.env[node] = self._placeholder(node, specs.get(node.name))
            elif node.op == "call_function":
                self.env[node] = self._call(node)
            elif node.op == "output":
                self._outputs(node)
            else:
                self.env[node] = self._fresh_like(self.meta(node), f"{node.op} node {node.name}")

    def _placeholder(self, node, spec):
        val = self.meta(node)
        if not isinstance(val, torch.Tensor):
            return None
        shape = tuple(val.shape)
        if spec is None:
            return self.fresh(shape, f"input {node.name}")
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and getattr(spec, "persistent", True) is not False:
            canon = self.tied.get(spec.target)
            if canon is not None and canon in self.param_labels:  # tied weights: one tensor, one label
                return self.param_labels[canon]
            lab = self.fresh(shape)
            self.param_labels[spec.target] = lab
            return lab
        if spec.kind == InputKind.USER_INPUT:
            return self.fresh(shape, "model input")
        return self.fresh(shape, f"constant tensor {spec.target} is not in the state dict")

    def _call(self, node):
        fn = lookup(node.target)
        if fn is None:
            if self.meta(node) is None or not node.all_input_nodes:
                return None
            return self.unknown(node)
        try:
            out = fn(self, node)
        except StructureError as e:  # the rule's own verdict: these axes cannot be tracked through the op
            return self.unknown(node, f"{self.opname(node)}: {e}")
        except (IndexError, TypeError, ValueError, KeyError, AttributeError) as e:
            # a bug in the rule (or an op signature it does not expect): loud in strict mode (the test suite),
            # otherwise the op is frozen, so the spec stays correct, and the failure is reported
            if STRICT_RULES:
                raise RuleError(f"permgraph's rule for {self.opname(node)} failed at {self._where(node)}: "
                                f"{type(e).__name__}: {e}") from e
            why = (f"{self.opname(node)}: permgraph's rule failed ({type(e).__name__}: {e}); frozen, please "
                   "report it")
            warnings.warn(f"{why} ({self._where(node)})", RuleWarning, stacklevel=2)
            return self.unknown(node, why)
        if not self._shapes_match(out, self.meta(node)):
            return self.unknown(node, f"{self.opname(node)}: propagated shape disagrees with the graph")
        return out

    def _shapes_match(self, lab, val) -> bool:
        if isinstance(val, torch.Tensor):
            return isinstance(lab, tuple) and tuple(self.size(a) for a in lab) == tuple(val.shape)
        if isinstance(val, (list, tuple)):
            return isinstance(lab, list) and len(lab) == len(val) and all(
                self._shapes_match(a, v) for a, v in zip(lab, val))
        return lab is None or not isinstance(lab, tuple)

    def _outputs(self, node):
        sig = self.ep.graph_signature
        outs = node.args[0]
        for spec, arg in zip(sig.output_specs, outs):
            lab = self.env.get(arg) if isinstance(arg, torch.fx.Node) else None
            if spec.kind == OutputKind.BUFFER_MUTATION and spec.target in self.param_labels and isinstance(lab, tuple):
                for a, b in zip(self.param_labels[spec.target], lab):
                    self.unify(a, b)
            elif isinstance(lab, tuple):
                for a in lab:
                    self.atoms.freeze(a, "model output")


# ---------------------------------------------------------------------------------------------- spec
def _tree(atoms: Atoms, a: int, gid: dict[int, str]):
    kind, payload = atoms.tree(a)
    if kind == "leaf":
        r = payload
        n = atoms.size(r)
        if n <= 1 or atoms.frozen(r) is not None:
            return n
        if r not in gid:
            gid[r] = f"g{len(gid)}"
        return gid[r]
    kids = [_tree(atoms, c, gid) for c in payload]
    if all(isinstance(k, int) for k in kids):
        out = 1
        for k in kids:
            out = out * k if kind == "prod" else out + k
        return out if kind == "prod" else sum(kids)
    merged: list = []
    for k in kids:
        if kind == "prod" and k == 1:
            continue
        if kind == "sum" and k == 0:
            continue
        if isinstance(k, int) and merged and isinstance(merged[-1], int):
            merged[-1] = merged[-1] * k if kind == "prod" else merged[-1] + k
        else:
            merged.append(k)
    return merged[0] if len(merged) == 1 else {kind: merged}


def _frozen_leaves(atoms: Atoms, a: int, out: set[int]) -> None:
    kind, payload = atoms.tree(a)
    if kind == "leaf":
        if atoms.size(payload) > 1 and atoms.frozen(payload) is not None:
            out.add(payload)
    else:
        for c in payload:
            _frozen_leaves(atoms, c, out)


def _label_groups(atoms: Atoms, lab, gid: dict[int, str]) -> set[str]:
    """The group ids found anywhere in a label's axis trees."""
    out: set[str] = set()
    stack = list(lab)
    while stack:
        kind, payload = atoms.tree(stack.pop())
        if kind == "leaf":
            if payload in gid:
                out.add(gid[payload])
        else:
            stack.extend(payload)
    return out


def nest_plan(prop: Propagator, trees: Iterable[list], gid: dict[int, str]) -> dict[str, str]:
    """Which groups are the dims inside attention heads, each with its own permutation per head.

    A group ``g`` whose every occurrence in the parameters' axis trees is ``{"prod": [h, g]}`` for one
    group ``h`` (heads x head dims, from a reshape) gets, by the Kronecker form, the same permutation in
    every head: valid, but a subgroup of the symmetry. Each head may reorder its own dims as long as
    nothing compares dim ``d`` of one head with dim ``d`` of another: that holds when every tensor of the
    graph (parameters and activations) that carries ``g`` also carries ``h``, so that every value indexed
    by a head dim is also indexed by its head. A norm weight of size d shared by all heads, a mean over
    heads, a broadcast of one head's dims to all heads each carry ``g`` without ``h`` and keep the shared
    form. Returns ``{g: h}`` for the groups that can be nested (verification still checks the result).
    """
    under: dict[str, set[str]] = {}
    bare: set[str] = set()

    def walk(t) -> None:
        if isinstance(t, str):
            bare.add(t)
        elif isinstance(t, dict):
            kind, kids = next(iter(t.items()))
            if (kind == "prod" and len(kids) == 2 and all(isinstance(k, str) for k in kids)
                    and kids[0] != kids[1]):
                under.setdefault(kids[1], set()).add(kids[0])
                bare.add(kids[0])
                return
            for k in kids:
                walk(k)

    for ts in trees:
        for t in ts:
            walk(t)
    plan = {g: next(iter(hs)) for g, hs in under.items() if len(hs) == 1 and g not in bare}
    plan = {g: h for g, h in plan.items() if h not in plan and g not in plan.values()}
    if not plan:
        return plan
    for lab in prop.env.values():
        if not isinstance(lab, tuple) or not plan:
            continue
        present = _label_groups(prop.atoms, lab, gid)
        for g in [g for g in plan if g in present and plan[g] not in present]:
            del plan[g]
    return plan


def apply_nest(tree, plan: dict[str, str]):
    """``tree`` with every ``{"prod": [h, g]}`` of a nested group ``g`` (``plan[g] == h``) replaced by ``g``."""
    if isinstance(tree, dict):
        kind, kids = next(iter(tree.items()))
        if kind == "prod" and len(kids) == 2 and isinstance(kids[1], str) and plan.get(kids[1]) == kids[0]:
            return kids[1]
        return {kind: [apply_nest(k, plan) for k in kids]}
    return tree


def build_spec(prop: Propagator, model: nn.Module, info: dict, input_shapes: tuple = (),
               nested_heads: bool = True) -> PermutationSpec:
    atoms = prop.atoms
    state = model.state_dict(keep_vars=True)
    aliases: dict[str, str] = dict(prop.tied)
    gid: dict[int, str] = {}
    axes: dict[str, list] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    frozen_axes: dict[int, list[AxisRef]] = {}
    unused_reason = "not used by the traced forward pass"
    unused: list[AxisRef] = []
    for key, t in state.items():
        shape = tuple(t.shape)
        if key in aliases:
            continue
        lab = prop.param_labels.get(key)
        if lab is None:
            shapes[key] = shape
            axes[key] = list(shape)
            unused.extend(AxisRef(key, d) for d, s in enumerate(shape) if s > 1)
            continue
        shapes[key] = shape
        axes[key] = [_tree(atoms, a, gid) for a in lab]
        for d, a in enumerate(lab):
            leaves: set[int] = set()
            _frozen_leaves(atoms, a, leaves)
            for r in leaves:
                frozen_axes.setdefault(r, []).append(AxisRef(key, d))
    frozen = []
    for r, ax in frozen_axes.items():
        reason, where = prop.locations.get(atoms.frozen(r) or "frozen", (atoms.frozen(r) or "frozen", ""))
        frozen.append(FrozenPart(atoms.size(r), reason, tuple(ax), where))
    if unused:
        frozen.append(FrozenPart(0, unused_reason, tuple(unused)))
    group_sizes = {g: atoms.size(r) for r, g in gid.items()}
    graph = _coupling_graph(prop, gid)
    plan = nest_plan(prop, axes.values(), gid) if nested_heads else {}
    if plan:
        axes = {k: [apply_nest(t, plan) for t in ts] for k, ts in axes.items()}
        for g, h in plan.items():
            group_sizes[g] *= group_sizes[h]
            graph.nodes[g].update(size=group_sizes[g], blocks=h)
    return PermutationSpec.from_axes(axes, shapes, group_sizes, frozen, aliases, info, graph,
                                     input_shapes=input_shapes, blocks=plan)


def _coupling_graph(prop: Propagator, gid: dict[int, str]) -> nx.Graph:
    """Nodes: every tensor axis of the graph (AxisRef) and every group; an edge joins an axis to each
    group that acts on it. Parameters are named by state-dict key, activations by node name."""
    g = nx.Graph()
    for r, name in gid.items():
        g.add_node(name, kind="group", size=prop.atoms.size(r))
    names = {}
    for key, lab in prop.param_labels.items():
        names[id(lab)] = key

    def groups_of(a: int) -> set[str]:
        out: set[str] = set()
        stack = [a]
        while stack:
            kind, payload = prop.atoms.tree(stack.pop())
            if kind == "leaf":
                if payload in gid and prop.atoms.frozen(payload) is None:
                    out.add(gid[payload])
            else:
                stack.extend(payload)
        return out

    for node, lab in prop.env.items():
        if not isinstance(lab, tuple):
            continue
        tname = names.get(id(lab), node.name)
        kind = "param" if id(lab) in names else "activation"
        for d, a in enumerate(lab):
            ref = AxisRef(tname, d)
            gs = groups_of(a)
            if gs:
                g.add_node(ref, kind=kind)
                for name in gs:
                    g.add_edge(ref, name)
    return g


# ---------------------------------------------------------------------------------------------- public
# torch.export's failures print the partial graph to stderr (twice) and log through torch's loggers; the
# TraceError already says what failed, so that output is held back while permgraph exports
_EXPORT_LOCK = threading.RLock()
_LOGGERS = ("torch", "torch.export", "torch._export", "torch._dynamo", "torch.fx.experimental.symbolic_shapes",
            "torch._subclasses.fake_tensor", "torch._functorch.aot_autograd")


def _torch_logger_names() -> list[str]:
    try:  # every logger torch gives its own handler (they do not propagate to "torch")
        from torch._logging._internal import log_registry

        return sorted(set(_LOGGERS) | set(log_registry.get_log_qnames()))
    except Exception:  # pragma: no cover - private torch API moved
        return list(_LOGGERS)


class _Held(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class _ThreadStderr:
    """sys.stderr for the duration of an export: this thread's writes are held, other threads' pass."""

    def __init__(self, real) -> None:
        self.real, self.thread, self.held = real, threading.get_ident(), io.StringIO()

    def write(self, s: str) -> int:
        return (self.held if threading.get_ident() == self.thread else self.real).write(s)

    def flush(self) -> None:
        self.real.flush()

    def __getattr__(self, name):
        return getattr(self.real, name)


@contextlib.contextmanager
def _quiet_torch() -> Iterator[list[str]]:
    """Hold back what torch logs or prints to stderr while the body runs. The held text is appended to
    the yielded list; on success it is passed on unchanged (replayed), on an exception it is not printed.
    With ``TORCH_LOGS`` set (the user asked for torch's logs) nothing is held."""
    details: list[str] = []
    if os.environ.get("TORCH_LOGS"):
        yield details
        return
    with _EXPORT_LOCK:
        held = _Held()
        saved = []
        for name in _torch_logger_names():
            lg = logging.getLogger(name)
            saved.append((lg, lg.handlers, lg.propagate))
            lg.handlers, lg.propagate = [held], False
        real_stderr = sys.stderr
        err = _ThreadStderr(real_stderr)
        sys.stderr = err
        failed = True
        try:
            yield details
            failed = False
        finally:
            if sys.stderr is err:
                sys.stderr = real_stderr
            for lg, handlers, propagate in saved:
                lg.handlers, lg.propagate = handlers, propagate
            mine = threading.get_ident()
            fmt = logging.Formatter("%(levelname)s %(name)s: %(message)s")
            for rec in held.records:
                if failed and rec.thread == mine:
                    details.append(fmt.format(rec))
                else:
                    logging.getLogger(rec.name).handle(rec)
            if failed:
                details.append(err.held.getvalue())
            else:
                real_stderr.write(err.held.getvalue())


def _user_location(e: BaseException) -> str:
    """``file:line in function: code`` of the user's code where tracing failed, if it can be found."""
    m = re.search(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(\S[^\n]*)', str(e))
    if m:
        return f"{m.group(1)}:{m.group(2)} in {m.group(3)}: {m.group(4).strip()}"
    torch_dir = os.path.dirname(torch.__file__)
    here = os.path.dirname(os.path.abspath(__file__))
    py_dir = os.path.dirname(os.__file__)
    for fr in reversed(traceback.extract_tb(e.__traceback__)):
        f = os.path.abspath(fr.filename)
        if not f.startswith((torch_dir, here, py_dir)) and "site-packages" not in f and not f.startswith("<"):
            return f"{fr.filename}:{fr.lineno} in {fr.name}: {(fr.line or '').strip()}"
    return ""


@contextlib.contextmanager
def _without_caches(model: nn.Module):
    """Hugging Face models return a key/value cache object (``DynamicCache``) with their outputs when
    ``config.use_cache`` is on; torch.export cannot return it, and it does not change the function of one
    forward pass. Switched off inside the block (every submodule's config), put back afterwards."""
    saved = []
    for m in model.modules():
        config = getattr(m, "config", None)
        if getattr(config, "use_cache", None) is True:
            saved.append(config)
            config.use_cache = False
    try:
        yield
    finally:
        for config in saved:
            config.use_cache = True


def export(model: nn.Module, example_inputs: tuple, guessed: bool = False) -> torch.export.ExportedProgram:
    """torch.export in eval mode, restoring the caller's train/eval flags afterwards. A failure raises one
    short ``TraceError`` (torch's own log output is in its ``details`` attribute, not printed)."""
    details: list[str] = []
    try:
        with _quiet_torch() as details, kept_modes(model), _without_caches(model), torch.no_grad(), \
                warnings.catch_warnings():
            # nn.LSTM/GRU/RNN reassign their ``_flat_weights`` list while exported; torch warns about it,
            # harmlessly (the weights are the module's parameters and reach the graph as such)
            warnings.filterwarnings("ignore", message=r"The tensor attributes .*_flat_weights")
            model.eval()
            return torch.export.export(model, example_inputs, strict=False)
    except Exception as e:  # torch.export raises many types; re-raise as one permgraph error
        failure = e
    name = type(model).__name__
    where = _user_location(failure)
    shapes = describe_inputs(record_inputs(tuple(example_inputs))) or "not all tensors"
    if "data-dependent" in str(failure).lower() or "DataDependent" in type(failure).__name__:
        what = ("the forward pass branches on tensor values (if/while on a tensor, .item()), which torch.export "
                "cannot capture: rewrite it with torch.where or torch.cond")
    else:
        what = "permgraph needs a model torch.export can capture, and example inputs the model accepts"
    given = (f"the example inputs were guessed ({shapes}): if they are wrong, pass the right ones, e.g. "
             "permgraph.trace(model, (torch.randn(4, 40),))" if guessed else f"the example inputs were {shapes}")
    err = TraceError(
        f"torch.export could not trace {name}: {type(failure).__name__}: {_reason(failure)}\n"
        + (f"  at {where}\n" if where else "")
        + f"{what}; {given}. If {name} is a standard architecture, please report it.")
    err.details = "\n".join(d for d in details if d.strip())
    raise err from failure


def _tied_keys(model: nn.Module) -> dict[str, str]:
    """State-dict keys that share storage with an earlier key (tied weights): key -> first key."""
    first: dict[tuple, str] = {}
    tied: dict[str, str] = {}
    for k, t in model.state_dict(keep_vars=True).items():
        if t.numel() == 0:
            continue
        sig = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if sig in first:
            tied[k] = first[sig]
        else:
            first[sig] = k
    return tied


def trace(model: nn.Module, example_inputs=None, *, verify: bool = True, freeze: Iterable[str] = (),
          seed: int = 0, nested_heads: bool = True) -> PermutationSpec:
    """Trace ``model`` into a verified PermutationSpec.

    Args:
        model: any ``nn.Module`` that ``torch.export`` can capture. It is traced in eval mode and is not
            changed (its train/eval flags are restored).
        example_inputs: a tensor or a tuple of positional inputs. Inferred when omitted (permgraph zoo
            models, timm ``pretrained_cfg["input_size"]``, else the first Linear/Conv layer). Their shapes
            and dtypes (not their values) are kept in ``spec.input_shapes``, so that ``check_equivalence``
            and ``from_json(model=...)`` can build inputs like them later.
        verify: apply a random permutation of every group to a copy with randomised norm statistics and
            affine parameters, and check the output is unchanged; groups that change it are found by
            bisection, frozen and reported. The returned spec always preserves the function.
        freeze: glob patterns of state-dict keys (or module-name prefixes) whose axes must not move,
            e.g. ``["fc.*"]`` or ``["head"]``.
        seed: seed of the verification's random permutation.
        nested_heads: give every attention head its own permutation of its query/key dims and of its
            value/output dims, with the heads permuted as wholes (the full symmetry; ``Group.blocks``).
            False keeps one permutation of the head dims shared by all heads (a subgroup).

    Raises:
        TraceError: ``torch.export`` failed (one short message: torch's reason, where in the model's code,
            what to do; torch's own log output is in the error's ``details``, not printed), or no example
            inputs were given and none can be inferred.

    Example:
        >>> import permgraph
        >>> spec = permgraph.trace(permgraph.models.create("mlp", width=16, depth=2))
        >>> len(spec.groups)
        2
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"trace() takes an nn.Module, not {type(model).__name__}")
    inputs = resolve_inputs(model, example_inputs)
    t0 = time.perf_counter()
    ep = export(model, inputs, guessed=example_inputs is None)
    t1 = time.perf_counter()
    prop = Propagator(ep, _tied_keys(model))
    prop.run()
    info = {"model": type(model).__name__,
            "example_input_shapes": [list(x.shape) for x in inputs if isinstance(x, torch.Tensor)],
            "unsupported_ops": dict(prop.unknown_ops)}
    spec = build_spec(prop, model, info, record_inputs(inputs), nested_heads)
    freeze = list(freeze)
    if freeze:
        spec = spec.freeze_keys(freeze, f"frozen by trace(freeze={freeze})")
    t2 = time.perf_counter()
    if verify:
        from ._verify import verify_and_repair

        spec = verify_and_repair(spec, model, inputs, seed=seed)
    t3 = time.perf_counter()
    return spec.with_info(timings={"export_s": round(t1 - t0, 4), "propagate_s": round(t2 - t1, 4),
                                   "verify_s": round(t3 - t2, 4)})
