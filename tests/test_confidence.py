"""Per-group margin and confidence: the solver's definitions against brute force, and both matchers'
diagnostics on a model with two interchangeable units (docs/alignment.md, "How sure is each group?")."""

import itertools
import math

import pytest
import torch

import permgraph
from permgraph import models
from permgraph._solver import assign, confidence, margin, margins


def _score(s, q):
    return sum(float(s[i, q[i]]) for i in range(len(q)))


def _brute_margin(s, p):
    """score(p) - max over every other permutation q of score(q)."""
    n = len(p)
    others = [q for q in itertools.permutations(range(n)) if list(q) != list(p)]
    return _score(s, p) - max(_score(s, q) for q in others)


def _brute_swap(s, p):
    n = len(p)
    return min(float(s[i, p[i]] + s[j, p[j]] - s[i, p[j]] - s[j, p[i]]) for i in range(n) for j in range(n) if i != j)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_margin_is_the_gap_to_the_second_best_assignment(n):
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        s = torch.randn(n, n, generator=g, dtype=torch.float64)
        best = assign(s)
        for p in (best, torch.randperm(n, generator=g)):  # the optimum, and (mostly) non-optimal ones
            assert margin(s, p) == pytest.approx(_brute_margin(s, p.tolist()), abs=1e-9)
            # the O(n^2) form used above EXACT_MARGIN_MAX units: the best exchange of two units
            assert margin(s, p, exact_max=0) == pytest.approx(_brute_swap(s, p.tolist()), abs=1e-9)
        assert margin(s, best) >= 0
        assert margin(s, best, exact_max=0) >= margin(s, best) - 1e-12  # an upper bound at the optimum


def test_the_best_exchange_of_a_large_matrix_is_found_in_blocks():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(300, 300, generator=g, dtype=torch.float64)  # over 2**16 entries: the blocked path
    for p in (assign(s), torch.randperm(300, generator=g)):
        t = s[:, p]
        d = t.diagonal()
        full = d[:, None] + d[None, :] - t - t.T
        full.fill_diagonal_(math.inf)
        assert margin(s, p) == pytest.approx(float(full.min()), abs=1e-9)


def test_margins_of_a_batch_equal_the_single_ones():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 9, 9, generator=g, dtype=torch.float64)
    p = torch.stack([assign(x) if i % 2 else torch.randperm(9, generator=g) for i, x in enumerate(s)])
    assert margins(s, p) == pytest.approx([margin(x, q) for x, q in zip(s, p)], abs=1e-12)


@pytest.mark.parametrize("n", [6, 40, 300])  # exact below EXACT_MARGIN_MAX, the best exchange above
def test_two_identical_units_give_a_margin_of_exactly_zero(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 8, generator=g, dtype=torch.float64)
    x[3] = x[n - 2]  # A's units 3 and n-2 are the same: their rows of S are identical
    s = x @ (x[torch.randperm(n, generator=g)] + 0.01 * torch.randn(n, 8, generator=g, dtype=torch.float64)).T
    p = assign(s)
    assert margin(s, p) == 0.0 and confidence(s, p) == 0.0
    assert not math.copysign(1.0, margin(s, p)) < 0  # 0.0, not -0.0


def test_confidence_is_scale_free_and_ignores_row_and_column_constants():
    g = torch.Generator().manual_seed(1)
    for n in (5, 200):
        x = torch.randn(n, 16, generator=g, dtype=torch.float64)
        s = x @ x.T
        p = assign(s)
        c = confidence(s, p)
        assert c > 0
        t = 7.5 * s + torch.randn(n, 1, generator=g, dtype=torch.float64) + torch.randn(1, n, generator=g,
                                                                                         dtype=torch.float64)
        assert confidence(t, p) == pytest.approx(c, rel=1e-9)
        assert margin(t, p) == pytest.approx(7.5 * margin(s, p), rel=1e-9)


def test_degenerate_matrices():
    one = torch.ones(1, 1)
    assert margin(one, torch.tensor([0])) == math.inf and confidence(one, torch.tensor([0])) == math.inf
    flat = torch.full((4, 4), 3.0)  # every assignment scores the same
    assert margin(flat, torch.arange(4)) == 0.0 and confidence(flat, torch.arange(4)) == 0.0
    s = torch.eye(3, dtype=torch.float64)
    p = torch.tensor([1, 0, 2])  # not optimal: it scores 1, the identity 3
    assert margin(s, p) == pytest.approx(-2.0) and confidence(s, p) < 0
    with pytest.raises(ValueError):
        margin(torch.zeros(2, 3), torch.arange(2))


def _with_twins():
    """A small MLP whose hidden group g1 holds two identical units (5 and 9), and a permuted copy."""
    torch.manual_seed(0)
    a = models.create("mlp", in_features=40, width=32, depth=3).eval()
    spec = permgraph.trace(a)
    with torch.no_grad():
        a.layers[2].weight[5] = a.layers[2].weight[9]
        a.layers[2].bias[5] = a.layers[2].bias[9]
        a.layers[4].weight[:, 5] = a.layers[4].weight[:, 9]
    b = permgraph.apply(a, spec, permgraph.random_permutation(spec, 3))
    return a, b, spec


def _check_twins(al, spec):
    for g in spec.groups:
        d = al.groups[g]
        assert {"margin", "confidence"} <= set(d)
        if g == "g1":
            assert abs(d["confidence"]) < 1e-9 and abs(d["margin"]) < 1e-9 * d["similarity_after"]
        else:
            assert d["confidence"] > 0.1 and d["margin"] > 0
    text = al.summary()
    block = text.split("least certain groups")[1].split("\n  g")[0]  # the block, before the per-group lines
    first = block.splitlines()[1]
    assert first.strip().startswith("g1 (32 units; layers.2, layers.4): confidence 0")
    assert "layers.2" in spec.groups["g1"].modules


def test_weight_matching_reports_interchangeable_units_as_uncertain(tmp_path):
    a, b, spec = _with_twins()
    al = permgraph.align(a, b, spec=spec, progress=False)
    _check_twins(al, spec)
    # the diagnostics survive save / load, and so does the summary's block
    al.save(tmp_path / "al.safetensors")
    back = permgraph.Alignment.load(tmp_path / "al.safetensors")
    assert back.groups["g1"]["confidence"] == al.groups["g1"]["confidence"]
    assert "least certain groups" in back.summary()
    # a run stopped before it converged computes the same keys from fresh similarities
    short = permgraph.align(a, b, spec=spec, progress=False, max_iter=1)
    assert all({"margin", "confidence"} <= set(d) for d in short.groups.values())


def test_activation_matching_reports_margin_and_confidence():
    a, b, spec = _with_twins()
    x = torch.randn(512, 40, generator=torch.Generator().manual_seed(2))
    al = permgraph.align(a, b, "activation", [x[:256], x[256:]], spec=spec, progress=False)
    _check_twins(al, spec)


@pytest.mark.parametrize("n", [2, 3, 64, 65, 130])
def test_exchange_losses_are_each_units_least_loss_over_all_exchanges(n):
    """The blockwise per-unit exchange losses (behind the tie rule and the swap margin) equal the
    brute-force n x n computation, for the optimal assignment and for a random one, ties included."""
    from permgraph._solver import _swap_margin, assign, exchange_losses

    gen = torch.Generator().manual_seed(n)
    s = torch.randn(n, n, dtype=torch.float64, generator=gen)
    if n > 3:
        s[1] = s[2]  # two units A cannot tell apart: their least exchange loss is exactly 0
    for p in (assign(s), torch.randperm(n, generator=gen)):
        sp = s[:, p]
        d = sp.diagonal()
        loss = d[:, None] + d[None, :] - sp - sp.T
        loss.fill_diagonal_(float("inf"))
        want = loss.min(1).values
        torch.testing.assert_close(exchange_losses(s, p), want, rtol=0, atol=1e-12)
        q = torch.empty_like(p)
        q[p] = torch.arange(n)
        assert _swap_margin(s, p, q) == pytest.approx(float(want.min()), abs=1e-12)
    if n > 3:
        assert float(exchange_losses(s, assign(s))[1]) == 0.0
