"""``trajectory``: simultaneous weak linear connectivity along training.

For every seed pair (A, B) trained with the spec's checkpoint schedule, and every matching method:
the permutation P_t is found between A_t and B_t at each epoch t of ``match_at`` (the final epoch is
always added), and applied at every checkpoint s: the barrier between A_s and P_t(B_s) on the first of
``barrier.splits`` (error and loss). That is a heatmap (t found x s applied) per method. With
``diagonal`` the permutation P_s is also found at every other checkpoint s (the curve of P_s applied at
s itself). The agreement of P_t with P_final (fraction of units i with P_t[g][i] == P_final[g][i]) is
reported per group ("layer-wise") and overall. Controls: A against a permuted copy of itself, and no
alignment at every checkpoint.
"""

from __future__ import annotations

from typing import Any

import permgraph

from .common import Context, fmt, md_table, mean_std, network_plan, plt, save_figure

METRICS = ("error", "loss")


def epochs_of(spec) -> tuple[list[int], list[int], list[int]]:
    """(checkpoints s where barriers are measured, epochs t of the heatmap rows, every epoch where a
    permutation is found)."""
    final = spec.train.epochs
    bad = sorted(set(spec.match_at) - set(spec.train.checkpoints) - {final})
    if bad:
        raise ValueError(f"{spec.name}: match_at epochs {bad} are not checkpoints: each must be in "
                         f"train.checkpoints {sorted(spec.train.checkpoints)} or be the final epoch {final}")
    s_epochs = sorted(set(spec.train.checkpoints) | {final})
    t_epochs = sorted(set(spec.match_at) | {final})
    matched = sorted(set(t_epochs) | (set(s_epochs) if spec.diagonal else set()))
    return s_epochs, t_epochs, matched


def state_at(net: dict[str, Any], epoch: int, final: int):
    if epoch in net["epoch"]:
        return net["epoch"][epoch]()
    if epoch == final:
        return net["final"]
    raise ValueError(f"epoch {epoch} was not checkpointed (checkpoints: {sorted(net['epoch'])})")


def perm_lists(perm) -> dict[str, list[int]]:
    return {g: [int(i) for i in p.tolist()] for g, p in perm.items()}


def agreement(p: dict[str, list[int]], q: dict[str, list[int]]) -> dict[str, Any]:
    """Fraction of units i with p[g][i] == q[g][i], per group and over all units."""
    groups = {}
    same = total = 0
    for g in q:
        eq = sum(int(x == y) for x, y in zip(p[g], q[g]))
        groups[g] = eq / max(len(q[g]), 1)
        same += eq
        total += len(q[g])
    return {"overall": same / max(total, 1), "groups": groups}


def _compact(curve: dict[str, Any]) -> dict[str, Any]:
    return {"barrier": curve["barrier"], "endpoints": {m: [v[0], v[-1]] for m, v in curve["values"].items()},
            "values": curve["values"]}


def run(ctx: Context) -> dict[str, Any]:
    spec = ctx.spec
    final = spec.train.epochs
    s_epochs, t_epochs, matched = epochs_of(spec)
    split = spec.barrier.splits[0]
    methods = list(spec.matching.methods)
    perm_spec = ctx.trace(ctx.build(0))
    ctx.expect_networks([s for pair in spec.seeds for s in pair])
    pairs = []
    for i, (sa, sb) in enumerate(spec.seeds, 1):
        with ctx.tracker.unit("pair", i, len(spec.seeds), f"seeds {sa}-{sb}"):
            na, nb = ctx.network(sa), ctx.network(sb)

            def model(net, e):
                return ctx.model_from(state_at(net, e, final))

            def barrier_at(s, perm, t=None, na=na, nb=nb):
                b = model(nb, s)
                if perm is not None:
                    b = permgraph.apply(b, perm_spec, perm)
                note = f"at epoch {s}, " + ("unaligned" if perm is None else f"P found at epoch {t}")
                return _compact(ctx.barriers(model(na, s), b, [split], note=note)[split])

            none = ctx.unit(f"none_{sa}_{sb}", lambda barrier_at=barrier_at: {
                "epochs": s_epochs, "barriers": [barrier_at(s, None) for s in s_epochs]})
            per_method: dict[str, Any] = {}
            for method in methods:
                found: dict[int, dict[str, Any]] = {}
                for t in matched:
                    applied = s_epochs if t in t_epochs else [t]

                    def unit(t=t, applied=applied, method=method, barrier_at=barrier_at, na=na, nb=nb):
                        al = ctx.align(model(na, t), model(nb, t), method, perm_spec,
                                       note=f"at epoch {t}")
                        return {"epoch": t, "method": method, "moved": 1.0 - al.fixed_fraction,
                                "perm": perm_lists(al.perm), "applied_at": applied,
                                "barriers": [barrier_at(s, al.perm, t) for s in applied]}

                    found[t] = ctx.unit(f"match_{sa}_{sb}_{method}_t{t}", unit)
                pf = found[final]["perm"]
                heat = {m: [[r["barrier"][m] for r in found[t]["barriers"]] for t in t_epochs]
                        for m in METRICS}
                own = {m: [found[s]["barriers"][found[s]["applied_at"].index(s)]["barrier"][m]
                           if s in found else None for s in s_epochs] for m in METRICS}
                agree = [agreement(found[t]["perm"], pf) for t in matched]
                per_method[method] = {
                    "heatmap": heat,
                    "final_perm": {m: heat[m][t_epochs.index(final)] for m in METRICS},
                    "own_perm": own,
                    "moved": [found[t]["moved"] for t in matched],
                    "agreement": {"overall": [a["overall"] for a in agree],
                                  "groups": {g: [a["groups"][g] for a in agree] for g in pf}},
                }
            pairs.append({"seeds": [sa, sb],
                          "none": {m: [r["barrier"][m] for r in none["barriers"]] for m in METRICS},
                          # the accuracy of A_s and B_s on the barrier's examples (the ends of the curves)
                          "endpoint_accuracy": {
                              end: [1.0 - r["endpoints"]["error"][k] for r in none["barriers"]]
                              for k, end in enumerate("AB")},
                          "methods": per_method})

    with ctx.tracker.unit("control", 1, 1, "a network against a permuted copy of itself"):
        control = ctx.unit("control_self_permuted",
                           lambda: ctx.control(ctx.network(spec.seeds[0][0])["final"], perm_spec))
    ctx.tracker.finish(f"{len(pairs)} pairs")
    groups = {g: {"size": perm_spec.groups[g].size, "module": (perm_spec.groups[g].modules or [g])[0]}
              for g in perm_spec.groups}
    return {"split": split, "examples": len(ctx.loader(split).dataset), "final_epoch": final,
            "epochs": s_epochs, "match_at": t_epochs, "matched": matched,
            "groups": groups, "pairs": pairs, "summary": _summary(pairs, methods, t_epochs, s_epochs, matched),
            "endpoint_accuracy": {end: [_ms([p["endpoint_accuracy"][end][j] for p in pairs])
                                        for j in range(len(s_epochs))] for end in "AB"},
            "controls": {"self_permuted": control}}


def _ms(values: list) -> dict[str, float] | None:
    vals = [v for v in values if v is not None]
    return mean_std(vals) if vals else None


def _summary(pairs, methods, t_epochs, s_epochs, matched) -> dict[str, Any]:
    out: dict[str, Any] = {"none": {m: [_ms([p["none"][m][j] for p in pairs]) for j in range(len(s_epochs))]
                                    for m in METRICS}}
    for method in methods:
        ps = [p["methods"][method] for p in pairs]
        groups = list(ps[0]["agreement"]["groups"])
        out[method] = {
            "heatmap": {m: [[_ms([q["heatmap"][m][i][j] for q in ps]) for j in range(len(s_epochs))]
                            for i in range(len(t_epochs))] for m in METRICS},
            "final_perm": {m: [_ms([q["final_perm"][m][j] for q in ps]) for j in range(len(s_epochs))]
                           for m in METRICS},
            "own_perm": {m: [_ms([q["own_perm"][m][j] for q in ps]) for j in range(len(s_epochs))]
                         for m in METRICS},
            "agreement": {"overall": [_ms([q["agreement"]["overall"][k] for q in ps]) for k in range(len(matched))],
                          "groups": {g: [_ms([q["agreement"]["groups"][g][k] for q in ps])
                                         for k in range(len(matched))] for g in groups}},
        }
    return out


# ---------------------------------------------------------------------------------------------- report
def _pm(s: dict[str, float] | None) -> str:
    return "–" if s is None else (f"{fmt(s['mean'])} ± {fmt(s['std'])}" if s["n"] > 1 else fmt(s["mean"]))


def _mean(s):
    return float("nan") if s is None else s["mean"]


def report(ctx: Context, results: dict[str, Any]) -> str:
    spec = ctx.spec
    S, T, matched = results["epochs"], results["match_at"], results["matched"]
    final, split = results["final_epoch"], results["split"]
    summ = results["summary"]
    methods = [m for m in summ if m != "none"]
    n = len(results["pairs"])
    pyplot = plt()
    parts = [
        f"# {spec.name}: simultaneous weak linear connectivity along training",
        f"Model `{spec.model.name}` {spec.model.kwargs}, data `{spec.data.name}`, {spec.train.epochs} epochs, "
        f"{n} seed pair(s). P_t is found between A_t and B_t and applied at every checkpoint s: barrier between "
        f"A_s and P_t(B_s) on {results.get('examples', spec.barrier.subset)} {split} examples ({spec.barrier.alphas} alphas, "
        f"BatchNorm handling `{spec.barrier.bn}`); mean ± std over seed pairs.",
    ]
    # ---------------------------------------------------------------- heatmaps
    for method in methods:
        fig, axes = pyplot.subplots(1, 2, figsize=(1.0 + 0.55 * len(S) * 2 + 2, 0.5 * len(T) + 2.2), squeeze=False)
        for ax, m in zip(axes[0], METRICS):
            grid = [[_mean(c) for c in row] for row in summ[method]["heatmap"][m]]
            im = ax.imshow(grid, aspect="auto", cmap="viridis", origin="upper")
            ax.set_xticks(range(len(S)), [str(s) for s in S])
            ax.set_yticks(range(len(T)), [str(t) for t in T])
            ax.set_xlabel("epoch s where the permutation is applied")
            ax.set_ylabel("epoch t where P_t is found")
            ax.set_title(f"{method} matching: {split} {m} barrier")
            if len(S) * len(T) <= 200:
                lo, hi = im.get_clim()
                for i, row in enumerate(grid):
                    for j, v in enumerate(row):
                        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                                color="w" if v < (lo + hi) / 2 else "k")
            fig.colorbar(im, ax=ax)
        fig.tight_layout()
        save_figure(fig, ctx.run_dir / f"trajectory_heatmap_{method}.png")
        rows = [[f"P_{t}"] + [_pm(c) for c in summ[method]["heatmap"]["error"][i]] for i, t in enumerate(T)]
        rows.append(["P_s (own)"] + [_pm(c) for c in summ[method]["own_perm"]["error"]])
        rows.append(["none"] + [_pm(c) for c in summ["none"]["error"]])
        if "endpoint_accuracy" in results:
            rows += [[f"accuracy {end}_s"] + [_pm(c) for c in results["endpoint_accuracy"][end]]
                     for end in "AB"]
        parts += [f"## {method} matching: {split} error barrier (rows: where P is found; columns: epoch s; "
                  f"last rows: the accuracy of A_s and B_s on the same {split} examples)",
                  md_table(["P \\ s"] + [str(s) for s in S], rows),
                  f"![heatmap]({f'trajectory_heatmap_{method}.png'})"]
    # ---------------------------------------------------------------- curves over s
    fig, axes = pyplot.subplots(1, 2, figsize=(10, 3.6), squeeze=False)
    for ax, m in zip(axes[0], METRICS):
        ax.plot(S, [_mean(c) for c in summ["none"][m]], "k--", marker="x", label="no alignment")
        for k, method in enumerate(methods):
            ax.plot(S, [_mean(c) for c in summ[method]["final_perm"][m]], marker="o", ms=4, color=f"C{k}",
                    label=f"{method}: P_final (epoch {final})")
            own = [(s, _mean(c)) for s, c in zip(S, summ[method]["own_perm"][m]) if c is not None]
            ax.plot([s for s, _ in own], [v for _, v in own], marker="s", ms=4, ls=":", color=f"C{k}",
                    label=f"{method}: P_s (found at s)")
        ax.set_xlabel("epoch s")
        ax.set_ylabel(f"{split} {m} barrier")
        ax.set_title(f"{m} barrier between A_s and P(B_s)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, ctx.run_dir / "trajectory_curves.png")
    parts += ["## P_final and P_s along the trajectory", "![curves](trajectory_curves.png)"]
    # ---------------------------------------------------------------- agreement
    groups = results["groups"]
    fig, axes = pyplot.subplots(1, len(methods), figsize=(5.2 * len(methods), 3.6), squeeze=False)
    for ax, method in zip(axes[0], methods):
        ag = summ[method]["agreement"]
        cmap = pyplot.get_cmap("viridis")
        for k, g in enumerate(ag["groups"]):
            ax.plot(matched, [_mean(c) for c in ag["groups"][g]], lw=1, color=cmap(k / max(len(groups) - 1, 1)),
                    label=f"{g} ({groups[g]['module']}, {groups[g]['size']})")
        ax.plot(matched, [_mean(c) for c in ag["overall"]], "k-", lw=2.5, marker="o", ms=4, label="all units")
        ax.set_xlabel("epoch t")
        ax.set_ylabel("agreement of P_t with P_final")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{method} matching: layer-wise agreement")
        ax.legend(fontsize=6, ncol=2 if len(groups) > 8 else 1)
    fig.tight_layout()
    save_figure(fig, ctx.run_dir / "trajectory_agreement.png")
    header = ["t"] + [f"{m} overall" for m in methods] + [f"{m} {g}" for m in methods for g in groups]
    rows = [[str(t)] + [_pm(summ[m]["agreement"]["overall"][k]) for m in methods]
            + [_pm(summ[m]["agreement"]["groups"][g][k]) for m in methods for g in groups]
            for k, t in enumerate(matched)]
    chance = ", ".join(f"{g}: {1 / groups[g]['size']:.3f}" for g in groups)
    parts += ["## Agreement of P_t with P_final (fraction of units mapped alike)",
              f"Chance level (random permutations) is 1/size per group ({chance}).",
              md_table(header, rows), "![agreement](trajectory_agreement.png)"]
    # ---------------------------------------------------------------- key numbers
    lines = []
    late = [j for j, s in enumerate(S) if s >= 1]
    for method in methods:
        fp = summ[method]["final_perm"]["error"]
        worst = max(late or range(len(S)), key=lambda j: _mean(fp[j]))
        end = [f"P_{t} {fmt(_mean(summ[method]['heatmap']['error'][i][-1]))}" for i, t in enumerate(T)]
        lines.append(f"- {method}: P_final applied at every checkpoint s ≥ 1: worst error barrier "
                     f"{fmt(_mean(fp[worst]))} (at s = {S[worst]}); P_t applied at the end (s = {S[-1]}): "
                     + ", ".join(end) + f"; no alignment at the end {fmt(_mean(summ['none']['error'][-1]))}.")
    c = results["controls"]["self_permuted"]
    parts += ["## Key numbers", "\n".join(lines), "## Sanity controls",
              f"A network against a randomly permuted copy of itself: weight matching recovered the permutation "
              f"with {c['mismatched_units']} of {c['units']} units mismatched; barrier (error) unaligned "
              f"{fmt(c['barrier_unaligned']['error'])}, aligned {fmt(c['barrier_aligned']['error'])}. "
              "Agreement of P_final with itself is 1 by construction. The 'none' rows are the unaligned barriers."]
    return "\n\n".join(parts) + "\n"


def plan(ctx: Context) -> list:
    """Parallel units: training the networks (the costly part). Alignment and barriers then run in the
    driver, on the trained networks."""
    return network_plan([s for pair in ctx.spec.seeds for s in pair])
