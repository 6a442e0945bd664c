"""Shared by the runner tests: run a spec twice in one store and record what the second run touched."""

import contextlib
import time
from pathlib import Path

import permgraph
from permgraph import experiments

# the expensive calls a run makes: training, alignment and barriers
WORK = ("train", "align", "barrier")


def stamps(out: Path) -> dict[str, int]:
    files = list(out.rglob("units/*.json")) + list(out.rglob("networks/*/*.safetensors"))
    return {str(p): p.stat().st_mtime_ns for p in files}


@contextlib.contextmanager
def counting(calls: dict[str, int]):
    """Count the calls of ``permgraph.train/align/barrier`` made inside the block."""
    originals = {name: getattr(permgraph, name) for name in WORK}

    def counted(name):
        def call(*args, **kw):
            calls[name] += 1
            return originals[name](*args, **kw)
        return call

    try:
        for name in WORK:
            setattr(permgraph, name, counted(name))
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(permgraph, name, fn)


def run_twice(spec: dict, out: Path) -> dict:
    work_first, work_second = dict.fromkeys(WORK, 0), dict.fromkeys(WORK, 0)
    t0 = time.perf_counter()
    with counting(work_first):
        run_dir = experiments.run(experiments.parse(spec), out=out, progress=False)
    first = time.perf_counter() - t0
    before, text = stamps(out), (run_dir / "results.json").read_bytes()
    t0 = time.perf_counter()
    with counting(work_second):
        again = experiments.run(experiments.parse(spec), out=out, progress=False)
    second = time.perf_counter() - t0
    return {"run_dir": run_dir, "again": again, "first": first, "second": second, "before": before,
            "after": stamps(out), "text": text, "text_again": (again / "results.json").read_bytes(),
            "work_first": work_first, "work_second": work_second}
