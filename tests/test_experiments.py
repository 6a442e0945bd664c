"""Experiment suite: spec validation, run hashes, the pair runner end to end, resume after a kill, CLI."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import experiments
from experiments.spec import SpecError
from permgraph.cli import main

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "kind": "pair", "name": "tiny",
    "model": {"name": "mlp", "kwargs": {"in_features": 64, "width": 32, "depth": 2}},
    "data": {"name": "digits"},
    "train": {"epochs": 2, "batch_size": 64, "lr": 0.05, "weight_decay": 0.0, "schedule": "constant"},
    "seeds": [[0, 1], [2, 3]],
    "matching": {"num_samples": 300},
    "barrier": {"alphas": 3, "subset": 300, "batch_size": 300},
}


def test_every_spec_in_the_repository_validates():
    paths = sorted((ROOT / "specs").rglob("*.yaml"))
    assert (ROOT / "specs" / "quickstart.yaml") in paths
    for p in paths:
        spec = experiments.load(p)
        assert spec.kind in experiments.KINDS


@pytest.mark.parametrize("change, message", [
    ({"train": {"epochz": 3}}, "train.epochz: unknown field (allowed here: epochs,"),
    ({"barrier": {"bn": "maybe"}}, "barrier.bn: Input should be 'auto', 'reset', 'repair' or 'none'"),
    ({"seeds": "0,1"}, "seeds"),
    ({"train": {"lr": -1}}, "train.lr"),
    ({"kind": "pairs"}, "kind 'pairs' is not one of pair, trajectory"),
])
def test_bad_specs_name_the_file_the_field_and_the_allowed_values(tmp_path, change, message):
    d = {**TINY, **change}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(SpecError) as e:
        experiments.load(path)
    assert str(path) in str(e.value) and message in str(e.value)


def test_missing_kind_and_missing_file():
    with pytest.raises(SpecError, match="missing field 'kind'"):
        experiments.parse({"name": "x"}, "x.yaml")
    with pytest.raises(SpecError, match="no such spec file"):
        experiments.load("does/not/exist.yaml")


def test_run_hashes_are_pinned_and_ignore_fields_left_at_their_defaults():
    base = {"kind": "pair", "name": "t", "model": {"name": "mlp"}, "data": {"name": "digits"}, "seeds": [[0, 1]]}
    assert experiments.parse(base).run_name() == "pair-t-c3c5ddae99db"
    # spelling out a default does not change the hash
    assert experiments.parse({**base, "train": {"epochs": 10}}).run_name() == "pair-t-c3c5ddae99db"
    changed = {**base, "model": {"name": "mlp", "kwargs": {"width": 64}}, "train": {"epochs": 3}}
    assert experiments.parse(changed).run_name() == "pair-t-cd30241d5930"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("store")
    run_dir = experiments.run(experiments.parse(TINY), out=out, progress=False)
    return out, run_dir


def test_pair_runner_end_to_end(tiny_run):
    out, run_dir = tiny_run
    res = experiments.store.read_json(run_dir / "results.json")
    assert [p["seeds"] for p in res["pairs"]] == [[0, 1], [2, 3]]
    for arm in ("none", "weight", "activation"):
        for split in ("train", "test"):
            s = res["summary"][arm][split]["error"]
            assert 0.0 <= s["mean"] <= 1.0 and s["n"] == 2
    c = res["controls"]["self_permuted"]
    assert c["mismatched_units"] == 0 and c["barrier_aligned"] == {"loss": 0.0, "error": 0.0}
    assert (run_dir / "report.md").exists() and (run_dir / "pair_curves.png").stat().st_size > 1000
    text = (run_dir / "results.json").read_text()
    assert str(out) not in text and "log" not in res
    assert len(list((out / "networks").iterdir())) == 4


def test_rerun_skips_finished_work_and_results_are_byte_identical(tiny_run, tmp_path):
    out, run_dir = tiny_run
    before = {p: p.stat().st_mtime_ns for p in (out / "networks").rglob("final.safetensors")}
    units = {p: p.stat().st_mtime_ns for p in (run_dir / "units").iterdir()}
    t0 = time.perf_counter()
    experiments.run(experiments.parse(TINY), out=out, progress=False)
    assert time.perf_counter() - t0 < 20
    assert before == {p: p.stat().st_mtime_ns for p in (out / "networks").rglob("final.safetensors")}
    assert units == {p: p.stat().st_mtime_ns for p in (run_dir / "units").iterdir()}
    # an independent run of the same spec in another store gives the same bytes
    other = experiments.run(experiments.parse(TINY), out=tmp_path, progress=False)
    assert (other / "results.json").read_bytes() == (run_dir / "results.json").read_bytes()


def test_killed_run_resumes_and_loses_nothing(tiny_run, tmp_path):
    _, reference = tiny_run
    spec = {**TINY, "train": {**TINY["train"], "epochs": 2}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "store"
    cmd = [sys.executable, "-m", "permgraph", "run", str(path), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.rglob("units/pair_0_1.json")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-run: after the first unit, before the end
    proc.wait()
    assert list(out.rglob("units/pair_0_1.json")), "the run did not get far enough to test resuming"
    kept = {p: p.read_bytes() for p in out.rglob("*.json")}
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    for p, data in kept.items():  # nothing already written was lost or changed
        assert p.read_bytes() == data
    run_dir = next((out / "runs").iterdir())
    assert (run_dir / "results.json").read_bytes() == (reference / "results.json").read_bytes()


def test_cli_list_report_and_errors(tiny_run, capsys):
    _, run_dir = tiny_run
    assert main(["list", str(ROOT / "specs")]) == 0
    listed = capsys.readouterr().out
    assert "quickstart.yaml" in listed and "pair-quickstart-" in listed and "INVALID" not in listed
    (run_dir / "report.md").unlink()
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.md").exists()
    assert main(["run", "nope.yaml"]) == 2
    assert "no such spec file" in capsys.readouterr().err
