"""Activation matching under weight noise: how well B's planted partners still correlate with A's units.

For each model: A with randomised norms, B = A under a random permutation of every group with every floating
tensor scaled by ``1 + 0.1 N(0, 1)``, then put back into A's order (so the planted assignment is the identity).
Activation matching (Pearson, 256 random inputs) reports per group the mean correlation of the assignment it
found and of the identity, i.e. the planted one (``similarity_after`` / ``similarity_before``), and the units it
moved away from their planted partner. Writes JSON and prints a summary by correlation band.

    python benchmarks/am_noise.py [--models torchvision:resnet50,deep-convnext_tiny] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch

import permgraph
from permgraph._verify import randomize_

sys.path.insert(0, str(Path(__file__).resolve().parent))
import planted as P  # noqa: E402

MODELS = {
    "torchvision:resnet50": lambda: permgraph.models.create("torchvision:resnet50"),
    "deep-convnext_tiny": P.DEEP["deep-convnext_tiny"][0],
    "deep-vit_small_patch16_224": P.DEEP["deep-vit_small_patch16_224"][0],
}


def measure(build, noises=(0.0, P.NOISE)) -> list[dict]:
    torch.manual_seed(0)
    a0 = build().eval()
    spec = permgraph.trace(a0, (P._inputs(P.IMG64, 2, 0),))
    loader = [P._inputs(P.IMG64, 64, 10 + i) for i in range(P.SAMPLES // 64)]
    a = randomize_(copy.deepcopy(a0), torch.Generator().manual_seed(1))
    perm = permgraph.random_permutation(spec, 3)
    rows = []
    for noise in noises:
        b = permgraph.apply(a, spec, perm)
        if noise:
            P._noise_(b, noise)
        back = permgraph.apply(b, spec, permgraph.inverse(perm))
        al = permgraph.align(a, back, "activation", spec=spec, progress=False, loader=loader)
        for i, (g, d) in enumerate(al.groups.items()):
            if "similarity_before" not in d:
                continue
            n = len(al.perm[g])
            rows.append({"noise": noise, "order": i, "group": g, "units": n,
                         "wrong": int((al.perm[g] != torch.arange(n)).sum()),
                         "planted_corr": d["similarity_before"], "found_corr": d["similarity_after"]})
    return rows


def summary(name: str, rows: list[dict]) -> str:
    out = [f"== {name}"]
    for noise in sorted({r["noise"] for r in rows}):
        rs = [r for r in rows if r["noise"] == noise]
        units, wrong = sum(r["units"] for r in rs), sum(r["wrong"] for r in rs)
        higher = sum(r["planted_corr"] > r["found_corr"] + 1e-9 for r in rs)
        out.append(f" noise {noise}: {wrong} of {units} units moved; groups whose planted assignment scores "
                   f"higher: {higher} of {len(rs)}")
        for lo, hi in [(-1.0, 0.5), (0.5, 0.7), (0.7, 0.9), (0.9, 1.01)]:
            band = [r for r in rs if lo <= r["planted_corr"] < hi]
            if band:
                u, w = sum(r["units"] for r in band), sum(r["wrong"] for r in band)
                out.append(f"   planted partners' mean correlation in [{lo}, {hi}): {len(band)} groups, {u} units, "
                           f"{w} moved ({w / u:.0%}); mean correlation planted "
                           f"{statistics.mean(r['planted_corr'] for r in band):.3f}, found "
                           f"{statistics.mean(r['found_corr'] for r in band):.3f}")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    for name in [m for m in args.models.split(",") if m]:
        results[name] = measure(MODELS[name])
        print(summary(name, results[name]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
