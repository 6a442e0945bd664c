"""Masks, magnitude pruning, IMP with rewinding, mask transfer."""

import pytest
import torch

import permgraph
from permgraph import data, models
from permgraph.prune import Mask, magnitude, prunable_keys, random_mask_like, transfer_arms


def _resnet(seed=0):
    torch.manual_seed(seed)
    return models.create("resnet20", width_multiplier=0.5)


def test_prunable_keys_are_linear_and_conv_weights_only():
    m = _resnet()
    keys = prunable_keys(m)
    assert len(keys) == 22 and all(k.endswith("weight") for k in keys)
    assert not any("bn" in k or "shortcut.1" in k for k in keys)
    assert "fc.weight" in keys and "fc.weight" not in prunable_keys(m, exclude_classifier=True)
    assert prunable_keys(m.state_dict()) == keys


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_one_level_prunes_exactly_the_fraction_of_what_remains(scope):
    m = _resnet()
    mask = magnitude(m, 0.2, scope=scope)
    if scope == "global":
        assert mask.total() - mask.kept() == round(0.2 * mask.total())
    else:
        for t in mask.values():
            assert t.numel() - int(t.sum()) == round(0.2 * t.numel())
    # the pruned weights are the smallest ones
    sd = m.state_dict()
    if scope == "global":
        kept = torch.cat([sd[k].abs().flatten()[mask[k].flatten()] for k in mask])
        gone = torch.cat([sd[k].abs().flatten()[~mask[k].flatten()] for k in mask])
        assert gone.max() <= kept.min()
    m2 = magnitude(m, 0.2, mask=mask, scope=scope)
    if scope == "global":
        assert m2.kept() == mask.kept() - round(0.2 * mask.kept())
    for k in mask:  # masks never regrow
        assert not torch.any(m2[k] & ~mask[k])


def test_l_levels_give_density_0_8_to_the_l_and_excluded_tensors_stay():
    m = _resnet()
    mask = magnitude(m, 0.2, exclude_classifier=True)
    for level in range(1, 6):
        if level > 1:
            mask = magnitude(m, 0.2, mask=mask)
        # exact up to one weight per level (rounding)
        assert abs(mask.kept() - 0.8 ** level * mask.total()) <= level
    assert "fc.weight" not in mask
    assert all(not k.endswith("bias") for k in mask)


def test_ties_are_broken_deterministically_so_counts_are_exact():
    sd = {"a.weight": torch.ones(10, 10), "b.weight": torch.ones(5, 4)}
    mask = magnitude(sd, 0.3)
    assert mask.total() - mask.kept() == round(0.3 * 120)
    assert torch.equal(magnitude(sd, 0.3)["a.weight"], mask["a.weight"])


def test_mask_validation_persistence_and_apply(tmp_path):
    m = _resnet()
    mask = magnitude(m, 0.5)
    p = tmp_path / "mask.safetensors"
    mask.save(p)
    loaded = Mask.load(p, reference=m)
    assert all(torch.equal(loaded[k], mask[k]) for k in mask)
    assert loaded.density() == pytest.approx(0.5, abs=1e-4)
    pruned = mask.apply(m)
    assert all(torch.all(pruned.state_dict()[k][~mask[k]] == 0) for k in mask)
    assert not torch.all(m.state_dict()["conv1.weight"][~mask["conv1.weight"]] == 0)  # caller untouched
    with pytest.raises(permgraph.SpecMismatchError, match="shape"):
        Mask({"conv1.weight": torch.ones(3, 3, dtype=torch.bool)}, reference=m)
    with pytest.raises(permgraph.SpecMismatchError, match="not a tensor"):
        Mask({"nope": torch.ones(3, dtype=torch.bool)}, reference=m)
    with pytest.raises(ValueError, match="0 and 1"):
        Mask({"conv1.weight": torch.full((2,), 0.5)})
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            magnitude(m, bad)
    r = random_mask_like(mask, 0)
    assert r.densities() == pytest.approx(mask.densities())


def test_transfer_is_consistent_with_permuting_a_and_its_mask_together():
    a = _resnet(0)
    spec = permgraph.trace(a)
    mask_a = magnitude(a, 0.6)
    perm = permgraph.random_permutation(spec, 1)
    b = permgraph.apply(a, spec, perm)  # B = A with units reordered
    al = permgraph.align(a, b, spec=spec, progress=False)  # maps B onto A
    moved = permgraph.transfer_mask(mask_a, al)
    expected = permgraph.apply(dict(mask_a), spec, perm)  # A's mask carried along with A's units
    assert all(torch.equal(moved[k], expected[k]) for k in mask_a)
    # and back: transferring B's mask through the inverse recovers A's mask exactly
    back = permgraph.transfer_mask(moved, al.inverse())
    assert all(torch.equal(back[k], mask_a[k]) for k in mask_a)
    # identity alignment is the identity; per-layer densities are preserved
    same = permgraph.transfer_mask(mask_a, permgraph.identity_alignment(spec))
    assert all(torch.equal(same[k], mask_a[k]) for k in mask_a)
    assert moved.densities() == pytest.approx(mask_a.densities())


def _mlp():
    return models.create("mlp", in_features=40, width=128, depth=2)


TRAIN = dict(epochs=6, lr=0.05, batch_size=128, weight_decay=0.0, schedule="constant", progress=False)


def test_imp_levels_resume_and_bad_rewind(tmp_path):
    d = data.get("mnist1d")
    res = permgraph.imp(_mlp, d, levels=2, fraction=0.2, rewind=1, init_seed=0, store=str(tmp_path), **TRAIN)
    assert [round(lv.density, 4) for lv in res.levels] == [1.0, 0.8, 0.64]
    for lv in res.levels[1:]:
        for k, t in lv.mask.items():
            assert torch.all(lv.state[k][~t] == 0)
    assert (tmp_path / "level_2" / "final.safetensors").exists()
    again = permgraph.imp(_mlp, d, levels=2, fraction=0.2, rewind=1, init_seed=0, store=str(tmp_path), **TRAIN)
    assert all(torch.equal(again.levels[2].state[k], res.levels[2].state[k]) for k in res.levels[2].state)
    assert torch.equal(again.rewind_state["layers.0.weight"], res.rewind_state["layers.0.weight"])
    with pytest.raises(ValueError, match="after the end of training"):
        permgraph.imp(_mlp, d, levels=1, rewind=7, **TRAIN)


def test_permuted_mask_beats_the_unpermuted_mask_at_high_sparsity_on_mnist1d():
    d = data.get("mnist1d")
    common = dict(levels=4, fraction=0.5, rewind=1, **TRAIN)
    a = permgraph.imp(_mlp, d, init_seed=0, data_seed=0, **common)
    b = permgraph.imp(_mlp, d, init_seed=1, data_seed=1, **common)
    rows = transfer_arms(_mlp(), a, b, d, levels=[4], data_seed=1, **TRAIN)
    err = {r["arm"]: r["test_error"] for r in rows}
    assert {r["density"] for r in rows if r["arm"] != "own"} == {0.0625}
    # measured at density 0.0625 (seed pairs 0/1 and 2/3, retrain="continue"): own 0.52/0.53,
    # dense_perm 0.59/0.60, level_perm 0.58/0.59, unpermuted 0.71/0.69, random 0.81/0.78, one-shot 0.56/0.54
    assert err["dense_perm"] < err["unpermuted"] - 0.04, err
    assert err["dense_perm"] < err["random"] - 0.1, err


def test_imp_leaves_the_global_generator_as_it_found_it():
    d = data.get("fake", input_shape=(16,), num_classes=4, n_train=512, n_test=128)

    def mlp():
        return models.create("mlp", in_features=16, width=32, depth=2, num_classes=4)

    kw = dict(levels=1, fraction=0.5, rewind=1, init_seed=3, **{**TRAIN, "epochs": 2})
    before = torch.get_rng_state()
    a = permgraph.imp(mlp, d, **kw)
    assert torch.equal(torch.get_rng_state(), before)
    b = permgraph.imp(mlp, d, **kw)
    assert torch.equal(torch.get_rng_state(), before)
    for la, lb in zip(a.levels, b.levels):
        assert all(torch.equal(la.state[k], lb.state[k]) for k in la.state)


# ------------------------------------------------------------------ IMP retraining: continue / restart
def _small():
    return models.create("mlp", in_features=16, width=24, depth=1, num_classes=4)


# fake data, 200 examples in batches of 32: 7 steps per epoch, 4 epochs = T = 28 steps; a step schedule
# with one epoch of warm-up and x0.1 after epochs 2 and 3, so that every step's learning rate tells where
# in the schedule it is
SMALL = dict(epochs=4, batch_size=32, lr=0.1, warmup=1, milestones=[2, 3], schedule="step", weight_decay=0.0,
             progress=False)


def _fake():
    return data.get("fake", input_shape=(16,), num_classes=4, n_train=200, n_test=64)


@pytest.mark.parametrize("rewind, unit, k", [(1, "epoch", 7), (10, "step", 10)])
def test_imp_continue_retrains_the_rest_of_level_0s_schedule(rewind, unit, k):
    from test_train_start_step import recording

    with recording(_fake()) as (d, steps):
        res = permgraph.imp(_small, d, levels=2, fraction=0.5, rewind=rewind, rewind_unit=unit, init_seed=0,
                            data_seed=2, **SMALL)
    # every level after 0 runs exactly steps k..T-1 of level 0: the same learning rate and batches
    assert len(steps) == 28 + 2 * (28 - k)
    lv0, lv1, lv2 = steps[:28], steps[28:56 - k], steps[56 - k:]
    assert lv1 == lv0[k:] and lv2 == lv0[k:]
    assert lv1[0][0] == lv0[k][0] and lv1[0][0] != lv0[0][0]  # the lr of the rewind step, not of step 0
    for lv in res.levels[1:]:  # positions in the schedule: the level ends where level 0 ended
        assert (lv.metrics["epoch"], lv.metrics["step"]) == (4, 28)
    assert (res.settings["retrain"], res.settings["start_step"]) == ("continue", k)


def test_imp_restart_is_the_old_behaviour_a_whole_schedule_from_step_0():
    from test_train_start_step import recording

    with recording(_fake()) as (d, steps):
        res = permgraph.imp(_small, d, levels=1, fraction=0.5, rewind=1, init_seed=0, data_seed=2,
                            retrain="restart", **SMALL)
    assert len(steps) == 56 and steps[28:] == steps[:28]  # warm-up and data order from step 0 again
    assert res.settings["start_step"] == 0
    # the same numbers as before the option: a plain train() of the masked rewind weights
    lv1 = res.levels[1]
    manual = permgraph.train(_small, _fake(), data_seed=2, mask=lv1.mask,
                             init_state=lv1.mask.apply(dict(res.rewind_state)), **SMALL)
    assert all(torch.equal(manual.model.state_dict()[k], v) for k, v in lv1.state.items())
    assert lv1.metrics == manual.final
    with pytest.raises(ValueError, match="retrain must be"):
        permgraph.imp(_small, _fake(), levels=1, rewind=1, retrain="resume", **SMALL)
    with pytest.raises(ValueError, match="nothing is left to retrain"):
        permgraph.imp(_small, _fake(), levels=1, rewind=4, **SMALL)


def test_transfer_arms_retrain_as_the_imp_levels_did():
    from test_train_start_step import recording

    d = _fake()
    res = permgraph.imp(_small, d, levels=1, fraction=0.5, rewind=1, init_seed=0, data_seed=2, **SMALL)
    with recording(d) as (rd, steps):
        rows = transfer_arms(_small(), res, res, rd, levels=[1], arms=["own", "unpermuted"], data_seed=2, **SMALL)
    # A = B: A's mask "as it is" is B's own mask, and retraining it as the IMP level did gives B's ticket
    assert len(steps) == 28 - 7
    own, same = (next(r for r in rows if r["arm"] == a) for a in ("own", "unpermuted"))
    assert same["test_loss"] == own["test_loss"] and same["test_error"] == own["test_error"]
    with pytest.raises(ValueError, match="must retrain as the levels did"):
        transfer_arms(_small(), res, res, d, levels=[1], arms=["unpermuted"], retrain="restart", **SMALL)


def test_imp_store_refuses_levels_retrained_in_the_other_mode(tmp_path):
    d = _fake()
    kw = dict(levels=1, fraction=0.5, rewind=1, init_seed=0, store=str(tmp_path), **SMALL)
    permgraph.imp(_small, d, retrain="restart", **kw)
    with pytest.raises(ValueError, match=r"retrained from step 0 \(retrain='restart'\), this run retrains from "
                                         r"step 7 \(retrain='continue'\)"):
        permgraph.imp(_small, d, **kw)
    (tmp_path / "imp.json").unlink()  # a store written before the option: its levels restarted
    with pytest.raises(ValueError, match="retrained from step 0"):
        permgraph.imp(_small, d, **kw)
    permgraph.imp(_small, d, retrain="restart", **kw)  # reused as it is
    # level 0 alone is the same in both modes and is shared
    import shutil

    shutil.rmtree(tmp_path / "level_1")
    permgraph.imp(_small, d, **kw)
    assert (tmp_path / "imp.json").read_text() == '{"retrain": "continue", "start_step": 7}'
