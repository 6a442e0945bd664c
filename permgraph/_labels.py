"""The label algebra of the tracer: atoms per tensor dim and the operations rules use on them."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._atoms import Atoms, StructureError

Label = tuple  # tuple[int, ...]: one atom per dim of a tensor


class Labels:
    """The label algebra: a tensor's label is a tuple of atoms, one per dim, and the rules of
    ``_rules.py`` relate the labels of an op's inputs and outputs through these operations (unify two
    dims, split a dim into factors, broadcast, matmul, reshape, pick an index, freeze). Every frozen atom
    keeps a reason, located at the graph node in progress (``node``).

    ``Propagator`` (``_walk.py``) adds the walk over the exported graph; rules see both as one context.
    """

    def __init__(self) -> None:
        self.atoms = Atoms()
        self.env: dict[torch.fx.Node, object] = {}  # graph node -> its label (a tuple), a list of them, or None
        self.locations: dict[str, tuple[str, str]] = {}  # reason text -> (reason, location), see located()
        self.node: torch.fx.Node | None = None  # the node in progress

    # ------------------------------------------------------------------ reading the graph
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
