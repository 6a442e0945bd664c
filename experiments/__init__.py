"""permgraph's experiment suite: declarative specs (``specs/*.yaml``) run by one runner per ``kind``.

    permgraph run specs/quickstart.yaml --out runs
    permgraph report runs/runs/pair-quickstart-<hash>
    permgraph list specs

Each runner is a module with ``run(ctx) -> results`` (plain data) and ``report(ctx, results) -> markdown``.
Runners use only permgraph's public API.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from .spec import KINDS, SpecError, load, parse
from .store import Store, read_json, write_json

__all__ = ["KINDS", "SpecError", "load", "parse", "run", "report", "runner"]


def runner(kind: str):
    if kind not in KINDS:
        raise SpecError(f"unknown kind {kind!r}; available: {', '.join(KINDS)}")
    return importlib.import_module(f"experiments.{kind}")


def run(spec_or_path, out: str | Path = "runs", device: str = "cpu", progress: bool = True) -> Path:
    """Run an experiment (skipping finished units), write results.json and report.md; return the run
    folder."""
    from .common import Context

    spec = load(spec_or_path) if isinstance(spec_or_path, (str, Path)) else spec_or_path
    store = Store(out)
    ctx = Context(spec, store, device=device, progress=progress)
    store.log(ctx.run_dir, f"run {spec.run_name()} on {device}")
    write_json(ctx.run_dir / "spec.json", spec.model_dump(mode="json"))
    mod = runner(spec.kind)
    results: dict[str, Any] = {"kind": spec.kind, "name": spec.name, "run": spec.run_name(),
                               "spec": spec.model_dump(mode="json"), **mod.run(ctx)}
    write_json(ctx.run_dir / "results.json", results)
    _write_report(ctx, mod, results)
    store.log(ctx.run_dir, "finished")
    return ctx.run_dir


def _write_report(ctx, mod, results) -> None:
    from .store import atomic_write

    atomic_write(ctx.run_dir / "report.md", mod.report(ctx, results))


def report(run_dir: str | Path) -> Path:
    """Re-create report.md (and plots) of a finished run from its results.json."""
    from .common import Context

    run_dir = Path(run_dir)
    if not (run_dir / "results.json").exists():
        raise FileNotFoundError(f"{run_dir} holds no results.json: run the experiment first (permgraph run SPEC)")
    results = read_json(run_dir / "results.json")
    spec = parse(results["spec"], str(run_dir / "spec.json"))
    store = Store(run_dir.parent.parent)
    ctx = Context(spec, store, progress=False)
    ctx.run_dir = run_dir
    _write_report(ctx, runner(spec.kind), results)
    return run_dir / "report.md"
