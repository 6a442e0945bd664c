"""Does one of the matchers' rules change a preset's aligned barriers by more than the matcher's own
noise? Each rule is run on and off, on the trained pairs of a preset, over several draws of what the
matcher depends on; the barriers use the preset's protocol (splits, subset, alphas, BatchNorm handling).

- ``--rule ties``: activation matching's tie rule (docs/alignment.md, "Statistics and similarity"), which
  hands the units the activation similarity cannot tell apart to weight matching, against no tie rule
  (``_tied_units`` patched to find none: the matcher as it was before the rule). The draws are matching
  sets of the preset's size: set 0 is the preset's own (the first ``num_samples`` training examples), set
  k > 0 is drawn at random from the training split (generator seeded by k).
- ``--rule start``: weight matching's default start (``start="auto"``) against plain coordinate descent
  from the identity (``start="identity"``); ``--fold-bn`` for the ``weight_folded`` arm. The draws are
  the solver's seeds (the order in which it visits the groups), 0 to n - 1; seed 0 is the preset's.

On the CPU presets these rules moved a few aligned barriers by 0.001-0.003 (docs/results.md). The script
prints one JSON line per pair and draw (how many units the rule changed, both barriers) and then, per
barrier, the mean and spread of (rule on) - (rule off), and how often each was lower.

Usage::

    permgraph run specs/cpu/zoo_mnist5k.yaml --out runs --threads 2    # trains the pairs (once)
    python benchmarks/rule_noise.py specs/cpu/zoo_mnist5k.yaml runs --labels mobilenetv3,swin [--draws 8]
    python benchmarks/rule_noise.py specs/cpu/pair_mnist1d.yaml runs --draws 4
    python benchmarks/rule_noise.py specs/cpu/pair_digits_resnet20_bn.yaml runs --rule start --fold-bn
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
from unittest import mock

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import permgraph  # noqa: E402
from experiments import spec as specs  # noqa: E402
from experiments import zoo  # noqa: E402
from experiments.common import Context  # noqa: E402
from experiments.store import Store  # noqa: E402


def _no_ties(s: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return torch.zeros(len(p), dtype=torch.bool)


def matching_sets(ctx, n_sets: int):
    """Set 0: the preset's own matching loader; set k: ``num_samples`` random training examples (seed k)."""
    yield 0, ctx.match_loader()
    m = ctx.spec.matching
    ds = ctx.data.subset("train", len(ctx.data.train))
    xs, ys = ds.tensors[0], ds.tensors[1]
    n = min(m.num_samples or len(xs), len(xs))
    for k in range(1, n_sets):
        idx = torch.randperm(len(xs), generator=torch.Generator().manual_seed(k))[:n]
        yield k, DataLoader(TensorDataset(xs[idx], ys[idx]), batch_size=500, shuffle=False)


def _flat(barriers: dict) -> dict[str, float]:
    """{"test error": 0.39, "test loss": 1.36, ...} from the context's barrier dicts."""
    out = {}
    for split, d in barriers.items():
        b = d["barrier"]
        for metric, v in (b.items() if isinstance(b, dict) else [("error", b)]):
            out[f"{split} {metric}"] = float(v)
    return out


def _ties_arms(ctx, a, b, spec, draws: int):
    """(draw, {"on": Alignment, "off": Alignment}, extra fields) for the tie rule."""
    m = ctx.spec.matching
    for k, loader in matching_sets(ctx, draws):
        als = {}
        for rule in ("on", "off"):
            patch = (mock.patch("permgraph._activations._tied_units", _no_ties) if rule == "off"
                     else contextlib.nullcontext())
            with patch:
                als[rule] = permgraph.align(a, b, "activation", loader=loader, spec=spec, num_samples=m.num_samples,
                                            similarity=m.similarity, residual=m.residual, max_iter=m.max_iter,
                                            progress=False)
        yield k, als, {"tied_units": sum((als["on"].log[0].get("tied_units") or {}).values())}


def _start_arms(ctx, a, b, spec, draws: int, fold_bn: bool):
    """(draw, {"on": Alignment, "off": Alignment}, extra fields) for weight matching's start rule."""
    m = ctx.spec.matching
    for seed in range(draws):
        als = {rule: permgraph.align(a, b, "weight", spec=spec, max_iter=m.max_iter, exclude=m.exclude, seed=seed,
                                     fold_bn=fold_bn, start=start, progress=False)
               for rule, start in (("on", "auto"), ("off", "identity"))}
        yield seed, als, {"objective_on": round(als["on"].log[-1]["objective"], 4),
                          "objective_off": round(als["off"].log[-1]["objective"], 4)}


def run_pair(ctx, sa: int, sb: int, args, label: str):
    a, b = (ctx.model_from(ctx.network(s)["final"]) for s in (sa, sb))
    spec = ctx.trace(a)
    arms = (_ties_arms(ctx, a, b, spec, args.draws) if args.rule == "ties"
            else _start_arms(ctx, a, b, spec, args.draws, args.fold_bn))
    for k, als, extra in arms:
        row = {"label": label, "seeds": [sa, sb], "draw": k, **extra}
        row["changed_units"] = sum(int((als["on"].perm[g] != als["off"].perm[g]).sum()) for g in spec.groups)
        row["on"] = _flat(ctx.barriers(a, als["on"].apply(b)))
        row["off"] = row["on"] if row["changed_units"] == 0 else _flat(ctx.barriers(a, als["off"].apply(b)))
        print(json.dumps(row), flush=True)
        yield row


def summary(rows: list[dict]) -> None:
    for label in dict.fromkeys(r["label"] for r in rows):
        rs = [r for r in rows if r["label"] == label]
        print(f"\n{label}: {len(rs)} runs (pairs x draws), permutations differ in "
              f"{sum(r['changed_units'] > 0 for r in rs)}")
        print(f"{'barrier':<14} {'rule on':>16} {'rule off':>16} {'diff mean':>10} {'diff sd':>8} {'lower':>6} "
              f"{'higher':>6} {'same':>5}")
        for key in rs[0]["on"]:
            w = [r["on"][key] for r in rs]
            wo = [r["off"][key] for r in rs]
            d = [x - y for x, y in zip(w, wo)]
            sd = statistics.stdev(d) if len(d) > 1 else 0.0

            def ms(v):
                return f"{statistics.mean(v):.4f}±{(statistics.stdev(v) if len(v) > 1 else 0):.4f}"

            print(f"{key:<14} {ms(w):>16} {ms(wo):>16} {statistics.mean(d):>+10.4f} {sd:>8.4f} "
                  f"{sum(x < -1e-12 for x in d):>6} {sum(x > 1e-12 for x in d):>6} {sum(abs(x) <= 1e-12 for x in d):>5}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("spec", help="a pair or zoo preset, e.g. specs/cpu/zoo_mnist5k.yaml")
    ap.add_argument("store", help="the experiment store its networks were trained into (--out of permgraph run)")
    ap.add_argument("--labels", default=None, help="zoo models to include (comma-separated labels; default all)")
    ap.add_argument("--rule", choices=("ties", "start"), default="ties")
    ap.add_argument("--draws", type=int, default=8, help="matching sets (ties) or solver seeds (start) per pair")
    ap.add_argument("--fold-bn", action="store_true", help="with --rule start: weight matching on BN-folded weights")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    exp = specs.load(args.spec)
    ctx = Context(exp, Store(args.store), progress=False)
    rows: list[dict] = []
    if exp.kind == "zoo":
        labels = args.labels.split(",") if args.labels else [m.label for m in exp.models]
        for label in labels:
            mctx = zoo.model_context(ctx, label)
            for sa, sb in exp.seeds:
                rows += list(run_pair(mctx, sa, sb, args, label))
    else:
        for sa, sb in exp.seeds:
            rows += list(run_pair(ctx, sa, sb, args, exp.name))
    summary(rows)


if __name__ == "__main__":
    main()
