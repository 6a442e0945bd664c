"""Shared pieces of the runners, built only from permgraph's public API."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import permgraph
from permgraph.train import load_state_dict, save_state_dict

from .store import Store, read_json, write_json


class Context:
    """What a runner needs: the spec, the store, its run folder, the device, data and a trained-network
    cache. Units of work are skipped when their result file exists (``unit``)."""

    def __init__(self, spec, store: Store, device: str = "cpu", progress: bool = True):
        self.spec, self.store, self.device, self.progress = spec, store, torch.device(device), progress
        self.run_dir = store.run_dir(spec)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._data = None
        self._specs: dict[tuple, permgraph.PermutationSpec] = {}

    # ------------------------------------------------------------------ data and models
    @property
    def data(self) -> permgraph.data.Data:
        if self._data is None:
            d = self.spec.data
            self._data = permgraph.data.get(d.name, root=d.root, download=d.download, normalize=d.normalize,
                                            augment=d.augment, seed=d.seed, **d.kwargs)
        return self._data

    def build(self, seed: int = 0, **override) -> torch.nn.Module:
        torch.manual_seed(seed)
        kw = {**self.spec.model.kwargs, **override}
        return permgraph.models.create(self.spec.model.name, **kw)

    def loader(self, split: str, batch_size: int | None = None, subset: int | None = None):
        b = self.spec.barrier
        return self.data.loader(split, batch_size or b.batch_size, shuffle=False, subset=subset or b.subset)

    def match_loader(self):
        m = self.spec.matching
        return self.data.loader("train", 500, shuffle=False, subset=m.num_samples)

    def trace(self, model) -> permgraph.PermutationSpec:
        """The model's spec, traced once per architecture (keyed by its tensor shapes)."""
        key = tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())
        if key not in self._specs:
            dev = next(model.parameters()).device  # the example input goes where the model is
            x = next(iter(self.loader("train", 2, 2)))[0].to(dev)
            self._specs[key] = permgraph.trace(model, (x,))
        return self._specs[key]

    # ------------------------------------------------------------------ networks
    def network(self, seed: int, checkpoints: list[int] | None = None, **override) -> dict[str, Any]:
        """Train (or load) the network of this spec's model/data/training with ``seed`` (init and data
        order). Returns {"final": state dict, "epoch": {n: state dict loader}}; reused across runs."""
        t = self.spec.train
        ckpts = sorted(set(t.checkpoints) | set(checkpoints or []))
        key = {"model": self.spec.model.model_dump(mode="json"), "override": override,
               "data": self.spec.data.model_dump(mode="json"),
               "train": t.model_dump(mode="json", exclude={"checkpoints"}), "checkpoints": ckpts, "seed": seed}
        d = self.store.network_dir(key)
        final = d / "final.safetensors"
        if not final.exists():
            self.store.log(self.run_dir, f"training network seed={seed} {override} -> {d}")
            write_json(d / "key.json", key)
            out = permgraph.train(lambda: self.build(seed, **override), self.data, epochs=t.epochs,
                            batch_size=t.batch_size, optimizer=t.optimizer, lr=t.lr, momentum=t.momentum,
                            weight_decay=t.weight_decay, schedule=t.schedule, warmup=t.warmup,
                            milestones=t.milestones, gamma=t.gamma, init_seed=seed, data_seed=seed,
                            checkpoints=ckpts, checkpoint_dir=str(d), progress=self.progress,
                            device=self.device)
            save_state_dict(out["model"].state_dict(), str(final))
        return {"final": load_state_dict(str(final)), "dir": d,
                "epoch": {n: (lambda n=n: load_state_dict(str(d / f"ckpt_epoch{n}.safetensors"))) for n in ckpts}}

    def model_from(self, state: dict, **override) -> torch.nn.Module:
        m = self.build(0, **override)
        m.load_state_dict(state)
        return m.to(self.device).eval()

    # ------------------------------------------------------------------ units of work
    def unit(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` once: its JSON result is stored as units/<name>.json and reused on re-runs."""
        path = self.store.unit_path(self.run_dir, name)
        if path.exists():
            return read_json(path)
        result = fn()
        write_json(path, result)
        return result

    # ------------------------------------------------------------------ measurements
    def align(self, a, b, method: str, spec) -> permgraph.Alignment:
        m = self.spec.matching
        if method == "weight":
            return permgraph.align(a, b, "weight", spec=spec, max_iter=m.max_iter, progress=False,
                                   exclude=m.exclude)
        return permgraph.align(a, b, "activation", loader=self.match_loader(), spec=spec,
                               num_samples=m.num_samples, similarity=m.similarity, max_iter=m.max_iter,
                               progress=False)

    def barriers(self, a, b, splits: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """Barrier curves (as plain data) on each split."""
        bs = self.spec.barrier
        out = {}
        for split in splits or bs.splits:
            curve = permgraph.barrier(a, b, self.loader(split), alphas=bs.alphas, bn=bs.bn,
                                      reset_loader=self.loader("train"), progress=False)
            d = curve.to_dict()
            out[split] = {"alphas": d["alphas"], "values": d["values"], "barrier": d["barrier"],
                          "midpoint": d.get("midpoint", {}), "bn": d["bn"]}
        return out

    def control(self, state: dict, spec, **override) -> dict[str, Any]:
        """Sanity control: a network against a randomly permuted copy of itself. After weight matching
        the recovered permutation must be exact and the barrier exactly 0."""
        return self.control_model(self.model_from(state, **override), spec)

    def control_model(self, a, spec) -> dict[str, Any]:
        """``control`` for a model already built."""
        perm = permgraph.random_permutation(spec, 12345)
        b = permgraph.apply(a, spec, perm)
        al = permgraph.align(a, b, spec=spec, progress=False)
        inv = permgraph.inverse(perm)
        mism = sum(int((al.perm[g] != inv[g]).sum()) for g in inv)
        split = self.spec.barrier.splits[0]
        unaligned = self.barriers(a, b, [split])[split]["barrier"]
        aligned = self.barriers(a, al.apply(b), [split])[split]["barrier"]
        return {"mismatched_units": mism, "units": sum(len(p) for p in inv.values()),
                "barrier_unaligned": unaligned, "barrier_aligned": aligned}


def mean_std(values: list[float]) -> dict[str, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n}


def save_figure(fig, path: Path) -> None:
    import io

    from .store import atomic_write

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    atomic_write(path, buf.getvalue())
    import matplotlib.pyplot as plt

    plt.close(fig)


def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def fmt(x: float) -> str:
    return f"{x:.3f}"


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)




def train_network(ctx: Context, seed: int) -> None:
    """Unit of work: train (or find) the network of ``seed``."""
    ctx.network(seed)


def network_plan(seeds) -> list[tuple[str, Any, list[str]]]:
    """Units that train every seed's network, independent of each other (for parallel executors)."""
    from functools import partial

    return [(f"train_{s}", partial(train_network, seed=s), []) for s in sorted(set(seeds))]
