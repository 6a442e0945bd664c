"""Benchmark ``permgraph.trace`` (export + axis propagation + verification) on a model list.

For every model: parameter count, number of groups, coverage, the median (over ``--repeats``
runs, after one warm-up trace of a small model) of each phase read from
``spec.info["timings"]`` and of the wall time of the whole ``permgraph.trace`` call, and whether
the model meets the target "every model up to 100M parameters traces and verifies in under 3 s".

The ``cpu s`` column is the process CPU time of one trace (all threads), and the run records the
1-minute load average: on a shared machine the wall times depend on what else runs. With the default
OpenMP wait policy, two intra-op threads on a 2-core machine that other processes also use can make
the verification's forward passes up to 100x slower; ``OMP_WAIT_POLICY=PASSIVE`` avoids that (see
docs/performance.md).

For context the same run times Torch-Pruning's dependency-graph build
(``tp.DependencyGraph().build_dependency(model, example_inputs=x)``) on the same models and
inputs. Torch-Pruning is a benchmark-only dependency (``pip install --no-deps torch-pruning``);
the column is skipped with a message when it is not installed.

Usage::

    python benchmarks/trace.py [--models a,b] [--repeats 3] [--markdown out.md] [--threads 2] [--no-tp]

Model names are the keys of ``MODELS`` below (e.g. ``resnet20``, ``torchvision:resnet18``,
``timm:efficientnet_b0``); a suffix that names one model only (``resnet18``, ``mixer_s16_224``)
also works.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch

import permgraph
from permgraph.models import create, example_inputs_for

TARGET_S = 3.0
TARGET_MAX_PARAMS = 100_000_000

CNN = (2, 3, 64, 64)
IMG224 = (2, 3, 224, 224)

# name -> (create() keyword arguments or a function that builds the model, input shape or None for
# example_inputs_for)
MODELS: dict[str, tuple[dict, tuple[int, ...] | None]] = {
    "mlp": ({}, None),
    "vgg16": ({}, CNN),
    "resnet20": ({}, CNN),
    "torchvision:resnet18": ({}, CNN),
    "torchvision:resnet50": ({}, CNN),
    "torchvision:vgg11_bn": ({}, CNN),
    "torchvision:densenet121": ({}, CNN),
    "torchvision:mobilenet_v2": ({}, CNN),
    "torchvision:mobilenet_v3_small": ({}, CNN),
    "torchvision:regnet_x_400mf": ({}, CNN),
    "torchvision:efficientnet_b0": ({}, CNN),
    "torchvision:convnext_tiny": ({}, CNN),
    "torchvision:vit_b_16": ({"image_size": 64}, CNN),
    "torchvision:shufflenet_v2_x0_5": ({}, CNN),
    "torchvision:googlenet": ({"aux_logits": False, "init_weights": True}, CNN),
    "timm:vit_tiny_patch16_224": ({}, IMG224),
    "timm:convnext_atto": ({}, CNN),
    "timm:mobilenetv3_small_050": ({}, CNN),
    "timm:efficientnet_b0": ({}, CNN),
    "timm:regnetx_002": ({}, CNN),
    "timm:mixer_s16_224": ({}, IMG224),
    "timm:resnet26d": ({}, CNN),
    # weight standardisation (ScaledStdConv2d); nfnet_f0 has 71M parameters
    "timm:test_nfnet": ({}, CNN),
    "timm:nf_regnet_b0": ({}, CNN),
    "timm:nfnet_f0": ({}, CNN),
    # LSTMs over the rows and columns of the feature map
    "timm:sequencer2d_s/1-block-stages": (lambda: create("timm:sequencer2d_s", layers=(1, 1, 1, 1)), CNN),
    "timm:sequencer2d_s": ({}, CNN),
    # recurrent layers alone: a bidirectional 2-layer LSTM over 16 steps of 32 features, then a classifier
    "lstm-classifier": (lambda: _LSTMClassifier(), (2, 16, 32)),
    # Hugging Face transformers from small random configs (token ids 2 x 16); GQA and rotary in Llama
    "hf:GPT2LMHeadModel": ({"n_layer": 4, "n_embd": 64, "n_head": 4, "vocab_size": 100, "n_positions": 32}, None),
    "hf:BertForMaskedLM": ({"num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 4,
                            "intermediate_size": 128, "vocab_size": 100, "max_position_embeddings": 32}, None),
    "hf:LlamaForCausalLM": ({"num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 4,
                             "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100,
                             "max_position_embeddings": 32}, None),
}


class _LSTMClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = torch.nn.LSTM(32, 64, num_layers=2, batch_first=True, bidirectional=True)
        self.head = torch.nn.Linear(128, 10)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


@dataclass
class Row:
    name: str
    input_shape: tuple[int, ...] = ()
    params: int = 0
    groups: int | None = None
    coverage: float | None = None  # fraction of state-dict elements in permutable keys
    key_coverage: float | None = None  # fraction of state-dict keys that are permutable
    verification: str = ""
    export_s: float | None = None
    propagate_s: float | None = None
    verify_s: float | None = None
    total_s: float | None = None
    totals: list[float] = field(default_factory=list)
    cpu_s: float | None = None  # median process CPU time of one trace (all threads)
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average before / after the model
    error: str | None = None
    tp: str = ""  # Torch-Pruning median time or "fails: <type>"

    @property
    def target(self) -> str:
        if self.params > TARGET_MAX_PARAMS:
            return "n/a (>100M)"
        if self.error is not None or self.total_s is None:
            return "no (fails)"
        return "yes" if self.total_s < TARGET_S else "no"

    def dominant(self) -> str:
        if self.export_s is None:
            return ""
        phases = {"export": self.export_s, "propagate": self.propagate_s, "verify": self.verify_s}
        return max(phases, key=phases.get)


def resolve_names(spec: str | None) -> list[str]:
    if not spec:
        return list(MODELS)
    names = []
    for raw in (s.strip() for s in spec.split(",")):
        if not raw:
            continue
        if raw in MODELS:
            names.append(raw)
            continue
        hits = [k for k in MODELS if k.split(":")[-1] == raw or k.endswith(raw)]
        if len(hits) != 1:
            choice = "ambiguous: " + ", ".join(hits) if hits else "unknown"
            raise SystemExit(f"--models: {raw!r} is {choice}; known: {', '.join(MODELS)}")
        names.append(hits[0])
    return names


def build(name: str) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    kw, shape = MODELS[name]
    torch.manual_seed(0)
    model = (kw() if callable(kw) else create(name, **kw)).eval()
    if shape is None:
        inputs = example_inputs_for(model)
    else:
        inputs = (torch.randn(shape, generator=torch.Generator().manual_seed(0)),)
    return model, inputs


def coverage(model: torch.nn.Module, spec: permgraph.PermutationSpec) -> tuple[float, float]:
    sd = model.state_dict()
    perm = set(spec.permutable_keys())
    total = sum(v.numel() for v in sd.values())
    covered = sum(v.numel() for k, v in sd.items() if k in perm)
    return covered / max(total, 1), sum(k in perm for k in sd) / max(len(sd), 1)


def bench_permgraph(row: Row, model, inputs, repeats: int) -> None:
    runs = []
    try:
        for _ in range(repeats):
            c0, t0 = time.process_time(), time.perf_counter()
            spec = permgraph.trace(model, inputs)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            runs.append((spec.info["timings"], wall, cpu))
    except Exception as e:  # report and go on with the next model
        row.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
        return
    row.groups = len(spec.groups)
    row.coverage, row.key_coverage = coverage(model, spec)
    row.verification = str(spec.info.get("verification", {}).get("status", ""))
    row.export_s = statistics.median(t["export_s"] for t, _, _ in runs)
    row.propagate_s = statistics.median(t["propagate_s"] for t, _, _ in runs)
    row.verify_s = statistics.median(t["verify_s"] for t, _, _ in runs)
    row.totals = [w for _, w, _ in runs]
    row.total_s = statistics.median(row.totals)
    row.cpu_s = statistics.median(c for _, _, c in runs)


def bench_tp(row: Row, model, inputs, repeats: int) -> None:
    import torch_pruning as tp

    times = []
    try:
        for _ in range(repeats):
            m = copy.deepcopy(model)  # build_dependency may attach state to the model
            t0 = time.perf_counter()
            tp.DependencyGraph().build_dependency(m, example_inputs=inputs[0] if len(inputs) == 1 else inputs)
            times.append(time.perf_counter() - t0)
            del m
    except Exception as e:
        row.tp = f"fails: {type(e).__name__}"
        return
    row.tp = f"{statistics.median(times):.3f}"


def pct(x: float) -> str:
    """Percent with one decimal, rounded down so that only full coverage prints as 100.0%."""
    return f"{math.floor(1000 * x) / 10:.1f}%"


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "" if x is None else format(x, spec)


HEADER = ["model", "input", "params (M)", "groups", "coverage (elems)", "coverage (keys)", "export s",
          "propagate s", "verify s", "total s", "cpu s", "< 3 s target", "Torch-Pruning DG s"]


def table(rows: list[Row], with_tp: bool) -> list[list[str]]:
    out = []
    for r in rows:
        if r.error is not None:
            cells = [r.name, "x".join(map(str, r.input_shape)), f"{r.params / 1e6:.1f}", "", "", "",
                     "", "", "", f"fails: {r.error.split(':')[0]}", "", r.target]
        else:
            cov, kcov = pct(r.coverage), pct(r.key_coverage)
            cells = [r.name, "x".join(map(str, r.input_shape)), f"{r.params / 1e6:.1f}", str(r.groups), cov, kcov,
                     fmt(r.export_s), fmt(r.propagate_s, '.3f'), fmt(r.verify_s), fmt(r.total_s),
                     fmt(r.cpu_s), r.target]
        if with_tp:
            cells.append(r.tp)
        out.append(cells)
    return out


def print_table(header: list[str], body: list[list[str]]) -> None:
    widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for cells in body:
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths)))


def markdown(header: list[str], body: list[list[str]]) -> str:
    right = {"params (M)", "groups", "coverage (elems)", "coverage (keys)", "export s", "propagate s", "verify s", "total s",
             "cpu s", "Torch-Pruning DG s"}
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if h in right else "---" for h in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", help="comma-separated subset of: " + ", ".join(MODELS))
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per model (median reported)")
    ap.add_argument("--markdown", metavar="OUT.md", help="also write the table as markdown")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--no-tp", action="store_true", help="skip the Torch-Pruning column")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    names = resolve_names(args.models)

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    with_tp = not args.no_tp
    if with_tp:
        try:
            import torch_pruning  # noqa: F401
        except ImportError:
            with_tp = False
    if not args.no_tp and not with_tp:
        print("Torch-Pruning is not installed; skipping its column "
              "(pip install --no-deps torch-pruning to include it).", file=sys.stderr)
    tp_version = ""
    if with_tp:
        from importlib.metadata import version

        tp_version = version("torch-pruning")

    print(f"permgraph {permgraph.__version__}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"python {platform.python_version()}, {platform.machine()}"
          + (f", torch-pruning {tp_version}" if with_tp else ""), file=sys.stderr)

    # warm-up: the first torch.export in a process pays one-off import/initialisation costs
    warm, warm_inputs = build("mlp")
    permgraph.trace(warm, warm_inputs)

    rows = []
    for name in names:
        model, inputs = build(name)
        row = Row(name, tuple(inputs[0].shape), sum(p.numel() for p in model.parameters()))
        load0 = os.getloadavg()[0]
        bench_permgraph(row, model, inputs, args.repeats)
        row.load = (load0, os.getloadavg()[0])
        if with_tp:
            bench_tp(row, model, inputs, args.repeats)
        status = row.error or (f"total {row.total_s:.2f}s (runs {', '.join(f'{t:.2f}' for t in row.totals)}), "
                               f"cpu {row.cpu_s:.2f}s, dominant {row.dominant()}, verification {row.verification}, "
            f"load {row.load[0]:.1f}->{row.load[1]:.1f}")
        print(f"[{name}] {status}" + (f"; torch-pruning {row.tp}" if with_tp else ""), file=sys.stderr,
              flush=True)
        rows.append(row)
        del model

    header = HEADER if with_tp else HEADER[:-1]
    body = table(rows, with_tp)
    print()
    print_table(header, body)
    misses = [r for r in rows if r.target.startswith("no")]
    print(f"\n{sum(r.target == 'yes' for r in rows)}/{sum(r.target != 'n/a (>100M)' for r in rows)} models "
          f"<= 100M params meet the {TARGET_S:g} s target; misses: "
          + (", ".join(f"{r.name} ({r.total_s:.2f}s, {r.dominant()})" if r.total_s else f"{r.name} (fails)"
                       for r in misses) or "none"))
    loads = [x for r in rows for x in r.load]
    note = (f"Median of {args.repeats} runs; torch.set_num_threads({args.threads}); {os.cpu_count()} CPUs; "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY') or 'unset'}; "
            f"1-minute load average during the run {min(loads):.1f}-{max(loads):.1f}.")
    print(note)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(header, body) + "\n" + note + "\n")
        print(f"wrote {args.markdown}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
