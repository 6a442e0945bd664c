"""Activation matching internals: streaming moments against a float64 reference, the assignment
solver's reductions, and the cached graph templates (reuse, stale templates, B of another architecture)."""

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

import permgraph
from permgraph import _activations, models
from permgraph._activations import _Moments
from permgraph._solver import assign
from permgraph.errors import SpecMismatchError


def _reference(xa: torch.Tensor, xb: torch.Tensor):
    """Pearson correlation, inner products and cosine of all rows at once, in float64."""
    xa, xb = xa.double(), xb.double()
    n = xa.shape[0]
    ca, cb = xa - xa.mean(0), xb - xb.mean(0)
    cov = ca.T @ cb / n
    pearson = cov / (ca.pow(2).mean(0).sqrt()[:, None] * cb.pow(2).mean(0).sqrt()[None, :])
    inner = xa.T @ xb / n
    cosine = inner / (xa.pow(2).mean(0).sqrt()[:, None] * xb.pow(2).mean(0).sqrt()[None, :])
    return {"pearson": pearson, "inner": inner, "cosine": cosine}


@pytest.mark.parametrize("layout", ["rows", "channels"])
def test_streaming_moments_match_a_float64_reference(layout):
    # means 100x the standard deviations (the case the shifted-data algorithm is for), uneven batch sizes,
    # several chunk flushes, and units on dim 1 of a 4-d tensor for the channel layout
    g = torch.Generator().manual_seed(0)
    n, sizes = 24, [700, 300, 1500, 64, 2200, 900]
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) / n ** 0.5
    pool: dict = {}
    m = _Moments(n, "cpu", pool)
    rows_a, rows_b = [], []
    for size in sizes:
        za = torch.randn(size, n, generator=g, dtype=torch.float64)
        xa = 100.0 + za
        xb = -50.0 + 0.5 * (za @ mix) + 0.5 * torch.randn(size, n, generator=g, dtype=torch.float64)
        xa, xb = xa.float(), xb.float()
        rows_a.append(xa)
        rows_b.append(xb)
        if layout == "rows":
            m.update(xa, xb, 1)
        else:  # (batch, units, 2, 2): four spatial positions per input, units on dim 1
            ta = xa.reshape(-1, 2, 2, n).permute(0, 3, 1, 2)
            tb = xb.reshape(-1, 2, 2, n).permute(0, 3, 1, 2)
            m.update(ta.contiguous(), tb.contiguous(), 1)
    assert m.count == sum(sizes)
    ref = _reference(torch.cat(rows_a), torch.cat(rows_b))
    for kind, want in ref.items():
        got = m.similarity(kind)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max())), kind
    da, db = m.constant_units()
    assert not da.any() and not db.any()


def test_constant_units_are_found_and_zeroed_in_pearson():
    g = torch.Generator().manual_seed(1)
    m = _Moments(6, "cpu", {})
    for _ in range(3):
        xa = torch.randn(500, 6, generator=g)
        xb = torch.randn(500, 6, generator=g)
        xa[:, 2] = 3.0  # a unit constant on the data (a dead ReLU with a bias)
        xb[:, 4] = 0.0
        m.update(xa, xb, 1)
    da, db = m.constant_units()
    assert da.tolist() == [i == 2 for i in range(6)] and db.tolist() == [i == 4 for i in range(6)]
    s = m.similarity("pearson")
    assert (s[2] == 0).all() and (s[:, 4] == 0).all() and torch.isfinite(s).all()


def test_assignment_reductions_keep_the_optimum():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 64, 200):
        s = rng.standard_normal((n, n)) * 0.1 + rng.standard_normal((n, 1)) + rng.standard_normal((1, n))
        p = assign(torch.from_numpy(s))
        assert sorted(p.tolist()) == list(range(n))
        r, c = linear_sum_assignment(s, maximize=True)
        assert s[np.arange(n), p.numpy()].sum() == pytest.approx(s[r, c].sum(), rel=1e-12, abs=1e-12)
    with pytest.raises(ValueError, match="NaN or inf"):
        assign(torch.tensor([[0.0, float("nan")], [1.0, 0.0]]))


class Switch(nn.Module):
    """Same tensors and the same repr whatever the activation: only forward tells them apart."""

    def __init__(self, act: str = "relu"):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 3)
        self.act = act

    def forward(self, x):
        f = torch.relu if self.act == "relu" else torch.tanh
        return self.out(f(self.fc2(f(self.fc1(x)))))


def _pair(act: str, seed: int):
    torch.manual_seed(seed)
    a = Switch(act).eval()
    spec = permgraph.trace(a, torch.randn(2, 8))
    perm = permgraph.random_permutation(spec, seed + 1)
    return a, permgraph.apply(a, spec, perm), spec, perm


def _recovered(al, perm) -> bool:
    """The alignment undoes the planted permutation (B = A permuted by ``perm``)."""
    return all(torch.equal(al.perm[g], torch.argsort(perm[g])) for g in perm)


def test_templates_are_reused_and_a_stale_one_is_exported_afresh(monkeypatch):
    _activations._TEMPLATES.clear()
    exports = []
    build = _activations._Template.__init__

    def counted(self, *args, **kw):
        exports.append(1)
        build(self, *args, **kw)

    monkeypatch.setattr(_activations._Template, "__init__", counted)
    loader = [torch.randn(64, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    for seed in (0, 1):  # two different pairs of one architecture: one export
        a, b, spec, perm = _pair("relu", seed)
        al = permgraph.align(a, b, "activation", loader, spec=spec, progress=False)
        assert _recovered(al, perm)
    assert len(exports) == 1
    # same class, tensors and repr, but another function: the cached graph fails the output check and
    # the template is exported again; the result is the exact recovery, as from a fresh export
    a, b, spec, perm = _pair("tanh", 2)
    al = permgraph.align(a, b, "activation", loader, spec=spec, progress=False)
    assert len(exports) == 2
    assert _recovered(al, perm)
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert torch.allclose(al.apply(b)(x), a(x), atol=1e-5)  # B mapped back onto A exactly
    # no template holds a model's tensors between calls
    for tpl in _activations._TEMPLATES.values():
        assert tpl._idle is None or all(t is None or not isinstance(t, torch.Tensor)
                                        for t in list(tpl._idle.parameters()) + list(tpl._idle.buffers()))


def test_model_b_of_another_architecture_with_the_same_tensors_is_an_error():
    a, _, spec, _ = _pair("relu", 0)
    b = Switch("tanh").eval()
    b.load_state_dict(a.state_dict())
    with pytest.raises(SpecMismatchError, match="does not compute the same function"):
        permgraph.align(a, b, "activation", [torch.randn(16, 8)], spec=spec, progress=False)


def test_output_check_tolerates_matching_nan_and_inf_but_not_a_one_sided_nan():
    from permgraph._activations import _mismatch

    w = torch.tensor([1.0, float("nan"), float("inf"), -2.0])
    assert _mismatch((w.clone(),), [w]) is None
    assert _mismatch((w + 1e-7,), [w]) is None
    assert _mismatch((torch.tensor([1.0, 0.0, float("inf"), -2.0]),), [w]) is not None
    assert _mismatch((torch.tensor([1.0, float("nan"), float("inf"), -2.1]),), [w]) is not None
    assert "shape" in _mismatch((torch.zeros(3),), [w])


class TwoTaps(nn.Module):
    """One group read at two taps: the ReLU of fc1 and the ReLU after the residual addition."""

    def __init__(self, n: int = 12):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(4, n), nn.Linear(n, n), nn.Linear(n, 2)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.out(torch.relu(self.fc2(h) + h))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_tap_keeps_its_own_means(seed):
    # units 0-3 are constant in each tap but at another level in each (fc1's bias, then fc1's plus
    # fc2's): pooled into one set of moments they vary (between the taps) and all correlate 1 with one
    # another, a tie the assignment breaks arbitrarily, and they escape the constant-unit fallback.
    # Per tap they are constant, and the weights match them.
    torch.manual_seed(seed)
    a = TwoTaps().eval()
    with torch.no_grad():
        a.fc1.weight[:4] = 0
        a.fc2.weight[:4] = 0
        a.fc1.bias[:4] = torch.tensor([1.0, 2.0, 3.0, 4.0])
        a.fc2.bias[:4] = torch.tensor([2.0, 3.0, 1.0, 5.0])
    spec = permgraph.trace(a, torch.randn(2, 4))
    perm = permgraph.random_permutation(spec, seed + 1)
    b = permgraph.apply(a, spec, perm)
    loader = [torch.randn(64, 4, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    for similarity in ("pearson", "cosine", "inner"):
        al = permgraph.align(a, b, "activation", loader, spec=spec, progress=False, similarity=similarity)
        assert _recovered(al, perm), similarity
        assert al.log[0]["constant_units"] == {"g0": 4}, similarity
    # the statistics themselves: per tap, the four units are constant and score 0 (Pearson); pooled,
    # they are not constant and tie at correlation 1
    xs = [torch.randn(64, 4, generator=torch.Generator().manual_seed(9))]
    with torch.no_grad():
        h = torch.relu(a.fc1(xs[0]))
        taps = [h, torch.relu(a.fc2(h) + h)]
    per_tap = _activations._TapMoments(12, "cpu", {})
    pooled = _Moments(12, "cpu", {})
    for k, t in enumerate(taps):
        per_tap.update(k, t, t, 1)
        pooled.update(t, t, 1)
    assert per_tap.constant_units()[0][:4].all() and not pooled.constant_units()[0][:4].any()
    assert (per_tap.similarity("pearson")[:4] == 0).all()
    assert torch.allclose(pooled.similarity("pearson")[:4, :4], torch.ones(4, 4, dtype=torch.float64))
    assert per_tap.count == pooled.count == 128


def test_mobilenetv3_small_with_random_batchnorm_is_matched_exactly():
    # taps of one group (the residual stream of a stage, read after every addition) with different
    # means and scales: pooled moments got 14-34 of its 4,872 units wrong with Pearson and cosine
    from permgraph._verify import randomize_

    torch.manual_seed(0)
    a = permgraph.models.create("timm:mobilenetv3_small_100").eval()
    randomize_(a, torch.Generator().manual_seed(0))
    spec = permgraph.trace(a, torch.randn(2, 3, 64, 64))
    perm = permgraph.random_permutation(spec, 1)
    b = permgraph.apply(a, spec, perm)
    g = torch.Generator().manual_seed(2)
    loader = [torch.randn(64, 3, 64, 64, generator=g) for _ in range(2)]
    for similarity in ("pearson", "cosine"):
        al = permgraph.align(a, b, "activation", loader, spec=spec, progress=False, similarity=similarity)
        wrong = {k: int((al.perm[k] != torch.argsort(perm[k])).sum()) for k in spec.groups}
        assert sum(wrong.values()) == 0, (similarity, {k: v for k, v in wrong.items() if v})


def test_units_that_activations_cannot_tell_apart_are_matched_by_weights():
    # unit 2k+1 of the hidden layer computes exactly twice unit 2k (weights and bias doubled), so every pair
    # correlates perfectly with each other's partner: Pearson ties, and the assignment between the two is
    # decided by the weights (which differ by the factor 2)
    torch.manual_seed(0)
    a = models.create("mlp", in_features=40, width=64, depth=1).eval()
    with torch.no_grad():
        w, b = a.layers[0].weight, a.layers[0].bias
        w[1::2] = 2 * w[0::2]
        b[1::2] = 2 * b[0::2]
    spec = permgraph.trace(a)
    planted = permgraph.random_permutation(spec, 3)
    pb = permgraph.apply(a, spec, planted)
    xs = [torch.randn(64, 40, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    al = permgraph.align(a, pb, "activation", xs, spec=spec, progress=False)
    (g,) = spec.groups
    assert torch.equal(al.perm[g], planted.inverse()[g])
    assert al.log[0]["tied_units"][g] >= 2 and al.groups[g]["tied_units"] >= 2

