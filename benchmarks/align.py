"""Benchmark ``permgraph.align``: weight matching against a compute bound and against ``rebasin``,
activation matching against plain forward passes, and the memory of activation matching.

Parts (``--parts``, default all):

* ``weight``: weight matching of two independently initialised models (seeds 0 and 1) of torchvision
  resnet18 and resnet50 (``weights=None``) and timm vit_small_patch16_224 (``pretrained=False``). For
  each: the wall time of ``permgraph.align(a, b, spec=spec, progress=False)`` with the spec traced
  beforehand (the *matching phase*), the wall time end to end (``align(a, b, progress=False)``, tracing
  included), the number of sweeps (entries of ``al.log`` with an ``"objective"``), the median time per
  sweep, and the per-sweep lower bound = similarity-product FLOPs / measured float32 matmul rate +
  assignment time. The FLOPs follow ``weight_matching``'s ``similarity()``: every (group, member tensor)
  pair visited in a sweep contributes one ``(n x C*rest) @ (C*rest x n)`` product, 2 * n * n * C * rest
  FLOPs, which is 2 * numel(tensor) * n when the group covers the whole axis (it covers a part of a
  concatenated axis such as a fused qkv). In the block-invariant phase (attention heads) a nested member
  contributes ``(n*C x rest) @ (rest x n*C)`` instead, 2 * (n*C)**2 * rest FLOPs. The matmul rate is
  the median of a 2048 x 2048 ``torch.mm`` measured in the same run; the assignment time is the median
  time of ``scipy.optimize.linear_sum_assignment`` on random n x n float64 matrices, summed over the
  groups a sweep visits. The products are also timed at their real shapes (random operands), which is
  what BLAS achieves on those shapes. Target: every sweep within 2x of its bound.
* ``rebasin``: PyPI ``rebasin`` (benchmark-only: ``pip install --no-deps rebasin torchview graphviz``)
  on an untrained torchvision resnet18 in the same run, interleaved with permgraph's matching phase:
  ``PermutationCoordinateDescent(a, b, input_data_b=x).calculate_permutations()``. Target: permgraph's
  matching phase at least 4x faster. Both results are also compared by the L2 distance from A to the
  permuted B over all parameters.
* ``activation``: activation matching over 10,000 random inputs: torchvision resnet18 (10 classes) at
  3 x 32 x 32 in batches of 250, against the two models' plain forward passes over the same batches
  (eval, no_grad), target within 1.5x; and the zoo MLP (in_features=40, width=512, depth=3) in batches
  of 250 and of 1,000, against the forward passes plus the cross-moment products (``xa.T @ xb`` for
  every tap of every batch, at the real shapes, timed separately). Each repeat times a warm call (the
  graph template of this architecture and input shape cached by an earlier call, as when aligning many
  pairs or checkpoints of one architecture) and a cold one (template cache cleared: the call exports
  the graph); the export and pairing of the graph (``_Template``) is also timed alone.
* ``memory``: peak memory added by activation matching over 2,000 and over 10,000 inputs (batches
  generated on the fly), each in a fresh subprocess: the bytes allocated through malloc (glibc
  ``mallinfo2``: torch's CPU allocator calls malloc directly, so this counts live tensors) and the
  resident set size (/proc/self/statm), both sampled every millisecond during ``align``, minus their
  values just before it. The RSS is noisier: it keeps freed pages that malloc has not returned yet.
  (``ru_maxrss`` is of no use here: the process's peak is set earlier, by tracing.) The forward passes
  alone over the same inputs are measured the same way; every measurement is taken twice.

Every ratio is measured against its baseline in the same run, interleaved (baseline, subject,
baseline, subject, ...), and the median of ``--repeats`` runs is reported. Activation-matching parts
run ``gc.collect()`` before each timed part (as ``timeit`` keeps the collector out of its timings).

Usage::

    python benchmarks/align.py [--parts weight,rebasin,activation,memory] [--models resnet18,vit]
                               [--act resnet18:250,mlp:250,mlp:1000]
                               [--repeats 3] [--threads 1] [--device cpu] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

import permgraph
from permgraph._weight import _members, _select_keys

SWEEP_TARGET = 2.0
REBASIN_TARGET = 4.0
ACT_TARGET = 1.5

WM_MODELS = ("resnet18", "resnet50", "vit_small_patch16_224")


def median(xs):
    return statistics.median(xs)


def load() -> float:
    return os.getloadavg()[0]


def build(name: str, seed: int, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    if name.startswith("vit") or name.startswith("timm:"):
        import timm

        return timm.create_model(name.removeprefix("timm:"), pretrained=False, **kw).eval()
    import torchvision

    return getattr(torchvision.models, name)(weights=None, **kw).eval()


# ---------------------------------------------------------------------------------------------- bound
def matmul_rate(n: int = 2048, reps: int = 5) -> float:
    """float32 FLOP/s of a large square torch.mm (median of ``reps``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        ts.append(time.perf_counter() - t0)
    return 2 * n ** 3 / median(ts)


def lsa_time(n: int, reps: int = 5, seed: int = 0) -> float:
    """Median time of linear_sum_assignment(maximize=True) on random n x n float64 matrices."""
    rng = np.random.default_rng(seed)
    ts = []
    for _ in range(reps):
        s = rng.standard_normal((n, n))
        t0 = time.perf_counter()
        linear_sum_assignment(s, maximize=True)
        ts.append(time.perf_counter() - t0)
    return median(ts)


def sweep_products(spec) -> dict[str, list[tuple[int, int, int, bool]]]:
    """Per group, the similarity products of one sweep as (n, C, rest, nested): the plain product is
    (n x C*rest) @ (C*rest x n)."""
    keys = _select_keys(spec, None, [], False)
    members = _members(spec, keys)
    sizes = spec.group_sizes()
    out = {}
    for g, ms in members.items():
        if not ms:
            continue
        prods = []
        for m in ms:
            shape = spec.shapes[m.key]
            numel = math.prod(shape)
            rest = numel // shape[m.dim]
            prods.append((sizes[g], int(m.idx.shape[1]), rest, m.nested))
        out[g] = prods
    # a head group's visit (nested groups, Group.blocks) computes the plain similarity of every group
    # nested in it, beside its own
    for h, gs in spec.nested().items():
        out[h] = out.get(h, []) + [p for g in gs for p in out.get(g, [])]
    return out


def sweep_lsa(spec, prods, lsa) -> float:
    """Assignment time of one sweep from solver timings (``lsa``: size -> seconds): one n x n assignment
    per group; a head group's joint step solves heads x heads assignments of one head's units per nested
    group, and one of the heads."""
    sizes = spec.group_sizes()
    nested = spec.nested()
    tot = 0.0
    for g in prods:
        if g in nested:
            nb = sizes[g]
            tot += lsa[nb] + sum(nb * nb * lsa[sizes[n] // nb] for n in nested[g])
        elif spec.groups[g].blocks is not None:
            nb = sizes[spec.groups[g].blocks]
            tot += nb * lsa[sizes[g] // nb]
        else:
            tot += lsa[sizes[g]]
    return tot


def sweep_flops(prods, phase: str) -> float:
    tot = 0.0
    for ps in prods.values():
        nested = phase == "invariant" and any(p[3] for p in ps)
        for n, c, rest, is_nested in ps:
            if nested:
                if is_nested:
                    tot += 2.0 * (n * c) ** 2 * rest
            else:
                tot += 2.0 * n * n * c * rest
    return tot


def product_time_real_shapes(prods, phase: str, reps: int = 3) -> float:
    """Time of one sweep's similarity products at their real shapes (random float32 operands)."""
    shapes = []
    for ps in prods.values():
        nested = phase == "invariant" and any(p[3] for p in ps)
        for n, c, rest, is_nested in ps:
            if nested:
                if is_nested:
                    shapes.append((n * c, rest))
            else:
                shapes.append((n, c * rest))
    ts = []
    cache = {}
    for _ in range(reps):
        t = 0.0
        for rows, cols in shapes:
            if (rows, cols) not in cache:
                cache[(rows, cols)] = (torch.randn(rows, cols), torch.randn(rows, cols))
            x, y = cache[(rows, cols)]
            t0 = time.perf_counter()
            x @ y.T
            t += time.perf_counter() - t0
        ts.append(t)
    return median(ts)


# ---------------------------------------------------------------------------------------------- weight
def bench_weight(name: str, repeats: int) -> dict:
    a, b = build(name, 0), build(name, 1)
    params = sum(p.numel() for p in a.parameters())
    t0 = time.perf_counter()
    spec = permgraph.trace(a)
    trace_s = time.perf_counter() - t0
    prods = sweep_products(spec)
    sizes = spec.group_sizes()
    rates, match, e2e, logs, loads = [], [], [], [], []
    for r in range(repeats):
        loads.append(load())
        rates.append(matmul_rate())
        t0 = time.perf_counter()
        al = permgraph.align(a, b, spec=spec, progress=False)
        match.append(time.perf_counter() - t0)
        logs.append([e for e in al.log if "objective" in e])
        t0 = time.perf_counter()
        permgraph.align(a, b, progress=False)
        e2e.append(time.perf_counter() - t0)
        print(f"  [{name}] repeat {r + 1}: matching {match[-1]:.2f}s, end to end {e2e[-1]:.2f}s, "
              f"{len(logs[-1])} sweeps, {rates[-1] / 1e9:.0f} GFLOP/s, load {loads[-1]:.1f}", file=sys.stderr,
              flush=True)
    rate = median(rates)
    assign_sweep = measured_assign(a, b, spec)
    need = {sizes[g] for g in prods}
    for h, gs in spec.nested().items():
        need.update(sizes[g] // sizes[h] for g in gs)
    lsa = {n: lsa_time(n) for n in sorted(need)}
    lsa_sweep = sweep_lsa(spec, prods, lsa)
    sweeps = logs[0]
    phases = sorted({e["phase"] for e in sweeps}, key=["invariant", "plain"].index)
    per_phase = {}
    for ph in phases:
        secs = [e["seconds"] for lg in logs for e in lg if e["phase"] == ph]
        flops = sweep_flops(prods, ph)
        bound = flops / rate + lsa_sweep
        real = product_time_real_shapes(prods, ph)
        bound_measured = flops / rate + assign_sweep
        per_phase[ph] = {"sweeps": sum(e["phase"] == ph for e in sweeps), "sweep_s": median(secs),
                         "flops": flops, "mm_s": flops / rate, "mm_real_s": real, "lsa_s": lsa_sweep,
                         "assign_s": assign_sweep, "bound_s": bound, "ratio": median(secs) / bound,
                         "ratio_measured_assign": median(secs) / bound_measured}
    return {"model": name, "params": params, "groups": len(spec.groups), "visited": len(prods),
            "trace_s": trace_s, "match_s": median(match), "e2e_s": median(e2e), "match_runs": match,
            "e2e_runs": e2e, "sweeps": len(sweeps), "sweep_s": median(e["seconds"] for lg in logs for e in lg),
            "sweeps_total_s": median(sum(e["seconds"] for e in lg) for lg in logs), "rate": rate,
            "phases": per_phase, "load": (min(loads), max(loads + [load()]))}


def measured_assign(a, b, spec) -> float:
    """Time spent in permgraph's assign() per sweep, from one extra matching run with assign() wrapped."""
    mods = [sys.modules["permgraph._weight"], sys.modules["permgraph._blocks"]]

    orig = mods[0].assign
    spent = [0.0]

    def timed(s):
        t0 = time.perf_counter()
        try:
            return orig(s)
        finally:
            spent[0] += time.perf_counter() - t0

    for m in mods:
        m.assign = timed
    try:
        al = permgraph.align(a, b, spec=spec, progress=False)
    finally:
        for m in mods:
            m.assign = orig
    return spent[0] / max(1, sum("objective" in e for e in al.log))


def profile_weight(name: str, top: int = 12) -> str:
    """cProfile of one matching phase (with assign() timed separately)."""
    import cProfile
    import io
    import pstats

    a, b = build(name, 0), build(name, 1)
    spec = permgraph.trace(a)
    pr = cProfile.Profile()
    pr.enable()
    permgraph.align(a, b, spec=spec, progress=False)
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
    return s.getvalue()


# ---------------------------------------------------------------------------------------------- rebasin
def l2_params(a, sb) -> float:
    sa = dict(a.named_parameters())
    return math.sqrt(sum(float((sa[k].detach() - sb[k]).pow(2).sum()) for k in sa))


def bench_rebasin(repeats: int) -> dict:
    from rebasin import PermutationCoordinateDescent

    a, b = build("resnet18", 0), build("resnet18", 1)
    spec = permgraph.trace(a)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    ours, theirs, init, loads, iters, sweeps = [], [], [], [], [], []
    error = None
    al = None
    pcd = None
    for r in range(repeats):
        loads.append(load())
        t0 = time.perf_counter()
        al = permgraph.align(a, b, spec=spec, progress=False)
        ours.append(time.perf_counter() - t0)
        sweeps.append(sum("objective" in e for e in al.log))
        try:
            bb = copy.deepcopy(b)
            torch.manual_seed(r)
            t0 = time.perf_counter()
            pcd = PermutationCoordinateDescent(a, bb, input_data_b=x)
            init.append(time.perf_counter() - t0)
            step = pcd._calculate_permutations_step
            count = [0]

            def counted(*a_, _step=step, _count=count, **k_):
                _count[0] += 1
                return _step(*a_, **k_)

            pcd._calculate_permutations_step = counted  # count rebasin's iterations (sweeps)
            t0 = time.perf_counter()
            pcd.calculate_permutations()
            theirs.append(time.perf_counter() - t0)
            iters.append(count[0])
        except Exception as e:  # record the failure honestly and keep going
            error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
            break
        print(f"  [rebasin] repeat {r + 1}: permgraph {ours[-1]:.2f}s, rebasin init {init[-1]:.2f}s, "
              f"calculate_permutations {theirs[-1]:.2f}s ({iters[-1]} iterations), load {loads[-1]:.1f}", file=sys.stderr, flush=True)
    out = {"permgraph_s": median(ours), "permgraph_runs": ours, "permgraph_sweeps": sweeps, "error": error, "load": (min(loads), load())}
    if error is None:
        pcd.apply_permutations()
        out.update({"rebasin_s": median(theirs), "rebasin_runs": theirs, "rebasin_init_s": median(init),
                    "rebasin_iterations": iters,
                    "speedup": median(theirs) / median(ours),
                    "speedups": [t / o for t, o in zip(theirs, ours)],
                    "l2_unaligned": l2_params(a, dict(b.named_parameters())),
                    "l2_permgraph": l2_params(a, al.apply(b.state_dict())),
                    "l2_rebasin": l2_params(a, dict(pcd.model_b.named_parameters()))})
        import rebasin

        out["rebasin_version"] = getattr(rebasin, "__version__", importlib.metadata.version("rebasin"))
    return out


# ---------------------------------------------------------------------------------------------- activation
def random_batches(shape, n: int, batch: int, seed: int = 0):
    """A re-iterable loader of ``n`` random inputs in batches, generated on the fly (deterministic)."""

    class Loader:
        def __iter__(self):
            g = torch.Generator().manual_seed(seed)
            for i in range(0, n, batch):
                yield torch.randn(min(batch, n - i), *shape, generator=g)

    return Loader()


def act_models(kind: str):
    if kind == "resnet18":
        a, b = build("resnet18", 0, num_classes=10), build("resnet18", 1, num_classes=10)
        return a, b, (3, 32, 32)
    torch.manual_seed(0)
    a = permgraph.models.create("mlp", in_features=40, width=512, depth=3).eval()
    torch.manual_seed(1)
    b = permgraph.models.create("mlp", in_features=40, width=512, depth=3).eval()
    return a, b, (40,)


DEVICE = torch.device("cpu")  # --device: where the activation part runs


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def forward_passes(a, b, batches) -> None:
    with torch.no_grad():
        for x in batches:
            a(x)
            b(x)
    sync()


def tap_shapes(al) -> list[tuple[int, int]]:
    """(n, samples per input) of every tap, from the alignment's per-group sample counts."""
    return [(al.spec.groups[g].size, d["samples"]) for g, d in al.groups.items() if "samples" in d]


def bench_activation(kind: str, repeats: int, num: int = 10000, batch: int = 250) -> dict:
    a, b, shape = act_models(kind)
    a, b = a.to(DEVICE), b.to(DEVICE)
    spec = permgraph.trace(a, torch.randn(2, *shape, device=DEVICE))
    batches = [x.to(DEVICE) for x in random_batches(shape, num, batch)]
    al = permgraph.align(a, b, "activation", batches, spec=spec, num_samples=num, progress=False)  # warm-up
    # the cross-moment products of every tap of every batch, at their real shapes
    taps = []
    for g, d in al.groups.items():
        if "samples" in d:
            n = spec.groups[g].size
            per_batch = d["samples"] * batch // num  # rows per batch, all taps of the group together
            taps.append((n, per_batch))
    from permgraph import _activations

    fwd, act, cold, prod, setup, loads = [], [], [], [], [], []
    for r in range(repeats):
        loads.append(load())
        gc.collect()
        t0 = time.perf_counter()
        forward_passes(a, b, batches)
        fwd.append(time.perf_counter() - t0)
        gc.collect()
        t0 = time.perf_counter()
        _activations._Template(spec, a, batches[0])  # the export and pairing of the graph, once per shape
        setup.append(time.perf_counter() - t0)
        gc.collect()
        t0 = time.perf_counter()  # warm: the graph template of this architecture and shape is cached
        al = permgraph.align(a, b, "activation", batches, spec=spec, num_samples=num, progress=False)
        sync()
        act.append(time.perf_counter() - t0)
        _activations._TEMPLATES.clear()
        gc.collect()
        t0 = time.perf_counter()  # cold: the first call for this architecture and shape (exports)
        permgraph.align(a, b, "activation", batches, spec=spec, num_samples=num, progress=False)
        sync()
        cold.append(time.perf_counter() - t0)
        ops = [(torch.randn(rows, n, device=DEVICE), torch.randn(rows, n, device=DEVICE)) for n, rows in taps]
        gc.collect()
        t0 = time.perf_counter()
        for _ in range(num // batch):
            for xa, xb in ops:
                xa.T @ xb
        sync()
        prod.append(time.perf_counter() - t0)
        print(f"  [activation {kind}] repeat {r + 1}: forward {fwd[-1]:.3f}s, align {act[-1]:.3f}s "
              f"(cold {cold[-1]:.3f}s), products {prod[-1]:.3f}s, load {loads[-1]:.1f}", file=sys.stderr,
              flush=True)
    by_weight = al.log[0]["groups_by_weight"]
    out = {"model": kind, "inputs": al.log[0]["inputs"], "batch": batch, "groups": len(spec.groups),
           "groups_by_activation": al.log[0]["groups_by_activation"], "groups_by_weight": by_weight,
           "constant_units": sum(al.log[0]["constant_units"].values()),
           "forward_s": median(fwd), "align_s": median(act), "cold_s": median(cold), "products_s": median(prod),
           "setup_s": median(setup),
           "ratio_forward": median(x / f for x, f in zip(act, fwd)),
           "ratio_bound": median(x / (f + p) for x, f, p in zip(act, fwd, prod)),
           "ratio_forward_cold": median(x / f for x, f in zip(cold, fwd)),
           "ratio_bound_cold": median(x / (f + p) for x, f, p in zip(cold, fwd, prod)),
           "runs": {"forward": fwd, "align": act, "cold": cold, "products": prod, "setup": setup},
           "load": (min(loads), load())}
    return out


def profile_activation(kind: str, top: int = 14) -> str:
    import cProfile
    import io
    import pstats

    a, b, shape = act_models(kind)
    spec = permgraph.trace(a, torch.randn(2, *shape))
    batches = list(random_batches(shape, 10000, 250))
    permgraph.align(a, b, "activation", batches, spec=spec, progress=False)
    pr = cProfile.Profile()
    pr.enable()
    permgraph.align(a, b, "activation", batches, spec=spec, progress=False)
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
    return s.getvalue()


# ---------------------------------------------------------------------------------------------- memory
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _heap_reader():
    """Bytes allocated through malloc now (glibc mallinfo2: in-use arena bytes + mmapped blocks), or None.

    torch's CPU allocator calls malloc/free directly, so this counts live tensors, unlike the resident set
    size, which also keeps pages that were freed but not yet returned to the system."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
    except (OSError, AttributeError):
        return None

    def heap() -> int:
        m = libc.mallinfo2()
        return m.uordblks + m.hblkhd

    return heap


def _peak_during(fn) -> tuple[int | None, int, float]:
    """(peak malloc'ed bytes minus before, peak RSS minus before, seconds) of ``fn()``, sampled every ms."""
    import gc

    gc.collect()
    heap = _heap_reader()
    base_h = heap() if heap else 0
    base_r = _rss()
    peak = [base_h, base_r]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            if heap:
                peak[0] = max(peak[0], heap())
            peak[1] = max(peak[1], _rss())
            time.sleep(0.001)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    stop.set()
    th.join()
    return (peak[0] - base_h if heap else None), peak[1] - base_r, dt


def memory_child(kind: str, num: int, what: str) -> dict:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    a, b, shape = act_models(kind)
    spec = permgraph.trace(a, torch.randn(2, *shape))
    loader = random_batches(shape, num, 250, seed=1)
    if what == "align":
        def fn():
            permgraph.align(a, b, "activation", loader, spec=spec, num_samples=num, progress=False)
    else:
        def fn():
            forward_passes(a, b, loader)
    heap, rss, dt = _peak_during(fn)
    return {"kind": kind, "num": num, "what": what, "heap_delta": heap, "rss_delta": rss, "seconds": dt}


def mib(xs) -> str:
    return ", ".join("n/a" if x is None else f"{x / 2**20:.1f}" for x in xs)


def bench_memory(kinds, nums=(2000, 10000), tries: int = 2) -> list[dict]:
    rows = []
    for kind in kinds:
        for what in ("forward", "align"):
            for num in nums:
                runs = []
                for _ in range(tries):
                    res = subprocess.run([sys.executable, __file__, "--memory-child", f"{kind},{num},{what}"],
                                         capture_output=True, text=True, check=True)
                    runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
                row = dict(runs[0])
                row["heap"] = [r["heap_delta"] for r in runs]
                row["rss"] = [r["rss_delta"] for r in runs]
                row["seconds"] = median(r["seconds"] for r in runs)
                rows.append(row)
                print(f"  [memory {kind}] {what} {num}: allocated peak +{mib(row['heap'])} MiB, RSS peak "
                      f"+{mib(row['rss'])} MiB", file=sys.stderr, flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- report
def md_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def report(res: dict, args) -> str:
    out = []
    if "weight" in res:
        rows = []
        for r in res["weight"]:
            for ph, p in r["phases"].items():
                rows.append([r["model"], f"{r['params'] / 1e6:.1f}", f"{r['visited']}/{r['groups']}",
                             f"{r['trace_s']:.2f}", f"{r['match_s']:.2f}", f"{r['e2e_s']:.2f}", r["sweeps"],
                             f"{ph} ({p['sweeps']})", f"{p['sweep_s']:.3f}", f"{p['flops'] / 1e9:.1f}",
                             f"{p['mm_s']:.3f}", f"{p['mm_real_s']:.3f}", f"{p['lsa_s']:.3f}",
                             f"{p['bound_s']:.3f}", f"{p['ratio']:.2f}",
                             "yes" if p["ratio"] <= SWEEP_TARGET else "no", f"{p['assign_s']:.3f}",
                             f"{p['ratio_measured_assign']:.2f}"])
        out.append("### Weight matching: time per sweep against its bound\n")
        out.append(md_table(["model", "params (M)", "groups visited", "trace s", "matching s", "end to end s",
                             "sweeps", "phase (sweeps)", "s / sweep", "GFLOP / sweep", "products s (rate)",
                             "products s (real shapes)", "assignment s (random n x n)", "bound s",
                             "sweep / bound", f"within {SWEEP_TARGET:g}x", "assignment s (measured in align)",
                             "sweep / bound with measured assignment"], rows))
        rates = [r["rate"] / 1e9 for r in res["weight"]]
        out.append(f"\nMeasured float32 matmul rate (2048 x 2048 torch.mm, median per model): "
                   f"{', '.join(f'{x:.0f}' for x in rates)} GFLOP/s.\n")
    if "rebasin" in res:
        r = res["rebasin"]
        out.append("### Weight matching against rebasin (torchvision resnet18, untrained)\n")
        if r.get("error"):
            out.append(f"rebasin failed: `{r['error']}`; permgraph matching phase {r['permgraph_s']:.2f} s.\n")
        else:
            out.append(md_table(
                ["", "matching s (median)", "runs", "sweeps", "L2(A, permuted B) over parameters"],
                [["permgraph `align(a, b, spec=spec)`", f"{r['permgraph_s']:.2f}",
                  ", ".join(f"{x:.2f}" for x in r["permgraph_runs"]),
                  ", ".join(map(str, r["permgraph_sweeps"])), f"{r['l2_permgraph']:.2f}"],
                 [f"rebasin {r['rebasin_version']} `calculate_permutations()`", f"{r['rebasin_s']:.2f}",
                  ", ".join(f"{x:.2f}" for x in r["rebasin_runs"]),
                  ", ".join(map(str, r["rebasin_iterations"])), f"{r['l2_rebasin']:.2f}"],
                 ["unaligned", "", "", "", f"{r['l2_unaligned']:.2f}"]]))
            ok = r["speedup"] >= REBASIN_TARGET
            out.append(f"\nSpeed-up {r['speedup']:.2f}x (per repeat: "
                       f"{', '.join(f'{x:.2f}' for x in r['speedups'])}); target {REBASIN_TARGET:g}x: "
                       f"{'met' if ok else 'missed'}. rebasin's constructor (graph tracing, not timed above) "
                       f"took {r['rebasin_init_s']:.2f} s.\n")
    if "activation" in res:
        rows = []
        for r in res["activation"]:
            main = r["ratio_bound"] if r["model"] == "mlp" else r["ratio_forward"]
            cold = r["ratio_bound_cold"] if r["model"] == "mlp" else r["ratio_forward_cold"]
            rows.append([r["model"], r["inputs"], r["batch"],
                         f"{r['groups_by_activation']} / {r['groups_by_weight']}", f"{r['forward_s']:.3f}",
                         f"{r['products_s']:.3f}" if r["model"] == "mlp" else "",
                         f"{r['align_s']:.3f}", f"**{main:.2f}**", f"{r['setup_s']:.3f}", f"{r['cold_s']:.3f}",
                         f"{cold:.2f}"])
        out.append("### Activation matching against forward passes\n")
        out.append(md_table(["model", "inputs", "batch", "groups by activation / by weight",
                             "forward passes s", "cross-moment products s", "align s (warm)",
                             "warm / baseline", "graph export s", "align s (cold)", "cold / baseline"], rows))
        out.append("\nBaseline: the two models' forward passes for resnet18; forward passes plus the "
                   "cross-moment products for the MLP. Warm: the graph template of the architecture and "
                   "input shape is cached from an earlier call; cold: the call exports it.\n")
    if "memory" in res:
        rows = []
        for r in res["memory"]:
            rows.append([r["kind"], r["what"], r["num"], mib(r["heap"]), mib(r["rss"]), f"{r['seconds']:.2f}"])
        out.append("### Activation matching: memory against the number of inputs\n")
        out.append(md_table(["model", "run", "inputs", "peak allocated growth MiB (two runs)",
                             "peak RSS growth MiB (two runs)", "s"], rows))
        out.append("")
    loads = [x for part in res.values() for r in (part if isinstance(part, list) else [part])
             if isinstance(r, dict) and "load" in r for x in r["load"]]
    note = (f"Median of {args.repeats} interleaved repeats ({args.rebasin_repeats} for rebasin); torch.set_num_threads({args.threads}); "
            f"{os.cpu_count()} CPUs; torch {torch.__version__}; 1-minute load average during the run "
            + (f"{min(loads):.1f}-{max(loads):.1f}." if loads else "n/a."))
    out.append(note)
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="weight,rebasin,activation,memory")
    ap.add_argument("--act", default="resnet18:250,mlp:250,mlp:1000",
                    help="activation-matching runs, model:batch (models: resnet18, mlp)")
    ap.add_argument("--models", default=",".join(WM_MODELS), help="weight-matching models")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rebasin-repeats", type=int, default=5,
                    help="repeats of the rebasin comparison (its iteration count varies with its random order)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--device", default="cpu", help="device of the activation part (e.g. cuda)")
    ap.add_argument("--markdown", metavar="OUT.md")
    ap.add_argument("--json", metavar="OUT.json")
    ap.add_argument("--profile", action="store_true", help="print cProfile summaries of the slowest parts")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        kind, num, what = args.memory_child.split(",")
        print(json.dumps(memory_child(kind, int(num), what)))
        return 0
    torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = torch.device(args.device)
    warnings.filterwarnings("ignore")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    print(f"permgraph {permgraph.__version__}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"python {platform.python_version()}, {platform.machine()}", file=sys.stderr)
    # warm-up: the first torch.export of a process pays one-off costs
    permgraph.trace(permgraph.models.create("mlp"))
    res: dict = {}
    if "weight" in parts:
        res["weight"] = []
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            name = next((m for m in WM_MODELS if m.startswith(name)), name)
            res["weight"].append(bench_weight(name, args.repeats))
    if "rebasin" in parts:
        if importlib.util.find_spec("rebasin") is None:
            res["rebasin"] = {"error": "rebasin is not installed (pip install --no-deps rebasin torchview "
                                       "graphviz)", "permgraph_s": float("nan"), "load": (load(), load())}
        else:
            res["rebasin"] = bench_rebasin(args.rebasin_repeats)
    if "activation" in parts:
        runs = [item.split(":") for item in args.act.split(",") if item.strip()]
        res["activation"] = [bench_activation(k.strip(), args.repeats, batch=int(bs)) for k, bs in runs]
    if "memory" in parts:
        res["memory"] = bench_memory(("resnet18", "mlp"))
    text = report(res, args)
    print()
    print(text)
    if args.profile:
        if "weight" in parts:
            for name in [m.strip() for m in args.models.split(",") if m.strip()]:
                name = next((m for m in WM_MODELS if m.startswith(name)), name)
                print(f"--- cProfile: weight matching, {name}")
                print(profile_weight(name))
        if "activation" in parts:
            for k in ("resnet18", "mlp"):
                print(f"--- cProfile: activation matching, {k}")
                print(profile_activation(k))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
