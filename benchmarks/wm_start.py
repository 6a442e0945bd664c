"""Weight matching's default start (``start="auto"``) against plain coordinate descent from the identity
(``start="identity"``, Git Re-Basin), on trained pairs from an experiment store.

For every network of the store's ``networks/`` folder that has a partner of the same model with seed 0
and seed 1 (both finished), both starts run on the pair (A = seed 0, B = seed 1) with the same seed. The
script prints one JSON line per pair: the objectives reached, whether the permutations are the same,
the wall times, and the ``anchored_start`` record of the auto run (its objective before any sweep, the
stalled groups, whether it descended and whether its run was kept). ``J_auto >= J_identity`` holds by
construction; the point is how often and by how much the default goes further.

Usage::

    permgraph run specs/cpu/zoo_mnist5k.yaml --out runs --threads 2   # trains the pairs (12 min)
    python benchmarks/wm_start.py runs [--threads 1]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time

import torch

import permgraph
from permgraph.io import load_state_dict
from permgraph.models import create


def pairs(root: str):
    nets: dict[str, dict[int, tuple[dict, str]]] = {}
    for d in sorted(glob.glob(os.path.join(root, "networks", "*", ""))):
        if not os.path.exists(d + "final.safetensors"):
            continue
        with open(d + "key.json") as f:
            k = json.load(f)
        label = json.dumps(k["model"], sort_keys=True) + json.dumps(k.get("override", {}), sort_keys=True)
        nets.setdefault(label, {})[k["seed"]] = (k, d + "final.safetensors")
    for by_seed in nets.values():
        if 0 in by_seed and 1 in by_seed:
            yield by_seed[0][0], by_seed[0][1], by_seed[1][1]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("store", help="an experiment store (the --out of permgraph run)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for k, path_a, path_b in pairs(args.store):
        kw = {**k["model"].get("kwargs", {}), **k.get("override", {})}
        a = create(k["model"]["name"], **kw).eval()
        a.load_state_dict(load_state_dict(path_a))
        b = create(k["model"]["name"], **kw).eval()
        b.load_state_dict(load_state_dict(path_b))
        data = k.get("data", {})
        side = data.get("resize") or 28
        x = permgraph.models.example_inputs_for(a) if data.get("name") is None else \
            (torch.randn(2, data.get("channels") or 1, side, side),)
        spec = permgraph.trace(a, x)
        out = {}
        for start in ("identity", "auto"):
            t = time.perf_counter()
            al = permgraph.align(a, b, spec=spec, progress=False, start=start)
            out[start] = (al.log[-1]["objective"], time.perf_counter() - t, al)
        same = all(torch.equal(out["identity"][2].perm[g], out["auto"][2].perm[g]) for g in spec.groups)
        info = out["auto"][2].log[-1].get("anchored_start") or {}
        print(json.dumps({"model": k["model"]["name"], "kwargs": kw, "J_identity": round(out["identity"][0], 4),
                          "J_auto": round(out["auto"][0], 4), "same_perm": same,
                          "s_identity": round(out["identity"][1], 2), "s_auto": round(out["auto"][1], 2),
                          "anchored_start": {n: round(v, 4) if isinstance(v, float) else v for n, v in info.items()}}),
              flush=True)


if __name__ == "__main__":
    main()
