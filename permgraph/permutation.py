"""Permutations of a spec's groups, and applying them to models and state dicts.

Convention (used everywhere in permgraph): a permutation ``p`` of a group maps *new* index ``i`` to
*old* index ``p[i]``, i.e. ``new = old[p]`` along every axis the group acts on. Hence
``apply(apply(x, p), q) == apply(x, compose(p, q))`` with ``compose(p, q)[g] = p[g][q[g]]``, and
``inverse(p)[g] = argsort(p[g])``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from .errors import SpecMismatchError
from .spec import PermutationSpec, Tree, tree_size


class Permutation(Mapping[str, torch.Tensor]):
    """One permutation (a 1-D LongTensor) per group id; validated to be bijections on construction."""

    def __init__(self, perms: Mapping[str, torch.Tensor | list[int]]):
        self._p: dict[str, torch.Tensor] = {}
        for g, p in perms.items():
            t = torch.as_tensor(p, dtype=torch.long).detach().cpu()
            if t.ndim != 1:
                raise ValueError(f"permutation of group {g!r} must be 1-D, got shape {tuple(t.shape)}")
            if not torch.equal(torch.sort(t).values, torch.arange(t.numel())):
                raise ValueError(f"permutation of group {g!r} is not a bijection of 0..{t.numel() - 1}")
            self._p[g] = t

    def __getitem__(self, g: str) -> torch.Tensor:
        return self._p[g]

    def __iter__(self) -> Iterator[str]:
        return iter(self._p)

    def __len__(self) -> int:
        return len(self._p)

    def __repr__(self) -> str:
        moved = sum(int((p != torch.arange(p.numel())).sum()) for p in self._p.values())
        total = sum(p.numel() for p in self._p.values())
        return f"Permutation({len(self._p)} groups, {moved}/{total} units moved)"

    def inverse(self) -> Permutation:
        return inverse(self)

    def is_identity(self) -> bool:
        return all(torch.equal(p, torch.arange(p.numel())) for p in self._p.values())


def expand_blocks(head: torch.Tensor, block: int) -> torch.Tensor:
    """The permutation of ``len(head) * block`` units that moves whole blocks by ``head`` (no reordering
    inside a block): ``out[h * block + d] = head[h] * block + d``."""
    head = torch.as_tensor(head, dtype=torch.long)
    return (head[:, None] * block + torch.arange(block)[None, :]).reshape(-1)


def nest(head: torch.Tensor, inner: torch.Tensor, block: int) -> torch.Tensor:
    """A nested group's permutation from the head permutation and a block-diagonal ``inner`` one
    (``inner[h*block + d] = h*block + tau_h[d]``): block ``h`` takes old block ``head[h]``, reordered by
    that old head's own ``tau``. Inverse of ``unnest``."""
    head = torch.as_tensor(head, dtype=torch.long)
    inner = torch.as_tensor(inner, dtype=torch.long).view(len(head), block)
    within = inner - torch.arange(len(head))[:, None] * block
    return (head[:, None] * block + within[head]).reshape(-1)


def unnest(head: torch.Tensor, full: torch.Tensor, block: int) -> torch.Tensor:
    """The block-diagonal inner permutation of a nested group's permutation ``full`` (see ``nest``)."""
    head = torch.as_tensor(head, dtype=torch.long)
    full = torch.as_tensor(full, dtype=torch.long).view(len(head), block)
    within = full - head[:, None] * block
    inv = torch.argsort(head)
    return (within[inv] + torch.arange(len(head))[:, None] * block).reshape(-1)


def restrict(spec: PermutationSpec, perm: Mapping[str, torch.Tensor], groups) -> Permutation:
    """``perm`` on the ``groups`` given, the identity elsewhere, kept valid for nested groups: a nested
    group that moves while its head group does not keeps only its reordering inside each head; a head
    group that moves carries the blocks of its nested groups along (unreordered when they do not move)."""
    groups = set(groups)
    out = {g: (torch.as_tensor(perm[g], dtype=torch.long) if g in groups else torch.arange(grp.size))
           for g, grp in spec.groups.items()}
    for h, gs in spec.nested().items():
        head = torch.as_tensor(perm[h], dtype=torch.long)
        for g in gs:
            block = spec.groups[g].size // len(head)
            if g in groups and h not in groups:
                out[g] = unnest(head, perm[g], block)
            elif h in groups and g not in groups:
                out[g] = expand_blocks(head, block)
    return Permutation(out)


def identity(spec: PermutationSpec) -> Permutation:
    """The identity permutation of every group of ``spec``."""
    return Permutation({g: torch.arange(grp.size) for g, grp in spec.groups.items()})


def random_permutation(spec: PermutationSpec, generator: torch.Generator | int | None = None,
                       groups=None) -> Permutation:
    """A uniformly random permutation of every group (or of ``groups`` only; the rest identity)."""
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    chosen = set(spec.groups if groups is None else groups)
    out = {}
    for g, grp in spec.groups.items():
        if g not in chosen:
            out[g] = torch.arange(grp.size)
        elif grp.blocks is None:
            out[g] = torch.randperm(grp.size, generator=generator)
        else:  # an independent permutation inside every head (the heads move with their own group)
            nb = spec.groups[grp.blocks].size
            block = grp.size // nb
            out[g] = torch.cat([h * block + torch.randperm(block, generator=generator) for h in range(nb)])
    for h, gs in spec.nested().items():
        for g in gs:
            out[g] = nest(out[h], out[g], spec.groups[g].size // spec.groups[h].size)
    return Permutation(out)


def compose(p: Mapping[str, torch.Tensor], q: Mapping[str, torch.Tensor]) -> Permutation:
    """The permutation equal to applying ``p`` first, then ``q``: ``compose(p, q)[g] = p[g][q[g]]``."""
    if set(p) != set(q):
        raise ValueError(f"cannot compose permutations over different groups "
                         f"({sorted(set(p) ^ set(q))[:5]} differ)")
    return Permutation({g: torch.as_tensor(p[g])[torch.as_tensor(q[g])] for g in p})


def inverse(p: Mapping[str, torch.Tensor]) -> Permutation:
    """The inverse permutation: ``compose(p, inverse(p))`` is the identity."""
    return Permutation({g: torch.argsort(torch.as_tensor(t)) for g, t in p.items()})


def axis_index(tree: Tree, perm: Mapping[str, torch.Tensor], sizes: dict[str, int]) -> torch.Tensor | None:
    """The index array along one axis (``new = old[index]``), or None when the axis does not move."""
    if isinstance(tree, int):
        return None
    if isinstance(tree, str):
        p = perm.get(tree)
        return None if p is None else torch.as_tensor(p, dtype=torch.long)
    kind, kids = next(iter(tree.items()))
    parts = [axis_index(k, perm, sizes) for k in kids]
    if all(x is None for x in parts):
        return None
    ns = [tree_size(k, sizes) for k in kids]
    parts = [torch.arange(n) if x is None else x for x, n in zip(parts, ns)]
    if kind == "sum":
        offsets = [0]
        for n in ns[:-1]:
            offsets.append(offsets[-1] + n)
        return torch.cat([x + o for x, o in zip(parts, offsets)])
    out = parts[0]
    for x, n in zip(parts[1:], ns[1:]):
        out = (out[:, None] * n + x[None, :]).reshape(-1)
    return out


def _check_perm(spec: PermutationSpec, perm: Mapping[str, torch.Tensor]) -> None:
    for g, p in perm.items():
        grp = spec.groups.get(g)
        if grp is None:
            raise SpecMismatchError(f"permutation names group {g!r}, which the spec does not have "
                                    f"(spec groups: {list(spec.groups)[:8]}...)")
        if len(p) != grp.size:
            raise SpecMismatchError(f"permutation of group {g!r} has {len(p)} entries; the group has {grp.size}")
    for h, gs in spec.nested().items():
        if h not in perm:
            continue
        head = torch.as_tensor(perm[h], dtype=torch.long)
        for g in gs:
            if g in perm:
                block = spec.groups[g].size // len(head)
                if not torch.equal(torch.as_tensor(perm[g]).view(len(head), block) // block, head[:, None].expand(-1, block)):
                    raise SpecMismatchError(
                        f"permutation of group {g!r} does not move its heads as group {h!r} does (each block of "
                        f"{block} units must go to the head {h!r} assigns); build it with "
                        "permgraph.permutation.nest(head, inner, block)")


def permute_state_dict(state: Mapping[str, torch.Tensor], spec: PermutationSpec,
                       perm: Mapping[str, torch.Tensor], strict: bool = True) -> dict[str, torch.Tensor]:
    """Permute every tensor of ``state`` that the spec knows; the input is not modified.

    ``state`` may hold any subset of the model's keys (e.g. a pruning mask). Keys the spec does not
    know raise ``SpecMismatchError`` when ``strict`` (the default), else pass through unchanged.
    """
    _check_perm(spec, perm)
    sizes = spec.group_sizes()
    cache: dict[str, torch.Tensor | None] = {}
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        canon = spec.aliases.get(key, key)
        trees = spec.axes.get(canon)
        if trees is None:
            if strict:
                raise SpecMismatchError(f"state-dict key {key!r} is not in the spec; is this the same "
                                        f"architecture? (pass strict=False to leave unknown keys as they are)")
            out[key] = t
            continue
        if tuple(t.shape) != tuple(spec.shapes[canon]):
            raise SpecMismatchError(f"{key}: shape {tuple(t.shape)} differs from the spec's "
                                    f"{tuple(spec.shapes[canon])}; the spec belongs to another model")
        moved: dict[int, torch.Tensor] = {}
        for dim, tree in enumerate(trees):
            if isinstance(tree, int):
                continue
            ck = repr(tree)
            if ck not in cache:
                cache[ck] = axis_index(tree, perm, sizes)
            if cache[ck] is not None:
                moved[dim] = cache[ck]
        out[key] = take(t, moved)
    return out


def take(t: torch.Tensor, moved: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """``t`` with each dim ``d`` in ``moved`` reordered by its index (``new = old[index]``): a new tensor,
    or ``t`` itself when nothing moves.

    One ``index_select`` per dim, except when two or more dims move and the last of them is the tensor's
    last dim (a Linear weight, an LSTM's gate matrices): ``index_select`` along the last dim gathers one
    element at a time, and one advanced-indexing gather over all moved dims is 2-4x faster there."""
    if not moved:
        return t
    last = max(moved)
    if len(moved) >= 2 and last == t.ndim - 1:
        ix = []
        for d in range(t.ndim):
            i = moved.get(d)
            i = torch.arange(t.shape[d], device=t.device) if i is None else i.to(t.device)
            shape = [1] * t.ndim
            shape[d] = -1
            ix.append(i.view(shape))
        return t[tuple(ix)]
    for d, i in moved.items():
        t = t.index_select(d, i.to(t.device))
    return t


def apply(obj: nn.Module | Mapping[str, torch.Tensor], spec: PermutationSpec,
          perm: Mapping[str, torch.Tensor]):
    """Apply ``perm`` to a model or a (full or partial) state dict; returns a new object of the same
    kind, leaving the caller's untouched. Non-float tensors are permuted like any other; devices kept."""
    if isinstance(obj, nn.Module):
        state = obj.state_dict()
        missing = [k for k in spec.axes if k not in state]
        extra = [k for k in state if k not in spec.axes and k not in spec.aliases]
        if missing or extra:
            raise SpecMismatchError(
                "the model's state dict does not match the spec: "
                + (f"missing {missing[:3]} " if missing else "") + (f"unexpected {extra[:3]}" if extra else "")
                + "; trace this model with permgraph.trace(model)")
        new_state = permute_state_dict(state, spec, perm)
        model = copy.deepcopy(obj)
        model.load_state_dict(new_state)
        return model
    if isinstance(obj, Mapping):
        return permute_state_dict(obj, spec, perm)
    raise TypeError(f"apply() takes an nn.Module or a state dict, not {type(obj).__name__}")

