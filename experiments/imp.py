"""``imp``: simultaneous weak linear connectivity along IMP, and IMP mask transfer across seeds.

For every seed pair (A, B) both networks run iterative magnitude pruning with rewinding (stored and
resumable under the store's ``networks/`` folder, so it is shared by every run with the same model, data,
training and IMP settings). Then, per IMP level:

* barriers between A_L and B_L unaligned, aligned by the permutation found between the *dense* trained
  networks, and by the permutation found at that level (``permgraph.prune.imp_barriers``), at the trained
  weights and at the masked rewind point;
* A's level-L mask moved onto B and B retrained from its rewind point (``permgraph.prune.transfer_arms``):
  B's own ticket, A's mask permuted by the dense / per-level permutation, unpermuted, random, one-shot.

Controls: A's dense network against a permuted copy of itself, and the unaligned barrier ("none").
The alignment method is ``matching.methods[0]``.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Any

import permgraph

from .common import Context, fmt, md_table, mean_std, plt, pm, save_figure
from .store import write_json

ALIGNMENTS = ("none", "dense", "level")


def _train_kw(t) -> dict[str, Any]:
    return dict(batch_size=t.batch_size, optimizer=t.optimizer, lr=t.lr, momentum=t.momentum,
                weight_decay=t.weight_decay, schedule=t.schedule, warmup=t.warmup, milestones=list(t.milestones),
                gamma=t.gamma)


def imp_key(ctx: Context, seed: int) -> dict[str, Any]:
    """What identifies one IMP run in the store. ``levels`` is left out on purpose: a run with more levels
    continues the stored one (levels are stored one folder each). ``retrain`` is in it, so that levels
    retrained by one mode (or, before the option, always by "restart") are never reused for the other."""
    spec = ctx.spec
    # fields at their defaults are left out (as in the run hash), so a new field with a no-op default keeps
    # every stored chain valid
    return {"kind": "imp", "model": spec.model.model_dump(mode="json", exclude_defaults=True),
            "data": spec.data.model_dump(mode="json", exclude_defaults=True),
            "train": spec.train.model_dump(mode="json", exclude={"checkpoints"}, exclude_defaults=True),
            "imp": {"fraction": spec.imp.fraction, "rewind": spec.imp.rewind,
                    "exclude_classifier": spec.imp.exclude_classifier, "retrain": spec.imp.retrain},
            "seed": seed}


def _levels_to_train(ctx: Context, seed: int) -> list[int]:
    """The IMP levels of ``seed`` not yet in the store."""
    d = ctx.store.network_dir(imp_key(ctx, seed))
    return [lv for lv in range(ctx.spec.imp.levels + 1)
            if not (d / f"level_{lv}" / "final.safetensors").exists()]


def _trained_arms(spec) -> list[str]:
    return [a for a in spec.imp.arms if a != "own"]  # "own" is B's own ticket: nothing to retrain


def run_imp(ctx: Context, seed: int) -> permgraph.prune.IMPResult:
    """IMP of the network with ``seed`` (init and data order); finished levels are loaded from the store."""
    spec, t = ctx.spec, ctx.spec.train
    key = imp_key(ctx, seed)
    d = ctx.store.network_dir(key)
    if not (d / "key.json").exists():
        ctx.store.log(ctx.run_dir, f"IMP seed={seed} -> {d}")
        write_json(d / "key.json", key)
    todo = _levels_to_train(ctx, seed)
    if not todo:
        n = spec.imp.levels + 1
        ctx.tracker.found(d, f"IMP (seed {seed}): all {n} levels", count=n)
    data = ctx.data
    training = (ctx.tracker.training(lambda j: f"IMP seed {seed}, level {todo[j - 1]}", t.epochs,
                                     count=len(todo)) if todo else contextlib.nullcontext([]))
    with ctx.fork_rng(), training as cbs:
        res = permgraph.prune.imp(ctx.create, data, levels=spec.imp.levels, fraction=spec.imp.fraction,
                                  rewind=spec.imp.rewind, epochs=t.epochs, init_seed=seed, data_seed=seed,
                                  exclude_classifier=spec.imp.exclude_classifier, retrain=spec.imp.retrain,
                                  store=str(d),
                                  progress=ctx.progress, device=ctx.device, callbacks=cbs, **_train_kw(t))
    ctx.tracker.found(d)
    return res


def _imp_table(res: permgraph.prune.IMPResult) -> list[dict[str, Any]]:
    keep = ("level", "density", "train_loss", "train_error", "test_loss", "test_error")
    return [{k: row[k] for k in keep if k in row} for row in res.table()]


def _method(ctx: Context) -> str:
    return ctx.spec.matching.methods[0]


def _align_method(ctx: Context) -> str:
    """The method as align() takes it: weight_folded is weight matching with fold_bn=True (``_align_kw``)."""
    return "weight" if _method(ctx) == "weight_folded" else _method(ctx)


def _arm_levels(spec) -> list[int]:
    levels = list(spec.imp.arm_levels) or list(range(1, spec.imp.levels + 1))
    bad = [lv for lv in levels if not 1 <= lv <= spec.imp.levels]
    if bad:
        raise ValueError(f"imp.arm_levels {bad} outside 1..{spec.imp.levels} (imp.levels)")
    return levels


def _pair_setup(ctx: Context, sa: int, sb: int):
    imp_a, imp_b = run_imp(ctx, sa), run_imp(ctx, sb)
    model = ctx.model_from(imp_a.levels[0].state)
    match_loader = ctx.match_loader() if _method(ctx) == "activation" else None
    return imp_a, imp_b, model, ctx.trace(model), match_loader


def imp_unit(ctx: Context, seed: int) -> None:
    """Run (or load) the IMP of one seed."""
    run_imp(ctx, seed)


def _align_kw(ctx: Context) -> dict[str, Any]:
    """The spec's matching options, as align() takes them for the method in use."""
    m = ctx.spec.matching
    if _method(ctx) == "activation":
        return {"similarity": m.similarity, "max_iter": m.max_iter, "num_samples": m.num_samples}
    fold = {"fold_bn": True} if _method(ctx) == "weight_folded" else {}
    return {"max_iter": m.max_iter, "exclude": list(m.exclude), "start": m.start, **fold}


def barriers_unit(ctx: Context, sa: int, sb: int) -> dict[str, Any]:
    """Barriers between A_L and B_L at every level, unaligned / dense / per-level permutation."""
    spec = ctx.spec

    def compute():
        imp_a, imp_b, model, perm_spec, match_loader = _pair_setup(ctx, sa, sb)
        out = {}
        for split in spec.barrier.splits:
            out[split] = permgraph.prune.imp_barriers(
                model, imp_a, imp_b, ctx.loader(split), spec=perm_spec, alphas=spec.barrier.alphas,
                method=_align_method(ctx), match_loader=match_loader, bn=spec.barrier.bn,
                reset_loader=ctx.loader("train"), seed=0, progress=False, align_kw=_align_kw(ctx))
        return {"seeds": [sa, sb], "imp_a": _imp_table(imp_a), "imp_b": _imp_table(imp_b), "barriers": out}

    return ctx.unit(f"imp_barriers_{sa}_{sb}", compute)


def arms_unit(ctx: Context, sa: int, sb: int, level: int) -> list[dict[str, Any]]:
    """A's level mask moved onto B in every arm, B retrained from its rewind point (in the IMP levels'
    ``retrain`` mode); test metrics."""
    spec = ctx.spec

    def compute():
        imp_a, imp_b, model, perm_spec, match_loader = _pair_setup(ctx, sa, sb)
        arms = _trained_arms(spec)
        with ctx.tracker.training(lambda j: f"seeds {sa}-{sb}, level {level}, arm {arms[j - 1]}",
                                  spec.train.epochs, count=len(arms)) as cbs:
            return permgraph.prune.transfer_arms(
                model, imp_a, imp_b, ctx.data, spec=perm_spec, levels=[level], arms=list(spec.imp.arms),
                method=_align_method(ctx), loader=match_loader, epochs=spec.train.epochs, data_seed=sb, seed=0,
                retrain=spec.imp.retrain, progress=ctx.progress, device=ctx.device, align_kw=_align_kw(ctx), callbacks=cbs,
                **_train_kw(spec.train))

    return ctx.unit(f"imp_arms_{sa}_{sb}_level{level}", compute)


def control_unit(ctx: Context) -> dict[str, Any]:
    """A's dense network against a randomly permuted copy of itself."""

    def compute():
        state = run_imp(ctx, ctx.spec.seeds[0][0]).levels[0].state
        return ctx.control(state, ctx.trace(ctx.model_from(state)))

    return ctx.unit("control_self_permuted", compute)


def plan(ctx: Context) -> list[tuple[str, Any, list[str]]]:
    """Independent units of work with their dependencies (name, function of the Context, needed units),
    for executors that run them in parallel; listed in dependency order."""
    spec = ctx.spec
    seeds = sorted({s for pair in spec.seeds for s in pair})
    tasks: list[tuple[str, Any, list[str]]] = [(f"imp_{s}", partial(imp_unit, seed=s), []) for s in seeds]
    for sa, sb in spec.seeds:
        deps = [f"imp_{sa}", f"imp_{sb}"]
        tasks.append((f"imp_barriers_{sa}_{sb}", partial(barriers_unit, sa=sa, sb=sb), deps))
        tasks += [(f"imp_arms_{sa}_{sb}_level{lv}", partial(arms_unit, sa=sa, sb=sb, level=lv), deps)
                  for lv in _arm_levels(spec)]
    tasks.append(("control", control_unit, [f"imp_{spec.seeds[0][0]}"]))
    return tasks


def run(ctx: Context) -> dict[str, Any]:
    spec = ctx.spec
    arm_levels = _arm_levels(spec)
    # the networks this run trains: IMP levels not in the store, and the retrained arms of unfinished units
    seeds = sorted({s for p in spec.seeds for s in p})
    ctx.tracker.networks += sum(len(_levels_to_train(ctx, s)) for s in seeds)
    ctx.tracker.networks += len(_trained_arms(spec)) * sum(
        not ctx.store.unit_path(ctx.run_dir, f"imp_arms_{sa}_{sb}_level{lv}").exists()
        for sa, sb in spec.seeds for lv in arm_levels)
    pairs = []
    n_arms = len(spec.seeds) * len(arm_levels)
    for i, (sa, sb) in enumerate(spec.seeds, 1):
        with ctx.tracker.unit("IMP barriers", i, len(spec.seeds), f"seeds {sa}-{sb}, every level"):
            pair = dict(barriers_unit(ctx, sa, sb))
        pair["arms"] = []
        for j, level in enumerate(arm_levels, 1):
            with ctx.tracker.unit("mask transfer", (i - 1) * len(arm_levels) + j, n_arms,
                                  f"seeds {sa}-{sb}, level {level}"):
                pair["arms"] += arms_unit(ctx, sa, sb, level)
        pairs.append(pair)
    with ctx.tracker.unit("control", 1, 1, "a network against a permuted copy of itself"):
        control = control_unit(ctx)
    ctx.tracker.finish(f"{len(pairs)} pairs")
    return {"method": _method(ctx), "arm_levels": arm_levels, "pairs": pairs, "summary": _summary(spec, pairs),
            "controls": {"self_permuted": control}}


def _summary(spec, pairs: list[dict[str, Any]]) -> dict[str, Any]:
    levels = sorted({r["level"] for r in pairs[0]["barriers"][spec.barrier.splits[0]]})
    barriers: dict[str, Any] = {}
    for split in spec.barrier.splits:
        barriers[split] = {}
        for point in ("trained", "rewind"):
            barriers[split][point] = {}
            for al in ALIGNMENTS:
                per_level = []
                for level in levels:
                    rows = [r for p in pairs for r in p["barriers"][split]
                            if r["level"] == level and r["point"] == point and r["alignment"] == al]
                    if not rows:
                        continue
                    per_level.append({"level": level, "density": rows[0]["density"],
                                      "error": mean_std([r["barrier_error"] for r in rows]),
                                      "loss": mean_std([r["barrier_loss"] for r in rows])})
                if per_level:
                    barriers[split][point][al] = per_level
    arms: dict[str, Any] = {}
    for arm in spec.imp.arms:
        per_level = []
        for level in sorted({r["level"] for p in pairs for r in p["arms"]}):
            rows = [r for p in pairs for r in p["arms"] if r["level"] == level and r["arm"] == arm]
            if rows:
                per_level.append({"level": level, "density": mean_std([r["density"] for r in rows])["mean"],
                                  "test_accuracy": mean_std([r["test_accuracy"] for r in rows]),
                                  "test_loss": mean_std([r["test_loss"] for r in rows])})
        arms[arm] = per_level
    return {"levels": levels, "barriers": barriers, "arms": arms}


def _rest(rewind: int, epochs: int) -> str:
    """The epochs a level retrains with ``retrain: continue``, in words."""
    return f"epoch {epochs}" if rewind + 1 == epochs else f"epochs {rewind + 1}-{epochs}"


def report(ctx: Context, results: dict[str, Any]) -> str:
    spec = ctx.spec
    s = results["summary"]
    splits = spec.barrier.splits
    pyplot = plt()
    # barrier vs density, one panel per split
    fig, axes = pyplot.subplots(1, len(splits), figsize=(4.8 * len(splits), 3.6), squeeze=False)
    for ax, split in zip(axes[0], splits):
        for i, al in enumerate(ALIGNMENTS):
            for point, style in (("trained", "-"), ("rewind", ":")):
                rows = s["barriers"][split][point].get(al)
                if not rows:
                    continue
                ax.errorbar([r["density"] for r in rows], [r["error"]["mean"] for r in rows],
                            yerr=[r["error"]["std"] for r in rows], ls=style, marker="o", ms=3, capsize=2,
                            color=f"C{i}", label=f"{al} ({point})")
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("density of the prunable weights (log)")
        ax.set_ylabel("error barrier")
        ax.set_title(f"{split}: barrier between A_L and B_L")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, ctx.run_dir / "imp_barriers.png")
    # accuracy vs density per arm
    fig, ax = pyplot.subplots(figsize=(5.2, 3.8))
    for i, (arm, rows) in enumerate(s["arms"].items()):
        if rows:
            ax.errorbar([r["density"] for r in rows], [r["test_accuracy"]["mean"] for r in rows],
                        yerr=[r["test_accuracy"]["std"] for r in rows], marker="o", ms=3, capsize=2,
                        color=f"C{i}", label=arm)
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("density of the prunable weights (log)")
    ax.set_ylabel("test accuracy of B")
    ax.set_title("IMP mask transfer A -> B")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, ctx.run_dir / "imp_arms.png")

    split = splits[0]
    brows = []
    for i, level in enumerate(s["levels"]):
        row = [level]
        tr = s["barriers"][split]["trained"]
        row.append(fmt(tr["none"][i]["density"]))
        for al in ALIGNMENTS:
            e = tr[al][i]["error"]
            row.append(f"{fmt(e['mean'])} ± {fmt(e['std'])}")
        for al in ("none", "dense"):
            rw = s["barriers"][split]["rewind"].get(al)
            row.append(f"{fmt(rw[i]['error']['mean'])}" if rw else "-")
        for end in ("imp_a", "imp_b"):  # the endpoints A_L and B_L: test accuracy at the end of training
            acc = [1 - r["test_error"] for p in results["pairs"] for r in p[end]
                   if r["level"] == level and "test_error" in r]
            row.append(pm(mean_std(acc)) if acc else "-")
        brows.append(row)
    bheader = ["level", "density"] + [f"{split} error barrier, {al}" for al in ALIGNMENTS] + \
        ["rewind point, none", "rewind point, dense", "test accuracy A_L", "test accuracy B_L"]
    arm_names = [a for a in s["arms"] if s["arms"][a]]
    arows = []
    for level in results["arm_levels"]:
        row: list[Any] = [level]
        dens = [r["density"] for a in arm_names for r in s["arms"][a] if r["level"] == level]
        row.append(fmt(dens[0]) if dens else "-")
        for a in arm_names:
            r = [r for r in s["arms"][a] if r["level"] == level]
            row.append(f"{fmt(r[0]['test_accuracy']['mean'])} ± {fmt(r[0]['test_accuracy']['std'])}" if r else "-")
        arows.append(row)
    irows = []
    for p in results["pairs"]:
        for ra, rb in zip(p["imp_a"], p["imp_b"]):
            irows.append([f"{p['seeds'][0]}/{p['seeds'][1]}", ra["level"], fmt(ra["density"]),
                          fmt(1 - ra.get("test_error", float("nan"))), fmt(1 - rb.get("test_error", float("nan")))])
    c = results["controls"]["self_permuted"]
    return "\n\n".join([
        f"# {spec.name}: simultaneous weak LC along IMP, and mask transfer",
        f"Model `{spec.model.name}` {spec.model.kwargs}, data `{spec.data.name}`, {len(results['pairs'])} seed "
        f"pairs, IMP {spec.imp.levels} levels pruning {spec.imp.fraction:g} of the remaining weights per level "
        f"(global magnitude), rewind to epoch {spec.imp.rewind}, {spec.train.epochs} epochs of training; "
        + (f"levels 1.. and the mask-transfer arms retrain {_rest(spec.imp.rewind, spec.train.epochs)} of that "
           "schedule from the rewind point (`retrain: continue`). " if spec.imp.retrain == "continue" else
           f"levels 1.. and the mask-transfer arms retrain a whole {spec.train.epochs}-epoch schedule from the "
           "rewind point (`retrain: restart`). ") +
        f"Alignment method `{results['method']}`; {spec.barrier.alphas} alphas, BatchNorm handling "
        f"`{spec.barrier.bn}`. Mean ± std over pairs.",
        "## Barriers along IMP",
        "`dense` = the permutation found between the dense trained A and B, applied at every level (the "
        "paper's claim: it aligns every level); `level` = a permutation found at that level; `none` = the "
        "unaligned control. Rewind columns: A's and B's level masks applied to their rewind weights. Test "
        "accuracy: of the endpoints A_L and B_L (the trained weights of that level).",
        md_table(bheader, brows),
        "![barrier vs density](imp_barriers.png)",
        "## Mask transfer (test accuracy of B retrained from its rewind point)",
        "`own` = B's own IMP ticket; `dense_perm` = A's mask permuted by the dense permutation (the method); "
        "`level_perm` = by the per-level permutation; `unpermuted` = A's mask as is; `random` = random mask with "
        "B's per-layer densities; `oneshot` = one-shot magnitude pruning of dense B.",
        md_table(["level", "density"] + arm_names, arows),
        "![accuracy vs density](imp_arms.png)",
        "## IMP runs (test accuracy per level)",
        md_table(["pair", "level", "density", "A", "B"], irows),
        "## Sanity control",
        f"A's dense network against a randomly permuted copy of itself: weight matching recovered the permutation "
        f"with {c['mismatched_units']} of {c['units']} units mismatched; barrier (error) unaligned "
        f"{fmt(c['barrier_unaligned']['error'])}, aligned {fmt(c['barrier_aligned']['error'])}. The unaligned "
        "barrier of every level is the `none` column above.",
    ]) + "\n"
