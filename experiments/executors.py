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
from pathlib import Path
from typing import Any

EXECUTORS = ("local", "ray")


def _execute(fn, spec_data: dict, root: str, device: str, threads: int, *deps) -> str:
    """Run one unit in a worker: rebuild the Context from plain data and call ``fn`` on it."""
    import torch

    from . import parse
    from .common import Context
    from .store import Store

    torch.set_num_threads(threads)  # the same kernels as the driver, so results are bit-identical
    ctx = Context(parse(spec_data), Store(root), device=device, progress=False)
    fn(ctx)
    return "done"


def run_ray(spec, out: str | Path, device: str = "cpu", address: str | None = None,
            max_retries: int = 3) -> dict[str, Any]:
    """Submit the spec's units to Ray and wait for them; returns {"units": n, "started_cluster": bool}.

    Without ``address`` a local Ray instance is started on 127.0.0.1 and shut down afterwards.
    """
    try:
        import ray
    except ImportError as e:
        raise RuntimeError("the ray executor needs Ray: pip install 'permgraph[ray]'") from e
    import torch

    from . import runner
    from .common import Context
    from .store import Store

    out = Path(out).resolve()
    mod = runner(spec.kind)
    ctx = Context(spec, Store(out), device=device, progress=False)
    if not hasattr(mod, "plan"):
        return {"units": 0, "started_cluster": False, "note": f"kind {spec.kind} has no parallel plan"}
    tasks = mod.plan(ctx)
    started = False
    if not ray.is_initialized():
        if address is None:
            ray.init(address="local", include_dashboard=False, log_to_driver=False,
                     _node_ip_address="127.0.0.1", configure_logging=False)
            started = True
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    try:
        remote = ray.remote(max_retries=max_retries, retry_exceptions=False)(_execute)
        spec_data = spec.model_dump(mode="json")
        threads = torch.get_num_threads()
        refs: dict[str, Any] = {}
        for name, fn, deps in tasks:
            refs[name] = remote.remote(fn, spec_data, str(out), device, threads, *[refs[d] for d in deps])
        ray.get(list(refs.values()))
    finally:
        if started:
            ray.shutdown()
    return {"units": len(tasks), "started_cluster": started}


def execute(spec, out: str | Path, device: str = "cpu", executor: str = "local",
            address: str | None = None) -> Path:
    """Run ``spec`` with the chosen executor; returns the run folder."""
    from . import run

    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    if executor == "ray":
        run_ray(spec, out, device, address)
    os.makedirs(out, exist_ok=True)
    return run(spec, out, device, progress=executor == "local")
