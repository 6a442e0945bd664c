"""Core types: PermutationSpec, Group, FrozenPart, and the axis trees that tie them to tensors.

An *axis tree* describes how the permutation groups act on one axis of one state-dict tensor:

* ``"g3"``: the axis is exactly group ``g3`` (new = old[p] along the axis);
* an integer ``n``: ``n`` positions that never move (a frozen part, or the identity);
* ``{"prod": [t1, t2, ...]}``: the axis is the row-major product of the sub-axes (a flatten or a
  reshape; the permutation is the Kronecker product, ``t1`` outermost);
* ``{"sum": [t1, t2, ...]}``: the axis is the concatenation of the sub-axes (block-diagonal).

This module imports no torch; its only file I/O is ``PermutationSpec.save`` / ``PermutationSpec.load``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from ._report import _numel, coverage_report
from .errors import FileFormatError

# Verification of a loaded spec against a model (``from_json(..., model=)``) belongs to the layer above:
# ``permgraph._verify`` puts its ``verify_spec`` here when it is imported (importing ``permgraph`` does),
# so that this module, the bottom of the stack, imports nothing of permgraph's but the errors.
_VERIFY: list = [None]

Tree = Any  # str | int | dict[str, list[Tree]]

SPEC_VERSION = 2  # 2: groups may be nested in a block group (``Group.blocks``); version 1 files still load
_READABLE_VERSIONS = (1, 2)


@dataclass(frozen=True)
class AxisRef:
    """One axis of one tensor: a state-dict key (or a graph node name) and a dimension."""

    tensor: str
    dim: int

    def __str__(self) -> str:
        return f"{self.tensor}[{self.dim}]"


@dataclass(frozen=True)
class Member:
    """Where a group acts: an axis, and whether the axis is exactly the group (``plain``) or the group
    is one factor/segment of a structured axis (a flatten, a concatenation, attention heads)."""

    axis: AxisRef
    plain: bool = True


@dataclass(frozen=True)
class Group:
    """A set of coupled axes that one permutation of ``size`` units acts on.

    ``blocks`` names a *block group* when the units form consecutive blocks that move together with
    that group's units (attention heads): a *nested* group of ``size = H * d`` under a head group of size
    ``H`` may only map block ``h`` (units ``h*d .. h*d+d-1``) onto block ``p_head[h]``, in any order
    inside the block. So every head gets its own permutation of its ``d`` dims while the heads move as
    wholes, and several nested groups under one head group (queries/keys, values/outputs) share the
    head permutation. A head group may act on no axis of its own (``members`` empty).
    """

    id: str
    size: int
    members: tuple[Member, ...]
    blocks: str | None = None

    @property
    def nested(self) -> bool:
        return self.blocks is not None

    @property
    def modules(self) -> list[str]:
        out: list[str] = []
        for m in self.members:
            mod = m.axis.tensor.rpartition(".")[0] or m.axis.tensor
            if mod not in out:
                out.append(mod)
        return out

    @property
    def keys(self) -> list[str]:
        out: list[str] = []
        for m in self.members:
            if m.axis.tensor not in out:
                out.append(m.axis.tensor)
        return out


@dataclass(frozen=True)
class FrozenPart:
    """Units that must stay in place, with the reason, and the axes they touch."""

    size: int
    reason: str
    axes: tuple[AxisRef, ...]
    location: str = ""  # where the tracer decided it ("node add_3 in layer1.0"); "" when unknown or by hand


def tree_size(tree: Tree, sizes: dict[str, int]) -> int:
    if isinstance(tree, str):
        return sizes[tree]
    if isinstance(tree, int):
        return tree
    kind, kids = next(iter(tree.items()))
    vals = [tree_size(k, sizes) for k in kids]
    if kind == "sum":
        return sum(vals)
    out = 1
    for v in vals:
        out *= v
    return out


def tree_groups(tree: Tree) -> Iterator[str]:
    if isinstance(tree, str):
        yield tree
    elif isinstance(tree, dict):
        for kid in next(iter(tree.values())):
            yield from tree_groups(kid)


def _tree_members(tree: Tree, axis: AxisRef) -> Iterator[tuple[str, Member]]:
    plain = isinstance(tree, str)
    for g in dict.fromkeys(tree_groups(tree)):
        yield g, Member(axis, plain)


@dataclass(frozen=True)
class PermutationSpec:
    """The verified permutation symmetry of a model.

    Attributes:
        groups: the permutation groups, by id (``"g0"``, ``"g1"``, ...), in graph order.
        axes: for every state-dict key, one axis tree per dimension (``None`` entries never occur;
            an unpermuted axis is its size as an integer).
        shapes: the shape of every state-dict key.
        frozen: the parts that must stay in place, with reasons.
        aliases: state-dict keys that share storage with another key (tied weights).
        info: free-form metadata (model class, example input shapes, verification result, timings).
        input_shapes: ``(shape, dtype name)`` of each positional example input the spec was traced with,
            e.g. ``(((4, 40), "float32"),)`` (never the values); ``check_equivalence`` and
            ``from_json(model=...)`` build inputs like these when none are passed. Empty when unknown
            (a spec saved by an older permgraph, or inputs that are not all tensors).
    """

    groups: dict[str, Group]
    axes: dict[str, list[Tree]]
    shapes: dict[str, tuple[int, ...]]
    frozen: list[FrozenPart] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    input_shapes: tuple[tuple[tuple[int, ...], str], ...] = ()
    _graph: nx.Graph | None = field(default=None, repr=False, compare=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_axes(cls, axes: dict[str, list[Tree]], shapes: dict[str, tuple[int, ...]],
                  group_sizes: dict[str, int], frozen: Iterable[FrozenPart] = (),
                  aliases: dict[str, str] | None = None, info: dict[str, Any] | None = None,
                  graph: nx.Graph | None = None, input_shapes: Iterable = (),
                  blocks: dict[str, str] | None = None) -> PermutationSpec:
        """``blocks`` maps nested group ids to their block (head) group (see ``Group``)."""
        members: dict[str, list[Member]] = {g: [] for g in group_sizes}
        for key, trees in axes.items():
            for dim, tree in enumerate(trees):
                for g, m in _tree_members(tree, AxisRef(key, dim)):
                    members[g].append(m)
        blocks = {g: h for g, h in (blocks or {}).items() if members.get(g)}
        heads = set(blocks.values())
        groups = {g: Group(g, group_sizes[g], tuple(ms), blocks.get(g)) for g, ms in members.items()
                  if ms or g in heads}
        spec = cls(groups=groups, axes=axes, shapes={k: tuple(v) for k, v in shapes.items()},
                   frozen=list(frozen), aliases=dict(aliases or {}), info=dict(info or {}),
                   input_shapes=_input_shapes(input_shapes))
        object.__setattr__(spec, "_graph", graph)  # (frozen dataclass: the cache is set once, here or below)
        spec._check()
        return spec

    def _check(self) -> None:
        sizes = {g: grp.size for g, grp in self.groups.items()}
        for key, trees in self.axes.items():
            shape = self.shapes[key]
            if len(trees) != len(shape):
                raise ValueError(f"spec: {key} has {len(trees)} axis trees for shape {tuple(shape)}")
            for dim, tree in enumerate(trees):
                for g in tree_groups(tree):
                    if g not in sizes:
                        raise ValueError(f"spec: {key}[{dim}] names unknown group {g!r}")
                n = tree_size(tree, sizes)
                if n != shape[dim]:
                    raise ValueError(f"spec: {key}[{dim}] tree covers {n} units but the axis has {shape[dim]}")
        for g, grp in self.groups.items():
            if grp.blocks is None:
                continue
            head = self.groups.get(grp.blocks)
            if head is None or head.blocks is not None or grp.size % head.size:
                raise ValueError(f"spec: group {g} is nested in {grp.blocks!r}, which is not a block group "
                                 f"whose size divides {grp.size}")

    def nested(self) -> dict[str, list[str]]:
        """Block (head) group id -> the ids of the groups nested in it (see ``Group``); empty for most models."""
        out: dict[str, list[str]] = {}
        for g, grp in self.groups.items():
            if grp.blocks is not None:
                out.setdefault(grp.blocks, []).append(g)
        return out

    # ------------------------------------------------------------------ queries
    @property
    def graph(self) -> nx.Graph:
        """The coupling graph: nodes are AxisRef (tensor axes) and group ids; edges say which group
        acts on which axis. A traced spec also holds the activation axes of the graph's nodes."""
        if self._graph is None:
            g = nx.Graph()
            for gid, grp in self.groups.items():
                g.add_node(gid, kind="group", size=grp.size)
                for m in grp.members:
                    g.add_node(m.axis, kind="param")
                    g.add_edge(gid, m.axis)
            object.__setattr__(self, "_graph", g)
        return self._graph

    def with_info(self, **entries: Any) -> PermutationSpec:
        """A copy whose ``info`` also holds ``entries`` (a spec is not changed after it is built: the tracer
        and verification add their records, such as ``timings`` and ``verification``, this way)."""
        return dataclasses.replace(self, info={**self.info, **entries})

    def group_sizes(self) -> dict[str, int]:
        return {g: grp.size for g, grp in self.groups.items()}

    def permutable_keys(self) -> list[str]:
        return [k for k, trees in self.axes.items() if any(True for t in trees for _ in tree_groups(t))]

    def permutable_values(self) -> tuple[int, int]:
        """(values of the permutable tensors, values of all tensors) of the state dict: the coverage."""
        total = sum(_numel(s) for s in self.shapes.values())
        return sum(_numel(self.shapes[k]) for k in self.permutable_keys()), total

    def fingerprint(self) -> str:
        """A short hash of the spec's structure (keys, shapes, groups, axis trees)."""
        doc = {"axes": self.axes, "shapes": {k: list(v) for k, v in self.shapes.items()},
               "groups": self.group_sizes()}
        nested = {g: grp.blocks for g, grp in self.groups.items() if grp.blocks is not None}
        if nested:  # (absent otherwise: fingerprints of specs without heads are unchanged)
            doc["blocks"] = nested
        payload = json.dumps(doc, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.groups)

    # ------------------------------------------------------------------ editing
    def freeze_groups(self, ids: Iterable[str], reason: str) -> PermutationSpec:
        """A new spec in which the given groups are frozen (identity) with ``reason``."""
        ids = set(ids)
        unknown = ids - set(self.groups)
        if unknown:
            raise KeyError(f"unknown groups {sorted(unknown)}; the spec has {list(self.groups)[:10]}...")
        # heads that stay in place keep the units of every head in place too (a subgroup: always safe)
        ids |= {g for h, gs in self.nested().items() if h in ids for g in gs}
        sizes = self.group_sizes()

        def strip(tree: Tree) -> Tree:
            if isinstance(tree, str):
                return sizes[tree] if tree in ids else tree
            if isinstance(tree, int):
                return tree
            kind, kids = next(iter(tree.items()))
            new = [strip(k) for k in kids]
            if all(isinstance(k, int) for k in new):
                return tree_size({kind: new}, sizes)
            return {kind: new}

        axes = {k: [strip(t) for t in trees] for k, trees in self.axes.items()}
        frozen = list(self.frozen)
        for g in sorted(ids, key=_gkey):
            grp = self.groups[g]
            if grp.members:
                frozen.append(FrozenPart(grp.size, reason, tuple(m.axis for m in grp.members)))
        keep = {g: s for g, s in sizes.items() if g not in ids}
        blocks = {g: grp.blocks for g, grp in self.groups.items() if grp.blocks is not None and g not in ids}
        graph = None
        if self._graph is not None:
            graph = self._graph.copy()
            graph.remove_nodes_from(ids)
            graph.remove_nodes_from([n for n in list(graph.nodes) if graph.degree(n) == 0])
        return PermutationSpec.from_axes(axes, self.shapes, keep, frozen, self.aliases, self.info, graph,
                                         self.input_shapes, blocks)

    def freeze_keys(self, patterns: Iterable[str], reason: str | None = None) -> PermutationSpec:
        """Freeze every group that acts on a state-dict key matching one of the glob ``patterns``."""
        patterns = list(patterns)
        hit = {g for g, grp in self.groups.items()
               for k in grp.keys if any(_match(k, p) for p in patterns)}
        if not hit:
            return self
        return self.freeze_groups(hit, reason or f"frozen by user pattern {patterns}")

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        nested = any(g.blocks is not None for g in self.groups.values())
        return {
            # version 1 when no group is nested: older permgraph versions keep reading such files
            "version": SPEC_VERSION if nested else 1,
            "groups": [{"id": g.id, "size": g.size, "frozen": False, "modules": g.modules,
                        **({"blocks": g.blocks} if g.blocks is not None else {})} for g in self.groups.values()],
            "axes": {k: list(v) for k, v in self.axes.items()},
            "shapes": {k: list(v) for k, v in self.shapes.items()},
            "frozen": [{"size": f.size, "reason": f.reason, "axes": [str(a) for a in f.axes],
                        **({"location": f.location} if f.location else {})} for f in self.frozen],
            "aliases": dict(self.aliases),
            "inputs": [{"shape": list(shape), "dtype": dtype} for shape, dtype in self.input_shapes],
            "info": _jsonable(self.info),
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PermutationSpec:
        """A spec from ``to_dict``'s dictionary. Raises ``FileFormatError`` (a ``ValueError``) if ``d`` is not
        one (an unsupported version, a missing or malformed entry, inconsistent axis trees)."""
        return _from_dict(cls, d, "the spec")

    @classmethod
    def from_json(cls, text: str, model=None, example_inputs=None, *, source: str | None = None) -> PermutationSpec:
        """Load a spec from ``to_json``'s text; ``source`` (a file name, say) names the text in errors.

        Raises ``FileFormatError`` (a ``ValueError``) if the text is not valid spec JSON. When ``model`` is
        given, re-verify the spec against that model (raises ``SpecMismatchError`` if the keys/shapes
        differ, ``VerificationError`` if a permutation changes the output) on ``example_inputs``, or when
        those are omitted on inputs shaped like the ones the spec was traced with."""
        what = source if source is not None else "the spec text"
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise FileFormatError(f"{what} is not valid spec JSON (line {e.lineno} column {e.colno}: {e.msg}); "
                                  "fix it, or write it again with spec.save(path)") from None
        spec = _from_dict(cls, d, what)
        if model is not None:
            _VERIFY[0](spec, model, example_inputs)
        return spec

    def save(self, path: str | os.PathLike) -> None:
        """Write ``to_json()`` to ``path``."""
        with open(os.fspath(path), "w", encoding="utf-8") as f:
            f.write(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike, model=None, example_inputs=None) -> PermutationSpec:
        """Read a spec file written by ``save`` (or ``to_json``); errors name the file. A missing file
        raises ``FileNotFoundError``, a corrupted one ``FileFormatError``; ``model`` and
        ``example_inputs`` are as in ``from_json``."""
        path = os.fspath(path)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"spec file {path} does not exist (write one with spec.save(path) or "
                                    "permgraph trace --json)") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FileFormatError(f"{path} is not a spec file (not UTF-8 text); write it again with "
                                  "spec.save(path)") from None
        return cls.from_json(text, model, example_inputs, source=path)

    # ------------------------------------------------------------------ report
    def report(self, max_groups: int = 60) -> str:
        """A readable coverage report: permutable vs frozen parameters, groups, frozen parts (written by
        ``permgraph._report.coverage_report``)."""
        return coverage_report(self, max_groups)

    def __str__(self) -> str:
        return self.report()


def _reason_and_location(f: dict) -> tuple[str, str]:
    """A stored frozen part's reason and location. Files written before FrozenPart had a location carry it
    at the end of the reason, as " (node ...)": only those are split."""
    reason = f["reason"]
    if "location" in f:
        return reason, f["location"]
    i = reason.rfind(" (node ")
    return (reason[:i], reason[i + 2:-1]) if i >= 0 and reason.endswith(")") else (reason, "")


def _match(key: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(key, pattern) or key.startswith(pattern.rstrip(".*") + ".") and (
        pattern.endswith("*") or "*" not in pattern)


def _gkey(g: str) -> tuple[int, str]:
    return (int(g[1:]) if g[1:].isdigit() else 0, g)


def _from_dict(cls, d: Any, what: str) -> PermutationSpec:
    redo = "write it again with permgraph.trace(model).save(path)"
    if not isinstance(d, dict) or "groups" not in d or "axes" not in d:
        raise FileFormatError(f"{what} is not a permgraph spec (it has no 'groups' and 'axes'); {redo}")
    if d.get("version") not in _READABLE_VERSIONS:
        raise FileFormatError(f"{what} has spec version {d.get('version')!r}, but this permgraph reads versions "
                              f"{', '.join(map(str, _READABLE_VERSIONS))}; {redo}")
    try:
        sizes = {g["id"]: int(g["size"]) for g in d["groups"]}
        frozen = []
        for f in d.get("frozen", []):
            reason, location = _reason_and_location(f)
            frozen.append(FrozenPart(int(f["size"]), reason, tuple(_parse_axis(a) for a in f["axes"]), location))
        spec = cls.from_axes(d["axes"], {k: tuple(v) for k, v in d["shapes"].items()}, sizes, frozen,
                             d.get("aliases", {}), d.get("info", {}),
                             input_shapes=[(x["shape"], x["dtype"]) for x in d.get("inputs", [])],
                             blocks={g["id"]: g["blocks"] for g in d["groups"] if g.get("blocks") is not None})
        hand = [g["id"] for g in d["groups"] if g.get("frozen")]
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        detail = f"missing entry {e}" if isinstance(e, KeyError) else str(e)
        raise FileFormatError(f"{what} is not a valid permgraph spec ({detail}); fix it or {redo}") from e
    if hand:
        spec = spec.freeze_groups(hand, "frozen by hand in the spec file")
    return spec


def _input_shapes(items: Iterable) -> tuple[tuple[tuple[int, ...], str], ...]:
    out = []
    for shape, dtype in items:
        if not isinstance(dtype, str) or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in shape):
            raise ValueError(f"input shapes must be (shape of ints >= 0, dtype name) pairs, got {(shape, dtype)!r}")
        out.append((tuple(shape), dtype))
    return tuple(out)


def _parse_axis(text: str) -> AxisRef:
    name, _, dim = text.rpartition("[")
    return AxisRef(name, int(dim.rstrip("]")))


def _jsonable(x: Any) -> Any:
    try:
        json.dumps(x)
        return x
    except TypeError:
        if isinstance(x, dict):
            return {str(k): _jsonable(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [_jsonable(v) for v in x]
        return str(x)
