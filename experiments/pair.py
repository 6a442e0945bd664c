"""``pair``: weak linear connectivity modulo permutation.

For every seed pair (A, B): barriers unaligned, after weight matching and after activation matching,
for loss and error on the train and test subsets. Controls: A against a permuted copy of itself.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from .common import Context, accuracy_columns, fmt, md_table, mean_std, network_plan, plt, save_figure


def pair_unit(ctx: Context, sa: int, sb: int) -> dict[str, Any]:
    """One unit of work: align the networks of seeds ``sa`` and ``sb`` and measure their barriers."""

    def compute():
        a = ctx.model_from(ctx.network(sa)["final"])
        b = ctx.model_from(ctx.network(sb)["final"])
        perm_spec = ctx.trace(a)
        res: dict[str, Any] = {"seeds": [sa, sb], "barriers": {}, "moved": {}}
        for arm in ["none"] + list(ctx.spec.matching.methods):
            if arm == "none":
                bb = b
            else:
                al = ctx.align(a, b, arm, perm_spec)
                bb = al.apply(b)
                res["moved"][arm] = 1.0 - al.fixed_fraction
            note = "unaligned" if arm == "none" else f"after {arm} matching"
            res["barriers"][arm] = ctx.barriers(a, bb, note=note)
        return res

    return ctx.unit(f"pair_{sa}_{sb}", compute)


def control_unit(ctx: Context) -> dict[str, Any]:
    state = ctx.network(ctx.spec.seeds[0][0])["final"]
    return ctx.unit("control_self_permuted", lambda: ctx.control(state, ctx.trace(ctx.model_from(state))))


def plan(ctx: Context) -> list[tuple[str, Any, list[str]]]:
    """Independent units of work with their dependencies, for executors that run them in parallel:
    (name, function of the Context, names of the units it needs)."""
    tasks = network_plan([s for pair in ctx.spec.seeds for s in pair])
    tasks += [(f"pair_{sa}_{sb}", partial(pair_unit, sa=sa, sb=sb), [f"train_{sa}", f"train_{sb}"])
              for sa, sb in ctx.spec.seeds]
    tasks.append(("control", control_unit, [f"train_{ctx.spec.seeds[0][0]}"]))
    return tasks


def run(ctx: Context) -> dict[str, Any]:
    spec = ctx.spec
    arms = ["none"] + list(spec.matching.methods)
    ctx.expect_networks([s for pair in spec.seeds for s in pair])
    pairs = []
    for i, (sa, sb) in enumerate(spec.seeds, 1):
        with ctx.tracker.unit("pair", i, len(spec.seeds), f"seeds {sa}-{sb}"):
            pairs.append(pair_unit(ctx, sa, sb))
    with ctx.tracker.unit("control", 1, 1, "a network against a permuted copy of itself"):
        control = control_unit(ctx)
    ctx.tracker.finish(f"{len(pairs)} pairs")
    summary: dict[str, Any] = {}
    for arm in arms:
        summary[arm] = {}
        for split in spec.barrier.splits:
            summary[arm][split] = {m: mean_std([p["barriers"][arm][split]["barrier"][m] for p in pairs])
                                   for m in ("error", "loss")}
    return {"pairs": pairs, "summary": summary, "controls": {"self_permuted": control}}


def report(ctx: Context, results: dict[str, Any]) -> str:
    spec = ctx.spec
    arms = list(results["summary"])
    splits = spec.barrier.splits
    acc_split = "test" if "test" in splits else splits[0]  # the endpoints' accuracy, from the curves' ends
    rows = []
    for arm in arms:
        row = [arm]
        for split in splits:
            for m in ("error", "loss"):
                s = results["summary"][arm][split][m]
                row.append(f"{fmt(s['mean'])} ± {fmt(s['std'])}")
        row += accuracy_columns([p["barriers"][arm][acc_split] for p in results["pairs"]])
        rows.append(row)
    header = ["alignment"] + [f"{split} {m} barrier" for split in splits for m in ("error", "loss")] + \
        [f"{acc_split} accuracy A", f"{acc_split} accuracy B"]
    pyplot = plt()
    fig, axes = pyplot.subplots(1, len(splits), figsize=(4.5 * len(splits), 3.4), squeeze=False)
    for ax, split in zip(axes[0], splits):
        for arm in arms:
            curves = [p["barriers"][arm][split] for p in results["pairs"]]
            alphas = curves[0]["alphas"]
            mean = [sum(c["values"]["error"][i] for c in curves) / len(curves) for i in range(len(alphas))]
            ax.plot(alphas, mean, marker="o", ms=3, label=arm)
        ax.set_title(f"{split} error along the path (mean of {len(results['pairs'])} pairs)")
        ax.set_xlabel("alpha (0 = A, 1 = B)")
        ax.set_ylabel("error")
        ax.legend()
    fig.tight_layout()
    save_figure(fig, ctx.run_dir / "pair_curves.png")
    c = results["controls"]["self_permuted"]
    return "\n\n".join([
        f"# {spec.name}: weak linear connectivity modulo permutation",
        f"Model `{spec.model.name}` {spec.model.kwargs}, data `{spec.data.name}`, {len(results['pairs'])} seed "
        f"pairs, {spec.barrier.alphas} alphas, BatchNorm handling `{spec.barrier.bn}`. Barrier = max over alpha "
        "of the metric minus the linear interpolation of the endpoints (mean ± std over pairs); accuracy A / "
        f"B = the endpoints' accuracy on the same {acc_split} examples (B after the row's alignment: the "
        "same function).",
        md_table(header, rows),
        "![error along the interpolation path](pair_curves.png)",
        "## Sanity control",
        f"A network against a randomly permuted copy of itself: weight matching recovered the permutation with "
        f"{c['mismatched_units']} of {c['units']} units mismatched; barrier (error) unaligned "
        f"{fmt(c['barrier_unaligned']['error'])}, aligned {fmt(c['barrier_aligned']['error'])}.",
    ]) + "\n"
