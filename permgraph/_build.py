"""Building the PermutationSpec from a finished walk: axis trees per state-dict tensor, groups, frozen
parts with their reasons, nested attention heads and the coupling graph."""

from __future__ import annotations

from collections.abc import Iterable

import networkx as nx
from torch import nn

from ._atoms import Atoms
from ._walk import Propagator
from .spec import AxisRef, FrozenPart, PermutationSpec


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
