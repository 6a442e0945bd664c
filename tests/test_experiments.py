"""Experiment suite: spec validation, run hashes, the pair runner end to end, resume after a kill, CLI."""

import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from permgraph.experiments.common import Context, Progress
from permgraph.experiments.spec import SpecError
from permgraph.experiments.store import Store

import permgraph
from permgraph import experiments
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


def test_matching_start_reaches_weight_matching(tmp_path):
    """matching.start is where weight matching's descent starts (align(..., start=)); left at "auto" it does
    not change the run hash, and a wrong value names the allowed ones."""
    base = experiments.parse(TINY)
    assert experiments.parse({**TINY, "matching": {**TINY["matching"], "start": "auto"}}).run_name() == base.run_name()
    with pytest.raises(SpecError, match="matching.start: Input should be 'auto', 'identity', 'anchored' or 'both'"):
        experiments.parse({**TINY, "matching": {"start": "random"}})
    starts = {}
    for start in ("auto", "anchored"):
        ctx = Context(experiments.parse({**TINY, "matching": {**TINY["matching"], "start": start}}), Store(tmp_path),
                      progress=False)
        a, b = ctx.build(0), ctx.build(1)
        al = ctx.align(a, b, "weight", ctx.trace(a))
        starts[start] = [e["start"] for e in al.log if "start" in e]
        direct = permgraph.align(a, b, "weight", spec=ctx.trace(a), start=start, progress=False)
        assert all(torch.equal(al.perm[g], direct.perm[g]) for g in al.perm)
    assert starts["auto"][0] == "identity" and set(starts["anchored"]) == {"anchored"}


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
    kept = {p: p.read_bytes() for p in out.rglob("*.json") if p.name != "meta.json"}  # meta.json logs invocations
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    for p, data in kept.items():  # nothing already written was lost or changed
        assert p.read_bytes() == data
    run_dir = next((out / "runs").iterdir())
    assert (run_dir / "results.json").read_bytes() == (reference / "results.json").read_bytes()


def test_cli_list_report_and_errors(tiny_run, tmp_path, capsys):
    out, run_dir = tiny_run
    assert main(["list", str(ROOT / "specs")]) == 0
    listed = capsys.readouterr().out
    assert "quickstart.yaml" in listed and "pair-quickstart-" in listed and "INVALID" not in listed
    # the status column: the tiny spec has finished in its store, and has not run in another
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    assert main(["list", str(tmp_path / "specs"), "--out", str(out)]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert "tiny.yaml" in line and run_dir.name in line and line.endswith(" finished")
    assert main(["list", str(tmp_path / "specs"), "--out", str(tmp_path / "elsewhere")]) == 0
    assert capsys.readouterr().out.rstrip().endswith(" not run")
    (run_dir / "report.md").unlink()
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.md").exists()
    assert main(["run", "nope.yaml"]) == 2
    assert "no such spec file" in capsys.readouterr().err


def test_status_finished_partial_or_not_run(tmp_path):
    spec = experiments.parse(TINY)
    assert experiments.status(spec, tmp_path) == "not run"
    units = Store(tmp_path).run_dir(spec) / "units"
    units.mkdir(parents=True)  # a run folder without finished units: nothing to resume
    assert experiments.status(spec, tmp_path) == "not run"
    (units / "pair_0_1.json").write_text("{}")
    assert experiments.status(spec, tmp_path) == "partial: 1 unit done (rerun to resume)"
    (units / "pair_2_3.json").write_text("{}")
    assert experiments.status(spec, tmp_path) == "partial: 2 units done (rerun to resume)"
    (units.parent / "results.json").write_text("{}")
    assert experiments.status(spec, tmp_path) == "finished"


LINE = re.compile(r"^\[ *\d+\.\ds\] ")


def test_progress_lines_when_stderr_is_not_a_terminal(tiny_run, tmp_path, capsys):
    _, reference = tiny_run
    with torch.random.fork_rng():  # the data loaders draw a seed from the global generator
        run_dir = experiments.run(experiments.parse(TINY), out=tmp_path, progress=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if LINE.match(line)]
    text = "\n".join(lines)
    assert "network 1/4 (seed 0): epoch 1/2, train loss" in text and "network 4/4 (seed 3): epoch 2/2" in text
    assert "pair 1/2 (seeds 0-1): weight matching done" in text and "pair 1/2 (seeds 0-1): barriers" in text
    assert "pair 2/2 (seeds 2-3): done" in text and "all done" in lines[-1]
    assert len([line for line in lines if ": epoch " in line]) <= 4 * 2  # at most one line per epoch
    # progress goes to stderr and log.txt, never into the results
    assert (run_dir / "results.json").read_bytes() == (reference / "results.json").read_bytes()
    assert "network 1/4 (seed 0): epoch 2/2" in (run_dir / "log.txt").read_text()
    with torch.random.fork_rng():
        experiments.run(experiments.parse(TINY), out=tmp_path, progress=True)
    text = capsys.readouterr().err
    assert "pair 1/2 (seeds 0-1): finished earlier (loaded from the store)" in text and ": epoch " not in text
    assert "networks: 0 trained" in text


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_helper_lines(capsys):
    def train(p, epochs=3):
        with p.training("seed 7", epochs) as callbacks:
            for e in range(1, epochs + 1):
                for cb in callbacks:
                    cb({"event": "epoch_end", "epoch": e, "step": e, "model": None, "metrics": {"test_error": 0.25}})

    quiet = Progress(enabled=False)  # progress=False: nothing at all
    train(quiet)
    with quiet.unit("pair", 1, 2, "seeds 0-1"), quiet.step("weight matching"):
        pass
    quiet.finish()
    assert capsys.readouterr().err == ""
    buf = io.StringIO()
    p = Progress(stream=buf, every=0.0)
    p.networks = 2
    with p.unit("pair", 1, 2, "seeds 0-1"):
        train(p)
        with p.step("weight matching"):
            pass
    lines = buf.getvalue().splitlines()
    assert all(LINE.match(line) for line in lines)
    assert [line.split("] ", 1)[1].split(", ETA")[0] for line in lines[:3]] == [
        "network 1/2 (seed 7): training, 3 epochs", "network 1/2 (seed 7): epoch 1/3, test error 0.250",
        "network 1/2 (seed 7): epoch 2/3, test error 0.250"]
    assert "epoch 3/3, test error 0.250, trained in" in lines[3] and "ETA" in lines[3]  # network 2/2 is left
    assert "pair 1/2 (seeds 0-1): weight matching done" in lines[4]
    assert "pair 1/2 (seeds 0-1): done (" in lines[5] and "ETA" in lines[5]
    with p.unit("pair", 2, 2, "seeds 2-3"):
        pass
    assert buf.getvalue().splitlines()[-1].endswith("pair 2/2 (seeds 2-3): finished earlier (loaded from the store)")
    # in a terminal the epochs are permgraph.train's tqdm bar: only the last epoch gets a line
    term = _Terminal()
    train(Progress(stream=term))
    start, end = term.getvalue().splitlines()
    assert "network 1/1 (seed 7): training" in start and "network 1/1 (seed 7): epoch 3/3" in end


def test_context_build_leaves_the_global_random_state_as_it_was(tmp_path):
    ctx = Context(experiments.parse(TINY), Store(tmp_path), progress=False)
    before = torch.get_rng_state()
    model = ctx.build(3)
    assert torch.equal(torch.get_rng_state(), before)
    with torch.random.fork_rng():  # the same weights as seeding the global generator
        torch.manual_seed(3)
        expected = permgraph.models.create("mlp", **TINY["model"]["kwargs"])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), expected.state_dict().values()))
