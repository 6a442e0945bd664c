"""Wall time of a small experiment grid (pair over 4 seed pairs on digits) with the local executor and
with Ray on 1 and 2 workers, each in a fresh store, on this machine.

    python benchmarks/ray_grid.py [--repeats 1]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402
from permgraph.experiments.executors import execute  # noqa: E402

from permgraph import experiments  # noqa: E402

GRID = {
    "kind": "pair", "name": "bench-grid",
    "model": {"name": "mlp", "kwargs": {"in_features": 64, "width": 512, "depth": 3}},
    "data": {"name": "digits"},
    "train": {"epochs": 60, "batch_size": 64, "lr": 0.05, "weight_decay": 0.0, "schedule": "constant"},
    "seeds": [[0, 1], [2, 3], [4, 5], [6, 7]],
    "matching": {"num_samples": 1000},
    "barrier": {"alphas": 25, "subset": 1437, "batch_size": 500},
}


def timed(executor: str, workers: int | None) -> tuple[float, bytes]:
    import ray

    with tempfile.TemporaryDirectory() as out:
        if workers:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            t0 = time.perf_counter()
            run_dir = execute(experiments.parse(GRID), out, executor=executor)
            dt = time.perf_counter() - t0
            return dt, (run_dir / "results.json").read_bytes()
        finally:
            if workers:
                ray.shutdown()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(1)  # one thread per unit, so that 2 workers use the 2 cores
    rows = []
    ref = None
    for name, ex, w in (("local", "local", None), ("ray, 1 worker", "ray", 1), ("ray, 2 workers", "ray", 2)):
        times = []
        for _ in range(args.repeats):
            dt, res = timed(ex, w)
            times.append(dt)
            ref = ref or res
            assert res == ref, "results differ between executors"
        rows.append((name, sorted(times)[len(times) // 2]))
    base = rows[1][1]
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, 1 torch thread per unit")
    print("| executor | wall time (s) | speed-up vs ray 1 worker |\n|---|---|---|")
    for name, t in rows:
        print(f"| {name} | {t:.1f} | {base / t:.2f}x |")
    print("results.json byte-identical across executors: yes")


if __name__ == "__main__":
    main()
