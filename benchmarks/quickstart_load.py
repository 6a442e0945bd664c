"""The main job on a shared machine: wall time of the README quickstart (``permgraph run
specs/quickstart.yaml``, each time in a fresh store) on an idle machine and while other processes keep
cores busy, at the default thread count and at an explicit one.

    python benchmarks/quickstart_load.py [--repeats 3] [--busy 1] [--threads default,2]

Target (issue 11): with one competing busy process, the quickstart takes at most 1.5x its idle time.
Each configuration is measured ``--repeats`` times and the median is reported, with its ratio to the idle
median of the same thread setting, the load average seen, and whether results.json was byte-identical to
the idle run's (it must be, for the same thread count).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "specs" / "quickstart.yaml"
BUSY = "while True: pass"


def one_run(threads: str) -> tuple[float, bytes]:
    exe = Path(sys.executable).parent / "permgraph"
    cmd = [str(exe), "run", str(SPEC)]
    if threads != "default":
        cmd += ["--threads", threads]
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        subprocess.run(cmd + ["--out", out], check=True, capture_output=True)
        dt = time.perf_counter() - t0
        results = next(Path(out).glob("runs/*/results.json")).read_bytes()
    return dt, results


def measure(threads: str, busy: int, repeats: int) -> dict:
    hogs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(busy)]
    try:
        time.sleep(1.0 if busy else 0.0)  # let the competing processes take their cores
        times, outputs, loads = [], set(), []
        for _ in range(repeats):
            dt, res = one_run(threads)
            times.append(dt)
            outputs.add(res)
            loads.append(os.getloadavg()[0])
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    return {"threads": threads, "busy": busy, "median": statistics.median(times), "times": times,
            "load": max(loads), "results": outputs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--busy", type=int, default=1, help="competing busy processes in the loaded runs")
    p.add_argument("--threads", default="default,2", help="comma-separated: 'default' and/or numbers")
    args = p.parse_args()
    print(f"{os.cpu_count()} cores; quickstart = {SPEC.relative_to(ROOT)}; median of {args.repeats}\n")
    print("| threads | competing busy processes | wall time (median) | runs | vs idle | load avg (1 min) | "
          "results as idle |")
    print("|---|---|---|---|---|---|---|")
    for threads in args.threads.split(","):
        idle = measure(threads, 0, args.repeats)
        loaded = measure(threads, args.busy, args.repeats)
        for r in (idle, loaded):
            same = "yes" if r["results"] == idle["results"] and len(r["results"]) == 1 else "no"
            print(f"| {threads} | {r['busy']} | {r['median']:.1f} s | "
                  f"{', '.join(f'{t:.1f}' for t in r['times'])} | {r['median'] / idle['median']:.2f}x | "
                  f"{r['load']:.2f} | {same} |", flush=True)


if __name__ == "__main__":
    main()
