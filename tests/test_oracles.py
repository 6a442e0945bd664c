"""Compare traced specs of the zoo models with hand-written Git Re-Basin-style oracles.

The oracles below are written the way Git Re-Basin (Ainsworth et al. 2023) writes its
``mlp_permutation_spec`` / ``vgg16_permutation_spec`` / ``resnet20_permutation_spec``: small helpers
``dense`` / ``conv`` / ``norm`` say which permutation acts on which axis of which state-dict key, and
loops over layers/blocks generate the spec. They never call permgraph; they only use the naming
conventions of ``permgraph/models/_zoo.py``.

An oracle is a list of groups, each a set of ``(state_dict_key, axis)`` pairs that the group permutes
plainly. It is compared with ``spec.groups`` as a set of frozensets (group ids are arbitrary).
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

import permgraph
from permgraph.models import create

Oracle = list[set[tuple[str, int]]]


# --------------------------------------------------------------------------- #
# Git Re-Basin-style spec builder
# --------------------------------------------------------------------------- #
class _SpecBuilder:
    """Collects ``perm name -> {(key, axis)}``; ``None`` as a perm name means "not permuted"."""

    def __init__(self) -> None:
        self.groups: dict[str, set[tuple[str, int]]] = defaultdict(set)

    def axes(self, key: str, perms: tuple[str | None, ...]) -> None:
        for axis, p in enumerate(perms):
            if p is not None:
                self.groups[p].add((key, axis))

    def dense(self, name: str, p_in: str | None, p_out: str | None, bias: bool = True) -> None:
        self.axes(f"{name}.weight", (p_out, p_in))
        if bias:
            self.axes(f"{name}.bias", (p_out,))

    def conv(self, name: str, p_in: str | None, p_out: str | None, bias: bool = False) -> None:
        self.axes(f"{name}.weight", (p_out, p_in, None, None))
        if bias:
            self.axes(f"{name}.bias", (p_out,))

    def norm(self, name: str, p: str, kind: str) -> None:
        """BatchNorm: affine + running statistics; LayerNorm over channels: affine only; none: nothing."""
        if kind == "none":
            return
        self.axes(f"{name}.weight", (p,))
        self.axes(f"{name}.bias", (p,))
        if kind == "bn":
            self.axes(f"{name}.running_mean", (p,))
            self.axes(f"{name}.running_var", (p,))

    def oracle(self) -> Oracle:
        return [set(v) for v in self.groups.values()]


def mlp_oracle(depth: int, norm: str = "none") -> Oracle:
    """``layers = [Linear, (norm), ReLU] * depth + [Linear]``; one permutation per hidden layer."""
    b = _SpecBuilder()
    per_layer = 3 if norm in ("bn", "ln") else 2
    p_in: str | None = None
    for i in range(depth):
        p = f"P_{i}"
        b.dense(f"layers.{i * per_layer}", p_in, p)
        if norm in ("bn", "ln"):
            b.norm(f"layers.{i * per_layer + 1}", p, norm)
        p_in = p
    b.dense(f"layers.{depth * per_layer}", p_in, None)
    return b.oracle()


VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def vgg_oracle(cfg, norm: str) -> Oracle:
    """``features = [Conv, norm, ReLU]`` per channel entry, ``[MaxPool]`` per ``"M"``; GAP; ``classifier``.

    The classifier's input (after global pooling and flatten) is the last conv's channel axis.
    """
    b = _SpecBuilder()
    idx = 0  # index in the ``features`` Sequential
    p_in: str | None = None
    for v in cfg:
        if v == "M":
            idx += 1
            continue
        p = f"P_features.{idx}"
        b.conv(f"features.{idx}", p_in, p, bias=norm == "none")
        b.norm(f"features.{idx + 1}", p, norm)
        p_in = p
        idx += 3
    b.dense("classifier", p_in, None)
    return b.oracle()


def resnet_oracle(depth: int, norm: str) -> Oracle:
    """CIFAR ResNet: stem conv/bn, 3 stages of n BasicBlocks, ``fc``.

    One residual-stream permutation per stage, shared by the stem (stage 1, identity shortcuts), every
    block's ``conv2``/``bn2`` output and the shortcut conv/norm that opens a stage; one inner
    permutation per block (``conv1``/``bn1`` output, ``conv2`` input).
    """
    n = (depth - 2) // 6
    bias = norm == "none"
    b = _SpecBuilder()
    p_res = "P_res0"
    b.conv("conv1", None, p_res, bias)
    b.norm("bn1", p_res, norm)
    for s in range(3):
        stage_res = f"P_res{s}"
        for j in range(n):
            blk = f"layer{s + 1}.{j}"
            inner = f"P_{blk}_inner"
            b.conv(f"{blk}.conv1", p_res, inner, bias)
            b.norm(f"{blk}.bn1", inner, norm)
            b.conv(f"{blk}.conv2", inner, stage_res, bias)
            b.norm(f"{blk}.bn2", stage_res, norm)
            if s > 0 and j == 0:  # stride 2 and a change of width: conv1x1 + norm shortcut
                b.conv(f"{blk}.shortcut.0", p_res, stage_res, bias)
                b.norm(f"{blk}.shortcut.1", stage_res, norm)
            p_res = stage_res
    b.dense("fc", p_res, None)
    return b.oracle()


# --------------------------------------------------------------------------- #
# comparison
# --------------------------------------------------------------------------- #
def _spec_groups(spec: permgraph.PermutationSpec) -> set[frozenset[tuple[str, int]]]:
    return {frozenset((m.axis.tensor, m.axis.dim) for m in grp.members) for grp in spec.groups.values()}


def _assert_matches(spec: permgraph.PermutationSpec, oracle: Oracle, model: torch.nn.Module) -> None:
    state = model.state_dict()
    # the oracle itself must be well-formed: real keys, real axes, disjoint groups
    seen: set[tuple[str, int]] = set()
    for grp in oracle:
        sizes = set()
        for key, axis in grp:
            assert key in state, f"oracle names unknown key {key}"
            assert axis < state[key].ndim, f"oracle names axis {axis} of {key} {tuple(state[key].shape)}"
            sizes.add(state[key].shape[axis])
        assert len(sizes) == 1, f"oracle group mixes axis sizes {sizes}: {sorted(grp)}"
        assert not (grp & seen), f"oracle groups overlap on {sorted(grp & seen)}"
        seen |= grp

    for grp in spec.groups.values():
        assert all(m.plain for m in grp.members), f"{grp.id} has structured members on a plain model"

    got = _spec_groups(spec)
    want = {frozenset(g) for g in oracle}
    missing = want - got
    extra = got - want
    msg = []
    for g in sorted(missing, key=sorted):
        msg.append(f"oracle group not in spec: {sorted(g)}")
    for g in sorted(extra, key=sorted):
        msg.append(f"spec group not in oracle: {sorted(g)}")
    assert got == want, "\n".join(msg)


def _trace(model: torch.nn.Module) -> permgraph.PermutationSpec:
    spec = permgraph.trace(model)
    assert spec.info["verification"]["status"] == "passed", spec.info["verification"]
    return spec


# --------------------------------------------------------------------------- #
# tests
# --------------------------------------------------------------------------- #
def test_mlp_oracle_literal() -> None:
    """The first group written out by hand, as in the Git Re-Basin MLP spec."""
    oracle = mlp_oracle(3)
    assert {("layers.0.weight", 0), ("layers.0.bias", 0), ("layers.2.weight", 1)} in oracle
    assert {("layers.4.weight", 0), ("layers.4.bias", 0), ("layers.6.weight", 1)} in oracle
    assert len(oracle) == 3


@pytest.mark.parametrize("norm", ["none", "bn", "ln"])
def test_mlp(norm: str) -> None:
    torch.manual_seed(0)
    model = create("mlp", width=32, depth=3, norm=norm)
    _assert_matches(_trace(model), mlp_oracle(3, norm), model)


@pytest.mark.parametrize("norm", ["bn", "ln", "none"])
def test_vgg16(norm: str) -> None:
    torch.manual_seed(0)
    model = create("vgg16", width_multiplier=0.25, norm=norm)
    oracle = vgg_oracle(VGG16_CFG, norm)
    assert len(oracle) == 13
    last = next(g for g in oracle if ("classifier.weight", 1) in g)
    assert ("features.40.weight", 0) in last
    _assert_matches(_trace(model), oracle, model)


@pytest.mark.parametrize("norm", ["bn", "ln", "none"])
def test_resnet20(norm: str) -> None:
    torch.manual_seed(0)
    model = create("resnet20", width_multiplier=0.5, norm=norm)
    oracle = resnet_oracle(20, norm)
    assert len(oracle) == 3 + 9
    _assert_matches(_trace(model), oracle, model)
