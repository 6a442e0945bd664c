"""The command line meets a user's mistakes with one or two lines and exit status 2, not a traceback."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from permgraph.cli import INTERRUPTED, main

TINY = {
    "kind": "pair", "name": "clitiny",
    "model": {"name": "mlp", "kwargs": {"in_features": 64, "width": 32, "depth": 2}},
    "data": {"name": "digits"},
    "train": {"epochs": 2, "batch_size": 64, "lr": 0.05, "weight_decay": 0.0, "schedule": "constant"},
    "seeds": [[0, 1]],
    "matching": {"num_samples": 300},
    "barrier": {"alphas": 3, "subset": 300, "batch_size": 300},
}


def _spec_file(tmp_path: Path, **change) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**TINY, **change}))
    return path


def _short_error(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert 1 <= len(lines) <= 2, f"expected a one- or two-line error, got:\n{err}"
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("change, words", [
    ({"data": {"name": "mnist1e"}}, ["data.name", "unknown data set 'mnist1e'", "mnist1d"]),
    ({"model": {"name": "timm:not_a_model"}}, ["model", "not_a_model"]),
    ({"model": {"name": "mlp", "kwargs": {"widht": 3}}}, ["model", "widht"]),
])
def test_unknown_names_in_a_spec_are_two_lines_and_leave_no_run_folder(tmp_path, capsys, change, words):
    path = _spec_file(tmp_path, **change)
    out = tmp_path / "store"
    assert main(["run", str(path), "--out", str(out)]) == 2
    err = _short_error(capsys.readouterr().err)
    assert str(path) in err
    for w in words:
        assert w in err
    assert not (out / "runs").exists() or not any((out / "runs").iterdir())


def test_trace_of_an_unknown_model(capsys):
    assert main(["trace", "timm:not_a_model"]) == 2
    err = _short_error(capsys.readouterr().err)
    assert "not_a_model" in err


def test_corrupted_results_file_is_named(tmp_path, capsys):
    run_dir = tmp_path / "runs" / "pair-x-0"
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text('{"kind": "pair", "spec": {')  # truncated
    assert main(["report", str(run_dir)]) == 2
    err = _short_error(capsys.readouterr().err)
    assert str(run_dir / "results.json") in err


def test_debug_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("PERMGRAPH_DEBUG", "1")
    with pytest.raises(Exception, match="not_a_model"):
        main(["trace", "timm:not_a_model"])
    monkeypatch.delenv("PERMGRAPH_DEBUG")
    with pytest.raises(Exception, match="not_a_model"):
        main(["trace", "timm:not_a_model", "--debug"])


def test_bad_thread_count_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", str(_spec_file(tmp_path)), "--threads", "0"])
    assert e.value.code == 2
    assert "--threads" in capsys.readouterr().err


def test_ctrl_c_during_a_run_is_one_line_and_the_rerun_resumes(tmp_path):
    path = _spec_file(tmp_path)
    out = tmp_path / "store"
    cmd = [sys.executable, "-m", "permgraph", "run", str(path), "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "PERMGRAPH_DEBUG"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.rglob("networks/*/key.json")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the interrupt arrived")
    assert proc.returncode == 2
    assert err.strip().splitlines()[-1] == INTERRUPTED and "Traceback" not in err
    assert subprocess.run(cmd, capture_output=True, env=env).returncode == 0


def test_threads_are_used_and_recorded_in_the_run_metadata_not_in_the_results(tmp_path, capsys):
    path = _spec_file(tmp_path)
    out = tmp_path / "store"
    threads = torch.get_num_threads()
    assert main(["run", str(path), "--out", str(out), "--threads", "2"]) == 0
    assert torch.get_num_threads() == threads  # the run put the caller's thread count back
    run_dir = next((out / "runs").iterdir())
    meta = json.loads((run_dir / "meta.json").read_text())
    inv = meta["invocations"][-1]
    assert inv["threads"] == 2 and inv["device"] == "cpu" and inv["torch"] == torch.__version__
    assert inv["finished"] is not None
    results = (run_dir / "results.json").read_text()
    assert torch.__version__ not in results and '"threads"' not in results
