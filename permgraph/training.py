"""A small, resumable trainer that produces the checkpoints the experiments need.

``train(model, data, ...)`` trains with SGD (or Adam), a learning-rate schedule (linear warm-up, then
step / cosine / constant), a data order fixed by ``data_seed`` (independent of the initialisation seed),
checkpoints at a schedule, callbacks, and optional pruning masks that keep pruned weights exactly zero.
``start_step`` runs only the rest of a schedule (IMP retraining from a rewind point, as in open_lth).
Every ``checkpoint_dir`` write is atomic, and a run interrupted at any point resumes from its last
checkpoint to the same result as an uninterrupted run. The resumable state is one safetensors file
(``last.safetensors``, see ``_save_train_state``): nothing permgraph reads is unpickled.
"""

from __future__ import annotations

import functools
import json
import math
import operator
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._eval import evaluate
from .data import Data
from .errors import FileFormatError
from .io import atomic_text as _atomic_text
from .io import save_state_dict
from .io import write_atomically as _write_atomically

Callback = Callable[[dict[str, Any]], None]

STATE_FILE = "last.safetensors"
"""The file in a run's ``checkpoint_dir`` that holds its resumable state (see ``_save_train_state``)."""
_PICKLED_STATE_FILE = "last.pt"  # what earlier versions wrote with torch.save: a pickle, so never loaded
_STATE_KEY = "permgraph.train_state"  # the safetensors metadata entry that holds the JSON document
_STATE_VERSION = 1  # raise it when the layout changes: a reader refuses versions it does not know


@dataclass(frozen=True, repr=False)
class TrainResult:
    """What ``train`` returns.

    Attributes:
        model: the trained model, in eval mode: the module that was passed in (trained in place), or the
            one the factory built.
        history: one metrics dict per finished epoch, oldest first, with ``epoch``, ``step``, ``lr``,
            ``train_loss``, ``train_error`` and, on evaluated epochs, ``test_loss`` and ``test_error``. A
            resumed run's history includes the epochs trained before the interruption.
        checkpoints: unit index -> path of its ``ckpt_{unit}{n}.safetensors`` (empty without a
            ``checkpoint_dir``).
        checkpoint_states: unit index -> state dict (CPU tensors) of each checkpoint, kept in memory when
            no ``checkpoint_dir`` was given (empty with one).
        steps: the step the run ended at: the optimizer steps taken in all, those before a resume
            included, plus ``start_step``.
    """

    model: nn.Module
    history: list[dict[str, Any]]
    checkpoints: dict[int, str]
    checkpoint_states: dict[int, dict[str, torch.Tensor]]
    steps: int

    @property
    def final(self) -> dict[str, Any]:
        """The last epoch's metrics, or ``{}`` if no epoch finished. A copy: changing it leaves
        ``history`` as it is."""
        return dict(self.history[-1]) if self.history else {}

    def __repr__(self) -> str:  # short on purpose: the model and the weights would bury the numbers
        parts = [f"steps={self.steps}", f"epochs={len(self.history)}"]
        if "test_error" in self.final:
            parts.append(f"test_error={self.final['test_error']:.4g}")
        units = sorted(self.checkpoints or self.checkpoint_states)
        if units:
            parts.append(f"checkpoints={units}")
        return f"TrainResult({', '.join(parts)})"


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    # a contiguous copy of its own: safetensors refuses tensors that share memory (tied weights)
    return t.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)


def _save_train_state(path: str, model: nn.Module, opt: torch.optim.Optimizer, dev: torch.device, step: int,
                      history: list[dict[str, Any]], saved: Mapping[int, str], start_step: int = 0) -> None:
    """Write the resumable state of a run to ``path``: one safetensors file, replaced atomically.

    Tensors, bit-exact in their own dtypes:

    * ``model/<key>``: the model's state dict;
    * ``optimizer/<i>/<name>``: the tensors of the optimizer's state of parameter ``i`` (in optimizer
      order): SGD's momentum buffers, Adam's moments and step counts, ...;
    * ``rng/cpu`` and, on CUDA, ``rng/cuda``: the global generators, so that what a resumed run draws
      (dropout) is what the uninterrupted run drew.

    Metadata ``permgraph.train_state``: a JSON document ``{"format_version": 1, "step", "start_step",
    "history", "checkpoints": {unit index: file name in the same folder}, "optimizer": {"class",
    "param_groups", "state": {i: {"tensors": [names], "values": {name: non-tensor value}}}}}``.
    ``start_step`` is the step the run began at (``train(..., start_step=)``; files written before it
    existed lack it and mean 0). Nothing is pickled.
    """
    from safetensors.torch import save_file

    tensors = {f"model/{k}": _cpu_copy(v) for k, v in model.state_dict().items()}
    osd = opt.state_dict()
    opt_state = {}
    for i, st in osd["state"].items():
        names = sorted(k for k, v in st.items() if isinstance(v, torch.Tensor))
        opt_state[str(i)] = {"tensors": names, "values": {k: v for k, v in st.items() if k not in names}}
        tensors.update({f"optimizer/{i}/{k}": _cpu_copy(st[k]) for k in names})
    tensors["rng/cpu"] = torch.get_rng_state()
    if dev.type == "cuda":
        tensors["rng/cuda"] = torch.cuda.get_rng_state(dev)
    doc = {"format_version": _STATE_VERSION, "step": step, "start_step": start_step, "history": history,
           "checkpoints": {str(n): name for n, name in saved.items()},
           "optimizer": {"class": type(opt).__name__, "param_groups": osd["param_groups"], "state": opt_state}}
    metadata = {_STATE_KEY: json.dumps(doc)}  # Python floats survive JSON exactly (repr round-trips)
    _write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _load_train_state(path: str, model: nn.Module, opt: torch.optim.Optimizer, dev: torch.device,
                      start_step: int = 0) -> tuple[int, list[dict[str, Any]], dict[int, str]]:
    """Restore the model, the optimizer and the global generators from a ``_save_train_state`` file and
    return (step, history, unit index -> checkpoint file name). Run it inside ``torch.random.fork_rng``
    (``train`` does), since it sets the generators.

    Raises ``FileFormatError``, naming ``path``, if the file is truncated, is not a permgraph training
    state, belongs to another model or optimizer, or to a run that began at another step than
    ``start_step``; then nothing has been changed. The file is only ever
    parsed as safetensors and JSON, so a malicious one cannot run code.
    """
    from safetensors import SafetensorError, safe_open

    def bad(problem: str) -> FileFormatError:
        return FileFormatError(f"training state {path} {problem}; delete it to restart training from the "
                               "beginning (or train with resume=False, which overwrites it)")

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise bad(f"is truncated or not a safetensors file ({e})") from None
    if _STATE_KEY not in metadata:
        raise bad(f"is not a permgraph training state (its metadata has no {_STATE_KEY!r} entry)")
    try:
        doc = json.loads(metadata[_STATE_KEY])
    except ValueError as e:
        raise bad(f"has a damaged {_STATE_KEY!r} entry ({e})") from None
    version = doc.get("format_version") if isinstance(doc, dict) else None
    if version != _STATE_VERSION:
        raise bad(f"has format version {version!r}; this permgraph reads version {_STATE_VERSION}")
    try:
        step, history, began = doc["step"], doc["history"], doc.get("start_step", 0)
        saved = {int(n): name for n, name in doc["checkpoints"].items()}
        cls, groups = doc["optimizer"]["class"], doc["optimizer"]["param_groups"]
        opt_state = {int(i): (e["tensors"], e["values"]) for i, e in doc["optimizer"]["state"].items()}
        if not (isinstance(step, int) and step >= 0 and isinstance(began, int) and began >= 0
                and isinstance(history, list)
                and all(isinstance(r, dict) for r in history) and isinstance(groups, list)
                and all(isinstance(g, dict) for g in groups)
                and all(isinstance(v, dict) and all(isinstance(n, str) for n in t) for t, v in opt_state.values())
                # plain names in the run's folder: the paths returned are built from them
                and all(isinstance(n, str) and n == os.path.basename(n) for n in saved.values())):
            raise ValueError("a field has the wrong type")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise bad(f"has a malformed {_STATE_KEY!r} entry ({type(e).__name__}: {e})") from None

    # check everything against this run before changing anything
    if began != start_step:
        raise bad(f"was written by a run that began at step {began}, this run begins at step {start_step} "
                  "(start_step=)")
    if step < start_step:
        raise bad(f"is at step {step}, before this run's start_step {start_step}")
    if cls != type(opt).__name__:
        raise bad(f"was written with the {cls} optimizer, this run uses {type(opt).__name__}")
    own = model.state_dict()
    weights = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    differ = sorted(set(own) ^ set(weights)) or [k for k in own if own[k].shape != weights[k].shape]
    if differ:
        raise bad(f"holds the weights of another model (first difference: {differ[0]!r})")
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {}
    for i, (names, values) in opt_state.items():
        if not 0 <= i < len(params):
            raise bad(f"holds optimizer state of parameter {i}; the model has {len(params)}")
        state[i] = dict(values)
        for name in names:
            t = tensors.get(f"optimizer/{i}/{name}")
            if t is None or (t.dim() and t.shape != params[i].shape):  # 0-dim: step counts
                raise bad(f"lacks the optimizer tensor optimizer/{i}/{name} or it has the wrong shape")
            state[i][name] = t
    if len(groups) != len(opt.param_groups):
        raise bad(f"has {len(groups)} optimizer parameter groups, this run {len(opt.param_groups)}")
    # JSON turned tuples (Adam's betas) into lists; give them back the type the optimizer was built with
    groups = [{k: tuple(v) if isinstance(live.get(k), tuple) and isinstance(v, list) else v for k, v in g.items()}
              for g, live in zip(groups, opt.param_groups)]
    # the CPU generator is always saved, CUDA's by runs on CUDA only: a run moved from the CPU to CUDA
    # draws on from CUDA's generator as it stands
    def generator_state_like(t: torch.Tensor | None, like: torch.Tensor) -> bool:
        return t is not None and t.dtype == like.dtype and t.shape == like.shape

    rng_cpu = tensors.get("rng/cpu")
    rng_cuda = tensors.get("rng/cuda") if dev.type == "cuda" else None
    if not generator_state_like(rng_cpu, torch.get_rng_state()):
        raise bad("lacks the CPU generator's state rng/cpu, or it is not one")
    if rng_cuda is not None and not generator_state_like(rng_cuda, torch.cuda.get_rng_state(dev)):
        raise bad("has a CUDA generator state rng/cuda that is not one")

    try:  # torch checks the groups' sizes before it changes the optimizer
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, TypeError) as e:
        raise bad(f"does not fit this run's optimizer ({e})") from None
    model.load_state_dict(weights)
    torch.set_rng_state(rng_cpu)
    if rng_cuda is not None:
        torch.cuda.set_rng_state(rng_cuda, dev)
    return step, history, saved


def _cuda_devices_to_fork(model: nn.Module | Callable[[], nn.Module], device) -> list[int]:
    """The CUDA devices whose generators a run of ``train`` or ``imp`` may seed or draw from (the CPU's
    is always forked).

    ``torch.manual_seed`` reseeds every CUDA generator, so all of them are forked once CUDA is in use:
    when the run is on CUDA, or the caller has initialised CUDA. Otherwise none, so that a CPU run does
    not initialise CUDA (a factory that builds on CUDA by itself initialises it within the run; the
    caller had no CUDA generator state to keep).
    """
    if device is not None:
        target = torch.device(device)
    elif isinstance(model, nn.Module):
        target = next(model.parameters(), torch.empty(0)).device
    else:
        target = torch.device("cpu")
    if target.type == "cuda" or torch.cuda.is_initialized():
        return list(range(torch.cuda.device_count()))
    return []


def _keeps_global_rng(fn):
    """Run ``fn(model, data, ..., device=...)`` (``train``, ``prune.imp``) inside ``torch.random.fork_rng``:
    seeding, building and training draw from the global generators exactly as if they were not forked,
    and the caller finds the generators as it left them."""

    @functools.wraps(fn)
    def run(model, *args, **kwargs):
        devices = _cuda_devices_to_fork(model, kwargs.get("device"))
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            return fn(model, *args, **kwargs)

    return run


def _batch(ds, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from torch.utils.data import TensorDataset

    if isinstance(ds, TensorDataset):
        return ds.tensors[0][idx], ds.tensors[1][idx]
    items = [ds[int(i)] for i in idx]
    return torch.stack([t[0] for t in items]), torch.as_tensor([int(t[1]) for t in items])


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


@_keeps_global_rng
def train(model: nn.Module | Callable[[], nn.Module], data: Data, *, epochs: int | None = None,
          steps: int | None = None, batch_size: int = 128, optimizer: str = "sgd", lr: float = 0.1,
          momentum: float = 0.9, weight_decay: float = 5e-4, schedule: str = "step", warmup: int = 0,
          milestones: Iterable[int] = (), gamma: float = 0.1, init_seed: int | None = None, data_seed: int = 0,
          checkpoints: Iterable[int] = (), checkpoint_unit: str = "epoch", checkpoint_dir: str | None = None,
          mask: Mapping[str, torch.Tensor] | None = None, init_state: Mapping[str, torch.Tensor] | None = None,
          callbacks: Iterable[Callback] = (), eval_every: int = 1, eval_subset: int | None = None,
          progress: bool = True, device=None, resume: bool = True, start_step: int = 0) -> TrainResult:
    """Train ``model`` (or build it from a factory with ``init_seed``) on ``data``.

    The global torch generators (CPU, and CUDA's once in use) are forked for the run: seeding, building
    and training draw from them as they are, and the caller finds them unchanged afterwards. So a factory
    called without ``init_seed`` builds the same weights on every call until the caller draws or seeds.

    Args:
        epochs / steps: length of training (give one). ``warmup``, ``milestones`` are in optimizer steps
            when ``steps`` is given, in epochs otherwise.
        schedule: "step" (x ``gamma`` at each milestone), "cosine" or "constant", after linear warm-up.
        init_seed: the factory is called after ``torch.manual_seed(init_seed)`` (ignored for a module).
            ``data_seed`` alone fixes the order of the training data (the two are independent).
        checkpoints: when to save weights (in ``checkpoint_unit`` = "epoch" or "step"; 0 = the initial
            weights). Saved as ``checkpoint_dir/ckpt_{unit}{n}.safetensors``.
        checkpoint_dir: where checkpoints, the resumable state (``last.safetensors``, rewritten after
            every epoch) and the metrics log (``metrics.jsonl``) go. Without it nothing is written.
        mask: state-dict key -> bool tensor; masked weights are zero at the start and stay exactly zero
            through every step (gradients and momentum are masked too).
        init_state: load these weights before training (e.g. an IMP rewind point).
        start_step: run only optimizer steps ``start_step .. total - 1`` of the schedule (0 = all of it):
            the learning rate and the data order are those of a full run at the same steps, so training
            from step k's weights with ``start_step=k`` continues a run as open_lth's retraining after
            rewinding does. The optimizer starts fresh (no momentum or Adam moments), as in open_lth.
            Epochs keep their place in the schedule: ``history`` counts from epoch
            ``start_step // steps_per_epoch + 1`` (a first partial epoch when ``start_step`` falls inside
            one), and checkpoints before ``start_step`` are an error (the checkpoint at ``start_step`` is
            the starting weights).
        callbacks: functions called with a dict (event, epoch, step, model, metrics) after every epoch.
        resume: continue from ``checkpoint_dir/last.safetensors`` when it exists: the weights, the
            optimizer's state, the generators, the step and the history, so that the result is
            bit-identical to an uninterrupted run's (not with ``augment=True`` data, whose augmentation
            generator belongs to the data set). A ``last.pt`` (the pickle earlier versions wrote) is
            never loaded, as unpickling can run code: a warning says so.

    Returns:
        a ``TrainResult``: ``.model`` (trained, in eval mode), ``.history`` (one metrics dict per epoch),
        ``.final`` (the last of them), ``.checkpoints`` (unit index -> path, with a ``checkpoint_dir``),
        ``.checkpoint_states`` (unit index -> weights, without one) and ``.steps`` (the step reached:
        ``start_step`` plus the steps taken).

    Raises:
        ValueError: invalid settings, or a mask that does not fit the model.
        FileFormatError: ``last.safetensors`` is truncated, not a permgraph training state, or the state
            of another model, optimizer or ``start_step`` (the message names the file; delete it to
            restart).
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
    try:
        if isinstance(start_step, bool):
            raise TypeError
        start_step = operator.index(start_step)  # ints, NumPy ints; not floats
    except TypeError:
        raise ValueError(f"start_step must be an int in 0..{total} (the run's steps), got {start_step!r}") from None
    if not 0 <= start_step <= total:
        raise ValueError(f"start_step must be an int in 0..{total} (the run's steps), got {start_step!r}")
    ckpts = sorted({int(c) for c in checkpoints})
    limit = (n_epochs if checkpoint_unit == "epoch" else total)
    first = start_step if checkpoint_unit == "step" else -(-start_step // per_epoch)  # first reachable unit
    bad = [c for c in ckpts if c < first or c > limit]
    if bad:
        raise ValueError(f"checkpoints {bad} are outside the run ({first}..{limit} {checkpoint_unit}s"
                         + (f": it starts at step {start_step}" if start_step else "") + ")")

    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    elif optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer must be 'sgd', 'adam' or 'adamw', got {optimizer!r}")

    step, history, saved = start_step, [], {}
    last = os.path.join(checkpoint_dir, STATE_FILE) if checkpoint_dir else None
    if resume and checkpoint_dir:
        pickled = os.path.join(checkpoint_dir, _PICKLED_STATE_FILE)
        if os.path.exists(pickled):
            then = "resumes from " + STATE_FILE if os.path.exists(last) else "restarts from the beginning"
            warnings.warn(f"{pickled} is an old pickle-based training state: it is not loaded, for safety "
                          f"(unpickling can run code), and training {then}. Delete it to silence this warning.",
                          stacklevel=3)  # 3: the caller of train, past the _keeps_global_rng wrapper
        if os.path.exists(last):
            step, history, saved = _load_train_state(last, model, opt, dev, start_step)

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
            _save_train_state(last, model, opt, dev, step, history, saved, start_step)

    log_path = os.path.join(checkpoint_dir, "metrics.jsonl") if checkpoint_dir else None
    eval_loader = data.loader("test", 512, shuffle=False, subset=eval_subset)
    if checkpoint_unit == "step":  # the starting weights, when the start is a checkpoint unit
        maybe_checkpoint(start_step)
    elif start_step % per_epoch == 0:
        maybe_checkpoint(start_step // per_epoch)
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
    return TrainResult(model=model, history=history, checkpoints=paths, checkpoint_states=in_memory, steps=step)
