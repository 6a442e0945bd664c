"""Command line: ``permgraph demo`` and ``permgraph trace MODEL``; the experiment suite's ``run``, ``report``
and ``list`` come from ``permgraph.experiments.cli``."""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

DEMO_MODELS = ["mlp", "vgg16", "resnet20", "timm:vit_tiny_patch16_224", "torchvision:densenet121"]


def _inputs(name: str, model, shape: list[int] | None):
    from .models import example_inputs_for

    if shape:
        return (torch.randn(*shape, generator=torch.Generator().manual_seed(0)),)
    if name.startswith("torchvision:"):
        return (torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)),)
    return example_inputs_for(model)


def _trace_one(name: str, shape=None, freeze=(), json_path=None, verbose=True) -> bool:
    import permgraph

    with torch.random.fork_rng(devices=[]):  # the same model every time, without touching the caller's RNG
        torch.manual_seed(0)
        model = permgraph.models.create(name)
    x = _inputs(name, model, shape)
    t0 = time.perf_counter()
    spec = permgraph.trace(model, x, freeze=freeze)
    dt = time.perf_counter() - t0
    if verbose:
        print(spec.report(max_groups=12))
    res = permgraph.check_equivalence(model, spec, x, per_group=False, seed=1)
    moved = sum(g.size for g in spec.groups.values())
    print(f"\n{name}: traced and verified in {dt:.2f} s; {len(spec.groups)} groups, {moved} units; "
          f"random permutation of every group changes the output by {res.rel_error:.1e} "
          f"({res.dtype}, tolerance {res.tolerance:.0e}) -> {'OK' if res.ok else 'FAILED'}\n")
    if json_path:
        with open(json_path, "w") as f:
            f.write(spec.to_json())
        print(f"spec written to {json_path}")
    return res.ok


INTERRUPTED = "interrupted: finished work is kept; rerun the same command to resume"


def main(argv: list[str] | None = None) -> int:
    """The ``permgraph`` command. Errors a user can fix print one or two lines (``error: ...``) and exit
    with status 2; ``--debug`` or ``PERMGRAPH_DEBUG=1`` shows the traceback instead."""
    from .errors import PermgraphError

    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("PERMGRAPH_DEBUG", "") not in ("", "0")
    try:
        return _dispatch([a for a in argv if a != "--debug"])
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\n{INTERRUPTED}", file=sys.stderr)
        return 2
    except Exception as e:
        if debug or not _user_error(e, PermgraphError):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


def _user_error(e: BaseException, permgraph_error: type) -> bool:
    """Errors whose message tells the user what to do (not bugs: those keep their traceback)."""
    app = _app()
    errors = (permgraph_error, FileNotFoundError, IsADirectoryError, PermissionError)
    return isinstance(e, errors + ((app.SpecError,) if app is not None else ()))


def _dispatch(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="permgraph", description="Permutation symmetry of neural networks.",
                                     epilog="--debug (or PERMGRAPH_DEBUG=1) shows the traceback of an error.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    demo = sub.add_parser("demo", help="trace, permute and verify a few models; print coverage reports")
    demo.add_argument("--models", default=",".join(DEMO_MODELS), help="comma-separated zoo names")
    tr = sub.add_parser("trace", help="trace one model and print its coverage report")
    tr.add_argument("model", help="zoo name: mlp, vgg16, resnet20, timm:<name>, torchvision:<name>")
    tr.add_argument("--input-shape", type=int, nargs="+", help="example input shape, e.g. 2 3 32 32")
    tr.add_argument("--freeze", nargs="*", default=(), help="glob patterns of state-dict keys to keep fixed")
    tr.add_argument("--json", help="write the spec as JSON to this file")
    app = _app()
    if app is not None:
        app.add_commands(sub)
    args = parser.parse_args(argv)
    if args.cmd == "demo":
        ok = True
        for i, name in enumerate(args.models.split(",")):
            print(f"{'=' * 100}\n[{i + 1}] {name}\n{'=' * 100}")
            ok &= _trace_one(name, verbose=True)
        print("all models: function preserved under random permutations" if ok else "SOME MODELS FAILED")
        return 0 if ok else 1
    if args.cmd == "trace":
        return 0 if _trace_one(args.model, args.input_shape, args.freeze, args.json) else 1
    if app is None:
        print("error: the experiment suite needs packages that are not installed: "
              "pip install 'permgraph[experiments]'", file=sys.stderr)
        return 2
    return app.main(args)


def _app():
    """The experiment suite's command module (``run``, ``report``, ``list``), or None when its packages are
    not installed. Only the command line reaches into the suite; the library never imports it."""
    try:
        from permgraph.experiments import cli
    except ImportError:
        return None
    return cli


if __name__ == "__main__":
    sys.exit(main())
