"""The ``imp`` experiment runner end to end on tiny real data (digits), and its resumption."""

import json
import sys

import pytest

import permgraph
from permgraph import experiments

SPEC = {
    "kind": "imp", "name": "t-imp",
    "model": {"name": "mlp", "kwargs": {"in_features": 64, "width": 24, "depth": 1}},
    "data": {"name": "digits"},
    "train": {"epochs": 2, "batch_size": 64, "lr": 0.05, "weight_decay": 0.0, "schedule": "constant"},
    "matching": {"methods": ["weight"]},
    "barrier": {"alphas": 3, "subset": 200},
    "seeds": [[0, 1]],
    "imp": {"levels": 2, "fraction": 0.5, "rewind": 1},
}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("imp")
    run_dir = experiments.run(experiments.parse(SPEC), out=out, progress=False)
    return out, run_dir


def test_imp_runner_results_are_sane(first_run):
    _, run_dir = first_run
    r = json.loads((run_dir / "results.json").read_text())
    for name in ("report.md", "imp_barriers.png", "imp_arms.png"):
        assert (run_dir / name).exists()
    (pair,) = r["pairs"]
    assert pair["seeds"] == [0, 1]
    levels = [row["level"] for row in pair["imp_a"]]
    assert levels == [0, 1, 2]
    for row in pair["imp_a"] + pair["imp_b"]:
        assert abs(row["density"] - 0.5 ** row["level"]) < 1e-3
        assert 0.0 <= row["test_error"] <= 1.0
    for split in ("train", "test"):
        rows = pair["barriers"][split]
        assert {(x["level"], x["point"], x["alignment"]) for x in rows} == {
            (lv, p, a) for lv in levels for p, als in (("trained", ("none", "dense", "level")),
                                                       ("rewind", ("none", "dense"))) for a in als}
        # the dense permutation *is* the level-0 permutation
        lv0 = {x["alignment"]: x["barrier_error"] for x in rows if x["level"] == 0 and x["point"] == "trained"}
        assert lv0["dense"] == lv0["level"]
    arms = pair["arms"]
    assert {(x["level"], x["arm"]) for x in arms} == {(lv, a) for lv in (1, 2) for a in permgraph.prune.ARMS}
    for x in arms:
        assert 0.0 <= x["test_accuracy"] <= 1.0
        assert abs(x["density"] - 0.5 ** x["level"]) < 1e-2
    assert r["arm_levels"] == [1, 2]
    s = r["summary"]
    assert [x["level"] for x in s["barriers"]["train"]["trained"]["dense"]] == [0, 1, 2]
    assert set(s["arms"]) == set(permgraph.prune.ARMS)
    c = r["controls"]["self_permuted"]
    assert c["mismatched_units"] == 0 and c["units"] == 24
    assert c["barrier_aligned"]["error"] == 0.0
    report = (run_dir / "report.md").read_text()
    assert "imp_barriers.png" in report and "imp_arms.png" in report


def test_imp_second_run_reuses_everything(first_run, monkeypatch):
    out, run_dir = first_run
    before = (run_dir / "results.json").read_bytes()

    def boom(*a, **k):
        raise AssertionError("nothing should be recomputed on a second run")

    monkeypatch.setattr(sys.modules["permgraph.training"], "train", boom)
    monkeypatch.setattr(permgraph, "train", boom)
    monkeypatch.setattr(permgraph.prune, "imp_barriers", boom)
    monkeypatch.setattr(permgraph.prune, "transfer_arms", boom)
    again = experiments.run(experiments.parse(SPEC), out=out, progress=False)
    assert again == run_dir
    assert (run_dir / "results.json").read_bytes() == before
    # the parallel plan: unique names, dependencies listed first, and every unit already done
    from permgraph.experiments import imp
    from permgraph.experiments.common import Context
    from permgraph.experiments.store import Store

    ctx = Context(experiments.parse(SPEC), Store(out), progress=False)
    seen = set()
    for name, fn, deps in imp.plan(ctx):
        assert name not in seen and set(deps) <= seen
        seen.add(name)
        fn(ctx)


def test_imp_key_holds_the_retrain_mode_and_the_levels_use_it(first_run):
    from permgraph.experiments import imp
    from permgraph.experiments.common import Context
    from permgraph.experiments.store import Store

    out, _ = first_run
    ctx = Context(experiments.parse(SPEC), Store(out), progress=False)
    restart = {**SPEC, "imp": {**SPEC["imp"], "retrain": "restart"}}
    ctx_restart = Context(experiments.parse(restart), Store(out), progress=False)
    key = imp.imp_key(ctx, 0)
    assert key["imp"]["retrain"] == "continue" and imp.imp_key(ctx_restart, 0)["imp"]["retrain"] == "restart"
    # networks retrained in one mode are never reused for the other
    assert ctx.store.network_dir(key) != ctx_restart.store.network_dir(imp.imp_key(ctx_restart, 0))
    # the default retrains from the rewind point (epoch 1 of 1,437 digits in batches of 64 = step 23)
    stored = json.loads((ctx.store.network_dir(key) / "imp.json").read_text())
    assert stored == {"retrain": "continue", "start_step": 23}
    level1 = json.loads((ctx.store.network_dir(key) / "level_1" / "metrics.json").read_text())
    assert (level1["epoch"], level1["step"]) == (2, 46)
