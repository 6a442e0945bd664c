"""The experiment suite's commands: ``permgraph run SPEC``, ``permgraph report RUN_DIR`` and
``permgraph list [SPECS_DIR]`` (``permgraph.cli`` adds them to the ``permgraph`` command)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from . import check_names, load, report, status
from .spec import SpecError

__all__ = ["SpecError", "add_commands", "main"]

COMMANDS = ("run", "report", "list")


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return n


def add_commands(sub) -> None:
    """Add ``run``, ``report`` and ``list`` to an argparse subparsers object."""
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


def main(args: argparse.Namespace) -> int:
    """Run the command ``args.cmd`` (one of COMMANDS); returns the exit status."""
    try:
        if args.cmd == "run":
            if args.device.startswith("cuda") and not torch.cuda.is_available():
                print("error: --device cuda asked for, but no CUDA device is available", file=sys.stderr)
                return 2
            from .executors import execute

            spec = load(args.spec)
            check_names(spec, args.spec)
            run_dir = execute(spec, args.out, args.device, args.executor, args.address, threads=args.threads)
            print(f"results: {run_dir / 'results.json'}\nreport:  {run_dir / 'report.md'}")
            return 0
        if args.cmd == "report":
            print(report(args.run_dir))
            return 0
        if args.cmd == "list":
            paths = sorted(Path(args.specs_dir).rglob("*.yaml"))
            if not paths:
                print(f"no *.yaml specs under {args.specs_dir}", file=sys.stderr)
                return 1
            for p in paths:
                try:
                    spec = load(p)
                    print(f"{str(p):45s} {spec.kind:11s} {spec.run_name():40s} {status(spec, args.out)}")
                except SpecError as e:
                    print(f"{str(p):45s} INVALID: {str(e).splitlines()[-1].strip()}")
            return 0
    except (SpecError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    raise ValueError(f"unknown command {args.cmd!r}; the suite's commands are {', '.join(COMMANDS)}")
