"""Interpolation between networks, BatchNorm statistics reset, REPAIR, and loss/error barriers.

The barrier of a metric L between A and B (Sharma et al. 2024; Frankle et al. 2020) is

    B = max over alpha of [ L(theta(alpha)) - ((1 - alpha) L(theta_A) + alpha L(theta_B)) ]

on a grid of alphas in [0, 1] with both endpoints, where theta(alpha) = (1 - alpha) theta_A + alpha theta_B
for floating tensors (integer buffers such as num_batches_tracked come from A). A model with itself has a
barrier of exactly 0. Other papers report the midpoint only (L(1/2) - (L_A + L_B)/2) or the maximum
minus the mean of the endpoints; ``BarrierCurve`` keeps the whole curve and offers all three.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._eval import evaluate
from ._progress import progress_bar
from .errors import SpecMismatchError

METRICS = ("loss", "error")


# ---------------------------------------------------------------------------------------------- interpolation
def _lerp_into(out: dict, sa: Mapping[str, torch.Tensor], sb: Mapping[str, torch.Tensor], alpha: float,
               mask: Mapping[str, torch.Tensor] | None = None) -> dict:
    for k, a in sa.items():
        b = sb[k]
        if a.is_floating_point():
            # a + alpha * (b - a): exactly a when b == a, so a model with itself gives a zero barrier
            t = a + alpha * (b - a) if alpha != 0 else a.clone()
            if alpha == 1:
                t = b.clone()
            if mask is not None and k in mask:
                t = t * mask[k].to(t.device, t.dtype)
            out[k] = t
        else:
            out[k] = a.clone()
    return out


def interpolate(a, b, alpha: float, *, mask: Mapping[str, torch.Tensor] | None = None):
    """``(1 - alpha) * a + alpha * b`` for models or state dicts (a new object of A's kind).

    Floating tensors are interpolated, integer buffers (``num_batches_tracked``) are taken from A, and
    weights outside ``mask`` (key -> bool tensor) are zero.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    sa = a.state_dict() if isinstance(a, nn.Module) else a
    sb = b.state_dict() if isinstance(b, nn.Module) else b
    if set(sa) != set(sb):
        raise SpecMismatchError(f"the two models have different tensors: {sorted(set(sa) ^ set(sb))[:3]}")
    for k in sa:
        if sa[k].shape != sb[k].shape:
            raise SpecMismatchError(f"{k}: shapes differ ({tuple(sa[k].shape)} vs {tuple(sb[k].shape)})")
    out = _lerp_into({}, sa, sb, float(alpha), mask)
    if isinstance(a, nn.Module):
        m = copy.deepcopy(a)
        m.load_state_dict(out)
        return m
    return out


# ---------------------------------------------------------------------------------------------- BatchNorm reset
def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """Every module that keeps BatchNorm running statistics (BatchNorm1d/2d/3d, SyncBatchNorm, timm's
    fused BatchNormAct2d, and any module with running_mean/running_var buffers and a momentum)."""
    out = []
    for m in model.modules():
        if isinstance(m, _BatchNorm) or (hasattr(m, "running_mean") and hasattr(m, "running_var")
                                          and hasattr(m, "momentum")):
            if getattr(m, "running_mean", None) is not None:
                out.append(m)
    return out


def _inputs(batch):
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (list, tuple)):
        return batch[0]
    raise TypeError(f"loader batches must be tensors or (input, target) pairs, got {type(batch).__name__}")


def _passes(model: nn.Module, loader: Iterable, num_batches: int | None, device, hooks=(), train: bool = False):
    """Run ``model`` over ``loader`` (no grad) with forward ``hooks`` ({module: fn}) registered, in eval
    mode (or train mode); the hooks are removed and train/eval flags restored afterwards."""
    from ._inputs import kept_modes

    handles = [m.register_forward_hook(fn) for m, fn in dict(hooks).items()]
    dev = device or next(model.parameters()).device
    try:
        with kept_modes(model), torch.no_grad():
            model.train(train)
            for i, batch in enumerate(loader):
                if num_batches is not None and i >= num_batches:
                    break
                model(_inputs(batch).to(dev))
    finally:
        for h in handles:
            h.remove()


class _ChannelMoments:
    """Per-channel count, sum and sum of squares (float64) of a layer's outputs."""

    def __init__(self):
        self.n, self.s, self.ss = 0, 0.0, 0.0

    def update(self, flat: torch.Tensor) -> None:
        flat = flat.double()
        self.n += flat.shape[0]
        self.s = self.s + flat.sum(0)
        self.ss = self.ss + (flat * flat).sum(0)

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.s / self.n
        return mean, (self.ss / self.n - mean * mean).clamp_min(0).sqrt()


def _channels_last(out: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """Move the channel dim last (dim 1 of conv outputs; Linear outputs already have it last)."""
    return out.movedim(1, -1) if out.ndim > 2 and not isinstance(module, nn.Linear) else out


def reset_bn_(model: nn.Module, loader: Iterable, num_batches: int | None = None, device=None) -> nn.Module:
    """Recompute BatchNorm running statistics in place: the cumulative average over ``loader`` (or its
    first ``num_batches`` batches) in train mode; momentum and train/eval flags are restored afterwards."""
    bns = batchnorm_layers(model)
    if not bns:
        return model
    momenta = [(m, m.momentum) for m in bns]
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average
        _passes(model, loader, num_batches, device, train=True)
    finally:
        for m, mom in momenta:
            m.momentum = mom
    return model


def reset_bn(model: nn.Module, loader: Iterable, num_batches: int | None = None, device=None) -> nn.Module:
    """A copy of ``model`` with BatchNorm statistics recomputed over ``loader`` (see ``reset_bn_``)."""
    return reset_bn_(copy.deepcopy(model), loader, num_batches, device)


# ---------------------------------------------------------------------------------------------- REPAIR
def repair_layers(model: nn.Module) -> list[str]:
    """Names of the layers REPAIR corrects: every Conv/Linear layer except the last one (the output)."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]
    return names[:-1]


def channel_stats(model: nn.Module, loader: Iterable, layers: Sequence[str], num_batches: int | None = None,
                  device=None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean and standard deviation of the named layers' outputs over ``loader`` (eval mode;
    channel dim 1, or the last dim for Linear layers on token sequences)."""
    mods = dict(model.named_modules())
    acc = {n: _ChannelMoments() for n in layers}

    def hook(name):
        def fn(module, _inp, out):
            x = _channels_last(out.detach(), module)
            acc[name].update(x.reshape(-1, x.shape[-1]))
        return fn

    _passes(model, loader, num_batches, device, {mods[n]: hook(n) for n in layers})
    return {n: a.mean_std() for n, a in acc.items() if a.n}


def repair_(model: nn.Module, targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]], loader: Iterable,
            num_batches: int | None = None, device=None, passes: int = 3) -> nn.Module:
    """REPAIR (Jordan et al. 2022) in place: rescale and shift every channel of the named layers so that
    its output mean/std over ``loader`` equal ``targets[name] = (mean, std)``.

    The statistics are collected in one pass, correcting each layer's output on the fly with the
    batch statistics (as a train-mode BatchNorm would), so downstream layers see corrected inputs; the
    cumulative statistics are then folded into each layer's weight and bias. Further passes (``passes``)
    measure without correcting and fold again, removing the small difference between per-batch and
    whole-data statistics.
    """
    for i in range(passes):
        _repair_pass(model, targets, loader, num_batches, device, on_the_fly=(i == 0))
    return model


def _repair_pass(model, targets, loader, num_batches, device, on_the_fly: bool) -> None:
    mods = dict(model.named_modules())
    acc = {n: _ChannelMoments() for n in targets}

    def hook(name):
        tm, ts = targets[name]

        def fn(module, _inp, out):
            x = _channels_last(out, module)
            flat = x.reshape(-1, x.shape[-1]).double()
            acc[name].update(flat)
            if not on_the_fly:
                return None
            mu, var = flat.mean(0), flat.var(0, unbiased=False)
            y = (x - mu.to(x.dtype)) / (var.sqrt().to(x.dtype) + 1e-8) * ts.to(x.dtype) + tm.to(x.dtype)
            return y.movedim(-1, 1) if out.ndim > 2 and not isinstance(module, nn.Linear) else y
        return fn

    _passes(model, loader, num_batches, device, {mods[n]: hook(n) for n in targets})
    with torch.no_grad():
        for n, a in acc.items():
            if not a.n:
                continue
            m = mods[n]
            mean, std = a.mean_std()
            tm, ts = targets[n]
            scale = ts.double() / (std + 1e-8)
            w = m.weight
            w.mul_(scale.to(w.dtype).view(-1, *([1] * (w.ndim - 1))))
            if m.bias is None:
                m.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
            m.bias.copy_(((m.bias.double() - mean) * scale + tm.double()).to(w.dtype))


# ---------------------------------------------------------------------------------------------- barrier
@dataclass
class BarrierCurve:
    """Metrics along the interpolation path from A (alpha=0) to B (alpha=1).

    ``bn`` is the BatchNorm mode used ("auto" resolved); ``reset_data`` says where recomputed statistics
    (BatchNorm reset, REPAIR) came from, e.g. ``"reset_loader (1437 examples)"``, and is None when none
    were recomputed."""

    alphas: list[float]
    values: dict[str, list[float]]
    bn: str = "none"
    info: dict[str, Any] = field(default_factory=dict)
    reset_data: str | None = None

    def endpoints(self, metric: str = "error") -> tuple[float, float]:
        v = self.values[metric]
        return v[0], v[-1]

    def excess(self, metric: str = "error") -> list[float]:
        """L(alpha) minus the straight line between the endpoints."""
        v = self.values[metric]
        lo, hi = v[0], v[-1]
        return [x - (lo + a * (hi - lo)) for a, x in zip(self.alphas, v)]

    def barrier(self, metric: str = "error", kind: str = "max") -> float:
        """``kind="max"`` (default, the paper's definition): max over alpha of L minus the linear
        interpolation of the endpoints. ``"midpoint"``: L(1/2) - mean of endpoints (needs 0.5 in the
        grid). ``"max_mean"``: max over alpha of L minus the mean of the endpoints."""
        v = self.values[metric]
        if kind == "max":
            return max(self.excess(metric))
        if kind == "midpoint":
            if 0.5 not in self.alphas:
                raise ValueError("the midpoint barrier needs alpha=0.5 in the grid (use an odd number of alphas)")
            return v[self.alphas.index(0.5)] - (v[0] + v[-1]) / 2
        if kind == "max_mean":
            return max(v) - (v[0] + v[-1]) / 2
        raise ValueError(f"kind must be 'max', 'midpoint' or 'max_mean', got {kind!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"alphas": list(self.alphas), "values": {k: list(v) for k, v in self.values.items()},
                "bn": self.bn, "reset_data": self.reset_data, "barrier": {m: self.barrier(m) for m in self.values},
                "midpoint": {m: self.barrier(m, "midpoint") for m in self.values if 0.5 in self.alphas},
                "max_mean": {m: self.barrier(m, "max_mean") for m in self.values}, "info": dict(self.info)}

    def plot(self, ax=None, metrics: Sequence[str] | None = None, label: str | None = None):
        """Plot the curves (one axis per metric when ``ax`` is None); returns the matplotlib figure.

        A new figure is a ``matplotlib.figure.Figure`` made without pyplot, so plotting works without a
        display and leaves pyplot's backend and figure list alone; save it with ``fig.savefig(path)``."""
        from matplotlib.figure import Figure

        metrics = list(metrics or self.values)
        if ax is None:
            fig = Figure(figsize=(4.2 * len(metrics), 3.2))
            axes = fig.subplots(1, len(metrics), squeeze=False)[0]
        else:
            axes = [ax] * len(metrics)
            fig = ax.figure
        for a, m in zip(axes, metrics):
            a.plot(self.alphas, self.values[m], marker="o", ms=3, label=label or f"{m} (barrier {self.barrier(m):.3f})")
            lo, hi = self.endpoints(m)
            a.plot([0, 1], [lo, hi], ls="--", c="gray", lw=1)
            a.set_xlabel("alpha (0 = A, 1 = B)")
            a.set_ylabel(m)
            a.legend(fontsize=8)
        fig.tight_layout()
        return fig


def _alpha_grid(alphas) -> list[float]:
    if isinstance(alphas, int):
        if alphas < 2:
            raise ValueError(f"alphas must be at least 2 (both endpoints), got {alphas}")
        return [i / (alphas - 1) for i in range(alphas)]
    grid = [float(a) for a in alphas]
    bad = [a for a in grid if not 0.0 <= a <= 1.0]
    if bad:
        raise ValueError(f"alphas must lie in [0, 1]; got {bad}")
    if not grid or grid[0] != 0.0 or grid[-1] != 1.0 or sorted(grid) != grid:
        raise ValueError("an explicit alpha grid must be increasing and include both endpoints 0 and 1")
    return grid


def resolve_bn(model: nn.Module, bn: str) -> str:
    """The BatchNorm mode ``barrier`` uses for ``model``: "auto" is "reset" with BatchNorm layers, else
    "none"; other modes as they are (``ValueError`` for an unknown one)."""
    if bn not in ("auto", "reset", "repair", "none"):
        raise ValueError(f"bn must be 'auto', 'reset', 'repair' or 'none', got {bn!r}")
    if bn == "auto":
        return "reset" if batchnorm_layers(model) else "none"
    return bn


def needs_reset_loader(model: nn.Module, bn: str) -> bool:
    """Whether ``barrier(model, ..., bn=bn)`` computes statistics from data, and so needs a
    ``reset_loader``: REPAIR always, a BatchNorm reset on a network with BatchNorm."""
    mode = resolve_bn(model, bn)
    return mode == "repair" or (mode == "reset" and bool(batchnorm_layers(model)))


def check_reset_loader(model: nn.Module, bn: str, reset_loader) -> None:
    """Raise ``ValueError`` when ``barrier(model, ..., bn=bn)`` would need statistics data and
    ``reset_loader`` is None (they are never taken from the evaluation data)."""
    if reset_loader is not None or not needs_reset_loader(model, bn):
        return
    mode = resolve_bn(model, bn)
    if mode == "repair":
        what = (f"bn={bn!r} measures per-channel statistics (REPAIR) and recomputes BatchNorm statistics at "
                "each alpha")
    else:
        what = (f"bn={bn!r}" + (" (resolved to 'reset': the network has BatchNorm)" if bn == "auto" else "")
                + " recomputes BatchNorm statistics at each alpha")
    raise ValueError(f"{what} and needs the data to compute them from: pass reset_loader= (training data, "
                     "e.g. data.loader('train', shuffle=False)); they are never computed on the evaluation "
                     "data. Or pass bn='none' to evaluate the interpolated statistics as they are.")


class _Counted:
    """An iterable over ``loader`` that counts the examples of the batches consumed in its latest pass
    (a batch fetched but not used, past ``num_batches``, is not counted)."""

    def __init__(self, loader: Iterable):
        self.loader, self.examples = loader, 0

    def __iter__(self):
        n = 0
        for batch in self.loader:
            yield batch
            n += len(_inputs(batch))  # counted once the consumer asks for the next batch or stops
            self.examples = n


def barrier(a: nn.Module, b, loader: Iterable, *, alphas: int | Sequence[float] = 25,
            metrics: Sequence[str] = METRICS, bn: str = "auto", reset_loader: Iterable | None = None,
            reset_batches: int | None = None, mask: Mapping[str, torch.Tensor] | None = None, device=None,
            progress: bool = True) -> BarrierCurve:
    """Evaluate the linear path between ``a`` and ``b`` (a model or a state dict of the same
    architecture) and return its BarrierCurve.

    Args:
        loader: evaluation data ((input, target) batches); loss = mean cross-entropy, error = 1 - accuracy.
        alphas: a count (the grid linspace(0, 1, n), endpoints included) or an explicit grid in [0, 1].
        bn: "auto" = "reset" when the model has BatchNorm, else "none"; "reset" recomputes BatchNorm
            statistics at every alpha over ``reset_loader``; "repair" applies REPAIR (per-channel
            correction of every hidden Conv/Linear output to the interpolated endpoint statistics,
            measured on ``reset_loader``); "none" evaluates the interpolated weights as they are.
        reset_loader: the data statistics are computed from (training data, in a fixed order), required
            whenever statistics are recomputed: with "repair", and with "reset" (or "auto") on a network
            with BatchNorm. It never defaults to ``loader``, which would leak the evaluation data (the
            test set) into the model. Not needed with "none" or without BatchNorm. The curve records it
            in ``reset_data``.
        reset_batches: use only the first ``reset_batches`` batches of ``reset_loader``.
        mask: weights outside the mask (key -> bool) are zero along the path.

    Raises:
        ValueError: bad settings, or statistics to recompute and no ``reset_loader``.
    """
    mode = resolve_bn(a, bn)
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise ValueError(f"unknown metrics {bad}; available: {METRICS}")
    grid = _alpha_grid(alphas)
    sa = a.state_dict()
    sb = b.state_dict() if isinstance(b, nn.Module) else dict(b)
    if set(sa) != set(sb) or any(sa[k].shape != sb[k].shape for k in sa):
        diff = sorted(set(sa) ^ set(sb)) or [k for k in sa if sa[k].shape != sb[k].shape]
        raise SpecMismatchError(f"A and B are different architectures (first difference: {diff[0]!r}); "
                                "a barrier needs two networks with the same spec")
    check_reset_loader(a, bn, reset_loader)
    counted = _Counted(reset_loader) if needs_reset_loader(a, bn) else None
    reset_loader = counted
    work = copy.deepcopy(a)  # one working copy for the whole path: weights are loaded into it per alpha
    dev = torch.device(device) if device is not None else next(a.parameters()).device
    work.to(dev).eval()
    targets_a = targets_b = None
    if mode == "repair":
        layers = repair_layers(a)
        targets_a = channel_stats(a, reset_loader, layers, reset_batches, dev)
        mb = copy.deepcopy(a)
        mb.load_state_dict(sb)
        targets_b = channel_stats(mb, reset_loader, layers, reset_batches, dev)
        base_state = {k: v for k, v in work.state_dict().items()}
        has_bias = {n: m.bias is not None for n, m in work.named_modules() if n in layers}
    values: dict[str, list[float]] = {m: [] for m in metrics}
    bar = progress_bar(progress, len(grid), f"barrier (bn={mode})")
    buf: dict[str, torch.Tensor] = {}
    for alpha in grid:
        _lerp_into(buf, sa, sb, alpha, mask)
        if mode == "repair":
            for n, hb in has_bias.items():  # REPAIR may have added biases; start from the plain model
                m = dict(work.named_modules())[n]
                if not hb and m.bias is not None:
                    m.bias = None
            work.load_state_dict({k: buf[k] for k in base_state})
            tg = {n: ((1 - alpha) * targets_a[n][0] + alpha * targets_b[n][0],
                      (1 - alpha) * targets_a[n][1] + alpha * targets_b[n][1]) for n in targets_a}
            repair_(work, tg, reset_loader, reset_batches, dev)
            if batchnorm_layers(work):  # BatchNorm after repaired layers: its statistics follow
                reset_bn_(work, reset_loader, reset_batches, dev)
        else:
            work.load_state_dict(buf)
            if mode == "reset":
                reset_bn_(work, reset_loader, reset_batches, dev)
        ev = evaluate(work, loader, dev)
        for m in metrics:
            values[m].append(ev[m])
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    reset_data = f"reset_loader ({counted.examples} examples)" if counted is not None else None
    return BarrierCurve(grid, values, mode, reset_data=reset_data)
