"""``zoo``: one protocol across architecture families, one table.

For every model of the spec (a ResNet, a ViT, a Mixer, ...): seed pairs trained alike on the same data, and
per pair the barriers (loss and error, on each split) unaligned and after each matching method; per model
the self-permuted control (mismatched units, aligned barrier), the trace coverage, and the wall time of each
phase. A model that cannot be built, traced, trained, aligned or measured is reported with its error (and
the phase it failed in); the other models still run. Each (model, pair) is a unit of work of its own.

Wall times go to ``timing.json`` and report.md, never into results.json (which stays byte-identical
across runs and executors).
"""

from __future__ import annotations

import time
import traceback
from functools import partial
from typing import Any

import permgraph

from .common import Context, fmt, md_table, mean_std, plt, save_figure
from .store import read_json, write_json


class _Failed(Exception):
    """An error in ``phase`` (carries the original exception)."""

    def __init__(self, phase: str, error: BaseException):
        super().__init__(phase)
        self.phase, self.error = phase, error


def _error(phase: str, e: BaseException) -> dict[str, str]:
    """An error as plain data: the phase, the exception's type and message, and where it was raised."""
    frames = traceback.extract_tb(e.__traceback__)
    where = f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else ""
    message = " ".join(str(e).split())
    return {"phase": phase, "type": type(e).__name__, "message": message[:600], "where": where}


class _Clock:
    """Wall time of named phases; an error in one is raised as ``_Failed`` naming the phase."""

    def __init__(self):
        self.times: dict[str, float] = {}

    def run(self, phase: str, fn, *args, key: str | None = None, **kw):
        t0 = time.perf_counter()
        try:
            out = fn(*args, **kw)
        except Exception as e:  # noqa: BLE001 - the zoo reports any model's failure and goes on
            raise _Failed(phase, e) from e
        k = key or phase
        self.times[k] = round(self.times.get(k, 0.0) + time.perf_counter() - t0, 3)
        return out


def model_context(ctx: Context, label: str) -> Context:
    """The context of the zoo's model ``label``: a pair experiment whose units live in this run's folder."""
    m = next(m for m in ctx.spec.models if m.label == label)
    return ctx.part(ctx.spec.pair_spec(m), f"{label}__")


def _coverage(spec: permgraph.PermutationSpec, model) -> dict[str, Any]:
    perm, total = spec.permutable_values()
    ver = spec.info.get("verification") or {}
    return {"permutable": perm / max(total, 1), "values": total, "groups": len(spec.groups),
            "units": sum(g.size for g in spec.groups.values()), "verification": ver.get("status", "not run"),
            "parameters": sum(p.numel() for p in model.parameters())}


def model_unit(ctx: Context, label: str) -> dict[str, Any]:
    """Build the model and trace it (coverage, verification); or the error that stopped it."""
    mctx = model_context(ctx, label)

    def compute():
        clock = _Clock()
        try:
            model = clock.run("build", lambda: mctx.build(0).to(mctx.device).eval())
            spec = clock.run("trace", mctx.trace, model)
            return {"coverage": _coverage(spec, model), "timing": clock.times}
        except _Failed as f:
            mctx.tracker.say(f"{label}: {f.phase} failed: {type(f.error).__name__}: {f.error}")
            return {"error": _error(f.phase, f.error), "timing": clock.times}

    return mctx.unit("model", compute)


def _train_time(net: dict[str, Any]) -> float | None:
    path = net["dir"] / "time.json"
    return read_json(path)["seconds"] if path.exists() else None


def pair_unit(ctx: Context, label: str, sa: int, sb: int) -> dict[str, Any]:
    """Train (or load) the pair's networks, align B to A with each method and measure the barriers."""
    mctx = model_context(ctx, label)

    def compute():
        built = model_unit(ctx, label)
        if "error" in built:
            return {"seeds": [sa, sb], "error": built["error"], "timing": {}}
        clock = _Clock()
        res: dict[str, Any] = {"seeds": [sa, sb], "barriers": {}, "moved": {}}
        try:
            nets = [clock.run("train", mctx.network, s) for s in (sa, sb)]
            train = [_train_time(n) for n in nets]
            if all(t is not None for t in train):
                clock.times["train"] = round(sum(train), 3)  # the training itself, wherever it ran
            a, b = (clock.run("build", mctx.model_from, n["final"]) for n in nets)
            spec = clock.run("trace", mctx.trace, a)
            for arm in ["none"] + list(mctx.spec.matching.methods):
                bb = b
                if arm != "none":
                    al = clock.run("align", mctx.align, a, b, arm, spec, key=f"align_{arm}")
                    bb = al.apply(b)
                    res["moved"][arm] = 1.0 - al.fixed_fraction
                note = "unaligned" if arm == "none" else f"after {arm} matching"
                res["barriers"][arm] = clock.run("barriers", mctx.barriers, a, bb, note=note)
        except _Failed as f:
            mctx.tracker.say(f"{label}: {f.phase} failed: {type(f.error).__name__}: {f.error}")
            return {"seeds": [sa, sb], "error": _error(f.phase, f.error), "timing": clock.times}
        res["timing"] = clock.times
        return res

    return mctx.unit(f"pair_{sa}_{sb}", compute)


def control_unit(ctx: Context, label: str) -> dict[str, Any]:
    """A network of the model against a randomly permuted copy of itself (weight matching)."""
    mctx = model_context(ctx, label)

    def compute():
        built = model_unit(ctx, label)
        if "error" in built:
            return {"error": built["error"], "timing": {}}
        clock = _Clock()
        try:
            state = clock.run("train", mctx.network, ctx.spec.seeds[0][0])["final"]
            model = clock.run("build", mctx.model_from, state)
            out = clock.run("control", mctx.control_model, model, clock.run("trace", mctx.trace, model))
        except _Failed as f:
            return {"error": _error(f.phase, f.error), "timing": clock.times}
        return {**out, "timing": clock.times}

    return mctx.unit("control", compute)


def _train_network(ctx: Context, label: str, seed: int) -> None:
    """Unit for parallel executors: train one network; an error is left for the pair's unit to report."""
    try:
        if "error" not in model_unit(ctx, label):
            model_context(ctx, label).network(seed)
    except Exception as e:  # noqa: BLE001 - reported by the pair unit, which trains it again and fails alike
        ctx.store.log(ctx.run_dir, f"{label}: training seed {seed} failed: {type(e).__name__}: {e}")


def plan(ctx: Context) -> list[tuple[str, Any, list[str]]]:
    """Independent units with their dependencies (for the Ray executor): per model, its build/trace, the
    training of each seed, each pair, the control."""
    tasks = []
    for m in ctx.spec.models:
        lb = m.label
        tasks.append((f"{lb}__model", partial(model_unit, label=lb), []))
        seeds = sorted({s for pair in ctx.spec.seeds for s in pair})
        tasks += [(f"{lb}__train_{s}", partial(_train_network, label=lb, seed=s), [f"{lb}__model"]) for s in seeds]
        tasks += [(f"{lb}__pair_{sa}_{sb}", partial(pair_unit, label=lb, sa=sa, sb=sb),
                   [f"{lb}__train_{sa}", f"{lb}__train_{sb}"]) for sa, sb in ctx.spec.seeds]
        tasks.append((f"{lb}__control", partial(control_unit, label=lb), [f"{lb}__train_{ctx.spec.seeds[0][0]}"]))
    return tasks


def _without_timing(unit: dict[str, Any], timing: dict, key: str) -> dict[str, Any]:
    unit = dict(unit)
    timing[key] = unit.pop("timing", {})
    return unit


def run(ctx: Context) -> dict[str, Any]:
    spec = ctx.spec
    arms = ["none"] + list(spec.matching.methods)
    for m in spec.models:
        model_context(ctx, m.label).expect_networks([s for pair in spec.seeds for s in pair])
    out: dict[str, Any] = {}
    timing: dict[str, Any] = {}
    n = len(spec.models)
    for i, m in enumerate(spec.models, 1):
        lb = m.label
        tm: dict[str, Any] = {}
        with ctx.tracker.unit("model", i, n, f"{lb}: {m.name}"):
            built = _without_timing(model_unit(ctx, lb), tm, "model")
            pairs = [_without_timing(pair_unit(ctx, lb, sa, sb), tm, f"pair_{sa}_{sb}") for sa, sb in spec.seeds]
            control = _without_timing(control_unit(ctx, lb), tm, "control")
        timing[lb] = tm
        entry: dict[str, Any] = {"name": m.name, "kwargs": m.kwargs, "train": spec.train_of(m).model_dump(mode="json")}
        entry.update(coverage=built.get("coverage"), pairs=pairs, controls={"self_permuted": control})
        errors = [u["error"] for u in [built, *pairs, control] if "error" in u]
        if errors:
            entry["error"] = errors[0]
        ok = [p for p in pairs if "error" not in p]
        entry["summary"] = {arm: {split: {mt: mean_std([p["barriers"][arm][split]["barrier"][mt] for p in ok])
                                          for mt in ("error", "loss")} for split in spec.barrier.splits}
                            for arm in arms} if ok else None
        out[lb] = entry
    write_json(ctx.run_dir / "timing.json", timing)
    ctx.tracker.finish(f"{n} models, {sum('error' not in e for e in out.values())} without errors")
    return {"models": out}


# ---------------------------------------------------------------------------------------------- report
def _acc(curves: list[dict[str, Any]]) -> str:
    accs = [1.0 - c["values"]["error"][i] for c in curves for i in (0, -1)]
    s = mean_std(accs)
    return f"{s['mean']:.3f}" if s["n"] else "–"


def _pm(s: dict[str, float] | None) -> str:
    if not s:
        return "–"
    return fmt(s["mean"]) if s["n"] < 2 else f"{fmt(s['mean'])} ± {fmt(s['std'])}"


def _seconds(timing: dict[str, Any], lb: str, key: str) -> float:
    """Seconds of phase ``key`` over the model's units (``align`` sums every method's ``align_<method>``)."""
    return sum(v for u in timing.get(lb, {}).values() for k, v in u.items() if k == key or k.startswith(key + "_"))


def report(ctx: Context, results: dict[str, Any]) -> str:
    spec = ctx.spec
    models = {m.label: results["models"][m.label] for m in spec.models}  # in the spec's order
    arms = ["none"] + list(spec.matching.methods)
    split = "test" if "test" in spec.barrier.splits else spec.barrier.splits[0]
    other = [s for s in spec.barrier.splits if s != split]
    timing_path = ctx.run_dir / "timing.json"
    timing = read_json(timing_path) if timing_path.exists() else {}
    header = (["model", "permutable", f"{split} accuracy"] + [f"error barrier, {a}" for a in arms]
              + [f"loss barrier, {a}" for a in arms] + ["control: mismatched units", "control: aligned barrier"])
    rows, detail, failed = [], [], []
    for lb, e in models.items():
        cov = e.get("coverage") or {}
        perm = f"{100 * cov['permutable']:.1f}%" if cov else "–"
        summ = e.get("summary")
        ok = [p for p in e["pairs"] if "error" not in p]
        c = e["controls"]["self_permuted"]
        ctrl = ([f"{c['mismatched_units']} of {c['units']}", fmt(c["barrier_aligned"]["error"])]
                if "error" not in c else ["–", "–"])
        if summ:
            rows.append([lb, perm, _acc([p["barriers"]["none"][split] for p in ok])]
                        + [_pm(summ[a][split]["error"]) for a in arms] + [_pm(summ[a][split]["loss"]) for a in arms]
                        + ctrl)
            detail.append([lb, f"{cov.get('parameters', 0) / 1e6:.2f}M", str(len(ok))]
                          + [_pm(summ[a][s]["error"]) for s in other for a in arms]
                          + [f"{_seconds(timing, lb, k):.0f}" for k in ("train", "align", "barriers")])
        else:
            rows.append([lb, perm, "–"] + ["–"] * (2 * len(arms)) + ctrl)
        if "error" in e:
            err = e["error"]
            failed.append(f"- **{lb}** (`{e['name']}`) failed at *{err['phase']}*: `{err['type']}`: "
                          f"{err['message']}" + (f" ({err['where']})" if err.get("where") else ""))
    pyplot = plt()
    fig, axes = pyplot.subplots(1, 2, figsize=(max(7.0, 1.1 * len(models)) * 1.2, 3.6), squeeze=False)
    labels = [lb for lb, e in models.items() if e.get("summary")]
    width = 0.8 / len(arms)
    for ax, metric in zip(axes[0], ("error", "loss")):
        for j, arm in enumerate(arms):
            ys = [models[lb]["summary"][arm][split][metric] for lb in labels]
            ax.bar([i + (j - (len(arms) - 1) / 2) * width for i in range(len(labels))], [y["mean"] for y in ys],
                   width, yerr=[y["std"] for y in ys], capsize=2, label=arm)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=35, ha="right")
        ax.set_ylabel(f"{split} {metric} barrier")
        ax.set_title(f"{split} {metric} barrier per architecture")
        ax.axhline(0, color="k", lw=0.5)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, ctx.run_dir / "zoo_barriers.png")
    n_pairs = len(spec.seeds)
    parts = [
        f"# {spec.name}: linear connectivity modulo permutation across architectures",
        f"Data `{spec.data.name}`" + (f" resized to {spec.data.resize} px" if spec.data.resize else "")
        + (f" with {spec.data.channels} channels" if spec.data.channels else "")
        + f"; {len(models)} models, {n_pairs} seed pair{'s' if n_pairs > 1 else ''} each, trained alike "
        f"({spec.train.epochs} epochs, {spec.train.optimizer}, lr {spec.train.lr}, unless a model overrides it); "
        f"{spec.barrier.alphas} alphas, BatchNorm handling `{spec.barrier.bn}`. Barrier = max over alpha of the "
        "metric minus the linear interpolation of the endpoints (mean ± std over pairs). Permutable = share of "
        "the parameters' values that the traced spec permutes. Control = a network against a randomly permuted "
        "copy of itself, aligned by weight matching: 0 mismatched units and a zero barrier say the matcher and "
        "the spec are right, so a barrier that stays after alignment is the geometry's.",
        md_table(header, rows),
        "![barrier per architecture](zoo_barriers.png)",
    ]
    if detail:
        parts += ["## Details",
                  "Parameters, pairs measured" + (f", {', '.join(other)} error barriers" if other else "")
                  + " and wall time (seconds, all pairs: training both networks, alignment, barriers; from "
                  "timing.json).",
                  md_table(["model", "parameters", "pairs"] + [f"{s} error barrier, {a}" for s in other for a in arms]
                           + ["train s", "align s", "barriers s"], detail)]
    if failed:
        parts += ["## Models that did not run", "\n".join(failed)]
    return "\n\n".join(parts) + "\n"
