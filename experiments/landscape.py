"""``landscape``: the loss over the plane through A, B and P(B).

A (seeds[0]) and B (seeds[1]) are trained; B is aligned to A (``method``) giving P(B), the same function
as B at another place in weight space. The directions B - A and P(B) - A in the flattened space of
floating tensors (BatchNorm running statistics excluded) are orthonormalised (Gram-Schmidt) and the
loss and error are evaluated on a ``resolution`` x ``resolution`` grid of that plane extending
``margin`` (a fraction of the triangle's extent) beyond the triangle A, B, P(B). Integer buffers come
from A; with BatchNorm (``barrier.bn`` auto / reset / repair) the statistics are recomputed at every
grid point over the training subset (REPAIR is not applied to the plane; the lines use it). Also the
barrier curves along the straight lines A -> B (the unaligned control) and A -> P(B).
Controls: A against a permuted copy of itself; the plane reproduces A, B and P(B) at their coordinates.
"""

from __future__ import annotations

from typing import Any

import torch

import permgraph

from .common import Context, endpoint_accuracy, fmt, md_table, network_plan, plt, save_figure
from .trajectory import perm_lists

METRICS = ("loss", "error")
STATS = ("running_mean", "running_var")


def _has_bn(model) -> bool:
    return any(getattr(m, "running_mean", None) is not None and hasattr(m, "momentum") for m in model.modules())


class Plane:
    """Points A + u e1 + v e2 of the plane through three state dicts (A, B, C), e1 and e2 orthonormal."""

    def __init__(self, a: dict, b: dict, c: dict):
        self.a = a
        self.keys = [k for k, t in a.items() if t.is_floating_point() and not k.endswith(STATS)]

        def flat(s):
            return torch.cat([s[k].reshape(-1).double() for k in self.keys])

        fa = flat(a)
        d1, d2 = flat(b) - fa, flat(c) - fa
        n1 = float(d1.norm())
        if n1 == 0:
            raise ValueError("A and B are the same point: the plane is undefined")
        self.e1 = d1 / n1
        p = float(d2 @ self.e1)
        r = d2 - p * self.e1
        n2 = float(r.norm())
        if n2 <= 1e-9 * max(n1, 1.0):
            raise ValueError("P(B) lies on the line through A and B: the plane is undefined")
        self.e2 = r / n2
        self.fa = fa
        self.coords = {"A": (0.0, 0.0), "B": (n1, 0.0), "P(B)": (p, n2)}
        self.distances = {"A-B": n1, "A-P(B)": float(d2.norm()), "B-P(B)": float((flat(c) - flat(b)).norm())}

    def state(self, u: float, v: float) -> dict:
        w = self.fa + u * self.e1 + v * self.e2
        out, i = {}, 0
        for k, t in self.a.items():
            if k in self.keys:
                n = t.numel()
                out[k] = w[i:i + n].view(t.shape).to(t.dtype)
                i += n
            else:
                out[k] = t.clone()
        return out

    def grid(self, resolution: int, margin: float) -> tuple[list[float], list[float]]:
        xs = [c[0] for c in self.coords.values()]
        ys = [c[1] for c in self.coords.values()]

        def axis(lo, hi):
            ext = hi - lo
            lo, hi = lo - margin * ext, hi + margin * ext
            return [lo + (hi - lo) * i / (resolution - 1) for i in range(resolution)]

        return axis(min(xs), max(xs)), axis(min(ys), max(ys))


def run(ctx: Context) -> dict[str, Any]:
    spec = ctx.spec
    sa, sb = spec.seeds
    split = spec.split
    ctx.expect_networks([sa, sb])
    na, nb = ctx.network(sa), ctx.network(sb)
    a, b = ctx.model_from(na["final"]), ctx.model_from(nb["final"])
    perm_spec = ctx.trace(ctx.build(0))

    def find():
        al = ctx.align(a, b, spec.method, perm_spec)
        return {"method": spec.method, "perm": perm_lists(al.perm), "moved": 1.0 - al.fixed_fraction}

    with ctx.tracker.unit("alignment", 1, 1, f"seeds {sa}-{sb}"):
        found = ctx.unit(f"align_{sa}_{sb}_{spec.method}", find)
    pb = permgraph.apply(b, perm_spec, permgraph.Permutation(found["perm"]))
    state = {k: v.detach().cpu() for k, v in a.state_dict().items()}
    plane = Plane(state, {k: v.detach().cpu() for k, v in b.state_dict().items()},
                  {k: v.detach().cpu() for k, v in pb.state_dict().items()})
    xs, ys = plane.grid(spec.resolution, spec.margin)
    reset = spec.barrier.bn in ("auto", "reset", "repair") and _has_bn(a)
    loader, train_loader = ctx.loader(split), ctx.loader("train")
    work = ctx.model_from(state)

    def evaluate(u: float, v: float) -> dict[str, float]:
        work.load_state_dict(plane.state(u, v))
        model = permgraph.reset_bn(work, train_loader) if reset else work
        ev = permgraph.evaluate(model, loader)
        return {m: ev[m] for m in METRICS}

    rows = []
    for j, v in enumerate(ys):
        with ctx.tracker.unit("grid row", j + 1, len(ys), f"{len(xs)} points"):
            rows.append(ctx.unit(f"grid_row_{j:03d}", lambda v=v: [evaluate(u, v) for u in xs]))
    with ctx.tracker.unit("lines", 1, 1, "A -> B and A -> P(B)"):
        lines = ctx.unit("lines", lambda: {"A-B": ctx.barriers(a, b, [split], note="A -> B")[split],
                                           "A-P(B)": ctx.barriers(a, pb, [split], note="A -> P(B)")[split]})

    def vertices():
        out = {}
        for name, model in (("A", a), ("B", b), ("P(B)", pb)):
            direct = permgraph.evaluate(permgraph.reset_bn(model, train_loader) if reset else model, loader)
            on_plane = evaluate(*plane.coords[name])
            out[name] = {"direct": {m: direct[m] for m in METRICS}, "plane": on_plane}
        return out

    with ctx.tracker.unit("vertices", 1, 1, "A, B and P(B) evaluated directly and on the plane"):
        vert = ctx.unit("vertices", vertices)
    gap = max(abs(v["direct"][m] - v["plane"][m]) for v in vert.values() for m in METRICS)
    with ctx.tracker.unit("control", 1, 1, "a network against a permuted copy of itself"):
        control = ctx.unit("control_self_permuted", lambda: ctx.control(na["final"], perm_spec))
    ctx.tracker.finish(f"{len(ys)} x {len(xs)} grid")
    return {"split": split, "examples": len(loader.dataset), "method": spec.method, "moved": found["moved"],
            "bn_reset": reset,
            "coords": {k: list(v) for k, v in plane.coords.items()}, "distances": plane.distances,
            "u": xs, "v": ys, "grid": {m: [[cell[m] for cell in row] for row in rows] for m in METRICS},
            "lines": {k: {"alphas": c["alphas"], "values": c["values"], "barrier": c["barrier"]}
                      for k, c in lines.items()},
            "vertices": vert,
            "controls": {"self_permuted": control, "plane_reconstruction_max_gap": gap}}


def report(ctx: Context, results: dict[str, Any]) -> str:
    spec = ctx.spec
    import numpy as np
    from matplotlib.colors import LogNorm

    pyplot = plt()
    split = results["split"]
    u, v = np.array(results["u"]), np.array(results["v"])
    fig, axes = pyplot.subplots(1, 2, figsize=(11, 4.4), squeeze=False)
    for ax, m in zip(axes[0], METRICS):
        z = np.array(results["grid"][m])
        if m == "loss":
            lo, hi = max(float(z.min()), 1e-4), max(float(z.max()), 2e-4)
            levels = np.geomspace(lo, hi, 25)
            cs = ax.contourf(u, v, np.clip(z, lo, hi), levels=levels, norm=LogNorm(lo, hi), cmap="viridis")
        else:
            lo = float(z.min())
            cs = ax.contourf(u, v, z, levels=np.linspace(lo, max(float(z.max()), lo + 1e-3), 21), cmap="viridis")
        ax.contour(u, v, z, levels=cs.levels[::3], colors="w", linewidths=0.4)
        fig.colorbar(cs, ax=ax, format="%.3g")
        c = results["coords"]
        for name, mk in (("A", "o"), ("B", "s"), ("P(B)", "^")):
            ax.plot(*c[name], marker=mk, color="r", ms=8, mec="k")
            ax.annotate(name, c[name], textcoords="offset points", xytext=(6, 6), color="w", fontsize=10,
                        fontweight="bold")
        ax.plot([c["A"][0], c["B"][0]], [c["A"][1], c["B"][1]], "r--", lw=0.8)
        ax.plot([c["A"][0], c["P(B)"][0]], [c["A"][1], c["P(B)"][1]], "r-", lw=0.8)
        ax.set_aspect("equal")
        ax.set_xlabel("direction of B - A")
        ax.set_ylabel("orthogonal direction towards P(B)")
        ax.set_title(f"{split} {m} over the plane A, B, P(B)")
    fig.tight_layout()
    save_figure(fig, ctx.run_dir / "landscape_plane.png")
    fig, axes = pyplot.subplots(1, 2, figsize=(10, 3.4), squeeze=False)
    for ax, m in zip(axes[0], METRICS):
        for name, line in results["lines"].items():
            ax.plot(line["alphas"], line["values"][m], marker="o", ms=3,
                    label=f"{name} (barrier {fmt(line['barrier'][m])})")
        ax.set_xlabel("alpha (0 = A, 1 = B or P(B))")
        ax.set_ylabel(f"{split} {m}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, ctx.run_dir / "landscape_lines.png")
    d = results["distances"]
    rows = [[name, fmt(line["barrier"]["error"]), fmt(line["barrier"]["loss"]),
             *(fmt(endpoint_accuracy(line)[end]) for end in "AB"),
             fmt(d["A-B" if name == "A-B" else "A-P(B)"])] for name, line in results["lines"].items()]
    z = results["grid"]["loss"]
    best = min(min(r) for r in z)
    c = results["controls"]["self_permuted"]
    vert = results["vertices"]
    return "\n\n".join([
        f"# {spec.name}: the loss landscape through A, B and P(B)",
        f"Model `{spec.model.name}` {spec.model.kwargs}, data `{spec.data.name}`, seeds {list(spec.seeds)}; B "
        f"aligned to A by {results['method']} matching ({100 * results['moved']:.1f}% of units moved). "
        f"{spec.resolution} x {spec.resolution} grid on {results.get('examples', spec.barrier.subset)} {split} examples; "
        f"margin {spec.margin} of the triangle's extent; BatchNorm statistics "
        f"{'recomputed at every point' if results['bn_reset'] else 'not reset (no BatchNorm, or bn: none)'}.",
        "![plane](landscape_plane.png)",
        "## Straight lines",
        md_table(["line", f"{split} error barrier", f"{split} loss barrier", f"{split} accuracy at A",
                  f"{split} accuracy at the end (B or P(B))", "distance (L2)"], rows),
        f"Distance B to P(B): {fmt(d['B-P(B)'])}. Lowest {split} loss on the grid: {fmt(best)} "
        f"(A {fmt(vert['A']['direct']['loss'])}, B {fmt(vert['B']['direct']['loss'])}, P(B) "
        f"{fmt(vert['P(B)']['direct']['loss'])}).",
        "![lines](landscape_lines.png)",
        "## Sanity controls",
        f"The plane reproduces A, B and P(B) at their coordinates: largest gap in loss or error "
        f"{results['controls']['plane_reconstruction_max_gap']:.2e}; B and P(B) compute the same function "
        f"({split} loss {fmt(vert['B']['direct']['loss'])} vs {fmt(vert['P(B)']['direct']['loss'])}). "
        f"A against a randomly permuted copy of itself: weight matching recovered the permutation with "
        f"{c['mismatched_units']} of {c['units']} units mismatched; barrier (error) unaligned "
        f"{fmt(c['barrier_unaligned']['error'])}, aligned {fmt(c['barrier_aligned']['error'])}. The line A -> B is "
        "the no-alignment control.",
    ]) + "\n"


def plan(ctx: Context) -> list:
    """Parallel units: training the networks (the costly part). Alignment and barriers then run in the
    driver, on the trained networks."""
    return network_plan(list(ctx.spec.seeds))
