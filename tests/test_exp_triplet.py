"""The ``triplet`` experiment runner end to end on tiny real data (digits), and its resumption."""

import json
import sys

import pytest
import torch
from permgraph.experiments.triplet import agreement, chain_seeds, fixed_points

import permgraph
from permgraph import experiments

SPEC = {
    "kind": "triplet", "name": "t-triplet",
    "model": {"name": "mlp", "kwargs": {"in_features": 64, "depth": 1}},
    "data": {"name": "digits"},
    "train": {"epochs": 2, "batch_size": 64, "lr": 0.05, "weight_decay": 0.0, "schedule": "constant"},
    "matching": {"methods": ["weight"]},
    "barrier": {"alphas": 3, "subset": 200},
    "widths": [8, 32], "width_arg": "width",
    "seeds": [[0, 1, 2]],
    "chain": 1,
}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("triplet")
    run_dir = experiments.run(experiments.parse(SPEC), out=out, progress=False)
    return out, run_dir


def test_agreement_and_fixed_points_helpers():
    with torch.random.fork_rng():  # the global random state is left as it was
        torch.manual_seed(0)
        model, x = permgraph.models.create("mlp", in_features=4, width=6, depth=2), torch.randn(2, 4)
    spec = permgraph.trace(model, (x,))
    p = permgraph.random_permutation(spec, 0)
    assert agreement(p, p)["overall"] == 1.0
    al = permgraph.Alignment(p, spec)
    cycle = al.after(al.inverse())
    assert fixed_points(cycle)["overall"] == 1.0
    assert set(agreement(p, permgraph.identity(spec))["groups"]) == set(spec.groups)


def test_triplet_runner_results_are_sane(first_run):
    _, run_dir = first_run
    r = json.loads((run_dir / "results.json").read_text())
    for name in ("report.md", "triplet_width.png", "triplet_chains.png"):
        assert (run_dir / name).exists()
    assert r["chain_seeds"] == chain_seeds(experiments.parse(SPEC)) == [3]
    assert [w["width"] for w in r["widths"]] == [8, 32]
    for w in r["widths"]:
        (t,) = w["triples"]
        assert t["seeds"] == [0, 1, 2]
        for kind in ("none", "pair", "triplet", "composed"):
            for split in ("train", "test"):
                b = t["barriers"][kind][split]
                assert len(b["alphas"]) == 3 and -1.0 <= b["barrier"]["error"] <= 1.0
        # the triplet path and the composed one are the same path relabelled
        for split in ("train", "test"):
            assert t["barriers"]["triplet"][split]["barrier"]["error"] == pytest.approx(
                t["barriers"]["composed"][split]["barrier"]["error"], abs=1e-6)
        assert 0.0 <= t["agreement"]["overall"] <= 1.0
        assert 0.0 <= t["cycle_fixed"]["overall"] <= 1.0 and 0.0 <= t["symmetry_bc"] <= 1.0
        assert all(0.0 <= v <= 1.0 for v in t["cycle_fixed"]["groups"].values())
        (ch,) = t["chains"]
        assert ch["intermediates"] == 2 and ch["path"] == [0, 2, 3, 1]
        assert 0.0 <= ch["agreement"]["overall"] <= 1.0
        c = w["controls"]["self_permuted"]
        assert c["mismatched_units"] == 0 and c["units"] == w["width"]
        assert c["barrier_aligned"]["error"] == 0.0
        pc = w["controls"]["permuted_copies"]
        assert pc["agreement"] == 1.0 and pc["cycle_fixed"] == 1.0
        assert pc["barrier_composed"]["error"] == 0.0
        assert w["summary"]["chains"][0]["intermediates"] == 2
    assert "triplet_width.png" in (run_dir / "report.md").read_text()


def test_triplet_second_run_reuses_everything(first_run, monkeypatch):
    out, run_dir = first_run
    before = (run_dir / "results.json").read_bytes()

    def boom(*a, **k):
        raise AssertionError("nothing should be recomputed on a second run")

    monkeypatch.setattr(sys.modules["permgraph.training"], "train", boom)
    monkeypatch.setattr(permgraph, "train", boom)
    monkeypatch.setattr(permgraph, "align", boom)
    monkeypatch.setattr(permgraph, "barrier", boom)
    assert experiments.run(experiments.parse(SPEC), out=out, progress=False) == run_dir
    assert (run_dir / "results.json").read_bytes() == before
    # the parallel plan: unique names, dependencies listed first, and every unit already done
    from permgraph.experiments import triplet
    from permgraph.experiments.common import Context
    from permgraph.experiments.store import Store

    ctx = Context(experiments.parse(SPEC), Store(out), progress=False)
    seen = set()
    for name, fn, deps in triplet.plan(ctx):
        assert name not in seen and set(deps) <= seen
        seen.add(name)
        fn(ctx)
