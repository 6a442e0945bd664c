"""Planted-permutation recovery over the whole test zoo and a set of deep models.

For every model: B = a random permutation of A (seed 3), then both matchers must give back the
inverse permutation. Each model is tried in four conditions:

- ``init``: norms and every other tensor as the constructor left them;
- ``init+noise``: the same, and every floating tensor of B scaled elementwise by ``1 + 0.1 N(0, 1)``;
- ``rand``: A's norm statistics, affine vectors and constant-initialised tensors randomised
  (``permgraph._verify.randomize_``) before B is made;
- ``rand+noise``: both.

Weight matching runs with its defaults. Activation matching (default Pearson) reads 256 random inputs
(4 batches of 64; token ids for language models). The table counts the units whose assignment differs
from the planted one, out of all units; ``0`` is exact.

The test zoo is ``CASES`` of tests/test_trace_models.py (slow cases included); the deep models are the
ones named in issue 12 (12-block DeiT-tiny and ViT-S, MLP-Mixer S/16, ConvNeXt-T, 12-layer GPT-2 and BERT,
8-layer Llama with grouped-query attention and rotary embeddings).

Usage::

    python benchmarks/planted.py [--models a,b] [--conditions init,rand] [--methods weight,activation]
                                 [--json out.json] [--markdown out.md] [--threads 2]

``--models`` takes ids of the table (``timm-convnext_atto``, ``deep-gpt2``, ...) or substrings of them.
``--store runs`` adds the networks trained by an experiment (seed 0 of each model, ids ``trained-...``), matched
on 256 test examples of their own data instead of random inputs: planted recovery on trained weights.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

import permgraph
from permgraph._verify import randomize_
from permgraph.models import create

ROOT = Path(__file__).resolve().parents[1]
CONDITIONS = ("init", "init+noise", "rand", "rand+noise")
NOISE = 0.1
SAMPLES = 256


def _test_zoo() -> dict:
    """id -> (build, input shape) for every case of tests/test_trace_models.py."""
    spec = importlib.util.spec_from_file_location("_trace_cases", ROOT / "tests" / "test_trace_models.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    out = {}
    for p in mod.CASES:
        (case,) = p.values
        out[case.id] = (lambda c=case: create(c.name, **c.kwargs), tuple(case.input_shape))
    return out


class _Logits(torch.nn.Module):
    """A Hugging Face model with token ids in and a tensor out."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, ids):
        out = self.m(input_ids=ids)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _hf(cls: str, **cfg):
    return lambda: _Logits(create(f"hf:{cls}", **cfg))


TOKENS = ("tokens", 100, 16)  # (marker, vocabulary, sequence length)
IMG64 = (2, 3, 64, 64)
DEEP = {
    "deep-deit_tiny_patch16_224": (lambda: create("timm:deit_tiny_patch16_224", img_size=64), IMG64),
    "deep-vit_small_patch16_224": (lambda: create("timm:vit_small_patch16_224", img_size=64), IMG64),
    "deep-mixer_s16_224": (lambda: create("timm:mixer_s16_224", img_size=64), IMG64),
    "deep-convnext_tiny": (lambda: create("timm:convnext_tiny"), IMG64),
    "deep-gpt2": (_hf("GPT2LMHeadModel", n_layer=12, n_embd=128, n_head=4, vocab_size=100, n_positions=32), TOKENS),
    "deep-bert": (_hf("BertForMaskedLM", num_hidden_layers=12, hidden_size=128, num_attention_heads=4,
                      intermediate_size=256, vocab_size=100, max_position_embeddings=32), TOKENS),
    "deep-llama": (_hf("LlamaForCausalLM", num_hidden_layers=8, hidden_size=128, num_attention_heads=8,
                       num_key_value_heads=2, intermediate_size=256, vocab_size=100, max_position_embeddings=32),
                   TOKENS),
}


def _inputs(shape, n: int, seed: int) -> torch.Tensor:
    if shape[0] == "data":  # a trained model: its own data's test split
        from permgraph.data import get as get_data

        test = get_data(**json.loads(shape[1])).test
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(test), generator=g)[:n]
        return torch.stack([test[int(i)][0] for i in idx])
    g = torch.Generator().manual_seed(seed)
    if shape[0] == "tokens":
        return torch.randint(0, shape[1], (n, shape[2]), generator=g)
    return torch.randn(n, *shape[1:], generator=g)


def _noise_(model, noise: float) -> None:
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for v in model.state_dict().values():
            if v.is_floating_point():
                v.mul_(1 + noise * torch.randn(v.shape, generator=g))


def _wrong(al, perm) -> int:
    inv = permgraph.inverse(perm)
    return sum(int((al.perm[g] != inv[g]).sum()) for g in inv)


def _inner(a: dict, b: dict) -> float:
    """Weight matching's objective: the sum of <A_k, B_k> over the tensors it reads (not running statistics)."""
    skip = ("running_mean", "running_var", "num_batches_tracked")
    return sum(float((a[k].double() * b[k].double()).sum()) for k in a
               if a[k].is_floating_point() and not k.endswith(skip))


def _explain(method, a, b, spec, perm, al, kw) -> dict:
    """Whether a miss is the solver's or the objective's: the planted assignment's score against the one
    found, under the same statistics. Weight matching: the objective of each. Activation matching: B put back
    into A's order is matched again (the statistics are equivariant, so the same assignment is found, now
    against the identity); the groups whose planted assignment scores above the found one are solver misses."""
    back = permgraph.apply(b, spec, permgraph.inverse(perm))  # B in A's order: the planted assignment
    sa = a.state_dict()
    if method == "weight":
        found = _inner(sa, al.apply(b).state_dict())
        planted = _inner(sa, back.state_dict())
        return {"objective_found_minus_planted": round(found - planted, 4)}
    again = permgraph.align(a, back, method, spec=spec, progress=False, **kw)
    lost = [g for g, d in again.groups.items() if "similarity_before" in d
            and d["similarity_before"] > d["similarity_after"] + 1e-6]
    moved = sum(int((again.perm[g] != torch.arange(len(again.perm[g]))).sum()) for g in again.perm)
    return {"groups_planted_scores_higher": lost, "wrong_in_a_order": moved}


def run_model(build, shape, conditions, methods) -> dict:
    torch.manual_seed(0)
    a0 = build().eval()
    x = _inputs(shape, 2, 0)
    t = time.perf_counter()
    spec = permgraph.trace(a0, (x,))
    out = {"units": sum(spec.group_sizes().values()), "groups": len(spec.group_sizes()),
           "trace_s": round(time.perf_counter() - t, 2), "conditions": {}}
    loader = [_inputs(shape, 64, 10 + i) for i in range(SAMPLES // 64)]
    for cond in conditions:
        a = a0
        if cond.startswith("rand"):
            import copy

            a = randomize_(copy.deepcopy(a0), torch.Generator().manual_seed(1))
        perm = permgraph.random_permutation(spec, 3)
        b = permgraph.apply(a, spec, perm)
        if cond.endswith("+noise"):
            _noise_(b, NOISE)
        row = {}
        for method in methods:
            t = time.perf_counter()
            kw = {"loader": loader} if method == "activation" else {}
            al = permgraph.align(a, b, method, spec=spec, progress=False, **kw)
            row[method] = {"wrong": _wrong(al, perm), "s": round(time.perf_counter() - t, 2)}
            if row[method]["wrong"]:
                row[method].update(_explain(method, a, b, spec, perm, al, kw))
        out["conditions"][cond] = row
    return out


def _trained(store: str) -> dict:
    """id -> (build, data loader) for seed 0 of every model trained in an experiment store, with the
    store's data (its test split, 256 examples in batches of 64, as the matching inputs)."""
    import glob

    from permgraph.io import load_state_dict

    out = {}
    for d in sorted(glob.glob(os.path.join(store, "networks", "*", ""))):
        if not os.path.exists(d + "final.safetensors"):
            continue
        k = json.loads(Path(d + "key.json").read_text())
        if k["seed"] != 0:
            continue
        kw = {**k["model"].get("kwargs", {}), **k.get("override", {})}
        data = {n: v for n, v in k["data"].items() if v is not None}

        def build(name=k["model"]["name"], kw=kw, path=d + "final.safetensors"):
            m = create(name, **kw)
            m.load_state_dict(load_state_dict(path))
            return m

        label = "trained-" + k["model"]["name"].split(":")[-1] + "".join(f"-{v}" for n, v in kw.items()
                                                                          if n in ("norm",))
        out[label] = (build, ("data", json.dumps(data, sort_keys=True)))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="")
    ap.add_argument("--conditions", default=",".join(CONDITIONS))
    ap.add_argument("--methods", default="weight,activation")
    ap.add_argument("--json", default="")
    ap.add_argument("--markdown", default="")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--store", default="", help="also the trained networks (seed 0) of this experiment store, "
                                                 "matched on their own data's test split")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    models = {**_test_zoo(), **DEEP, **(_trained(args.store) if args.store else {})}
    if args.models:
        keys = [k.strip() for k in args.models.split(",") if k.strip()]
        models = {m: v for m, v in models.items() if any(k == m or k in m for k in keys)}
    conditions = [c for c in args.conditions.split(",") if c]
    methods = [m for m in args.methods.split(",") if m]
    results = {}
    if args.json and os.path.exists(args.json):
        results = json.loads(Path(args.json).read_text())  # resume
    for name, (build, shape) in models.items():
        if name in results:
            continue
        t = time.perf_counter()
        try:
            results[name] = run_model(build, shape, conditions, methods)
        except Exception as e:  # a model that fails is a row of the table, not the end of the sweep
            results[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
        results[name]["total_s"] = round(time.perf_counter() - t, 1)
        print(name, json.dumps(results[name]), flush=True)
        if args.json:
            tmp = Path(args.json + ".tmp")
            tmp.write_text(json.dumps(results, indent=1))
            tmp.replace(args.json)
    md = markdown(results, conditions, methods)
    print(md)
    if args.markdown:
        Path(args.markdown).write_text(md)


def markdown(results: dict, conditions, methods) -> str:
    head = "| model | groups | units | " + " | ".join(f"{c} {m[0].upper()}M" for c in conditions for m in methods)
    lines = [head + " | s |", "|" + "---|" * (3 + len(conditions) * len(methods) + 1)]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} |")
            continue
        cells = [str(r["conditions"].get(c, {}).get(m, {}).get("wrong", "")) for c in conditions for m in methods]
        lines.append(f"| {name} | {r['groups']} | {r['units']} | " + " | ".join(cells) + f" | {r['total_s']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
