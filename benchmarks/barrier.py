"""Benchmark ``permgraph.barrier`` against the evaluation passes it cannot avoid.

Cases:

* ``mlp``: two zoo MLPs (40 -> 128 -> 128 -> 10, trained from seeds 0 and 1 as in
  tests/test_barrier.py::_mnist1d_mlp) on MNIST-1D (``data.get("mnist1d")``), evaluated on the training
  subset of 4,000 sequences in batches of 1,000, ``bn="none"``. Bound: 25 plain evaluation passes
  (``permgraph.evaluate``) over the same loader.
* ``mlp-list``: the same with the loader's four batches collected into a list beforehand, which shows
  how much of the MLP case is the DataLoader's per-example indexing and collation.
* ``cnn``: two BatchNorm CNNs (``models.create("resnet20", width_multiplier=0.5, norm="bn",
  in_channels=1, input_size=8)``, trained 2 epochs from seeds 0 and 1 as in tests/test_barrier.py) on
  scikit-learn's digits (``data.get("digits")``, the 1,437 training images in batches of 256),
  ``bn="reset"``. Bound: 25 plain evaluation passes plus 25 ``reset_bn_`` passes over the same loader.

Each case times ``permgraph.barrier(a, b, loader, alphas=25, bn=..., progress=False)`` and its bound in
the same run, interleaved (bound, barrier, bound, barrier, ...), and reports the median of
``--repeats`` repeats and the median of the per-repeat ratios. Target: barrier within 1.3x of its bound.
For information the same run also times ``bn="repair"`` (REPAIR, 3 passes per alpha, plus a BatchNorm
reset for the CNN) against its own pass count. ``--profile`` prints a cProfile summary of one barrier
of each case.

Usage::

    python benchmarks/barrier.py [--cases mlp,cnn] [--repeats 5] [--threads 1] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import platform
import statistics
import sys
import time
import warnings

import torch

import permgraph
from permgraph import data, models
from permgraph.interpolation import batchnorm_layers, channel_stats, repair_, repair_layers, reset_bn_

TARGET = 1.3
ALPHAS = 25


def median(xs):
    return statistics.median(xs)


@functools.cache
def mnist1d_models():
    d = data.get("mnist1d")

    def mlp(seed):
        return permgraph.train(lambda: models.create("mlp", in_features=40, width=128, depth=2), d, epochs=10,
                               lr=0.05, batch_size=128, weight_decay=0.0, schedule="constant", init_seed=seed,
                               data_seed=seed, progress=False).model.eval()

    return d, mlp(0), mlp(1)


def mnist1d_case():
    d, a, b = mnist1d_models()
    return a, b, d.loader("train", 1000, subset=4000), "none"


def mnist1d_list_case():
    """The same, with the loader's batches collected into a list first (no per-example indexing)."""
    d, a, b = mnist1d_models()
    return a, b, list(d.loader("train", 1000, subset=4000)), "none"


def digits_case():
    d = data.get("digits")

    def cnn(seed):
        def make():
            return models.create("resnet20", width_multiplier=0.5, norm="bn", in_channels=1, input_size=8)

        return permgraph.train(make, d, epochs=2, lr=0.05, batch_size=64, init_seed=seed, data_seed=seed,
                               progress=False).model.eval()

    return cnn(0), cnn(1), d.loader("train", 256, shuffle=False), "reset"


CASES = {"mlp": ("zoo MLP 40-128-128-10, MNIST-1D train subset 4,000, batch 1,000", mnist1d_case),
         "mlp-list": ("the same, batches pre-collected in a list", mnist1d_list_case),
         "cnn": ("resnet20 x0.5 with BatchNorm, digits train 1,437, batch 256", digits_case)}


def bound_passes(model, loader, bn: str) -> float:
    """The passes a barrier cannot avoid: one evaluation (and one BatchNorm reset) per alpha."""
    m = copy.deepcopy(model)
    t0 = time.perf_counter()
    for _ in range(ALPHAS):
        if bn == "reset":
            reset_bn_(m, loader)
        permgraph.evaluate(m, loader)
    return time.perf_counter() - t0


def repair_bound(model, loader) -> float:
    """REPAIR's own passes: endpoint statistics (2 passes), then per alpha 3 REPAIR passes, a BatchNorm
    reset when the model has BatchNorm, and one evaluation."""
    m = copy.deepcopy(model)
    layers = repair_layers(m)
    has_bn = bool(batchnorm_layers(m))
    t0 = time.perf_counter()
    targets = channel_stats(m, loader, layers)
    channel_stats(m, loader, layers)
    for _ in range(ALPHAS):
        repair_(m, targets, loader)
        if has_bn:
            reset_bn_(m, loader)
        permgraph.evaluate(m, loader)
    return time.perf_counter() - t0


def time_barrier(a, b, loader, bn: str) -> tuple[float, permgraph.BarrierCurve]:
    t0 = time.perf_counter()
    # the statistics (bn="reset" / "repair") come from the same training loader the bound passes use
    curve = permgraph.barrier(a, b, loader, alphas=ALPHAS, bn=bn, reset_loader=loader, progress=False)
    return time.perf_counter() - t0, curve


def bench_case(name: str, repeats: int, repair: bool) -> dict:
    desc, make = CASES[name]
    a, b, loader, bn = make()
    time_barrier(a, b, loader, bn)  # warm-up
    bounds, barriers, loads = [], [], []
    rep_bounds, rep_barriers = [], []
    curve = None
    for r in range(repeats):
        loads.append(os.getloadavg()[0])
        bounds.append(bound_passes(a, loader, bn))
        t, curve = time_barrier(a, b, loader, bn)
        barriers.append(t)
        msg = f"  [{name}] repeat {r + 1}: bound {bounds[-1]:.3f}s, barrier {barriers[-1]:.3f}s"
        if repair:
            rep_bounds.append(repair_bound(a, loader))
            t, _ = time_barrier(a, b, loader, "repair")
            rep_barriers.append(t)
            msg += f"; repair bound {rep_bounds[-1]:.3f}s, repair barrier {rep_barriers[-1]:.3f}s"
        print(msg + f", load {loads[-1]:.1f}", file=sys.stderr, flush=True)
    ratios = [x / y for x, y in zip(barriers, bounds)]
    out = {"case": name, "desc": desc, "bn": curve.bn, "examples": sum(len(x[0]) for x in loader),
           "batches": sum(1 for _ in loader), "bound_s": median(bounds), "barrier_s": median(barriers),
           "ratio": median(ratios), "ratios": ratios, "bounds": bounds, "barriers": barriers,
           "error_barrier": curve.barrier("error"), "loss_barrier": curve.barrier("loss"),
           "load": (min(loads), max(loads + [os.getloadavg()[0]]))}
    if repair:
        rr = [x / y for x, y in zip(rep_barriers, rep_bounds)]
        out.update({"repair_bound_s": median(rep_bounds), "repair_s": median(rep_barriers), "repair_ratio": median(rr)})
    return out


def profile_case(name: str, top: int = 15) -> str:
    import cProfile
    import io
    import pstats

    a, b, loader, bn = CASES[name][1]()
    time_barrier(a, b, loader, bn)
    pr = cProfile.Profile()
    pr.enable()
    time_barrier(a, b, loader, bn)
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
    return s.getvalue()


def report(rows: list[dict], args) -> str:
    lines = ["| case | bn | examples (batches) | bound s | barrier s | barrier / bound | per repeat | "
             f"within {TARGET:g}x | error barrier | loss barrier |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['desc']} | {r['bn']} | {r['examples']} ({r['batches']}) | {r['bound_s']:.3f} | "
                     f"{r['barrier_s']:.3f} | {r['ratio']:.2f} | {', '.join(f'{x:.2f}' for x in r['ratios'])} | "
                     f"{'yes' if r['ratio'] <= TARGET else 'no'} | {r['error_barrier']:.3f} | {r['loss_barrier']:.3f} |")
    if args.repair:
        lines += ["", "| case | bn | REPAIR passes s | barrier s | barrier / passes |", "|---|---|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['desc']} | repair | {r['repair_bound_s']:.3f} | {r['repair_s']:.3f} | "
                         f"{r['repair_ratio']:.2f} |")
    loads = [x for r in rows for x in r["load"]]
    lines += ["", f"{ALPHAS} alphas. Median of {args.repeats} interleaved repeats; torch.set_num_threads({args.threads}); "
              f"{os.cpu_count()} CPUs; torch {torch.__version__}; 1-minute load average during the run "
              f"{min(loads):.1f}-{max(loads):.1f}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="mlp,mlp-list,cnn", help="comma-separated subset of: " + ", ".join(CASES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-repair", dest="repair", action="store_false", help="skip the bn='repair' timings")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--markdown", metavar="OUT.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print(f"permgraph {permgraph.__version__}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"python {platform.python_version()}", file=sys.stderr)
    rows = [bench_case(c.strip(), args.repeats, args.repair) for c in args.cases.split(",") if c.strip()]
    text = report(rows, args)
    print()
    print(text)
    if args.profile:
        for r in rows:
            print(f"--- cProfile: barrier, {r['case']}")
            print(profile_case(r["case"]))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
