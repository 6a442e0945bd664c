"""The axis algebra: atoms, their unification, and their refinement into products and sums.

An *atom* is an index set that one permutation acts on. Every dimension of every tensor in a traced
graph is labelled with one atom. Atoms are unified when an op couples two dimensions (union-find), and
*refined* when an op reveals structure inside them:

* ``prod``: a reshape splits a dimension of size ``n = n1 * n2`` into ``(n1, n2)``, or a flatten merges
  dimensions. The permutation of the whole is the Kronecker product of the children's permutations
  (row-major: the first child is the outermost).
* ``sum``: a concatenation or a split. The permutation of the whole is block-diagonal.

Only leaves that are not frozen become permutation groups. Freezing an atom freezes everything inside it.
Refining an atom only ever *restricts* its symmetry to a subgroup, so every refinement is safe.
"""

from __future__ import annotations

from dataclasses import dataclass


class StructureError(Exception):
    """Two structures cannot be reconciled; the caller freezes what is involved."""


@dataclass
class _Refinement:
    kind: str  # "prod" | "sum"
    children: list[int]


class Atoms:
    """Union-find over atoms with optional product/sum refinement on representatives."""

    def __init__(self) -> None:
        self._parent: list[int] = []
        self._size: list[int] = []
        self._ref: list[_Refinement | None] = []
        self._frozen: list[str | None] = []
        self._touched: set[int] = set()  # roots that were ever unified with another atom
        self._owner: dict[int, int] = {}  # child atom -> the atom whose refinement created it
        self._links: dict[int, list[int]] = {}  # uniform atom -> its per-slice instances (see unstack)
        self._stacks: dict[int, list[dict[int, int]]] = {}  # stack atom -> per-slice atom mappings

    # ------------------------------------------------------------------ basics
    def new(self, size: int, frozen: str | None = None) -> int:
        i = len(self._parent)
        self._parent.append(i)
        self._size.append(int(size))
        self._ref.append(None)
        self._frozen.append(frozen if size > 1 else None)
        return i

    def find(self, a: int) -> int:
        root = a
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[a] != root:
            self._parent[a], a = root, self._parent[a]
        return root

    def size(self, a: int) -> int:
        return self._size[self.find(a)]

    def refinement(self, a: int) -> _Refinement | None:
        return self._ref[self.find(a)]

    def frozen(self, a: int) -> str | None:
        return self._frozen[self.find(a)]

    def is_leaf(self, a: int) -> bool:
        return self._ref[self.find(a)] is None

    # ------------------------------------------------------------------ freezing
    def freeze(self, a: int, reason: str) -> None:
        stack = [a]
        while stack:
            r = self.find(stack.pop())
            if self._size[r] <= 1:
                continue
            if self._frozen[r] is None:
                self._frozen[r] = reason
            stack.extend(c for c in self._links.get(r, ()) if self.frozen(c) is None)
            ref = self._ref[r]
            if ref is not None:
                stack.extend(c for c in ref.children if self.frozen(c) is None)

    # ------------------------------------------------------------------ refinement
    def _refine(self, a: int, kind: str, sizes: list[int]) -> list[int]:
        r = self.find(a)
        assert self._ref[r] is None, "only leaves can be refined"
        reason = self._frozen[r]
        children = [self.new(s, reason) for s in sizes]
        for c in children:
            self._owner[c] = r
        self._ref[r] = _Refinement(kind, children)
        for inst in self._links.pop(r, []):  # structure on a uniform atom: slices follow it
            self.unify(inst, r)
        return children

    def factors(self, a: int) -> list[int]:
        """Flatten nested products: the row-major factor list of ``a`` (size-1 factors dropped)."""
        r = self.find(a)
        if self._size[r] <= 1:
            return []
        ref = self._ref[r]
        if ref is None or ref.kind != "prod":
            return [r]
        out: list[int] = []
        for c in ref.children:
            out.extend(self.factors(c))
        return out

    def summands(self, a: int) -> list[int]:
        """Flatten nested sums: the segments of ``a`` in order (empty segments dropped)."""
        r = self.find(a)
        ref = self._ref[r]
        if ref is None or ref.kind != "sum":
            return [r] if self._size[r] > 0 else []
        out: list[int] = []
        for c in ref.children:
            out.extend(self.summands(c))
        return out

    def split_product(self, factors: list[int], sizes: list[int]) -> list[list[int]]:
        """Partition a row-major factor list into consecutive chunks of the given sizes.

        Leaf factors are split (refined into products) where a boundary falls inside them. Raises
        StructureError when a boundary falls inside a non-leaf factor or does not divide it.
        """
        queue = [f for f in factors if self.size(f) > 1]
        out: list[list[int]] = []
        for target in sizes:
            chunk: list[int] = []
            prod = 1
            while prod < target:
                if not queue:
                    raise StructureError("sizes do not match")
                f = queue.pop(0)
                s = self.size(f)
                if target % (prod * s) == 0:
                    chunk.append(f)
                    prod *= s
                    continue
                need = target // prod
                if target % prod or s % need or not self.is_leaf(f):
                    raise StructureError(f"cannot split a factor of size {s} to size {need}")
                head, tail = self._refine(f, "prod", [need, s // need])
                chunk.append(head)
                queue.insert(0, tail)
                prod *= need
            if prod != target:
                raise StructureError("sizes do not match")
            out.append(chunk)
        if queue:
            raise StructureError("sizes do not match")
        return out

    def split_sum(self, a: int, sizes: list[int]) -> list[int]:
        """Split atom ``a`` into consecutive segments of the given sizes; returns one atom per segment.

        A leaf is refined into a sum; an existing sum is regrouped when the boundaries agree.
        """
        sizes = [int(s) for s in sizes]
        if sum(sizes) != self.size(a):
            raise StructureError("segment sizes do not add up")
        nonempty = [s for s in sizes if s > 0]
        if len(nonempty) == 1:
            return [a if s > 0 else self.new(0) for s in sizes]
        segs = self.summands(a)
        if len(segs) == 1 and self.is_leaf(segs[0]):
            children = iter(self._refine(segs[0], "sum", nonempty))
            return [next(children) if s > 0 else self.new(0) for s in sizes]
        out: list[int] = []
        queue = list(segs)
        for target in sizes:
            if target == 0:
                out.append(self.new(0))
                continue
            chunk: list[int] = []
            total = 0
            while total < target:
                if not queue:
                    raise StructureError("segment sizes do not add up")
                seg = queue.pop(0)
                s = self.size(seg)
                if total + s <= target:
                    chunk.append(seg)
                    total += s
                    continue
                if not self.is_leaf(seg):
                    raise StructureError("a split falls inside a structured segment")
                head, tail = self._refine(seg, "sum", [target - total, s - (target - total)])
                chunk.append(head)
                queue.insert(0, tail)
                total = target
            if len(chunk) == 1:
                out.append(chunk[0])
            else:
                out.append(self.compose("sum", chunk))
        return out

    def compose(self, kind: str, children: list[int]) -> int:
        """A new atom that is the product or sum of ``children`` (a single child is returned as is)."""
        kids = [c for c in children if self.size(c) != (1 if kind == "prod" else 0)]
        if len(kids) == 1:
            return kids[0]
        if kind == "prod":
            size = 1
            for c in kids:
                size *= self.size(c)
        else:
            size = sum(self.size(c) for c in kids)
        a = self.new(size)
        if size > 1 and kids:
            self._ref[a] = _Refinement(kind, [self.find(c) for c in kids])
        return a

    # ------------------------------------------------------------------ unification
    def unify(self, a: int, b: int) -> None:
        """Make ``a`` and ``b`` one atom. Raises StructureError when their structures conflict
        (the caller then freezes both)."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self._size[ra] != self._size[rb]:
            raise StructureError(f"sizes differ ({self._size[ra]} vs {self._size[rb]})")
        if self._size[ra] <= 1:
            self._parent[rb] = ra
            return
        self._touched.update((ra, rb))
        linked = self._links.pop(ra, []) + self._links.pop(rb, [])
        fa, fb = self._ref[ra], self._ref[rb]
        reason = self._frozen[ra] or self._frozen[rb]
        if fa is None and fb is not None:
            ra, rb, fa, fb = rb, ra, fb, fa
        # ra keeps its refinement (if any); rb joins it.
        self._parent[rb] = ra
        pairs: list[tuple[int, int]] = []
        if fa is not None and fb is not None:
            if fa.kind != fb.kind:
                raise StructureError("a product meets a sum")
            if fa.kind == "prod":
                xs, ys = self.factors(ra), self._factors_of(fb)
                bounds = _common_sizes([self.size(x) for x in xs], [self.size(y) for y in ys])
                cx = self.split_product(xs, bounds)
                cy = self.split_product(ys, bounds)
                pairs = [(p[0], q[0]) for p, q in zip(cx, cy)]
            else:
                xs, ys = self.summands(ra), self._summands_of(fb)
                if [self.size(x) for x in xs] != [self.size(y) for y in ys]:
                    raise StructureError("concatenations with different segment sizes")
                pairs = list(zip(xs, ys))
        if reason is not None:
            self.freeze(ra, reason)
        for x, y in pairs:
            self.unify(x, y)
        for inst in linked:  # a uniform atom got constrained: its slices must follow
            self.unify(inst, ra)

    # ------------------------------------------------------------------ stacks
    def unstack(self, s: int, reason: str) -> list[dict[int, int]] | None:
        """Turn ``X = prod(S, R)`` into ``X = sum(R_0, ..., R_{|S|-1})`` when a select/unbind picks slices
        along ``S`` (a fused qkv projection reshaped to (3, heads, dim) and unbound, for example).

        The Kronecker form ties every slice to one permutation of ``R``; after the select the slices are
        used separately, so each gets its own copy of ``R``'s atoms. Valid only while ``S`` and ``R``'s
        atoms were never coupled to anything else; if the uniform ``R`` is coupled later, the copies are
        unified back with it (``_links``). Returns one mapping (uniform atom -> slice atom) per slice,
        or None when the conversion does not apply.
        """
        r = self.find(s)
        if r in self._stacks:
            return self._stacks[r]
        owner = self._owner.get(r)
        if owner is None or r in self._touched or self._frozen[r] is not None:
            return None
        x = self.find(owner)
        ref = self._ref[x]
        if ref is None or ref.kind != "prod" or self.find(ref.children[0]) != r or len(ref.children) < 2:
            return None
        rest = ref.children[1:]
        subtree: list[int] = []
        stack = list(rest)
        while stack:
            a = self.find(stack.pop())
            if a in self._touched or a in self._links or self._frozen[a] is not None:
                return None
            subtree.append(a)
            if self._ref[a] is not None:
                stack.extend(self._ref[a].children)
        mappings: list[dict[int, int]] = []
        slices: list[int] = []
        for _ in range(self._size[r]):
            mapping: dict[int, int] = {}
            copies = [self._copy(c, mapping) for c in rest]
            slices.append(copies[0] if len(copies) == 1 else self.compose("prod", copies))
            mappings.append(mapping)
        for a in subtree:
            self._links[a] = [m[a] for m in mappings]
        self._ref[x] = _Refinement("sum", [self.find(c) for c in slices])
        for c in slices:
            self._owner[self.find(c)] = x
        self._frozen[r] = reason
        self._stacks[r] = mappings
        return mappings

    def _copy(self, a: int, mapping: dict[int, int]) -> int:
        r = self.find(a)
        c = self.new(self._size[r])
        mapping[r] = c
        ref = self._ref[r]
        if ref is not None:
            kids = [self._copy(k, mapping) for k in ref.children]
            self._ref[c] = _Refinement(ref.kind, kids)
            for k in kids:
                self._owner[k] = c
        return c

    def _factors_of(self, ref: _Refinement) -> list[int]:
        out: list[int] = []
        for c in ref.children:
            out.extend(self.factors(c))
        return out

    def _summands_of(self, ref: _Refinement) -> list[int]:
        out: list[int] = []
        for c in ref.children:
            out.extend(self.summands(c))
        return out

    # ------------------------------------------------------------------ export
    def tree(self, a: int):
        """One level of structure: ``("leaf", root)``, or ``("prod" | "sum", [child atoms])``."""
        r = self.find(a)
        ref = self._ref[r]
        if ref is None or self._size[r] <= 1:
            return ("leaf", r)
        return (ref.kind, list(ref.children))


def _common_sizes(xs: list[int], ys: list[int]) -> list[int]:
    """The coarsest common refinement of two factorizations of the same number, as factor sizes."""
    out: list[int] = []
    xs, ys = list(xs), list(ys)
    while xs and ys:
        x, y = xs[0], ys[0]
        if x == y:
            out.append(x)
            xs.pop(0)
            ys.pop(0)
        elif x % y == 0:
            out.append(y)
            xs[0] = x // y
            ys.pop(0)
        elif y % x == 0:
            out.append(x)
            ys[0] = y // x
            xs.pop(0)
        else:
            raise StructureError("factorizations have no common refinement")
    if xs or ys:
        raise StructureError("factorizations differ in size")
    return out
