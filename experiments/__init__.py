"""permgraph's experiment suite: declarative specs (``specs/*.yaml``) run by one runner per ``kind``.

Installed as ``permgraph.experiments`` (from the repository's ``experiments/`` folder); the library
(``permgraph``) never imports it, only the command line does.

    permgraph run specs/quickstart.yaml --out runs
    permgraph report runs/runs/pair-quickstart-<hash>
    permgraph list specs

Each runner is a module with ``run(ctx) -> results`` (plain data) and ``report(ctx, results) -> markdown``.
Runners use only permgraph's public API.
"""

from __future__ import annotations

import difflib
import importlib
from pathlib import Path
from typing import Any

import torch

from .spec import KINDS, SpecError, load, parse
from .store import Store, read_json, write_json

__all__ = ["KINDS", "SpecError", "check_names", "load", "parse", "run", "report", "runner"]


def runner(kind: str):
    if kind not in KINDS:
        raise SpecError(f"unknown kind {kind!r}; available: {', '.join(KINDS)}")
    return importlib.import_module(f"{__name__}.{kind}")


def run(spec_or_path, out: str | Path = "runs", device: str = "cpu", progress: bool = True,
        threads: int = 1) -> Path:
    """Run an experiment (skipping finished units), write results.json and report.md; return the run
    folder.

    ``threads`` is torch's intra-op thread count for the run (put back afterwards). Results are
    byte-identical for the same torch version, device and thread count; each invocation records these in
    the run folder's ``meta.json`` (not in results.json, which stays free of paths, hosts and times).
    """
    from .common import Context

    is_path = isinstance(spec_or_path, (str, Path))
    spec = load(spec_or_path) if is_path else spec_or_path
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_names(spec, str(spec_or_path) if is_path else "<spec>")  # before the run folder exists: a typo leaves nothing behind
        store = Store(out)
        ctx = Context(spec, store, device=device, progress=progress)
        invocation = _start_invocation(ctx.run_dir, device, threads)
        store.log(ctx.run_dir, f"run {spec.run_name()} on {device} with {threads} torch thread(s)")
        write_json(ctx.run_dir / "spec.json", spec.model_dump(mode="json"))
        mod = runner(spec.kind)
        results: dict[str, Any] = {"kind": spec.kind, "name": spec.name, "run": spec.run_name(),
                                   "spec": spec.model_dump(mode="json"), **mod.run(ctx)}
        write_json(ctx.run_dir / "results.json", results)
        _write_report(ctx, mod, results)
        _finish_invocation(ctx.run_dir, invocation)
        store.log(ctx.run_dir, "finished")
        return ctx.run_dir
    finally:
        torch.set_num_threads(before)


def check_names(spec, source: str = "<spec>") -> None:
    """Raise SpecError when the spec names a data set or model that does not exist (or cannot be built
    with its kwargs), naming the file, the field and what to do; nothing is written."""
    import permgraph

    if spec.data.name not in permgraph.data.available():
        close = difflib.get_close_matches(spec.data.name, permgraph.data.available(), n=3)
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        raise SpecError(f"{source}: data.name: unknown data set {spec.data.name!r}; {hint}available: "
                        f"{', '.join(permgraph.data.available())}")
    # a zoo's models are not checked here: one that cannot be built is reported in its results, and the
    # others run
    models = [("model", spec.model.name, spec.model.kwargs)] if hasattr(spec, "model") else []
    for field, name, kwargs in models:
        try:
            with torch.random.fork_rng(devices=[]):
                permgraph.models.create(name, **kwargs)
        except (permgraph.PermgraphError, TypeError, ValueError) as e:
            raise SpecError(f"{source}: {field}: cannot build {name!r} with kwargs {kwargs}: {e}") from None


def _environment(device: str, threads: int) -> dict[str, Any]:
    """What results depend on beyond the spec: torch's version, the device and the thread count."""
    import platform

    import permgraph

    dev = torch.device(device)
    env = {"torch": torch.__version__, "permgraph": permgraph.__version__, "python": platform.python_version(),
           "device": str(dev), "threads": threads, "host": platform.node(), "machine": platform.machine()}
    if dev.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["device_name"] = torch.cuda.get_device_name(dev)
    return env


def _start_invocation(run_dir: Path, device: str, threads: int) -> dict[str, Any]:
    """Append this invocation to meta.json; warn when it resumes a run begun under other conditions."""
    import time
    import warnings

    meta_path = run_dir / "meta.json"
    meta = read_json(meta_path) if meta_path.exists() else {"invocations": []}
    env = _environment(device, threads)
    keys = ("torch", "device", "threads")
    earlier = [inv for inv in meta["invocations"] if any(inv.get(k) != env[k] for k in keys)]
    if earlier:
        was = ", ".join(f"{k}={earlier[-1].get(k)}" for k in keys)
        now = ", ".join(f"{k}={env[k]}" for k in keys)
        warnings.warn(f"{run_dir.name} was begun with {was} and continues with {now}: units computed now may "
                      "differ in their last digits from the ones already stored", stacklevel=3)
    invocation = {**env, "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "finished": None}
    meta["invocations"].append(invocation)
    write_json(meta_path, meta)
    return invocation


def _finish_invocation(run_dir: Path, invocation: dict[str, Any]) -> None:
    import time

    meta_path = run_dir / "meta.json"
    meta = read_json(meta_path)
    meta["invocations"][-1] = {**invocation, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json(meta_path, meta)


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


def status(spec, out: str | Path = "runs") -> str:
    """Where the run of ``spec`` (a spec or its path) stands in the store ``out``: "finished" (results.json
    written), "partial: k units done (rerun to resume)" (finished units, no results.json) or "not run"."""
    spec = load(spec) if isinstance(spec, (str, Path)) else spec
    run_dir = Store(out).run_dir(spec)
    if (run_dir / "results.json").exists():
        return "finished"
    units = len(list((run_dir / "units").glob("*.json"))) if (run_dir / "units").is_dir() else 0
    if units:
        return f"partial: {units} unit{'s' if units != 1 else ''} done (rerun to resume)"
    return "not run"
