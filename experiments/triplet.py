"""``triplet``: toward strong linear connectivity modulo permutation.

For every width and every seed triple (A, B, C), with the alignment method ``matching.methods[0]``:

* pair barrier: A against P_AB(B) (B aligned directly to A);
* triplet barrier: A and B aligned to C separately, then the barrier between P_CA(A) and P_CB(B);
* composed permutation: P_AC∘P_CB (``al_ca.inverse().after(al_cb)`` maps B onto A through C): the
  barrier of A against it (equal to the triplet barrier up to numerics: a consistency check of the
  composition convention) and the fraction of units on which it agrees with the direct P_AB;
* chains A <- N1 <- ... <- Nk <- B (N1 = C, then extra networks with seeds above every seed of the spec,
  shared by all triples) of k = 2 .. chain + 1 intermediates: barrier and agreement with P_AB vs k;
* the cycle A -> B -> C -> A (P_AB∘P_BC∘P_CA maps A onto itself): the fraction of units that return to
  themselves.

Controls per width: A against a permuted copy of itself (``ctx.control``); a triple of permuted copies
(A, π1(A), π2(A)), where the composed permutation must agree with the direct one on every unit, the
cycle must fix every unit and the barrier must be 0; and the unaligned barrier ("none").
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

import permgraph

from .common import Context, accuracy_columns, fmt, md_table, mean_std, plt, save_figure

BARRIERS = ("none", "pair", "triplet", "composed")


def _width(w: float) -> int | float:
    return int(w) if float(w).is_integer() else float(w)


def agreement(p, q) -> dict[str, Any]:
    """Fraction of units on which two alignments (or permutations) agree, per group and overall."""
    p = p.perm if isinstance(p, permgraph.Alignment) else p
    q = q.perm if isinstance(q, permgraph.Alignment) else q
    groups = {g: float((torch.as_tensor(p[g]) == torch.as_tensor(q[g])).float().mean()) for g in sorted(p)}
    total = sum(len(p[g]) for g in p)
    same = sum(int((torch.as_tensor(p[g]) == torch.as_tensor(q[g])).sum()) for g in p)
    return {"overall": same / max(total, 1), "groups": groups}


def fixed_points(al) -> dict[str, Any]:
    """Fraction of units an alignment (of a network onto itself) leaves in place, per group and overall."""
    return agreement(al.perm, permgraph.identity(al.spec))


def chain_seeds(spec) -> list[int]:
    """Seeds of the extra networks of the chains: above every seed of the spec, shared by all triples."""
    top = max(s for triple in spec.seeds for s in triple)
    return [top + 1 + k for k in range(spec.chain)]


def _models(ctx: Context, w):
    """Loader of the trained networks of width ``w`` (trained on first use, cached in the store)."""
    ov = {ctx.spec.width_arg: w}
    models: dict[int, Any] = {}

    def model(seed: int):
        if seed not in models:
            models[seed] = ctx.model_from(ctx.network(seed, **ov)["final"], **ov)
        return models[seed]

    return model


def _trace(ctx: Context, model) -> permgraph.PermutationSpec:
    # traced per width (Context.trace caches one spec for the spec's own model)
    x = next(iter(ctx.loader("train", 2, 2)))[0].to(next(model.parameters()).device)
    return permgraph.trace(model, (x,))


def network_unit(ctx: Context, seed: int, width) -> None:
    """Train (or load) one network of one width."""
    ctx.network(seed, **{ctx.spec.width_arg: width})


def triple_unit(ctx: Context, w, sa: int, sb: int, sc: int) -> dict[str, Any]:
    """Pair, triplet and composed barriers, agreement, cycle fixed points and chains of one triple."""
    spec = ctx.spec

    def compute():
        model = _models(ctx, w)
        method = spec.matching.methods[0]
        a, b = model(sa), model(sb)
        perm_spec = _trace(ctx, a)
        cache: dict[tuple[int, int], permgraph.Alignment] = {}

        def al(x: int, y: int) -> permgraph.Alignment:  # maps network y onto network x
            if (x, y) not in cache:
                cache[(x, y)] = ctx.align(model(x), model(y), method, perm_spec, note=f"of seed {y} onto {x}")
            return cache[(x, y)]

        al_ab, al_ca, al_cb = al(sa, sb), al(sc, sa), al(sc, sb)
        composed = al_ca.inverse().after(al_cb)  # B onto A through C
        res: dict[str, Any] = {"seeds": [sa, sb, sc], "barriers": {
            "none": ctx.barriers(a, b, note="unaligned"),
            "pair": ctx.barriers(a, al_ab.apply(b), note="pair"),
            "triplet": ctx.barriers(al_ca.apply(a), al_cb.apply(b), note="triplet"),
            "composed": ctx.barriers(a, composed.apply(b), note="composed"),
        }}
        res["agreement"] = agreement(composed, al_ab)
        cycle = al_ab.after(al(sb, sc)).after(al_ca)  # A onto A via C and B
        res["cycle_fixed"] = fixed_points(cycle)
        # when matching is symmetric (align(b, c) is the inverse of align(c, b)) the cycle's fixed points are
        # exactly the units on which the composed and the direct permutations agree
        res["symmetry_bc"] = agreement(al(sb, sc), al(sc, sb).inverse())["overall"]
        res["moved"] = {"pair": 1.0 - al_ab.fixed_fraction, "composed": 1.0 - composed.fixed_fraction}
        chains = []
        for k in range(2, spec.chain + 2):
            path = [sa, sc, *chain_seeds(spec)[:k - 1], sb]
            p = al(path[0], path[1])
            for x, y in zip(path[1:-1], path[2:]):
                p = p.after(al(x, y))
            chains.append({"intermediates": k, "path": path,
                           "barriers": ctx.barriers(a, p.apply(b), note=f"chain {k}"),
                           "agreement": agreement(p, al_ab)})
        res["chains"] = chains
        return res

    return ctx.unit(f"triplet_w{w}_{sa}_{sb}_{sc}", compute)


def control_unit(ctx: Context, w) -> dict[str, Any]:
    """A against a permuted copy of itself; a triple of permuted copies of A."""
    spec = ctx.spec

    def compute():
        a = _models(ctx, w)(spec.seeds[0][0])
        perm_spec = _trace(ctx, a)
        first = spec.barrier.splits[0]
        out: dict[str, Any] = {"self_permuted": ctx.control_model(a, perm_spec)}
        b = permgraph.apply(a, perm_spec, permgraph.random_permutation(perm_spec, 1))
        c = permgraph.apply(a, perm_spec, permgraph.random_permutation(perm_spec, 2))
        al_ab, al_ca, al_cb, al_bc = (ctx.align(x, y, "weight", perm_spec) for x, y in
                                      ((a, b), (c, a), (c, b), (b, c)))
        composed = al_ca.inverse().after(al_cb)
        cycle = al_ab.after(al_bc).after(al_ca)
        out["permuted_copies"] = {
            "agreement": agreement(composed, al_ab)["overall"],
            "cycle_fixed": fixed_points(cycle)["overall"],
            "barrier_composed": ctx.barriers(a, composed.apply(b), [first])[first]["barrier"],
        }
        return out

    return ctx.unit(f"control_w{w}", compute)


def plan(ctx: Context) -> list[tuple[str, Any, list[str]]]:
    """Independent units of work with their dependencies (name, function of the Context, needed units),
    for executors that run them in parallel; listed in dependency order."""
    spec = ctx.spec
    seeds = sorted({s for t in spec.seeds for s in t} | set(chain_seeds(spec)))
    tasks: list[tuple[str, Any, list[str]]] = []
    for w in map(_width, spec.widths):
        tasks += [(f"train_w{w}_{s}", partial(network_unit, seed=s, width=w), []) for s in seeds]
        for sa, sb, sc in spec.seeds:
            deps = [f"train_w{w}_{s}" for s in sorted({sa, sb, sc} | set(chain_seeds(spec)))]
            tasks.append((f"triplet_w{w}_{sa}_{sb}_{sc}", partial(triple_unit, w=w, sa=sa, sb=sb, sc=sc), deps))
        tasks.append((f"control_w{w}", partial(control_unit, w=w), [f"train_w{w}_{spec.seeds[0][0]}"]))
    return tasks


def run(ctx: Context) -> dict[str, Any]:
    spec = ctx.spec
    widths = []
    all_widths = list(map(_width, spec.widths))
    seeds = sorted({s for t in spec.seeds for s in t} | set(chain_seeds(spec)))
    for w in all_widths:
        ctx.expect_networks(seeds, **{spec.width_arg: w})
    n, k = len(all_widths) * len(spec.seeds), 0
    for w in all_widths:
        triples = []
        for sa, sb, sc in spec.seeds:
            k += 1
            with ctx.tracker.unit("triple", k, n, f"{spec.width_arg}={w}, seeds {sa}-{sb}-{sc}"):
                triples.append(triple_unit(ctx, w, sa, sb, sc))
        with ctx.tracker.unit("control", 1, 1, f"{spec.width_arg}={w}"):
            control = control_unit(ctx, w)
        widths.append({"width": w, "triples": triples, "summary": _summary(spec, triples),
                       "controls": control})
    ctx.tracker.finish(f"{n} triples")
    return {"method": spec.matching.methods[0], "width_arg": spec.width_arg, "chain_seeds": chain_seeds(spec),
            "widths": widths}


def _summary(spec, triples: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"barriers": {}}
    for kind in BARRIERS:
        out["barriers"][kind] = {split: {m: mean_std([t["barriers"][kind][split]["barrier"][m] for t in triples])
                                         for m in ("error", "loss")} for split in spec.barrier.splits}
    out["agreement"] = mean_std([t["agreement"]["overall"] for t in triples])
    out["cycle_fixed"] = mean_std([t["cycle_fixed"]["overall"] for t in triples])
    out["symmetry_bc"] = mean_std([t["symmetry_bc"] for t in triples])
    out["chains"] = []
    for i in range(len(triples[0]["chains"])):
        rows = [t["chains"][i] for t in triples]
        out["chains"].append({
            "intermediates": rows[0]["intermediates"],
            "barriers": {split: {m: mean_std([r["barriers"][split]["barrier"][m] for r in rows])
                                 for m in ("error", "loss")} for split in spec.barrier.splits},
            "agreement": mean_std([r["agreement"]["overall"] for r in rows])})
    return out


def report(ctx: Context, results: dict[str, Any]) -> str:
    spec = ctx.spec
    splits = spec.barrier.splits
    ws = results["widths"]
    xs = [w["width"] for w in ws]
    pyplot = plt()
    fig, axes = pyplot.subplots(1, len(splits), figsize=(4.8 * len(splits), 3.6), squeeze=False)
    for ax, split in zip(axes[0], splits):
        for i, kind in enumerate(("none", "pair", "triplet")):
            ms = [w["summary"]["barriers"][kind][split]["error"] for w in ws]
            ax.errorbar(xs, [m["mean"] for m in ms], yerr=[m["std"] for m in ms], marker="o", ms=3, capsize=2,
                        color=f"C{i}", label=kind)
        ax.set_xscale("log")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        ax.set_xlabel(f"{results['width_arg']} (log)")
        ax.set_ylabel("error barrier")
        ax.set_title(f"{split}: pair vs triplet barrier")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, ctx.run_dir / "triplet_width.png")
    has_chains = bool(ws[0]["summary"]["chains"])
    if has_chains:
        fig, axes = pyplot.subplots(1, 2, figsize=(9.6, 3.6))
        for i, w in enumerate(ws):
            s = w["summary"]
            ks = [1] + [c["intermediates"] for c in s["chains"]]
            bar = [s["barriers"]["composed"][splits[0]]["error"]["mean"]] + \
                [c["barriers"][splits[0]]["error"]["mean"] for c in s["chains"]]
            agr = [s["agreement"]["mean"]] + [c["agreement"]["mean"] for c in s["chains"]]
            axes[0].plot(ks, bar, marker="o", ms=3, color=f"C{i}", label=f"{results['width_arg']}={w['width']}")
            axes[1].plot(ks, agr, marker="o", ms=3, color=f"C{i}", label=f"{results['width_arg']}={w['width']}")
        axes[0].set_ylabel(f"{splits[0]} error barrier, A vs P_chain(B)")
        axes[1].set_ylabel("agreement of P_chain with P_AB")
        for ax in axes:
            ax.set_xlabel("intermediate networks in the chain")
            ax.legend(fontsize=7)
        fig.tight_layout()
        save_figure(fig, ctx.run_dir / "triplet_chains.png")
    acc_split = "test" if "test" in splits else splits[0]  # the endpoints' accuracy, from the curves' ends
    rows = []
    for w in ws:
        s = w["summary"]
        row: list[Any] = [w["width"]]
        for split in splits:
            for kind in BARRIERS:
                m = s["barriers"][kind][split]["error"]
                row.append(f"{fmt(m['mean'])} ± {fmt(m['std'])}")
        row += accuracy_columns([t["barriers"]["none"][acc_split] for t in w["triples"]])
        row += [fmt(s["agreement"]["mean"]), fmt(s["cycle_fixed"]["mean"]), fmt(s["symmetry_bc"]["mean"])]
        rows.append(row)
    header = [results["width_arg"]] + [f"{split} {k}" for split in splits for k in BARRIERS] + \
        [f"{acc_split} accuracy A", f"{acc_split} accuracy B"] + \
        ["agreement P_AC∘P_CB vs P_AB", "cycle fixed points", "symmetry P_BC vs P_CB⁻¹"]
    crows = []
    for w in ws:
        for c in w["summary"]["chains"]:
            crows.append([w["width"], c["intermediates"], fmt(c["barriers"][splits[0]]["error"]["mean"]),
                          fmt(c["agreement"]["mean"])])
    ctl_rows = []
    for w in ws:
        c, pc = w["controls"]["self_permuted"], w["controls"]["permuted_copies"]
        ctl_rows.append([w["width"], f"{c['mismatched_units']} / {c['units']}", fmt(c["barrier_unaligned"]["error"]),
                         fmt(c["barrier_aligned"]["error"]), fmt(pc["agreement"]), fmt(pc["cycle_fixed"]),
                         fmt(pc["barrier_composed"]["error"])])
    parts = [
        f"# {spec.name}: toward strong linear connectivity modulo permutation",
        f"Model `{spec.model.name}` {spec.model.kwargs} with `{results['width_arg']}` in {xs}, data "
        f"`{spec.data.name}`, {len(spec.seeds)} seed triples, alignment `{results['method']}`, "
        f"{spec.barrier.alphas} alphas, BatchNorm handling `{spec.barrier.bn}`. Error barriers, mean ± std over "
        "triples. `pair` = A vs P_AB(B); `triplet` = P_CA(A) vs P_CB(B) (A and B aligned to C separately); "
        "`composed` = A vs P_AC∘P_CB(B) (the same path relabelled: equal to `triplet` up to numerics); `none` "
        f"= unaligned; accuracy A / B = the accuracy of A and B on the same {acc_split} examples (the ends "
        "of the unaligned path). The paper's shape: triplet above pair, both falling with width. Agreement = "
        "fraction of units "
        "on which P_AC∘P_CB equals P_AB; cycle fixed points = units that P_AB∘P_BC∘P_CA leaves in place (the two "
        "coincide when matching is symmetric, i.e. P_BC = P_CB⁻¹ on every unit: last column).",
        md_table(header, rows),
        "![barrier vs width](triplet_width.png)",
    ]
    if has_chains:
        parts += ["## Chains A <- N1 <- ... <- Nk <- B",
                  f"N1 = C, further networks from seeds {results['chain_seeds']} (shared by all triples). k = 1 is "
                  "the triplet.",
                  md_table([results["width_arg"], "k", f"{splits[0]} error barrier", "agreement with P_AB"], crows),
                  "![chains](triplet_chains.png)"]
    parts += ["## Sanity controls",
              "A against a randomly permuted copy of itself (units mismatched by weight matching, error barrier "
              "unaligned / aligned); and a triple of permuted copies (A, π1(A), π2(A)): the composed permutation "
              "must agree with the direct one on every unit, the cycle must fix every unit and the barrier must "
              "be 0.",
              md_table([results["width_arg"], "mismatched units", "unaligned", "aligned", "copies: agreement",
                        "copies: cycle fixed", "copies: barrier"], ctl_rows)]
    return "\n\n".join(parts) + "\n"
