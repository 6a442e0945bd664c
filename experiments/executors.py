"""Executors: where an experiment's units of work run.

* ``local`` (default, no extra dependency): the runner executes its units in order, in this process.
* ``ray``: the runner's ``plan`` (independent units with their dependencies: train a network, align and
  measure one pair, ...) is submitted to a Ray cluster; independent units run in parallel on any worker,
  a unit whose worker dies is retried, and finished units are skipped. Every unit writes its artifact
  atomically into the shared store, so the final aggregation (run locally) finds everything done and
  produces byte-identical results to the local executor.

The store must be a path every worker can reach (a shared filesystem: NFS, Lustre, ...).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

EXECUTORS = ("local", "ray")


def _execute(fn, spec_data: dict, root: str, device: str, *deps) -> str:
    """Run one unit in a worker: rebuild the Context from plain data and call ``fn`` on it, with as many
    torch threads as Ray assigned CPUs to this unit (a worker process is reused, so the count is put back)."""
    import ray
    import torch

    from . import parse
    from .common import Context
    from .store import Store

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cpus)))
    try:
        ctx = Context(parse(spec_data), Store(root), device=device, progress=False)
        fn(ctx)
    finally:
        torch.set_num_threads(before)
    return "done"


def run_ray(spec, out: str | Path, device: str = "cpu", address: str | None = None, cpus_per_unit: int = 1,
            max_retries: int = 3) -> dict[str, Any]:
    """Submit the spec's units to Ray and wait for them; returns {"units": n, "started_cluster": bool}.

    Each unit asks Ray for ``cpus_per_unit`` CPUs and runs with that many torch threads, so N units on one
    node use the node's cores once, not N times over. Results are byte-identical to a local run with
    ``threads=cpus_per_unit``. Without ``address`` a local Ray instance is started on 127.0.0.1. A
    connection this function opens (to a local instance or to ``address``) is closed before it returns;
    one that was already open is left as it was.
    """
    try:
        import ray
    except ImportError as e:
        raise RuntimeError("the ray executor needs Ray: pip install 'permgraph[ray]'") from e

    from . import runner
    from .common import Context
    from .store import Store

    if cpus_per_unit < 1:
        raise ValueError(f"cpus_per_unit must be at least 1, got {cpus_per_unit}")
    out = Path(out).resolve()
    mod = runner(spec.kind)
    ctx = Context(spec, Store(out), device=device, progress=False)
    if not hasattr(mod, "plan"):
        return {"units": 0, "started_cluster": False, "note": f"kind {spec.kind} has no parallel plan"}
    tasks = mod.plan(ctx)
    connected = False
    started = False
    # ray.init sets environment variables (PYTHONBREAKPOINT, ...) and draws from Python's global random
    # generator; a connection opened here leaves the caller's process as it found it
    saved_env, saved_random = dict(os.environ), random.getstate()
    if not ray.is_initialized():
        if address is None:
            ray.init(address="local", include_dashboard=False, log_to_driver=False,
                     _node_ip_address="127.0.0.1", configure_logging=False)
            started = True
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        connected = True
    try:
        remote = ray.remote(num_cpus=cpus_per_unit, max_retries=max_retries, retry_exceptions=False)(_execute)
        spec_data = spec.model_dump(mode="json")
        refs: dict[str, Any] = {}
        for name, fn, deps in tasks:
            refs[name] = remote.remote(fn, spec_data, str(out), device, *[refs[d] for d in deps])
        ray.get(list(refs.values()))
    finally:
        if connected:
            ray.shutdown()
            for k in [k for k in os.environ if k not in saved_env]:
                del os.environ[k]
            os.environ.update(saved_env)
            random.setstate(saved_random)
    return {"units": len(tasks), "started_cluster": started}


def execute(spec, out: str | Path, device: str = "cpu", executor: str = "local",
            address: str | None = None, threads: int = 1) -> Path:
    """Run ``spec`` with the chosen executor; returns the run folder.

    ``threads``: torch threads of the local run, or the CPUs each Ray unit asks for (and runs with), so
    that both executors give byte-identical results for the same value.
    """
    from . import run

    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    if executor == "ray":
        run_ray(spec, out, device, address, cpus_per_unit=threads)
    os.makedirs(out, exist_ok=True)
    return run(spec, out, device, progress=executor == "local", threads=threads)
