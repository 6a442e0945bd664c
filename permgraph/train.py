"""A small, resumable trainer that produces the checkpoints the experiments need.

``train(model, data, ...)`` trains with SGD (or Adam), a learning-rate schedule (linear warm-up, then
step / cosine / constant), a data order fixed by ``data_seed`` (independent of the initialisation seed),
checkpoints at a schedule, callbacks, and optional pruning masks that keep pruned weights exactly zero.
Every ``checkpoint_dir`` write is atomic, and a run interrupted at any point resumes from its last
checkpoint to the same result as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._eval import evaluate
from .data import Data

Callback = Callable[[dict[str, Any]], None]


def _atomic_save(obj, path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _atomic_text(text: str, path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _batch(ds, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from torch.utils.data import TensorDataset

    if isinstance(ds, TensorDataset):
        return ds.tensors[0][idx], ds.tensors[1][idx]
    items = [ds[int(i)] for i in idx]
    return torch.stack([t[0] for t in items]), torch.as_tensor([int(t[1]) for t in items])


def save_state_dict(state: Mapping[str, torch.Tensor], path: str) -> None:
    """Write a state dict as safetensors, atomically."""
    from safetensors.torch import save_file

    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def lr_at(step: int, total: int, lr: float, schedule: str, warmup: int, milestones: Iterable[int],
          gamma: float) -> float:
    """The learning rate at optimizer step ``step`` (0-based) of ``total``."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    if schedule == "step":
        return lr * gamma ** sum(step >= m for m in milestones)
    if schedule == "cosine":
        t = (step - warmup) / max(1, total - warmup)
        return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    raise ValueError(f"schedule must be 'constant', 'step' or 'cosine', got {schedule!r}")


def apply_mask_(model: nn.Module, mask: Mapping[str, torch.Tensor] | None) -> None:
    """Zero the masked-out weights of ``model`` in place."""
    if not mask:
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, m in mask.items():
            params[k].mul_(m.to(params[k].device, params[k].dtype))


def train(model: nn.Module | Callable[[], nn.Module], data: Data, *, epochs: int | None = None,
          steps: int | None = None, batch_size: int = 128, optimizer: str = "sgd", lr: float = 0.1,
          momentum: float = 0.9, weight_decay: float = 5e-4, schedule: str = "step", warmup: int = 0,
          milestones: Iterable[int] = (), gamma: float = 0.1, init_seed: int | None = None, data_seed: int = 0,
          checkpoints: Iterable[int] = (), checkpoint_unit: str = "epoch", checkpoint_dir: str | None = None,
          mask: Mapping[str, torch.Tensor] | None = None, init_state: Mapping[str, torch.Tensor] | None = None,
          callbacks: Iterable[Callback] = (), eval_every: int = 1, eval_subset: int | None = None,
          progress: bool = True, device=None, resume: bool = True) -> dict[str, Any]:
    """Train ``model`` (or build it from a factory with ``init_seed``) on ``data``.

    Args:
        epochs / steps: length of training (give one). ``warmup``, ``milestones`` are in optimizer steps
            when ``steps`` is given, in epochs otherwise.
        schedule: "step" (x ``gamma`` at each milestone), "cosine" or "constant", after linear warm-up.
        init_seed: seeds ``torch.manual_seed`` before calling a model factory. ``data_seed`` alone fixes
            the order of the training data (the two are independent).
        checkpoints: when to save weights (in ``checkpoint_unit`` = "epoch" or "step"; 0 = the initial
            weights). Saved as ``checkpoint_dir/ckpt_{unit}{n}.safetensors``.
        checkpoint_dir: where checkpoints, the resumable state (``last.pt``) and the metrics log
            (``metrics.jsonl``) go. Without it nothing is written.
        mask: state-dict key -> bool tensor; masked weights are zero at the start and stay exactly zero
            through every step (gradients and momentum are masked too).
        init_state: load these weights before training (e.g. an IMP rewind point).
        callbacks: functions called with a dict (event, epoch, step, model, metrics) after every epoch.
        resume: continue from ``checkpoint_dir/last.pt`` when it exists.

    Returns:
        a dict with the final "model", the per-epoch "history" (list of metric dicts), "checkpoints"
        (unit index -> path) and, without a checkpoint_dir, "checkpoint_states" (unit index -> weights).
    """
    if (epochs is None) == (steps is None):
        raise ValueError("give exactly one of epochs= or steps=")
    if checkpoint_unit not in ("epoch", "step"):
        raise ValueError(f"checkpoint_unit must be 'epoch' or 'step', got {checkpoint_unit!r}")
    if not isinstance(model, nn.Module):
        if init_seed is not None:
            torch.manual_seed(init_seed)
        model = model()
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(dev)
    if init_state is not None:
        model.load_state_dict(init_state)
    mask = {k: v.to(dev, torch.bool) for k, v in (mask or {}).items()}
    params = dict(model.named_parameters())
    unknown = [k for k in mask if k not in params]
    if unknown:
        raise ValueError(f"mask names tensors that are not parameters of the model: {unknown[:3]}")
    for k, m in mask.items():
        if m.shape != params[k].shape:
            raise ValueError(f"mask for {k} has shape {tuple(m.shape)}, the weight {tuple(params[k].shape)}")
    apply_mask_(model, mask)

    n_train = len(data.train)
    per_epoch = math.ceil(n_train / batch_size)
    total = steps if steps is not None else epochs * per_epoch
    unit_steps = 1 if steps is not None else per_epoch
    warm = warmup * unit_steps
    miles = [m * unit_steps for m in milestones]
    n_epochs = math.ceil(total / per_epoch)
    ckpts = sorted({int(c) for c in checkpoints})
    limit = (n_epochs if checkpoint_unit == "epoch" else total)
    bad = [c for c in ckpts if c < 0 or c > limit]
    if bad:
        raise ValueError(f"checkpoints {bad} are outside the run (0..{limit} {checkpoint_unit}s)")

    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    elif optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer must be 'sgd', 'adam' or 'adamw', got {optimizer!r}")

    step, history, saved = 0, [], {}
    last = os.path.join(checkpoint_dir, "last.pt") if checkpoint_dir else None
    if resume and last and os.path.exists(last):
        st = torch.load(last, map_location=dev, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        step, history, saved = st["step"], st["history"], st["checkpoints"]

    def ckpt_path(n: int) -> str:
        return os.path.join(checkpoint_dir, f"ckpt_{checkpoint_unit}{n}.safetensors")

    in_memory: dict[int, dict[str, torch.Tensor]] = {}

    def maybe_checkpoint(unit_index: int) -> None:
        if unit_index not in ckpts or unit_index in saved or unit_index in in_memory:
            return
        if checkpoint_dir:
            save_state_dict(model.state_dict(), ckpt_path(unit_index))
            saved[unit_index] = os.path.basename(ckpt_path(unit_index))
        else:  # nothing is written unless asked: keep the weights in memory
            in_memory[unit_index] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    def save_last() -> None:
        if last:
            _atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                          "history": history, "checkpoints": saved}, last)

    log_path = os.path.join(checkpoint_dir, "metrics.jsonl") if checkpoint_dir else None
    eval_loader = data.loader("test", 512, shuffle=False, subset=eval_subset)
    maybe_checkpoint(0)
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=step, desc="training", unit="step", leave=False, disable=None)
        except ImportError:
            bar = None
    model.train()
    while step < total:
        epoch = step // per_epoch
        gen = torch.Generator().manual_seed(data_seed * 100_003 + epoch)
        order = torch.randperm(n_train, generator=gen)
        start = step - epoch * per_epoch
        run_loss, run_wrong, run_n = 0.0, 0, 0
        for b in range(start, per_epoch):
            if step >= total:
                break
            idx = order[b * batch_size:(b + 1) * batch_size]
            x, y = _batch(data.train, idx)
            x, y = x.to(dev), y.to(dev)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, lr, schedule, warm, miles, gamma)
            opt.zero_grad(set_to_none=True)
            out = model(x)
            loss = F.cross_entropy(out, y)
            loss.backward()
            if mask:
                for k, m in mask.items():
                    if params[k].grad is not None:
                        params[k].grad.mul_(m)
            opt.step()
            apply_mask_(model, mask)
            step += 1
            run_loss += float(loss.detach()) * len(y)
            run_wrong += int((out.argmax(1) != y).sum())
            run_n += len(y)
            if bar is not None:
                bar.update(1)
            if checkpoint_unit == "step":
                maybe_checkpoint(step)
        done_epoch = step % per_epoch == 0 or step >= total
        if done_epoch:
            e = epoch + 1
            rec = {"epoch": e, "step": step, "lr": opt.param_groups[0]["lr"],
                   "train_loss": run_loss / max(run_n, 1), "train_error": run_wrong / max(run_n, 1)}
            if eval_every and (e % eval_every == 0 or step >= total):
                ev = evaluate(model, eval_loader, dev)
                model.train()
                rec.update({"test_loss": ev["loss"], "test_error": ev["error"]})
            history.append(rec)
            if checkpoint_unit == "epoch":
                maybe_checkpoint(e)
            save_last()
            if log_path:  # rewritten whole from the saved history, so a resumed run logs each epoch once
                _atomic_text("".join(json.dumps(r) + "\n" for r in history), log_path)
            for cb in callbacks:
                cb({"event": "epoch_end", "epoch": e, "step": step, "model": model, "metrics": rec})
    if bar is not None:
        bar.close()
    model.eval()
    paths = {k: os.path.join(checkpoint_dir, v) for k, v in saved.items()} if checkpoint_dir else {}
    return {"model": model, "history": history, "checkpoints": paths, "checkpoint_states": in_memory,
            "steps": step}
