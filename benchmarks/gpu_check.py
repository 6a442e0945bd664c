"""End-to-end check of permgraph on a CUDA device (run where a GPU is available):

    python benchmarks/gpu_check.py [--out DIR]

Traces, aligns (weight and activation matching), measures a barrier with BatchNorm reset, trains with a
mask, and runs two experiment specs (pair, imp) with --device cuda; prints what it checked.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import permgraph
from permgraph import data, models


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="gpu_check_runs")
    p.add_argument("--device", default="cuda", help="cuda (default); cpu runs the same checks as a dry run")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    dev = torch.device(args.device)
    print("device:", torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu", "torch", torch.__version__)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    a = models.create("resnet20", width_multiplier=2).to(dev)
    torch.manual_seed(1)
    b = models.create("resnet20", width_multiplier=2).to(dev)
    x = torch.randn(4, 3, 32, 32, device=dev)
    spec = permgraph.trace(a, (x,))
    print("trace:", len(spec.groups), "groups;", spec.info["verification"])
    perm = permgraph.random_permutation(spec, 0)
    pa = permgraph.apply(a, spec, perm)
    assert next(pa.parameters()).device.type == dev.type
    with torch.no_grad():
        err = float((pa.eval()(x) - a.eval()(x)).abs().max())
    print(f"apply on cuda: max output change {err:.2e}")
    assert err < 1e-3
    res = permgraph.check_equivalence(a, spec, (x,))
    assert res.ok, res
    al = permgraph.align(a, pa, spec=spec, progress=False)
    inv = permgraph.inverse(perm)
    mism = sum(int((al.perm[g] != inv[g]).sum()) for g in inv)
    print("weight matching on a permuted copy: mismatched units", mism)
    assert mism == 0
    loader = [torch.randn(32, 3, 32, 32, device=dev) for _ in range(4)]
    al2 = permgraph.align(a, pa, "activation", loader=loader, spec=spec, progress=False)
    mism2 = sum(int((al2.perm[g] != inv[g]).sum()) for g in inv)
    print("activation matching on a permuted copy: mismatched units", mism2)
    assert mism2 == 0
    d = data.get("fake", input_shape=(3, 32, 32), num_classes=10, n_train=512, n_test=256)
    out = permgraph.train(a, d, epochs=2, lr=0.05, batch_size=64, progress=False, device=dev,
                          mask=permgraph.prune.magnitude(a, 0.5))
    m = out.model
    assert next(m.parameters()).device.type == dev.type
    reset_loader = d.loader("train", 128, shuffle=False)  # BatchNorm statistics from the training data
    curve = permgraph.barrier(m, b, d.loader("test", 128), alphas=5, bn="reset", reset_loader=reset_loader,
                              progress=False)
    print("barrier (bn reset) on cuda:", json.dumps(curve.to_dict()["barrier"]), curve.reset_data)
    self_curve = permgraph.barrier(m, m, d.loader("test", 128), alphas=3, reset_loader=reset_loader,
                                   progress=False)
    assert self_curve.barrier("error") == 0.0
    from permgraph.experiments.executors import execute

    from permgraph import experiments

    pair = {"kind": "pair", "name": "gpu-pair", "model": {"name": "resnet20", "kwargs": {"in_channels": 1,
            "input_size": 8}}, "data": {"name": "digits"}, "train": {"epochs": 2, "batch_size": 64, "lr": 0.05},
            "seeds": [[0, 1]], "matching": {"num_samples": 500}, "barrier": {"alphas": 5, "subset": 500}}
    imp = {"kind": "imp", "name": "gpu-imp", "model": {"name": "mlp", "kwargs": {"in_features": 64, "width": 64,
           "depth": 2}}, "data": {"name": "digits"}, "train": {"epochs": 2, "batch_size": 64, "lr": 0.05},
           "seeds": [[0, 1]], "imp": {"levels": 2, "fraction": 0.5, "rewind": 1},
           "matching": {"num_samples": 500}, "barrier": {"alphas": 3, "subset": 300}}
    for s in (pair, imp):
        run_dir = execute(experiments.parse(s), args.out, device=args.device)
        res = json.loads((Path(run_dir) / "results.json").read_text())
        print(f"experiment {s['kind']} on {args.device}: results keys {sorted(res)[:8]}")
    print(f"all {args.device} checks passed in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
