"""Command line: ``permgraph demo`` and ``permgraph trace MODEL``."""

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
    from experiments.spec import SpecError

    return isinstance(e, (permgraph_error, SpecError, FileNotFoundError, IsADirectoryError, PermissionError))


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
    run = sub.add_parser("run", help="run an experiment spec (YAML) and write its results and report")
    run.add_argument("spec", help="path to a spec, e.g. specs/quickstart.yaml")
    run.add_argument("--out", default="runs", help="store root (default: ./runs)")
    run.add_argument("--device", default="cpu", help="cpu or cuda")
    run.add_argument("--executor", default="local", choices=["local", "ray"],
                     help="local (default): in this process; ray: independent units in parallel on a Ray cluster")
    run.add_argument("--threads", type=_positive, default=1,
                     help="torch threads (default 1). Results are byte-identical for the same torch version, "
                          "device and thread count. With --executor ray: the CPUs each unit asks Ray for")
    run.add_argument("--address", default=None,
                     help="Ray cluster address (e.g. 10.0.0.1:6379 or auto); default: start a local Ray instance")
    rep = sub.add_parser("report", help="re-create the report of a finished run folder")
    rep.add_argument("run_dir")
    ls = sub.add_parser("list", help="list the specs in a folder (recursively) with their kind, run name and "
                                     "whether the run finished in the store")
    ls.add_argument("specs_dir", nargs="?", default="specs")
    ls.add_argument("--out", default="runs", help="store root the runs are looked for in (default: ./runs)")
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
    return _experiments(args)


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return n


def _experiments(args) -> int:
    try:
        import experiments
        from experiments.spec import SpecError
    except ImportError as e:  # the suite's own dependencies are an extra
        print(f"error: the experiment suite needs packages that are not installed ({e}): "
              "pip install 'permgraph[experiments]'", file=sys.stderr)
        return 2

    try:
        if args.cmd == "run":
            if args.device.startswith("cuda") and not torch.cuda.is_available():
                print("error: --device cuda asked for, but no CUDA device is available", file=sys.stderr)
                return 2
            from experiments.executors import execute

            spec = experiments.load(args.spec)
            experiments.check_names(spec, args.spec)
            run_dir = execute(spec, args.out, args.device, args.executor, args.address, threads=args.threads)
            print(f"results: {run_dir / 'results.json'}\nreport:  {run_dir / 'report.md'}")
            return 0
        if args.cmd == "report":
            print(experiments.report(args.run_dir))
            return 0
        if args.cmd == "list":
            from pathlib import Path

            paths = sorted(Path(args.specs_dir).rglob("*.yaml"))
            if not paths:
                print(f"no *.yaml specs under {args.specs_dir}", file=sys.stderr)
                return 1
            for p in paths:
                try:
                    spec = experiments.load(p)
                    state = experiments.status(spec, args.out)
                    print(f"{str(p):45s} {spec.kind:11s} {spec.run_name():40s} {state}")
                except SpecError as e:
                    print(f"{str(p):45s} INVALID: {str(e).splitlines()[-1].strip()}")
            return 0
    except (SpecError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
