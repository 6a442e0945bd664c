"""Weight matching (Git Re-Basin's objective, coordinate descent over groups) and the helpers both matchers
share: state dicts in, permutations and per-group diagnostics out. The public entry is ``permgraph.align``
(module ``permgraph.alignment``); activation matching (``_activations``) builds on this module.
"""

from __future__ import annotations

import fnmatch
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import _blocks
from ._progress import progress_bar
from ._solver import assign, confidence, confidences, margins
from .errors import SpecMismatchError
from .permutation import Permutation, axis_index, take
from .spec import PermutationSpec, Tree

STAT_SUFFIXES = ("running_mean", "running_var")


# ---------------------------------------------------------------------------------------------- helpers
def _jsonable(x):
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def _state(obj) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        return dict(obj)
    raise TypeError(f"expected an nn.Module or a state dict, got {type(obj).__name__}")


def check_same_spec(spec: PermutationSpec, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    """Raise a SpecMismatchError naming the first difference between the two state dicts and the spec."""
    for name, sd in (("A", a), ("B", b)):
        for k in spec.axes:
            if k not in sd:
                raise SpecMismatchError(f"model {name} has no tensor {k!r}, which the spec expects; "
                                        "are both models the same architecture?")
            if tuple(sd[k].shape) != tuple(spec.shapes[k]):
                raise SpecMismatchError(f"{k}: model {name} has shape {tuple(sd[k].shape)}, the spec "
                                        f"{tuple(spec.shapes[k])}; the models differ in architecture or width")
        extra = [k for k in sd if k not in spec.axes and k not in spec.aliases]
        if extra:
            raise SpecMismatchError(f"model {name} has tensors the spec does not know ({extra[:3]}); "
                                    "are both models the same architecture?")
    devs = {t.device for sd in (a, b) for t in sd.values()}
    if len(devs) > 1:
        raise SpecMismatchError(f"the models' tensors are on different devices ({sorted(map(str, devs))}); "
                                "move both to one device (or pass device=...)")
    for name, sd in (("A", a), ("B", b)):
        for k, t in sd.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"model {name}'s tensor {k!r} holds NaN or inf values; alignment needs "
                                 "finite weights")


def _coords(tree: Tree, sizes: dict[str, int], g: str) -> torch.Tensor:
    """For every position along an axis, the unit of group ``g`` it belongs to (-1 if none)."""
    if isinstance(tree, str):
        n = sizes[tree]
        return torch.arange(n) if tree == g else torch.full((n,), -1, dtype=torch.long)
    if isinstance(tree, int):
        return torch.full((tree,), -1, dtype=torch.long)
    kind, kids = next(iter(tree.items()))
    parts = [_coords(k, sizes, g) for k in kids]
    if kind == "sum":
        return torch.cat(parts)
    ns = [len(p) for p in parts]
    out = torch.full(ns, -1, dtype=torch.long)
    hits = [i for i, p in enumerate(parts) if (p >= 0).any()]
    if len(hits) > 1:
        raise ValueError("a group appears twice in one product")
    if hits:
        i = hits[0]
        shape = [1] * len(ns)
        shape[i] = ns[i]
        out = parts[i].view(shape).expand(ns).clone()
    return out.reshape(-1)


def unit_positions(tree: Tree, sizes: dict[str, int], g: str) -> torch.Tensor:
    """Positions along an axis grouped by unit of ``g``: an (n, C) LongTensor whose row ``i`` lists the
    C positions of unit ``i``, in an order that pairs positions with the same context across units."""
    c = _coords(tree, sizes, g)
    pos = (c >= 0).nonzero().squeeze(1)
    order = torch.sort(c[pos], stable=True).indices
    return pos[order].reshape(sizes[g], -1)


@dataclass
class _Member:
    key: str
    dim: int
    idx: torch.Tensor  # (n, C)
    nested: bool = False  # the group is a factor of a product that also holds other groups (e.g. heads)


def _nested(tree: Tree, g: str) -> bool:
    """Is ``g`` a factor of a product whose other factors hold groups (heads x head dims, blocks x units)?"""
    if not isinstance(tree, dict):
        return False
    kind, kids = next(iter(tree.items()))
    has = [any(True for _ in _groups_in(k)) for k in kids]
    mine = [g in set(_groups_in(k)) for k in kids]
    if kind == "prod" and any(mine):
        if any(h for h, m in zip(has, mine) if not m):
            return True
    return any(_nested(k, g) for k, m in zip(kids, mine) if m)


def _groups_in(tree: Tree):
    if isinstance(tree, str):
        yield tree
    elif isinstance(tree, dict):
        for k in next(iter(tree.values())):
            yield from _groups_in(k)


def _members(spec: PermutationSpec, keys: Iterable[str]) -> dict[str, list[_Member]]:
    sizes = spec.group_sizes()
    out: dict[str, list[_Member]] = {g: [] for g in spec.groups}
    for key in keys:
        for dim, tree in enumerate(spec.axes[key]):
            if isinstance(tree, int):
                continue
            seen = []
            stack = [tree]
            while stack:
                t = stack.pop()
                if isinstance(t, str):
                    if t not in seen:
                        seen.append(t)
                elif isinstance(t, dict):
                    stack.extend(next(iter(t.values())))
            for g in seen:
                try:
                    out[g].append(_Member(key, dim, unit_positions(tree, sizes, g), _nested(tree, g)))
                except ValueError:
                    continue
    return out


def _select_keys(spec: PermutationSpec, include, exclude, include_stats: bool) -> list[str]:
    keys = []
    for k in spec.axes:
        if not include_stats and k.endswith(STAT_SUFFIXES):
            continue
        if k.endswith("num_batches_tracked"):
            continue
        if include is not None and not any(fnmatch.fnmatchcase(k, p) for p in include):
            continue
        if any(fnmatch.fnmatchcase(k, p) for p in exclude):
            continue
        keys.append(k)
    return keys


def _magnitude_zeroed(t: torch.Tensor, fraction: float, mode: str) -> torch.Tensor:
    """A copy of ``t`` with the ``fraction`` smallest ("small") or largest ("large") magnitudes zeroed."""
    k = int(round(fraction * t.numel()))
    if k <= 0 or t.ndim < 2:
        return t
    flat = t.abs().flatten()
    idx = torch.topk(flat, k, largest=(mode == "large")).indices
    out = t.flatten().clone()
    out[idx] = 0
    return out.view_as(t)


# ---------------------------------------------------------------------------------------------- weight matching
def _permuted(t: torch.Tensor, trees: list[Tree], perm: Mapping[str, torch.Tensor], sizes, skip_dim=None,
              skip_group=None) -> torch.Tensor:
    moved: dict[int, torch.Tensor] = {}
    for d, tree in enumerate(trees):
        if isinstance(tree, int):
            continue
        p = perm
        if d == skip_dim:
            p = dict(perm)
            p[skip_group] = torch.arange(sizes[skip_group])
        idx = axis_index(tree, p, sizes)
        if idx is not None:
            moved[d] = idx
    return take(t, moved)


def _slices(t: torch.Tensor, m: _Member) -> torch.Tensor:
    n = m.idx.shape[0]
    x = t.index_select(m.dim, m.idx.reshape(-1).to(t.device)).movedim(m.dim, 0)
    return x.reshape(n, -1)


AUTO_MARGIN = 0.01
"""``start="auto"``: the relative amount by which the anchored start must already score above the identity
run's end for a second descent to run from it (docs/alignment.md, "Where coordinate descent starts")."""


def weight_matching(spec: PermutationSpec, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], *,
                    max_iter: int = 100, seed: int = 0, include: list[str] | None = None,
                    exclude: Iterable[str] = (), include_stats: bool = False, prune_fraction: float = 0.0,
                    prune_mode: str = "small", init: Mapping[str, torch.Tensor] | None = None,
                    groups: Iterable[str] | None = None, progress: bool = False,
                    free_units: Mapping[str, torch.Tensor] | None = None,
                    start: str = "auto", device=None) -> tuple[Permutation, dict, list]:
    """Coordinate descent over groups (Ainsworth et al.). Returns (perm, per-group diagnostics, log).

    Groups that are the outer factor of a product with other groups (attention heads, blocks of a
    grouped convolution) are first matched with a similarity that does not depend on the inner groups'
    permutations (the squared Frobenius norm of each block pair's cross products), so that coordinate
    descent does not lock in a wrong block order before the units inside blocks are aligned; then all
    groups are refined with the plain objective. ``free_units`` restricts a group's reassignment to the
    given A units (and the B units currently matched to them); ``groups`` restricts which groups move.

    ``start="auto"`` (default) descends from the identity (or ``init``) and, only when that leaves a group
    of eight or more units where it was (the stall of freshly initialised transformers), descends again
    from the anchored start and keeps the higher objective. ``"anchored"`` descends from the anchored
    start only: groups assigned one at a time outward from the fixed axes (the stem's input, the classes),
    each from the tensors whose other groups are already assigned. ``"identity"`` is plain coordinate
    descent from the identity. ``start="both"`` descends from the identity and then
    descends a second time from an order-free assignment of every group (``_order_free_start``) and keeps
    the run with the higher objective (the identity run on ties): the objective is never lower than the
    identity start's, and planted permutations of freshly initialised transformers are recovered, at about
    twice the cost (docs/alignment.md, "A second, order-free start").
    """
    if start not in ("auto", "identity", "both", "anchored"):
        raise ValueError(f"start must be 'auto', 'identity', 'anchored' or 'both', got {start!r}")
    if prune_mode not in ("small", "large"):
        raise ValueError(f"prune_mode must be 'small' or 'large', got {prune_mode!r}")
    if not 0.0 <= prune_fraction < 1.0:
        raise ValueError(f"prune_fraction must be in [0, 1), got {prune_fraction}")
    sizes = spec.group_sizes()
    keys = _select_keys(spec, include, list(exclude), include_stats)
    dev = torch.device(device) if device is not None else next(iter(a.values())).device
    A = {k: a[k].to(dev, torch.float32) for k in keys}
    B = {k: b[k].to(dev, torch.float32) for k in keys}
    if prune_fraction > 0:
        A = {k: _magnitude_zeroed(t, prune_fraction, prune_mode) for k, t in A.items()}
        B = {k: _magnitude_zeroed(t, prune_fraction, prune_mode) for k, t in B.items()}
    members = _members(spec, keys)
    # nested groups (attention heads, Group.blocks): head group -> its nested groups in the objective
    heads = {h: [g for g in gs if members.get(g)] for h, gs in spec.nested().items()}
    heads = {h: gs for h, gs in heads.items() if gs}
    head_of = {g: h for h, gs in heads.items() for g in gs}
    movable = set(spec.groups if groups is None else groups)
    todo = [g for g in (spec.groups if groups is None else groups) if members.get(g) or g in heads]
    perm = {g: torch.arange(n) for g, n in sizes.items()}
    if init is not None:
        perm.update({g: torch.as_tensor(p) for g, p in init.items()})

    # A's slices never change: cutting them once per member instead of at every visit pays for most of
    # the second start (below); it holds about one extra copy of A's matched tensors per group member.
    a_cache: dict[int, torch.Tensor] = {}

    def a_slices(m: _Member) -> torch.Tensor:
        k = id(m)  # members live as long as this call
        if k not in a_cache:
            a_cache[k] = _slices(A[m.key], m)
        return a_cache[k]

    def similarity(g: str, invariant: bool, only=None) -> torch.Tensor:
        n = sizes[g]
        s = torch.zeros(n, n, dtype=torch.float64, device=dev)
        ms = [m for m in members[g] if m.nested] if invariant else members[g]
        if only is not None:
            ms = [m for m in ms if id(m) in only]
        for m in ms:
            bt = _permuted(B[m.key], spec.axes[m.key], perm, sizes, m.dim, g)
            xa, xb = a_slices(m), _slices(bt, m)
            if invariant:
                c = m.idx.shape[1]
                cross = xa.reshape(n * c, -1) @ xb.reshape(n * c, -1).T
                s += (cross.double() ** 2).reshape(n, c, n, c).sum((1, 3))
            else:
                s += (xa @ xb.T).double()
        return s

    def objective() -> float:
        tot = 0.0
        for k in keys:
            tot += float((A[k] * _permuted(B[k], spec.axes[k], perm, sizes)).sum())
        return tot

    j_start = objective()

    def head_step(h: str) -> tuple[float, float, dict[str, torch.Tensor]]:
        """Heads and the insides of their movable nested groups at once (``_blocks.heads``); returns the
        score before, after, and the new permutations."""
        nb = sizes[h]
        block = {g: sizes[g] // nb for g in heads[h]}
        sims = {g: similarity(g, False) for g in heads[h] if g in movable}
        # the head group's own axes (a grouped convolution's blocks, say) in the plain similarity, like
        # the nested groups' values it is added to
        extra = similarity(h, False).cpu() if members.get(h) else torch.zeros(nb, nb, dtype=torch.float64)
        keep = {}
        for g in heads[h]:
            if g not in movable:  # moves with its heads, keeping its inside order
                order = _blocks.inside_order(perm[g], perm[h], block[g])
                keep[g] = order
                extra = extra + _blocks.fixed_scores(similarity(g, False), order, nb, block[g])
        ar = torch.arange(nb)
        old = float(extra[ar, perm[h]].sum())
        for g, sg in sims.items():
            old += float(sg[torch.arange(sizes[g], device=dev), perm[g].to(dev)].sum())
        new_h, full = _blocks.heads(sims, nb, block, extra, keep)
        new = float(extra[ar, new_h].sum())
        for g, sg in sims.items():
            new += float(sg[torch.arange(sizes[g], device=dev), full[g].to(dev)].sum())
        return old, new, {h: new_h, **full}

    def diagonal_scores() -> dict[str, float]:
        """Each group's plain score at the current permutations: the sum of its similarity's chosen
        entries, which are the products of A's slices with B's fully permuted slices, so no n x n matrix is
        built (each permuted tensor is cut once and shared by its groups). A head group without members
        of its own scores what its nested groups score."""
        full: dict[str, torch.Tensor] = {}

        def score(g: str) -> float:
            if g in heads and not members.get(g):
                return sum(score(n) for n in heads[g])
            tot = 0.0
            for m in members.get(g, ()):
                if m.key not in full:
                    full[m.key] = _permuted(B[m.key], spec.axes[m.key], perm, sizes)
                tot += float((a_slices(m) * _slices(full[m.key], m)).sum(dtype=torch.float64))
            return tot

        return {g: score(g) for g in todo}

    # per-group diagnostics use the plain objective, measured before the first and after the last sweep
    before = diagonal_scores()
    nested = {g for g in todo if any(m.nested for m in members[g])}

    def descend(label: str):
        """Coordinate descent from the current ``perm`` (changed in place); returns its diagnostics."""
        gen = torch.Generator().manual_seed(seed)  # every start sees the same group orders
        log: list[dict[str, Any]] = []
        diag: dict[str, dict[str, Any]] = {g: {"similarity_before": before[g], "changes": 0,
                                               "last_changed_sweep": 0} for g in todo}
        bar = progress_bar(progress, max_iter, f"weight matching ({label} start, sweeps)")
        sweeps = 0
        last_sim: dict[str, torch.Tensor] = {}  # and its matrix (kept for the margins: no recomputation)
        phase = "invariant" if nested and free_units is None else "plain"
        for it in range(max_iter):
            sweeps = it + 1
            t0 = time.perf_counter()
            improved = 0
            order = [todo[i] for i in torch.randperm(len(todo), generator=gen).tolist()]
            for g in order:
                if g in heads:
                    old, new, moved = head_step(g)
                    if new > old + 1e-9 * max(1.0, abs(old)):
                        improved += 1
                        for n, p in moved.items():  # the head group and every nested group it moved
                            if n in diag and not torch.equal(p, perm[n]):
                                diag[n]["changes"] += 1
                                diag[n]["last_changed_sweep"] = sweeps
                        perm.update(moved)
                    continue
                s = similarity(g, phase == "invariant" and g in nested)
                ar = torch.arange(sizes[g], device=dev)
                old = float(s[ar, perm[g].to(dev)].sum())
                if g in head_of:  # inside every head, the heads as they are
                    rows = free_units.get(g) if free_units is not None else None
                    h = head_of[g]
                    new_p = _blocks.within(s, perm[h], sizes[g] // sizes[h], rows, perm[g])
                elif free_units is not None and g in free_units:
                    rows = torch.as_tensor(free_units[g], dtype=torch.long)
                    if len(rows) < 2:
                        continue
                    cols = perm[g][rows]
                    new_p = perm[g].clone()
                    new_p[rows] = cols[assign(s[rows][:, cols])]
                else:
                    new_p = assign(s)
                new = float(s[ar, new_p.to(dev)].sum())
                if phase == "plain" and not (phase == "invariant" and g in nested):
                    last_sim[g] = s
                if new > old + 1e-9 * max(1.0, abs(old)):
                    perm[g] = new_p
                    improved += 1
                    diag[g]["changes"] += 1
                    diag[g]["last_changed_sweep"] = sweeps
            log.append({"sweep": sweeps, "phase": phase, "start": label, "groups_improved": improved,
                        "seconds": time.perf_counter() - t0, "objective_before": j_start, "objective": objective()})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(improved=improved)
            if improved == 0:
                if phase == "invariant":
                    phase = "plain"
                    continue
                break
        if bar is not None:
            bar.close()
        converged = bool(log) and log[-1]["groups_improved"] == 0 and log[-1]["phase"] == "plain"
        final = last_sim if converged else {}  # plain similarities at the final permutations

        def final_sim(g: str) -> torch.Tensor:
            if g not in final:
                final[g] = similarity(g, False)
            return final[g]

        # computed like similarity_before (the same products, summed alike), so that a group that did not
        # move reports exactly the same value before and after
        after = diagonal_scores()
        for g, d in diag.items():
            d["similarity_after"] = after[g]
            d["moved_fraction"] = float((perm[g] != torch.arange(sizes[g])).float().mean())
            d["sweeps"] = sweeps
            # how clearly the final assignment beats every other (docs/alignment.md, "How sure is each group?")
            if g in heads:
                d.update(_head_certainty(perm[g], final_sim(g) if members.get(g) else None,
                                         [(final_sim(n), perm[n]) for n in heads[g]]))
            else:  # a nested group (in head_of): the alternatives inside the heads it is in
                d.update(_certainty(final_sim(g), perm[g], perm[head_of[g]] if g in head_of else None))
        return diag, log

    def anchored_start() -> None:
        """Assign groups one at a time, outward from what is fixed (``start="anchored"``).

        A member tensor *anchors* a group when every other group acting on it is already assigned (or
        there is none: the stem's input axis, a classifier's classes and positional embeddings are fixed
        by nature). The group with the most anchored values goes next and is assigned from its anchored
        members alone, so no guess about a group not yet assigned enters its similarity; heads are
        assigned together with the groups nested in them. This is one pass over the groups, costing
        less than one sweep; coordinate descent then continues from it.
        """
        units = {g: [g] for g in todo if g not in head_of}
        for h in heads:
            if h in units:
                units[h] = [h] + [g for g in heads[h] if g in todo]
        for g in todo:  # a nested group whose head group does not move: a unit of its own
            if g in head_of and head_of[g] not in units:
                units[g] = [g]
        deps: dict[int, set[str]] = {}
        for g, ms in members.items():
            for m in ms:
                others = set()
                for d, tree in enumerate(spec.axes[m.key]):
                    if d != m.dim or m.nested:
                        others.update(_groups_in(tree))
                others.discard(g)
                deps[id(m)] = others
        assigned = set(spec.groups) - {g for gs in units.values() for g in gs}  # groups that do not move
        numel = {id(m): A[m.key].numel() for ms in members.values() for m in ms}
        pending = dict(units)
        while pending:
            best, best_mass, best_only = None, -1, None
            for u, gs in pending.items():
                inside = set(gs)
                only = {id(m) for g in gs for m in members.get(g, ())
                        if deps[id(m)] <= assigned | inside}
                mass = sum(numel[i] for i in only)
                if mass > best_mass:
                    best, best_mass, best_only = u, mass, only
            gs = pending.pop(best)
            only = best_only if best_mass > 0 else None
            if best in heads:
                h = best
                nb = sizes[h]
                inner = [g for g in gs if g != h]
                sims = {g: similarity(g, False, only) for g in inner}
                own = similarity(h, False, only).cpu() if members.get(h) else None
                perm[h], full = _blocks.heads(sims, nb, {g: sizes[g] // nb for g in inner}, own)
                perm.update(full)
            elif best in head_of:
                h = head_of[best]
                perm[best] = _blocks.within(similarity(best, False, only), perm[h], sizes[best] // sizes[h])
            else:
                perm[best] = assign(similarity(best, False, only)).cpu()
            assigned.update(gs)

    initial = dict(perm)
    if start == "anchored" and init is None and free_units is None:
        anchored_start()
    diag, log = descend("identity" if init is None and start != "anchored" else
                        ("anchored" if init is None else "init"))
    if start == "auto" and init is None and free_units is None and groups is None and log:
        # Descent from the identity can end far from the best match: on freshly initialised networks
        # (norm affines all ones / zeros) only the stem and head tell the residual stream's order, the first
        # sweep fits every block to its identity order, and that fit then outscores the true order. In
        # transformers a whole group then never moves (the stall); in a ResNet-50 every group moves, yet
        # the run ends with almost every unit wrong. So the anchored start (one pass, less than a sweep) is
        # always built, and a second descent runs from it when it already scores clearly above the identity
        # run's end (by AUTO_MARGIN: the identity run is then stuck far from the best match), or when a
        # group of eight or more units stalled (the identity is the best order of n units
        # by chance with odds about 1/n!, so smaller groups may keep their order by chance). The run with
        # the higher objective is kept (the identity run on ties): J is never below the identity start's,
        # and pairs the identity run matches well cost one pass more.
        stalled = [g for g in todo if sizes[g] >= 8 and diag[g]["changes"] == 0]
        first = (dict(perm), diag, log)
        j_first = log[-1]["objective"]
        perm = dict(initial)
        anchored_start()
        j_anchored = objective()
        info = {"objective_at_start": j_anchored, "stalled_groups": stalled[:20], "descended": False, "kept": False}
        if stalled or j_anchored > j_first + AUTO_MARGIN * abs(j_first):
            diag, log = descend("anchored")
            info.update(descended=True, kept=log[-1]["objective"] > j_first)
        if not info["kept"]:
            perm, diag, log = first
        log[-1]["anchored_start"] = info
    if start == "both" and init is None and free_units is None and groups is None and log:
        # Second start: every group assigned at once by an order-free similarity (_order_free_start).
        # Coordinate descent from the identity fails on freshly initialised transformers: while the
        # LayerNorm affines are all ones / zeros only the stem and head tell the residual stream's order,
        # the first sweep fits every block to the residual stream's identity order, and that fit then
        # outscores the true order, so the residual group never moves. The identity run always comes
        # first and is kept unless the second one ends higher, so J is never below plain coordinate
        # descent from the identity with the same seed. The second descent always runs, which about
        # doubles the cost: J at the order-free start is no reliable gate (a permuted mixer with 10% noise
        # starts below a stuck identity run, as independent models do, yet ends at the planted match).
        first = (dict(perm), diag, log)
        perm = dict(initial)
        perm.update(_order_free_start(a_slices, B, members, todo, sizes, dev, heads))
        j0 = objective()
        diag, log = descend("order-free")
        if first[2][-1]["objective"] >= log[-1]["objective"]:
            perm, diag, log = first
        log[-1]["order_free_start"] = {"objective_at_start": j0, "descended": True, "kept": log is not first[2]}
    return Permutation(perm), diag, log


def _order_free_start(a_slices, B, members, todo, sizes, dev, heads=None) -> dict[str, torch.Tensor]:
    """One assignment per group from a similarity that no other group's permutation can change.

    For each tensor carrying group ``g``, the slice of unit ``i`` holds all its positions across the other
    dims, so statistics of the slice's values that ignore their order (mean, moments, extremes) do not
    depend on any other group's permutation. Units are paired by ``S[i, j] = -sum over tensors of
    C * ||f(A_i) - f(B_j)||^2`` (``C`` the slice length, ``f`` those statistics, all in the units of the
    weights). On a permuted copy, even with noise, this already names the right units; on independently
    trained models it is only a start for coordinate descent, which then maximises the real objective.
    Statistics rather than whole sorted slices: sorting every slice cost as much as a sweep."""
    def feats(x: torch.Tensor) -> torch.Tensor:
        # float32 passes (float64 ones made this start cost a fifth of a whole matching); the few
        # statistics per unit are then compared in float64
        x2 = x * x
        m3 = (x2 * x).mean(1).double()
        f = torch.stack([x.mean(1).double(), x2.mean(1).double().sqrt(), m3.sign() * m3.abs().pow(1 / 3),
                         (x2 * x2).mean(1).double().pow(0.25), x.abs().mean(1).double(),
                         x.amax(1).double(), x.amin(1).double()], 1)
        return f * math.sqrt(x.shape[1])

    heads = heads or {}
    nested = {g for gs in heads.values() for g in gs}
    sims = {}
    for g in todo:
        n = sizes[g]
        s = torch.zeros(n, n, dtype=torch.float64, device=dev)
        for m in members[g]:
            s -= torch.cdist(feats(a_slices(m)), feats(_slices(B[m.key], m))) ** 2
        sims[g] = s
    out = {g: assign(s).cpu() for g, s in sims.items() if g not in nested and g not in heads}
    for h, gs in heads.items():  # heads and their insides at once (nested groups)
        if h not in sims:
            continue
        nb = sizes[h]
        inner = {g: sims[g] for g in gs if g in sims}
        own = sims[h].cpu() if members.get(h) else None
        out[h], full = _blocks.heads(inner, nb, {g: sizes[g] // nb for g in inner}, own)
        out.update(full)
    return out


def _certainty(s: torch.Tensor, p: torch.Tensor, head: torch.Tensor | None = None) -> dict[str, float]:
    """A group's ``margin`` and ``confidence`` (``_solver.margin`` / ``confidence``) from its similarity
    ``s`` and assignment ``p``. With ``head`` (a nested group's head permutation), over the alternatives
    inside the heads: the least margin and the least confidence over the heads' blocks, each block's
    margin its best exchange of two units (the exact closure of every block of every nested group would
    cost a quarter of all the margins of a ViT-S/16)."""
    p = p.to(s.device)
    if head is None:
        m = margins(s[None], p[None])[0]
        return {"margin": m, "confidence": confidence(s, p, m)}
    nb = len(head)
    bs = len(p) // nb
    head = head.to(s.device)
    blocks = s.reshape(nb, bs, nb, bs)[torch.arange(nb, device=s.device), :, head, :]  # A head h, B head[h]
    inside = p.view(nb, bs) - head[:, None] * bs
    ms = margins(blocks, inside, exact_max=0)
    return {"margin": min(ms), "confidence": min(confidences(blocks, inside, ms))}


def _head_certainty(head: torch.Tensor, own: torch.Tensor | None,
                    inner: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """``_certainty`` of a head group's permutation ``head``: on the heads x heads matrix of the value of
    pairing A's head ``h`` with B's head ``k``, B's head keeping its inside order (as
    ``_blocks.fixed_scores`` gives it, for every nested group in ``inner`` as (similarity, permutation);
    plus ``own``, the head group's own similarity). Alternatives with re-optimised insides score at least
    as much, so this bounds that margin from above, without the ``nb * nb`` small assignments per nested
    group that they would cost."""
    nb = len(head)
    total = own.double().cpu() if own is not None else torch.zeros(nb, nb, dtype=torch.float64)
    for s, p in inner:
        bs = len(p) // nb
        total = total + _blocks.fixed_scores(s, _blocks.inside_order(p, head, bs), nb, bs)
    return _certainty(total, head)
