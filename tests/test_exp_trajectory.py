"""The ``trajectory`` runner end to end on a tiny MLP: heatmap of P_t applied at every checkpoint s,
P_final / P_s curves, agreement with P_final, controls, and a second run that reuses everything."""


import pytest
from _runs import WORK, run_twice
from permgraph.experiments.spec import SpecError
from permgraph.experiments.store import read_json

from permgraph import experiments

SPEC = {
    "kind": "trajectory", "name": "tiny-trajectory",
    "model": {"name": "mlp", "kwargs": {"in_features": 64, "width": 16, "depth": 2}},
    "data": {"name": "digits"},
    "train": {"epochs": 3, "batch_size": 64, "lr": 0.05, "weight_decay": 0.0, "schedule": "constant",
              "checkpoints": [0, 1, 2, 3]},
    "seeds": [[0, 1]],
    "match_at": [1, 3],
    "matching": {"num_samples": 200},
    "barrier": {"alphas": 3, "subset": 200, "batch_size": 200, "splits": ["train"]},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_twice(SPEC, tmp_path_factory.mktemp("store"))


def test_outputs_have_the_promised_shape(runs):
    run_dir = runs["run_dir"]
    res = read_json(run_dir / "results.json")
    assert res["epochs"] == [0, 1, 2, 3] and res["match_at"] == [1, 3] and res["matched"] == [0, 1, 2, 3]
    for method in ("weight", "activation"):
        s = res["summary"][method]
        for m in ("error", "loss"):
            heat = s["heatmap"][m]
            assert len(heat) == len(SPEC["match_at"]) and all(len(r) == len(SPEC["train"]["checkpoints"])
                                                              for r in heat)
            assert len(s["final_perm"][m]) == len(s["own_perm"][m]) == len(res["epochs"])
            # the diagonal at the final epoch is P_final applied there
            assert s["own_perm"][m][-1]["mean"] == heat[-1][-1]["mean"] == s["final_perm"][m][-1]["mean"]
        for row in s["heatmap"]["error"]:
            assert all(0.0 <= c["mean"] <= 1.0 for c in row)
        # agreement of P_final with itself is exactly 1, in every group
        assert s["agreement"]["overall"][-1]["mean"] == 1.0
        assert all(v[-1]["mean"] == 1.0 for v in s["agreement"]["groups"].values())
        assert all(0.0 <= c["mean"] <= 1.0 for c in s["agreement"]["overall"])
        assert set(s["agreement"]["groups"]) == set(res["groups"])
    assert all(0.0 <= c["mean"] <= 1.0 for c in res["summary"]["none"]["error"])
    c = res["controls"]["self_permuted"]
    assert c["mismatched_units"] == 0 and c["barrier_aligned"]["error"] == 0.0
    for name in ("report.md", "trajectory_heatmap_weight.png", "trajectory_heatmap_activation.png",
                 "trajectory_curves.png", "trajectory_agreement.png"):
        assert (run_dir / name).stat().st_size > 0
    report = (run_dir / "report.md").read_text()
    assert "Sanity controls" in report and "trajectory_heatmap_weight.png" in report


def test_second_run_reuses_networks_and_units(runs):
    assert runs["again"] == runs["run_dir"]
    assert runs["before"] == runs["after"] and len(runs["before"]) >= 10
    assert runs["text"] == runs["text_again"]  # results are byte-identical
    # the second run trains, aligns and measures nothing: everything comes from the store (a count of
    # the work, not a timing, so that machine load cannot decide it)
    assert runs["work_second"] == dict.fromkeys(WORK, 0)
    assert runs["work_first"]["train"] > 0 and runs["work_first"]["align"] > 0


def test_match_at_must_be_checkpoints_or_the_final_epoch():
    with pytest.raises(SpecError, match=r"match_at epochs \[2\] are not checkpoints"):
        experiments.parse({**SPEC, "train": {**SPEC["train"], "checkpoints": [0, 1]}, "match_at": [2, 3]})
    spec = experiments.parse({**SPEC, "train": {**SPEC["train"], "checkpoints": [0, 1]}, "match_at": [1]})
    from permgraph.experiments.trajectory import epochs_of

    assert epochs_of(spec) == ([0, 1, 3], [1, 3], [0, 1, 3])
