"""The Ray executor on a real local cluster (head + one extra worker node on 127.0.0.1)."""

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'permgraph[ray]')")

from permgraph.experiments.executors import execute  # noqa: E402

from permgraph import experiments  # noqa: E402

# A loopback-only test cluster with token authentication: the driver (this process), the head and the
# worker share the token through these variables, set for this module's tests only (see ``cluster``).
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": os.environ.get("PERMGRAPH_TEST_RAY_TOKEN") or secrets.token_hex(32)}


def _refresh_ray_auth() -> None:
    """Ray caches its authentication settings; make it read the environment again."""
    try:
        from ray._private.authentication_test_utils import reset_auth_token_state
    except ImportError:  # older Ray: the settings are read at connection time
        return
    reset_auth_token_state()


GRID = {
    "kind": "pair", "name": "raygrid",
    "model": {"name": "mlp", "kwargs": {"in_features": 64, "width": 32, "depth": 2}},
    "data": {"name": "digits"},
    "train": {"epochs": 3, "batch_size": 64, "lr": 0.05, "weight_decay": 0.0, "schedule": "constant"},
    "seeds": [[0, 1], [2, 3], [4, 5], [6, 7]],
    "matching": {"num_samples": 300},
    "barrier": {"alphas": 3, "subset": 300, "batch_size": 300},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    saved = {k: os.environ.get(k) for k in RAY_ENV}
    os.environ.update(RAY_ENV)
    _refresh_ray_auth()
    exe = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    port = _free_port()
    env = dict(os.environ)
    tmp = tmp_path_factory.mktemp("ray")
    head = [exe, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=1",
            "--include-dashboard=false", f"--temp-dir={tmp}", "--disable-usage-stats"]
    try:
        subprocess.run(head, check=True, capture_output=True, env=env, timeout=120)
        address = f"127.0.0.1:{port}"
        worker = [exe, "start", f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                  "--disable-usage-stats"]
        subprocess.run(worker, check=True, capture_output=True, env=env, timeout=120)
        yield address
    finally:
        # disconnect before the cluster goes: `ray stop` terminates the processes still connected to it
        if ray.is_initialized():
            ray.shutdown()
        subprocess.run([exe, "stop", "--force"], capture_output=True, env=env, timeout=120)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _refresh_ray_auth()


@pytest.fixture(scope="module")
def local_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    run_dir = execute(experiments.parse(GRID), out, executor="local", threads=1)
    return (run_dir / "results.json").read_bytes()


def test_ray_cluster_gives_the_local_results(cluster, local_result, tmp_path):
    run_dir = execute(experiments.parse(GRID), tmp_path, executor="ray", address=cluster, threads=1)
    assert (run_dir / "results.json").read_bytes() == local_result
    assert not ray.is_initialized(), "the executor left its connection to the cluster open"
    # finished units are skipped on a second run, on either executor
    units = {p: p.stat().st_mtime_ns for p in (run_dir / "units").iterdir()}
    execute(experiments.parse(GRID), tmp_path, executor="ray", address=cluster)
    assert units == {p: p.stat().st_mtime_ns for p in (run_dir / "units").iterdir()}


def _task_pids() -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "ray::_execute" in line]


def test_a_killed_worker_has_its_unit_retried_and_the_run_completes(cluster, local_result, tmp_path):
    killed: list[int] = []

    def killer():
        deadline = time.time() + 90
        while time.time() < deadline and not killed:
            pids = _task_pids()
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.05)

    t = threading.Thread(target=killer)
    t.start()
    run_dir = execute(experiments.parse(GRID), tmp_path, executor="ray", address=cluster)
    t.join()
    assert killed, "no running unit was seen to kill"
    assert (run_dir / "results.json").read_bytes() == local_result
