"""The ``wm_limits`` runner end to end on a tiny MLP: weight matching on pruned copies (small / large
magnitudes), weight vs activation matching at early checkpoints, controls, and a reusing second run."""


import pytest
from _runs import WORK, run_twice
from permgraph.experiments.spec import SpecError
from permgraph.experiments.store import read_json

from permgraph import experiments

SPEC = {
    "kind": "wm_limits", "name": "tiny-wm-limits",
    "model": {"name": "mlp", "kwargs": {"in_features": 64, "width": 16, "depth": 2}},
    "data": {"name": "digits"},
    "train": {"epochs": 3, "batch_size": 64, "lr": 0.05, "weight_decay": 0.0, "schedule": "constant",
              "checkpoints": [0, 1, 3]},
    "seeds": [[0, 1]],
    "prune_fractions": [0.5, 0.9],
    "early": [0, 1],
    "matching": {"num_samples": 200},
    "barrier": {"alphas": 3, "subset": 200, "batch_size": 200, "splits": ["train"]},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_twice(SPEC, tmp_path_factory.mktemp("store"))


def test_outputs_have_the_promised_shape(runs):
    run_dir = runs["run_dir"]
    res = read_json(run_dir / "results.json")
    assert res["prune_fractions"] == [0.0, 0.5, 0.9]  # plain weight matching (x = 0) is always included
    assert res["early_epochs"] == [0, 1, 3]  # the final epoch is the reference
    (pair,) = res["pairs"]
    for mode in ("small", "large"):
        rows = pair["prune"][mode]
        assert len(rows) == 3
        assert rows[0]["agreement_with_plain"] == 1.0
        assert rows[0]["barrier"] == pair["prune"]["small"][0]["barrier"]  # x = 0 is shared by both modes
        assert all(0.0 <= r["barrier"]["error"] <= 1.0 and 0.0 <= r["agreement_with_plain"] <= 1.0 for r in rows)
        assert len(res["summary"]["prune"][mode]["error"]) == 3
    assert [e["epoch"] for e in pair["early"]] == [0, 1, 3]
    for e in pair["early"]:
        assert set(e["barrier"]) == {"none", "weight", "activation"}
        assert all(0.0 <= b["error"] <= 1.0 for b in e["barrier"].values())
        assert 0.0 <= e["weight_activation_agreement"] <= 1.0
    # plain weight matching at the final epoch, two ways: the same permutation, the same barrier
    assert pair["early"][-1]["barrier"]["weight"] == pair["prune"]["small"][0]["barrier"]
    assert pair["early"][-1]["barrier"]["none"] == pair["none"]
    c = res["controls"]["self_permuted"]
    assert c["mismatched_units"] == 0 and c["barrier_aligned"]["error"] == 0.0
    for name in ("report.md", "wm_limits_pruning.png", "wm_limits_early.png"):
        assert (run_dir / name).stat().st_size > 0
    assert "Sanity controls" in (run_dir / "report.md").read_text()


def test_second_run_reuses_networks_and_units(runs):
    assert runs["again"] == runs["run_dir"]
    assert runs["before"] == runs["after"] and len(runs["before"]) >= 8
    assert runs["text"] == runs["text_again"]
    # the second run trains, aligns and measures nothing: everything comes from the store (a count of
    # the work, not a timing, so that machine load cannot decide it)
    assert runs["work_second"] == dict.fromkeys(WORK, 0)
    assert runs["work_first"]["train"] > 0 and runs["work_first"]["align"] > 0


def test_bad_fractions_and_early_epochs_are_spec_errors():
    with pytest.raises(SpecError, match=r"prune_fractions must lie in \[0, 1\)"):
        experiments.parse({**SPEC, "prune_fractions": [0.5, 1.0]})
    with pytest.raises(SpecError, match=r"early epochs \[2\] are not checkpoints"):
        experiments.parse({**SPEC, "early": [2]})
