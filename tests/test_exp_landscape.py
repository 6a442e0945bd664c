"""The ``landscape`` runner end to end on a tiny MLP with BatchNorm (statistics reset at every grid
point): the plane through A, B and P(B), the two straight lines, controls, and a reusing second run."""


import pytest
from _runs import WORK, run_twice
from permgraph.experiments.store import read_json

SPEC = {
    "kind": "landscape", "name": "tiny-landscape",
    "model": {"name": "mlp", "kwargs": {"in_features": 64, "width": 16, "depth": 2, "norm": "bn"}},
    "data": {"name": "digits"},
    "train": {"epochs": 2, "batch_size": 64, "lr": 0.05, "weight_decay": 0.0, "schedule": "constant"},
    "seeds": [0, 1],
    "resolution": 5,
    "margin": 0.25,
    "method": "weight",
    "barrier": {"alphas": 3, "subset": 200, "batch_size": 200},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_twice(SPEC, tmp_path_factory.mktemp("store"))


def test_outputs_have_the_promised_shape(runs):
    run_dir = runs["run_dir"]
    res = read_json(run_dir / "results.json")
    assert res["bn_reset"] is True and res["split"] == "test"
    assert len(res["u"]) == len(res["v"]) == 5
    for m in ("loss", "error"):
        grid = res["grid"][m]
        assert len(grid) == 5 and all(len(r) == 5 for r in grid)
    assert all(0.0 <= e <= 1.0 for row in res["grid"]["error"] for e in row)
    assert all(x > 0 for row in res["grid"]["loss"] for x in row)
    # the grid extends the margin beyond the triangle A, B, P(B)
    c = res["coords"]
    assert c["A"] == [0.0, 0.0] and c["B"][1] == 0.0 and c["P(B)"][1] > 0
    assert res["u"][0] < min(0.0, c["P(B)"][0]) and res["u"][-1] > max(c["B"][0], c["P(B)"][0])
    assert res["v"][0] < 0.0 < c["P(B)"][1] < res["v"][-1]
    d = res["distances"]
    assert abs(d["A-B"] - c["B"][0]) < 1e-9
    # controls: the plane reproduces the three networks; B and P(B) are the same function
    assert res["controls"]["plane_reconstruction_max_gap"] < 1e-3
    v = res["vertices"]
    assert abs(v["B"]["direct"]["loss"] - v["P(B)"]["direct"]["loss"]) < 1e-4
    assert v["B"]["direct"]["error"] == v["P(B)"]["direct"]["error"]
    ctl = res["controls"]["self_permuted"]
    assert ctl["mismatched_units"] == 0 and ctl["barrier_aligned"]["error"] == 0.0
    for name in ("A-B", "A-P(B)"):
        line = res["lines"][name]
        assert len(line["alphas"]) == 3 and 0.0 <= line["barrier"]["error"] <= 1.0
    for name in ("report.md", "landscape_plane.png", "landscape_lines.png"):
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
