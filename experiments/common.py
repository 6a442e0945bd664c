"""Shared pieces of the runners, built only from permgraph's public API."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import permgraph
from permgraph.io import load_state_dict, save_state_dict

from .store import Store, read_json, write_json


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


class Progress:
    """Progress lines a person can follow in a log: ``[  3.1s] network 2/6 (seed 1): epoch 4/10, ...``.

    One line per phase on ``sys.stderr`` (and appended to the run's log.txt through ``log``): every epoch of
    every network trained (at most one line per ``every`` seconds, the first and the last epoch always;
    in a terminal only the last, as permgraph.train's tqdm bar shows the epochs), every alignment and
    barrier measurement, every unit of work of a runner's main loop (with an ETA from the time the
    computed ones took) and a final line. ``enabled=False`` prints and logs nothing. Progress lines never
    go into results.json."""

    def __init__(self, enabled: bool = True, log: Callable[[str], None] | None = None, stream=None,
                 every: float = 1.0):
        self.enabled, self.log, self._stream, self.every = enabled, log, stream, every
        self.start = time.perf_counter()
        self.label = ""  # the unit of work in progress: the prefix of measurement lines
        self.networks = 0  # networks this run will train, as declared by the runner (0: unknown)
        self.trained = 0  # networks whose training started so far
        self.loaded = 0  # networks found in the store (trained earlier)
        self.work = 0  # things computed so far (not loaded): tells a computed unit from a loaded one
        self._epochs, self._train_time = 0, 0.0  # for the ETA of the training
        self._epochs_per_network, self._first_epoch = 0, 0.0  # the first epoch (warm-up) is left out of rates
        self._durations: dict[str, list[float]] = {}  # seconds of the computed units, per kind
        self._seen: set = set()

    @property
    def stream(self):
        return sys.stderr if self._stream is None else self._stream  # looked up late: it may be replaced

    def tty(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def say(self, message: str) -> None:
        if not self.enabled:
            return
        text = f"[{time.perf_counter() - self.start:6.1f}s] {message}"
        print(text, file=self.stream, flush=True)
        if self.log is not None:
            self.log(text)

    def found(self, key, name: str = "", count: int = 1) -> None:
        """``count`` networks (``key``) found in the store: one line the first time they are seen (with a
        ``name``), none for networks this run trained."""
        if key not in self._seen:
            self._seen.add(key)
            if name:
                self.loaded += count
                self.say(f"{name}: trained earlier, loaded from the store")

    def _prefixed(self, message: str) -> str:
        return f"{self.label}: {message}" if self.label else message

    @contextlib.contextmanager
    def unit(self, kind: str, index: int, total: int, detail: str = ""):
        """Unit ``index`` of ``total`` of a runner's main loop; one line when it ends ("finished earlier" when
        nothing was computed), with an ETA: the units of this kind left times the mean time of the computed
        ones (network training left out), plus the training left."""
        label = (f"{kind} {index}/{total}" if total > 1 else kind) + (f" ({detail})" if detail else "")
        outer, self.label = self.label, label
        t0, train0, work0 = time.perf_counter(), self._train_time, self.work
        try:
            yield
        finally:
            self.label = outer
        if self.work == work0:
            self.say(f"{label}: finished earlier (loaded from the store)")
            return
        took = time.perf_counter() - t0 - (self._train_time - train0)
        times = self._durations.setdefault(kind, [])
        times.append(took)
        typical = times[1:] or times  # the first one also warms up (data, tracing)
        left = sum(typical) / len(typical) * (total - index) + self._training_left()
        trained = self._train_time - train0
        self.say(f"{label}: done ({took:.1f}s" + (f" + {trained:.1f}s training" if trained >= 0.05 else "")
                 + ")" + (f", ETA {_duration(left)}" if index < total or left else ""))

    def _training_left(self, epochs_left: int = 0) -> float:
        """Seconds of training left: ``epochs_left`` (of the network in training) and the networks not
        started yet, at the mean time per epoch so far."""
        if self._epochs < 2:  # no rate yet: the first epoch also warms up
            return 0.0
        epochs_left += self._epochs_per_network * max(self.networks - self.trained, 0)
        return (self._train_time - self._first_epoch) / (self._epochs - 1) * epochs_left

    @contextlib.contextmanager
    def step(self, what: str):
        """One measurement (an alignment, barriers) inside the current unit: a line when it is done."""
        self.work += 1
        t0 = time.perf_counter()
        yield
        self.say(self._prefixed(f"{what} done ({time.perf_counter() - t0:.1f}s)"))

    @contextlib.contextmanager
    def training(self, name: Callable[[int], str] | str, epochs: int, count: int = 1):
        """Training of ``count`` networks one after the other, ``epochs`` each (``name(j)`` describes the
        j-th, from 1). Yields the ``callbacks`` for permgraph.train; a network starts when the epoch number
        does not grow. Each network is numbered among the ``networks`` this run trains."""
        self.work += 1
        self._epochs_per_network = epochs
        st = {"j": 0, "epoch": None, "index": 0, "t": time.perf_counter(), "net_t": 0.0, "last": -math.inf}
        if count:
            total = max(self.networks, self.trained + count)
            self.say(f"network {self.trained + 1}/{total} ({name(1) if callable(name) else name}): training, "
                     f"{epochs} epochs")

        def callback(event: dict[str, Any]) -> None:
            now, before = time.perf_counter(), st["t"]
            self._train_time += now - before
            st["t"], e = now, int(event["epoch"])
            self._epochs += 1
            if self._epochs == 1:
                self._first_epoch = self._train_time
            first = st["epoch"] is None or e <= st["epoch"]
            if first:  # a new network
                self.trained += 1
                st["j"], st["index"], st["net_t"] = st["j"] + 1, self.trained, before
            st["epoch"] = e
            last = e >= epochs
            if not (last or not self.tty() and (first or now - st["last"] >= self.every)):
                return
            st["last"] = now
            total = max(self.networks, self.trained + count - st["j"])
            desc = name(st["j"]) if callable(name) else name
            m = event.get("metrics") or {}
            parts = [f"network {st['index']}/{total} ({desc}): epoch {e}/{epochs}"]
            if "train_loss" in m:
                parts.append(f"train loss {m['train_loss']:.3f}")
            for k in ("test_error", "train_error"):
                if k in m:
                    parts.append(f"{k.replace('_', ' ')} {m[k]:.3f}")
                    break
            if last:
                parts.append(f"trained in {now - st['net_t']:.1f}s")
            left = epochs - e  # epochs left of this network, then of the rest of its group when not declared
            if not self.networks:
                left += epochs * (count - st["j"])
            if self._epochs > 1 and (left or self.networks > self.trained):
                parts.append(f"ETA {_duration(self._training_left(left))} of training")
            self.say(", ".join(parts))

        yield [callback]
        self._train_time += time.perf_counter() - st["t"]
        st["t"] = time.perf_counter()

    def finish(self, what: str = "") -> None:
        nets = f"networks: {self.trained} trained, {self.loaded} loaded from the store"
        took = _duration(time.perf_counter() - self.start)
        what = f"; {what}" if what else ""
        self.say(f"all done in {took} ({nets}{what}); writing results.json and report.md")


class Context:
    """What a runner needs: the spec, the store, its run folder, the device, data and a trained-network
    cache. Units of work are skipped when their result file exists (``unit``)."""

    def __init__(self, spec, store: Store, device: str = "cpu", progress: bool = True):
        self.spec, self.store, self.device, self.progress = spec, store, torch.device(device), progress
        self.run_dir = store.run_dir(spec)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = ""  # of unit names (a zoo's model label)
        self._shared_data = [None]  # one data set for this context and its parts
        self._specs: dict[tuple, permgraph.PermutationSpec] = {}
        self._part_specs: dict[str, dict[tuple, permgraph.PermutationSpec]] = {}
        self._expected: set[Path] = set()
        # progress lines (stderr and log.txt) with progress=True; tqdm bars of training in a terminal
        self.tracker = Progress(progress, log=lambda text: store.log(self.run_dir, text))

    def part(self, spec, prefix: str) -> Context:
        """A context for ``spec``, a part of this run (one model of a zoo): its units are stored in this run's
        folder under names starting with ``prefix``; data, store, device and progress lines are shared."""
        part = Context.__new__(Context)
        part.__dict__.update(self.__dict__)
        part.spec, part.prefix = spec, self.prefix + prefix
        part._specs = self._part_specs.setdefault(part.prefix, {})  # each part traces its model once
        return part

    # ------------------------------------------------------------------ data and models
    @property
    def data(self) -> permgraph.data.Data:
        if self._shared_data[0] is None:
            d = self.spec.data
            t0 = time.perf_counter()
            shape = {k: v for k, v in (("resize", d.resize), ("channels", d.channels)) if v is not None}
            self._shared_data[0] = permgraph.data.get(d.name, root=d.root, download=d.download, normalize=d.normalize,
                                            augment=d.augment, seed=d.seed, **shape, **d.kwargs)
            data = self._shared_data[0]
            self.tracker.say(f"data {d.name}: {len(data.train)} training and {len(data.test)} test "
                             f"examples, loaded in {time.perf_counter() - t0:.1f}s")
        return self._shared_data[0]

    def build(self, seed: int = 0, **override) -> torch.nn.Module:
        """The spec's model initialised from ``seed``; the caller's random state is left as it was."""
        with self.fork_rng():
            torch.manual_seed(seed)
            return self.create(**override)

    def create(self, **override) -> torch.nn.Module:
        """The spec's model, initialised from the global random state (a factory for permgraph.train's
        ``init_seed``, which seeds it)."""
        return permgraph.models.create(self.spec.model.name, **{**self.spec.model.kwargs, **override})

    def fork_rng(self):
        """A block whose changes to torch's random state (CPU, and this context's CUDA device) are undone."""
        devices = []
        if self.device.type == "cuda":
            devices = [self.device.index if self.device.index is not None else torch.cuda.current_device()]
        return torch.random.fork_rng(devices=devices)

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
    def _network_key(self, seed: int, checkpoints, override: dict) -> tuple[dict[str, Any], list[int], Path]:
        t = self.spec.train
        ckpts = sorted(set(t.checkpoints) | set(checkpoints or []))
        # fields at their defaults are left out (as in the run hash): a new field with a no-op default
        # keeps every stored network valid
        key = {"model": self.spec.model.model_dump(mode="json", exclude_defaults=True), "override": override,
               "data": self.spec.data.model_dump(mode="json", exclude_defaults=True),
               "train": t.model_dump(mode="json", exclude={"checkpoints"}, exclude_defaults=True),
               "checkpoints": ckpts, "seed": seed}
        return key, ckpts, self.store.network_dir(key)

    def expect_networks(self, seeds, checkpoints: list[int] | None = None, **override) -> None:
        """Declare networks this run uses, so that progress lines number those it trains ("network i/n")."""
        for seed in seeds:
            d = self._network_key(seed, checkpoints, override)[2]
            if d not in self._expected:
                self._expected.add(d)
                self.tracker.networks += not (d / "final.safetensors").exists()

    def network(self, seed: int, checkpoints: list[int] | None = None, **override) -> dict[str, Any]:
        """Train (or load) the network of this spec's model/data/training with ``seed`` (init and data
        order). Returns {"final": state dict, "epoch": {n: state dict loader}}; reused across runs."""
        t = self.spec.train
        key, ckpts, d = self._network_key(seed, checkpoints, override)
        final = d / "final.safetensors"
        desc = f"seed {seed}" + "".join(f", {k}={v}" for k, v in override.items())
        if final.exists():
            self.tracker.found(d, f"network ({desc})")
        else:
            self.store.log(self.run_dir, f"training network seed={seed} {override} -> {d}")
            write_json(d / "key.json", key)
            data = self.data  # loaded before the training's clock starts
            t0 = time.perf_counter()
            with self.fork_rng(), self.tracker.training(desc, t.epochs) as callbacks:
                config = permgraph.TrainConfig(
                    epochs=t.epochs, batch_size=t.batch_size, optimizer=t.optimizer, lr=t.lr, momentum=t.momentum,
                    weight_decay=t.weight_decay, schedule=t.schedule, warmup=t.warmup, milestones=t.milestones,
                    gamma=t.gamma, checkpoints=ckpts)
                out = permgraph.train(lambda: self.create(**override), data, config, init_seed=seed, data_seed=seed,
                                      checkpoint_dir=str(d), progress=self.progress, device=self.device,
                                      callbacks=callbacks)
            self.tracker.found(d)
            # how long it took, for reports (not part of any results.json)
            write_json(d / "time.json", {"seconds": round(time.perf_counter() - t0, 3), "device": str(self.device),
                                         "threads": torch.get_num_threads()})
            save_state_dict(out.model.state_dict(), str(final))
        return {"final": load_state_dict(str(final)), "dir": d,
                "epoch": {n: (lambda n=n: load_state_dict(str(d / f"ckpt_epoch{n}.safetensors"))) for n in ckpts}}

    def model_from(self, state: dict, **override) -> torch.nn.Module:
        m = self.build(0, **override)
        m.load_state_dict(state)
        return m.to(self.device).eval()

    # ------------------------------------------------------------------ units of work
    def unit(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` once: its JSON result is stored as units/<name>.json and reused on re-runs."""
        path = self.store.unit_path(self.run_dir, self.prefix + name)
        if path.exists():
            return read_json(path)
        self.tracker.work += 1
        result = fn()
        write_json(path, result)
        return result

    # ------------------------------------------------------------------ measurements
    def align(self, a, b, method: str, spec, note: str = "") -> permgraph.Alignment:
        """Align ``b`` to ``a`` with the spec's matching options (``note``: for the progress line)."""
        m = self.spec.matching
        with self.tracker.step(f"{method} matching" + (f" {note}" if note else "")):
            if method in ("weight", "weight_folded"):
                fold = {"fold_bn": True} if method == "weight_folded" else {}
                return permgraph.align(a, b, "weight", spec=spec, max_iter=m.max_iter, progress=False,
                                       exclude=m.exclude, start=m.start, **fold)
            return permgraph.align(a, b, "activation", loader=self.match_loader(), spec=spec,
                                   num_samples=m.num_samples, similarity=m.similarity, residual=m.residual,
                                   max_iter=m.max_iter,
                                   progress=False)

    def barriers(self, a, b, splits: list[str] | None = None, note: str = "") -> dict[str, dict[str, Any]]:
        """Barrier curves (as plain data) on each split (``note``: for the progress line)."""
        bs = self.spec.barrier
        out = {}
        splits = splits or bs.splits
        with self.tracker.step(f"barriers ({', '.join(splits)})" + (f" {note}" if note else "")):
            for split in splits:
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
        unaligned = self.barriers(a, b, [split], note="unaligned")[split]["barrier"]
        aligned = self.barriers(a, al.apply(b), [split], note="aligned")[split]["barrier"]
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


class _Figures:
    """The two pyplot calls the reports make, on figures made without pyplot: no display is needed, and
    pyplot's backend and list of open figures (process-wide state) are left alone."""

    @staticmethod
    def subplots(nrows: int = 1, ncols: int = 1, *, figsize=None, **kw):
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize)
        return fig, fig.subplots(nrows, ncols, **kw)

    @staticmethod
    def get_cmap(name: str):
        import matplotlib

        return matplotlib.colormaps[name]


def plt() -> _Figures:
    return _Figures()


def fmt(x: float) -> str:
    return f"{x:.3f}"


def pm(s: dict[str, float] | None) -> str:
    """A mean_std as "mean ± std" (just the mean for one value, "–" for none)."""
    return "–" if s is None else (f"{fmt(s['mean'])} ± {fmt(s['std'])}" if s["n"] > 1 else fmt(s["mean"]))


def endpoint_accuracy(curve: dict[str, Any]) -> dict[str, float]:
    """Accuracy of the ends of a barrier curve (alpha = 0: A, alpha = 1: B) on the curve's examples."""
    err = curve["values"]["error"]
    return {"A": 1.0 - err[0], "B": 1.0 - err[-1]}


def accuracy_columns(curves: list[dict[str, Any]]) -> list[str]:
    """Cells "accuracy of A", "accuracy of B" (mean ± std) over barrier curves (one per pair)."""
    acc = [endpoint_accuracy(c) for c in curves]
    return [pm(mean_std([x[end] for x in acc])) for end in ("A", "B")]


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
