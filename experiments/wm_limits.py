"""``wm_limits``: the limits of weight matching.

1. Pruning before matching: for every seed pair, weight matching is run on copies of A and B with a
   fraction x of each weight tensor's smallest ("small") or largest ("large") magnitudes zeroed; the
   permutation found is applied to the real B and the barrier measured (first of ``barrier.splits``).
   If weight matching relies on the large weights, pruning small ones barely changes the barrier and
   pruning large ones hurts.
2. Early in training: at each epoch e of ``early`` (and the final epoch, for reference) the permutation
   is found between A_e and B_e by each method and the barrier between A_e and P(B_e) measured.
Controls: A against a permuted copy of itself, and no alignment (at the final epoch and at every e).
"""

from __future__ import annotations

from typing import Any

import permgraph

from .common import Context, endpoint_accuracy, fmt, md_table, mean_std, network_plan, plt, save_figure
from .trajectory import agreement, perm_lists, state_at

METRICS = ("error", "loss")
MODES = ("small", "large")


def _tag(x: float) -> str:
    return f"{x:g}"


def run(ctx: Context) -> dict[str, Any]:
    spec = ctx.spec
    final = spec.train.epochs
    bad = sorted(set(spec.early) - set(spec.train.checkpoints) - {final})
    if bad:
        raise ValueError(f"{spec.name}: early epochs {bad} are not checkpoints (train.checkpoints "
                         f"{sorted(spec.train.checkpoints)})")
    fractions = sorted(set(spec.prune_fractions) | {0.0})
    early = sorted(set(spec.early) | {final})
    split = spec.barrier.splits[0]
    methods = list(spec.matching.methods)
    m = spec.matching
    perm_spec = ctx.trace(ctx.build(0))
    ctx.expect_networks([s for pair in spec.seeds for s in pair])
    pairs = []
    for i, (sa, sb) in enumerate(spec.seeds, 1):
        with ctx.tracker.unit("pair", i, len(spec.seeds), f"seeds {sa}-{sb}"):
            na, nb = ctx.network(sa), ctx.network(sb)
            a, b = ctx.model_from(na["final"]), ctx.model_from(nb["final"])

            def bar(x, y, note=""):
                return ctx.barriers(x, y, [split], note=note)[split]["barrier"]

            def unaligned(x, y, note):  # the barrier, and the accuracy of x and y on the same examples
                curve = ctx.barriers(x, y, [split], note=f"{note}, unaligned")[split]
                return curve["barrier"], endpoint_accuracy(curve)

            def pruned(x, mode, a=a, b=b):
                opts = {"prune_fraction": x, "prune_mode": mode} if x > 0 else {}
                what = f"{x:g} of the {mode} weights zeroed" if x > 0 else "plain"
                with ctx.tracker.step(f"weight matching ({what})"):
                    al = permgraph.align(a, b, "weight", spec=perm_spec, max_iter=m.max_iter,
                                         exclude=m.exclude, start=m.start, progress=False, **opts)
                return {"fraction": x, "mode": mode, "perm": perm_lists(al.perm),
                        "moved": 1.0 - al.fixed_fraction,
                        "barrier": bar(a, al.apply(b), f"after weight matching ({what})")}

            plain = ctx.unit(f"prune_{sa}_{sb}_plain", lambda pruned=pruned: pruned(0.0, "small"))
            none = ctx.unit(f"none_{sa}_{sb}",
                            lambda a=a, b=b: dict(zip(("barrier", "endpoint_accuracy"),
                                                      unaligned(a, b, "at the final epoch"))))
            prune: dict[str, list[dict[str, Any]]] = {}
            for mode in MODES:
                prune[mode] = []
                for x in fractions:
                    r = plain if x == 0 else ctx.unit(f"prune_{sa}_{sb}_{mode}_x{_tag(x)}",
                                                      lambda x=x, mode=mode, pruned=pruned: pruned(x, mode))
                    prune[mode].append({
                        "barrier": r["barrier"], "moved": r["moved"],
                        "agreement_with_plain": agreement(r["perm"], plain["perm"])["overall"]})
            at: list[dict[str, Any]] = []
            for e in early:
                def unit(e=e, na=na, nb=nb):
                    ae, be = ctx.model_from(state_at(na, e, final)), ctx.model_from(state_at(nb, e, final))
                    unaligned_barrier, ends = unaligned(ae, be, f"at epoch {e}")
                    res: dict[str, Any] = {"epoch": e, "barrier": {"none": unaligned_barrier},
                                           "endpoint_accuracy": ends, "perm": {}}
                    for method in methods:
                        al = ctx.align(ae, be, method, perm_spec, note=f"at epoch {e}")
                        res["barrier"][method] = bar(ae, al.apply(be),
                                                     f"at epoch {e}, after {method} matching")
                        res["perm"][method] = perm_lists(al.perm)
                    return res

                r = ctx.unit(f"early_{sa}_{sb}_e{e}", unit)
                entry = {"epoch": e, "barrier": r["barrier"], "endpoint_accuracy": r.get("endpoint_accuracy")}
                if "weight" in r["perm"] and "activation" in r["perm"]:
                    entry["weight_activation_agreement"] = agreement(r["perm"]["weight"],
                                                                     r["perm"]["activation"])["overall"]
                at.append(entry)
            pairs.append({"seeds": [sa, sb], "none": none["barrier"],
                          "endpoint_accuracy": none.get("endpoint_accuracy"), "prune": prune, "early": at})

    with ctx.tracker.unit("control", 1, 1, "a network against a permuted copy of itself"):
        control = ctx.unit("control_self_permuted",
                           lambda: ctx.control(ctx.network(spec.seeds[0][0])["final"], perm_spec))
    ctx.tracker.finish(f"{len(pairs)} pairs")
    arms = ["none"] + methods
    summary = {
        "none": {mt: mean_std([p["none"][mt] for p in pairs]) for mt in METRICS},
        "prune": {mode: {**{mt: [mean_std([p["prune"][mode][i]["barrier"][mt] for p in pairs])
                                 for i in range(len(fractions))] for mt in METRICS},
                         "agreement_with_plain": [mean_std([p["prune"][mode][i]["agreement_with_plain"]
                                                            for p in pairs]) for i in range(len(fractions))]}
                  for mode in MODES},
        "early": {arm: {mt: [mean_std([p["early"][k]["barrier"][arm][mt] for p in pairs])
                             for k in range(len(early))] for mt in METRICS} for arm in arms},
        # the accuracy of A and B (final, and A_e and B_e) on the barrier's examples: the ends of the curves
        "endpoint_accuracy": {
            "final": {end: _known([(p["endpoint_accuracy"] or {}).get(end) for p in pairs]) for end in "AB"},
            "early": {end: [_known([(p["early"][k]["endpoint_accuracy"] or {}).get(end) for p in pairs])
                            for k in range(len(early))] for end in "AB"}},
    }
    return {"split": split, "examples": len(ctx.loader(split).dataset), "final_epoch": final,
            "prune_fractions": fractions, "early_epochs": early,
            "pairs": pairs, "summary": summary, "controls": {"self_permuted": control}}


def _known(values: list) -> dict[str, float] | None:
    """mean_std of the values known (units stored by older versions lack the endpoints' accuracy)."""
    vals = [v for v in values if v is not None]
    return mean_std(vals) if vals else None


def _pm(s: dict[str, float] | None) -> str:
    return "–" if s is None else (f"{fmt(s['mean'])} ± {fmt(s['std'])}" if s["n"] > 1 else fmt(s["mean"]))


def report(ctx: Context, results: dict[str, Any]) -> str:
    spec = ctx.spec
    X, E = results["prune_fractions"], results["early_epochs"]
    split, summ = results["split"], results["summary"]
    arms = list(summ["early"])
    n = len(results["pairs"])
    pyplot = plt()
    fig, axes = pyplot.subplots(1, 3, figsize=(14, 3.6), squeeze=False)
    for ax, mt in zip(axes[0][:2], METRICS):
        for k, mode in enumerate(MODES):
            s = summ["prune"][mode][mt]
            ax.errorbar(X, [c["mean"] for c in s], yerr=[c["std"] for c in s], marker="o", ms=4, capsize=2,
                        color=f"C{k}", label=f"prune {mode}est weights")
        ax.axhline(summ["none"][mt]["mean"], color="k", ls="--", lw=1, label="no alignment")
        ax.set_xlabel("fraction x of each weight tensor zeroed before matching")
        ax.set_ylabel(f"{split} {mt} barrier")
        ax.set_title(f"weight matching on pruned copies: {mt}")
        ax.legend(fontsize=7)
    ax = axes[0][2]
    for k, mode in enumerate(MODES):
        ax.plot(X, [c["mean"] for c in summ["prune"][mode]["agreement_with_plain"]], marker="o", ms=4,
                color=f"C{k}", label=f"prune {mode}est")
    ax.set_xlabel("fraction x")
    ax.set_ylabel("agreement with plain weight matching")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, ctx.run_dir / "wm_limits_pruning.png")

    fig, axes = pyplot.subplots(1, 2, figsize=(10, 3.6), squeeze=False)
    for ax, mt in zip(axes[0], METRICS):
        for k, arm in enumerate(arms):
            s = summ["early"][arm][mt]
            ax.errorbar(E, [c["mean"] for c in s], yerr=[c["std"] for c in s], marker="o", ms=4, capsize=2,
                        ls="--" if arm == "none" else "-", color="k" if arm == "none" else f"C{k}",
                        label="no alignment" if arm == "none" else f"{arm} matching")
        ax.set_xlabel("epoch e (P found between A_e and B_e)")
        ax.set_ylabel(f"{split} {mt} barrier")
        ax.set_title(f"{mt} barrier between A_e and P(B_e)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, ctx.run_dir / "wm_limits_early.png")

    ends = summ.get("endpoint_accuracy") or {"final": {"A": None, "B": None},
                                             "early": {end: [None] * len(E) for end in "AB"}}
    prune_rows = [[_tag(x)] + [_pm(summ["prune"][mode][mt][i]) for mode in MODES for mt in METRICS]
                  + [_pm(summ["prune"][mode]["agreement_with_plain"][i]) for mode in MODES]
                  + [_pm(ends["final"][end]) for end in "AB"]
                  for i, x in enumerate(X)]
    prune_header = (["x"] + [f"prune {mode}: {mt} barrier" for mode in MODES for mt in METRICS]
                    + [f"prune {mode}: agreement with x=0" for mode in MODES]
                    + [f"{split} accuracy A", f"{split} accuracy B"])
    early_rows = [[str(e) + (" (final)" if e == results["final_epoch"] else "")]
                  + [_pm(summ["early"][arm][mt][k]) for arm in arms for mt in METRICS]
                  + [_pm(ends["early"][end][k]) for end in "AB"] for k, e in enumerate(E)]
    early_header = (["epoch"] + [f"{arm}: {mt} barrier" for arm in arms for mt in METRICS]
                    + [f"{split} accuracy A_e", f"{split} accuracy B_e"])
    i_half = min(range(len(X)), key=lambda i: abs(X[i] - 0.5))
    c = results["controls"]["self_permuted"]
    key = [f"- plain weight matching: {split} error barrier {_pm(summ['prune']['small']['error'][0])} "
           f"(no alignment {_pm(summ['none']['error'])}); with x = {_tag(X[i_half])} of the smallest weights "
           f"zeroed {_pm(summ['prune']['small']['error'][i_half])}, of the largest "
           f"{_pm(summ['prune']['large']['error'][i_half])}."]
    if "weight" in arms and "activation" in arms:
        for k, e in enumerate(E):
            key.append(f"- epoch {e}: error barrier weight matching {_pm(summ['early']['weight']['error'][k])}, "
                       f"activation matching {_pm(summ['early']['activation']['error'][k])}, "
                       f"none {_pm(summ['early']['none']['error'][k])}.")
    return "\n\n".join([
        f"# {spec.name}: limits of weight matching",
        f"Model `{spec.model.name}` {spec.model.kwargs}, data `{spec.data.name}`, {spec.train.epochs} epochs, "
        f"{n} seed pair(s); barriers on {results.get('examples', spec.barrier.subset)} {split} examples ("
        f"{spec.barrier.alphas} alphas, BatchNorm handling `{spec.barrier.bn}`), mean ± std over pairs.",
        "## Key numbers", "\n".join(key),
        "## Weight matching on pruned copies",
        "Weight matching is run on copies of the final A and B with a fraction x of each weight tensor's "
        "smallest (or largest) magnitudes zeroed; the permutation found is applied to the real B. Accuracy "
        f"A / B: the final networks' accuracy on the same {split} examples (the ends of the path).",
        md_table(prune_header, prune_rows), "![pruning](wm_limits_pruning.png)",
        "## Early in training: weight vs activation matching",
        md_table(early_header, early_rows), "![early](wm_limits_early.png)",
        "## Sanity controls",
        f"A network against a randomly permuted copy of itself: weight matching recovered the permutation with "
        f"{c['mismatched_units']} of {c['units']} units mismatched; barrier (error) unaligned "
        f"{fmt(c['barrier_unaligned']['error'])}, aligned {fmt(c['barrier_aligned']['error'])}. "
        "The 'no alignment' lines are the unaligned barriers.",
    ]) + "\n"


def plan(ctx: Context) -> list:
    """Parallel units: training the networks (the costly part). Alignment and barriers then run in the
    driver, on the trained networks."""
    return network_plan([s for pair in ctx.spec.seeds for s in pair])
