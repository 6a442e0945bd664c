"""Interpolation, BatchNorm reset, REPAIR and barriers."""

import copy

import pytest
import torch
from torch import nn

import permgraph
from permgraph import data, models
from permgraph.interpolation import channel_stats, repair_, repair_layers


@pytest.fixture(scope="module")
def digits():
    return data.get("digits")


def _cnn(seed=0):
    torch.manual_seed(seed)
    return models.create("resnet20", width_multiplier=0.5, norm="bn", in_channels=1, input_size=8)


@pytest.fixture(scope="module")
def trained_cnn(digits):
    return permgraph.train(lambda: _cnn(0), digits, epochs=2, lr=0.05, batch_size=64, init_seed=0,
                           data_seed=0, progress=False).model


def test_interpolate_lerps_floats_and_keeps_integer_buffers_from_a():
    a, b = _cnn(0), _cnn(1)
    with torch.no_grad():
        b.bn1.num_batches_tracked.fill_(7)
    mid = permgraph.interpolate(a, b, 0.25)
    sa, sb, sm = a.state_dict(), b.state_dict(), mid.state_dict()
    for k in sa:
        if sa[k].is_floating_point():
            assert torch.allclose(sm[k], 0.75 * sa[k] + 0.25 * sb[k], atol=1e-6)
        else:
            assert torch.equal(sm[k], sa[k])
    mask = {"conv1.weight": torch.zeros_like(sa["conv1.weight"], dtype=torch.bool)}
    masked = permgraph.interpolate(sa, sb, 0.5, mask=mask)
    assert torch.all(masked["conv1.weight"] == 0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        permgraph.interpolate(a, b, 1.5)


def test_barrier_of_a_model_with_itself_is_exactly_zero(digits, trained_cnn):
    a = trained_cnn
    loader = digits.loader("test", 128)
    reset = digits.loader("train", 128, subset=360)  # as much data as the test set: the cost stays the same
    for bn in ("auto", "none", "repair"):
        curve = permgraph.barrier(a, a, loader, alphas=3, bn=bn, reset_loader=reset, progress=False)
        assert curve.barrier("error") == 0.0 and curve.barrier("loss") == 0.0, bn
    assert curve.to_dict()["barrier"] == {"loss": 0.0, "error": 0.0}


def test_barrier_with_an_aligned_permuted_copy_is_exactly_zero(digits, trained_cnn):
    a = trained_cnn
    spec = permgraph.trace(a)
    b = permgraph.apply(a, spec, permgraph.random_permutation(spec, 1))
    loader = digits.loader("test", 128)
    reset = digits.loader("train", 128, subset=360)
    unaligned = permgraph.barrier(a, b, loader, alphas=5, reset_loader=reset, progress=False)
    al = permgraph.align(a, b, spec=spec, progress=False)
    aligned = permgraph.barrier(a, al.apply(b), loader, alphas=5, reset_loader=reset, progress=False)
    assert aligned.barrier("error") == 0.0 and aligned.barrier("loss") == 0.0
    assert unaligned.barrier("loss") > 0.1


def test_endpoints_equal_a_direct_evaluation(digits):
    torch.manual_seed(0)
    a = models.create("mlp", in_features=64, width=32, depth=2)
    torch.manual_seed(1)
    b = models.create("mlp", in_features=64, width=32, depth=2)
    loader = digits.loader("test", 100)
    curve = permgraph.barrier(a, b, loader, alphas=[0.0, 0.3, 1.0], progress=False)
    assert curve.bn == "none"
    ea, eb = permgraph.evaluate(a, loader), permgraph.evaluate(b, loader)
    assert curve.endpoints("loss") == pytest.approx((ea["loss"], eb["loss"]), rel=1e-6)
    assert curve.endpoints("error") == (ea["error"], eb["error"])
    # definitions
    v = curve.values["error"]
    assert curve.barrier("error") == pytest.approx(max(x - (v[0] + al * (v[-1] - v[0]))
                                                       for al, x in zip(curve.alphas, v)))
    with pytest.raises(ValueError, match="midpoint"):
        curve.barrier("error", "midpoint")


def test_bad_alpha_grids_and_different_architectures_are_clear_errors(digits):
    a = _cnn(0)
    loader = digits.loader("test", 128)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        permgraph.barrier(a, a, loader, alphas=[0.0, 1.5], progress=False)
    with pytest.raises(ValueError, match="endpoints"):
        permgraph.barrier(a, a, loader, alphas=[0.2, 1.0], progress=False)
    other = models.create("resnet20", width_multiplier=1, norm="bn", in_channels=1, input_size=8)
    with pytest.raises(permgraph.SpecMismatchError, match="different architectures"):
        permgraph.barrier(a, other, loader, progress=False)
    with pytest.raises(ValueError, match="bn must be"):
        permgraph.barrier(a, a, loader, bn="magic", progress=False)


def test_recomputed_statistics_need_an_explicit_reset_loader_and_the_curve_records_it(digits):
    torch.manual_seed(0)
    bn_net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    mlp = models.create("mlp", in_features=64, width=16, depth=1)  # no BatchNorm
    test = digits.loader("test", 120)
    for model, bn in ((bn_net, "auto"), (bn_net, "reset"), (bn_net, "repair"), (mlp, "repair")):
        # never the evaluation data (here the test set) by default: that would leak it into the model
        with pytest.raises(ValueError, match=r"needs the data to compute them from: pass reset_loader="):
            permgraph.barrier(model, model, test, alphas=2, bn=bn, progress=False)
    with pytest.raises(ValueError, match=r"bn='auto' \(resolved to 'reset': the network has BatchNorm\)"):
        permgraph.barrier(bn_net, bn_net, test, alphas=2, progress=False)
    # nothing to recompute: no reset_loader needed, and the curve says no statistics were computed
    for model, bn in ((bn_net, "none"), (mlp, "auto"), (mlp, "reset"), (mlp, "none")):
        curve = permgraph.barrier(model, model, test, alphas=2, bn=bn, progress=False)
        assert curve.reset_data is None and curve.to_dict()["reset_data"] is None
    train = digits.loader("train", 100, shuffle=False)  # 1,437 examples
    for model, bn in ((bn_net, "auto"), (bn_net, "repair"), (mlp, "repair")):
        curve = permgraph.barrier(model, model, test, alphas=2, bn=bn, reset_loader=train, progress=False)
        assert curve.to_dict()["reset_data"] == "reset_loader (1437 examples)", (bn, curve.reset_data)
        part = permgraph.barrier(model, model, test, alphas=2, bn=bn, reset_loader=train, reset_batches=3,
                                 progress=False)
        assert part.reset_data == "reset_loader (300 examples)"
    # the statistics come from reset_loader: a different source gives different values
    other = permgraph.barrier(bn_net, bn_net, test, alphas=2, reset_loader=test, progress=False)
    curve = permgraph.barrier(bn_net, bn_net, test, alphas=2, reset_loader=train, progress=False)
    assert other.values["loss"] != curve.values["loss"] and other.reset_data == "reset_loader (360 examples)"
    # IMP barriers check before any alignment is computed
    with pytest.raises(ValueError, match="pass reset_loader="):
        permgraph.prune.imp_barriers(bn_net, None, None, test)


def test_reset_bn_matches_a_manual_pass_and_restores_momentum(digits):
    a = _cnn(0).eval()
    loader = digits.loader("train", 100, shuffle=False)
    bns = [m for m in a.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in bns]
    out = permgraph.reset_bn(a, loader)
    assert [m.momentum for m in bns] == momenta  # the caller's model is untouched
    new_bns = [m for m in out.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [m.momentum for m in new_bns] == momenta and not out.training
    # manual: cumulative average of per-batch means / unbiased variances of the first BN's input
    conv = a.conv1
    means, vars_ = [], []
    with torch.no_grad():
        for x, _ in loader:
            h = conv(x)
            means.append(h.mean((0, 2, 3)))
            vars_.append(h.var((0, 2, 3), unbiased=True))
    want_mean = torch.stack(means).mean(0)
    want_var = torch.stack(vars_).mean(0)
    assert torch.allclose(new_bns[0].running_mean, want_mean, atol=1e-5)
    assert torch.allclose(new_bns[0].running_var, want_var, rtol=1e-4, atol=1e-5)


def test_repair_matches_the_targeted_statistics(digits):
    torch.manual_seed(0)
    m = models.create("resnet20", width_multiplier=0.5, norm="ln", in_channels=1, input_size=8)
    loader = digits.loader("train", 200, shuffle=False)
    layers = repair_layers(m)
    assert "fc" not in layers and len(layers) == 21
    stats = channel_stats(m, loader, layers)
    g = torch.Generator().manual_seed(0)
    targets = {n: (mu + torch.randn(mu.shape, generator=g, dtype=mu.dtype) * 0.1,
                   sd * (1 + torch.rand(sd.shape, generator=g, dtype=sd.dtype))) for n, (mu, sd) in stats.items()}
    fixed = repair_(copy.deepcopy(m), targets, loader)
    after = channel_stats(fixed, loader, layers)
    for n in layers:
        # the targets moved every channel by ~0.1 (mean) and up to 2x (std); REPAIR lands within 5e-3
        assert (stats[n][0] - targets[n][0]).abs().max() > 0.05
        assert torch.allclose(after[n][0], targets[n][0], atol=5e-3), n
        assert torch.allclose(after[n][1], targets[n][1], rtol=5e-3, atol=5e-3), n


def _mnist1d_mlp(seed, d):
    return permgraph.train(lambda: models.create("mlp", in_features=40, width=128, depth=2), d, epochs=10,
                           lr=0.05, batch_size=128, weight_decay=0.0, schedule="constant", init_seed=seed,
                           data_seed=seed, progress=False).model


def test_alignment_lowers_the_error_barrier_on_mnist1d():
    d = data.get("mnist1d")
    a, b = _mnist1d_mlp(0, d), _mnist1d_mlp(1, d)
    train_loader = d.loader("train", 1000, shuffle=False)
    spec = permgraph.trace(a)
    plain = permgraph.barrier(a, b, train_loader, alphas=11, progress=False).barrier("error")
    wm = permgraph.align(a, b, spec=spec, progress=False)
    am = permgraph.align(a, b, "activation", loader=d.loader("train", 1000, shuffle=False), spec=spec,
                         progress=False)
    bw = permgraph.barrier(a, wm.apply(b), train_loader, alphas=11, progress=False).barrier("error")
    ba = permgraph.barrier(a, am.apply(b), train_loader, alphas=11, progress=False).barrier("error")
    # measured (seeds 0/1, train error barrier, 11 alphas): unaligned 0.391, weight 0.040, activation 0.052
    assert plain > 0.2
    assert bw < plain - 0.15 and ba < plain - 0.15, (plain, bw, ba)
