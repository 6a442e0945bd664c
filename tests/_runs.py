"""Shared by the runner tests: run a spec twice in one store and record what the second run touched."""

import time
from pathlib import Path

import experiments


def stamps(out: Path) -> dict[str, int]:
    files = list(out.rglob("units/*.json")) + list(out.rglob("networks/*/*.safetensors"))
    return {str(p): p.stat().st_mtime_ns for p in files}


def run_twice(spec: dict, out: Path) -> dict:
    t0 = time.perf_counter()
    run_dir = experiments.run(experiments.parse(spec), out=out, progress=False)
    first = time.perf_counter() - t0
    before, text = stamps(out), (run_dir / "results.json").read_bytes()
    t0 = time.perf_counter()
    again = experiments.run(experiments.parse(spec), out=out, progress=False)
    second = time.perf_counter() - t0
    return {"run_dir": run_dir, "again": again, "first": first, "second": second, "before": before,
            "after": stamps(out), "text": text, "text_again": (again / "results.json").read_bytes()}
