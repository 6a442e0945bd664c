"""Verification must tell a wrong rule from rounding noise, whatever the weights.

A permutation changes only the order in which sums are rounded. A model that amplifies rounding errors
(NFNets with randomised gains, deep networks in the chaotic regime) then changes its float32 output by more
than the fixed tolerance under a *correct* permutation. These tests pin down the fix: per-channel gains are
randomised like vectors, the tolerance follows the measured noise floor, a float32 check that cannot tell
is redone in float64, and a wrong rule is still caught.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_rules import BNNet  # the same two-BatchNorm conv net as the rule tests
from timm.layers import ScaledStdConv2d
from torch import nn

import permgraph
from permgraph import _rules, _verify
from permgraph.models import create

slow = pytest.mark.slow


class Chaotic(nn.Module):
    """A deep tanh MLP with weights of gain ``gain`` > 1: in this chaotic regime a perturbation of one
    rounding error grows from layer to layer, so permuting hidden units changes the float32 output by far
    more than float32's epsilon, although the permutation is exact."""

    def __init__(self, depth: int, gain: float, width: int = 32, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.inp = nn.Linear(8, width)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, 2)
        with torch.no_grad():
            for lin in self.layers:
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * gain / math.sqrt(width))

    def forward(self, x):
        x = torch.tanh(self.inp(x))
        for lin in self.layers:
            x = torch.tanh(lin(x))
        return self.head(x)


def _x():
    return torch.randn(16, 8, generator=torch.Generator().manual_seed(0))


def test_randomize_treats_per_channel_gains_as_vectors():
    """A (C, 1, 1, 1) gain is a per-channel vector: N(0, 0.5^2) noise, not the N(0, 1) of a constant
    weight with fan-in 1 (which made randomised NFNets amplify rounding errors ~1000-fold)."""
    conv = ScaledStdConv2d(4, 512, 1)
    ls = nn.Parameter(torch.full((512, 1, 1), 1e-6))  # a (C, 1, 1) layer scale, as in torchvision ConvNeXt
    conv.register_parameter("layer_scale", ls)
    _verify.randomize_(conv, torch.Generator().manual_seed(0))
    for t, start in ((conv.gain, 1.0), (conv.layer_scale, 1e-6)):
        noise = (t.detach() - start).flatten()
        assert 0.4 < float(noise.std()) < 0.6
    w = conv.weight.detach()  # a real weight is left alone
    assert float(w.std()) < 1.0


def test_float32_check_tolerates_the_rounding_noise_of_a_correct_spec(monkeypatch):
    """float32 check of an exact spec whose permuted output differs by more than the fixed 1e-4: the
    tolerance is widened to the measured noise floor, and nothing is frozen."""
    monkeypatch.setattr(_verify, "FLOAT64_MAX_PARAMS", 0)
    m = Chaotic(depth=20, gain=4.0)
    spec = permgraph.trace(m, _x(), verify=False)
    checker = _verify._Checker(spec, m, (_x(),))
    err = checker.error(set(spec.groups))
    assert err > _verify.TOL[torch.float32]  # what the fixed tolerance rejected
    traced = permgraph.trace(m, _x())
    ver = traced.info["verification"]
    assert ver["status"] == "passed" and ver["dtype"] == "float32", ver
    assert ver["tolerance"] >= err and ver["noise_floor"] > 1e-5
    assert len(traced.groups) == len(spec.groups) == 21
    res = permgraph.check_equivalence(m, traced, (_x(),))
    assert res.ok and res.tolerance > _verify.TOL[torch.float32]


def test_a_too_noisy_float32_check_is_redone_in_float64(monkeypatch):
    monkeypatch.setattr(_verify, "FLOAT64_MAX_PARAMS", 0)
    m = Chaotic(depth=40, gain=4.0)
    spec = permgraph.trace(m, _x())
    ver = spec.info["verification"]
    assert ver["status"] == "passed" and ver["dtype"] == "float64", ver
    assert ver["float32_noise_floor"] * _verify.NOISE_FACTOR > _verify.TOL_MAX
    assert len(spec.groups) == 41


def test_float32_check_still_catches_a_wrong_rule(monkeypatch):
    """The noise floor of a well-conditioned model is tiny: a rule that forgets running_var is still
    caught in float32, and the tolerance stays at 1e-4."""

    def forgetful(cx, node):
        lx = cx.label(node.args[0])
        for p in node.args[1:4]:
            if p is not None:
                cx.unify(cx.label(p)[0], lx[1])
        return lx

    monkeypatch.setattr(_verify, "FLOAT64_MAX_PARAMS", 0)
    monkeypatch.setitem(_rules.RULES, torch.ops.aten.batch_norm, forgetful)
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    spec = permgraph.trace(BNNet(), x)
    ver = spec.info["verification"]
    assert ver["dtype"] == "float32" and ver["status"].startswith("passed after freezing"), ver
    assert ver["tolerance"] == _verify.TOL[torch.float32] and ver["noise_floor"] < 1e-5
    assert len(spec.groups) == 0


def _coverage(model, spec) -> float:
    state = model.state_dict()
    return sum(state[k].numel() for k in spec.permutable_keys()) / sum(t.numel() for t in state.values())


def _random_gains_(model, seed: int, spread: float) -> None:
    """Arbitrary weights: every ScaledStdConv2d gain N(1, spread^2) (the last conv of each block is
    zero-initialised in a fresh NFNet), biases shifted."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, t in model.state_dict(keep_vars=True).items():
            if k.endswith("gain") and t.ndim:
                t.copy_(1 + spread * torch.randn(t.shape, generator=g))
            elif k.endswith("bias"):
                t.add_(0.3 * torch.randn(t.shape, generator=g))


@pytest.mark.parametrize("seed", [0, 1])
def test_small_nfnet_with_arbitrary_gains_verifies_in_float32(monkeypatch, seed):
    monkeypatch.setattr(_verify, "FLOAT64_MAX_PARAMS", 0)
    m = create("timm:test_nfnet").eval()
    _random_gains_(m, seed, 1.0)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    spec = permgraph.trace(m, x)
    assert spec.info["verification"]["status"] == "passed", spec.info["verification"]
    assert _coverage(m, spec) > 0.995


@slow
@pytest.mark.parametrize("seed,spread", [(None, 0.0), (0, 0.5), (1, 1.0), (2, 1.0)])
def test_nfnet_f0_verifies_for_any_weights(seed, spread):
    """nfnet_f0 (71M parameters: checked in float32) as built, and with random gains of which some make
    the randomised copy amplify rounding errors ~1e5-fold."""
    m = create("timm:nfnet_f0").eval()
    if seed is not None:
        _random_gains_(m, seed, spread)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    spec = permgraph.trace(m, x)
    assert spec.info["verification"]["status"] == "passed", spec.info["verification"]
    assert not any("verification" in f.reason for f in spec.frozen)
    assert _coverage(m, spec) > 0.999
