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

import dataclasses
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
from ._progress import progress_bar
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


@dataclass(frozen=True)
class TrainConfig:
    """The schedule of a training run: its length, batch size, optimizer, learning rates, checkpoints and
    evaluation. With the model, the data, the seeds and the mask it decides the weights a run ends with.

    ``train(model, data, config)`` uses it; keyword arguments of ``train`` with these names override its
    fields (``train(model, data, epochs=10, lr=0.05)`` builds one). ``config.replace(lr=0.01)`` gives a
    changed copy.

    Attributes:
        epochs / steps: length of training (give one). ``warmup`` and ``milestones`` are in optimizer steps
            when ``steps`` is given, in epochs otherwise.
        batch_size: training batch size (the last batch of an epoch may be smaller).
        optimizer: "sgd" (with ``momentum``), "adam" or "adamw"; ``weight_decay`` applies to all three.
        lr, schedule, warmup, milestones, gamma: the learning rate ``lr`` follows ``schedule`` ("step": x
            ``gamma`` at each milestone, "cosine" or "constant") after a linear warm-up of ``warmup`` units.
        checkpoints: when to keep the weights, in ``checkpoint_unit`` = "epoch" or "step" (0 = the initial
            weights).
        eval_every: evaluate on the test split every this many epochs (and after the last; 0 = never).
        eval_subset: evaluate on the first this many test examples only (None = all).
    """

    epochs: int | None = None
    steps: int | None = None
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "step"
    warmup: int = 0
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    checkpoints: tuple[int, ...] = ()
    checkpoint_unit: str = "epoch"
    eval_every: int = 1
    eval_subset: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        object.__setattr__(self, "checkpoints", tuple(sorted({int(c) for c in self.checkpoints})))

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` (field names of TrainConfig; another name is a TypeError)."""
        unknown = sorted(set(changes) - _CONFIG_FIELDS)
        if unknown:
            raise TypeError(f"unknown training setting(s) {unknown}; TrainConfig has {sorted(_CONFIG_FIELDS)}")
        return dataclasses.replace(self, **changes)

    def check(self) -> None:
        """Raise ValueError naming the first invalid setting."""
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("give exactly one of epochs= or steps=")
        for name in ("epochs" if self.steps is None else "steps", "batch_size"):
            if not _positive_int(getattr(self, name)):
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.optimizer not in ("sgd", "adam", "adamw"):
            raise ValueError(f"optimizer must be 'sgd', 'adam' or 'adamw', got {self.optimizer!r}")
        if self.schedule not in ("step", "cosine", "constant"):
            raise ValueError(f"schedule must be 'constant', 'step' or 'cosine', got {self.schedule!r}")
        if self.checkpoint_unit not in ("epoch", "step"):
            raise ValueError(f"checkpoint_unit must be 'epoch' or 'step', got {self.checkpoint_unit!r}")


def _as_int(v) -> int | None:
    """``v`` as an int when it is one (ints, NumPy ints; not bools or floats), else None."""
    if isinstance(v, bool):
        return None
    try:
        return operator.index(v)
    except TypeError:
        return None


def _positive_int(v) -> bool:
    i = _as_int(v)
    return i is not None and i >= 1


_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig))


@dataclass(frozen=True)
class _Steps:
    """A config's schedule in optimizer steps, for a training set of ``n_train`` examples."""

    per_epoch: int
    total: int
    warmup: int
    milestones: tuple[int, ...]

    @classmethod
    def of(cls, cfg: TrainConfig, n_train: int) -> _Steps:
        per_epoch = math.ceil(n_train / cfg.batch_size)
        unit = 1 if cfg.steps is not None else per_epoch
        total = cfg.steps if cfg.steps is not None else cfg.epochs * per_epoch
        return cls(per_epoch, total, cfg.warmup * unit, tuple(m * unit for m in cfg.milestones))

    @property
    def epochs(self) -> int:
        return math.ceil(self.total / self.per_epoch)

    def lr(self, cfg: TrainConfig, step: int) -> float:
        return lr_at(step, self.total, cfg.lr, cfg.schedule, self.warmup, self.milestones, cfg.gamma)

    def start(self, start_step) -> int:
        """``start_step`` checked against the run: an int in 0..total."""
        i = _as_int(start_step)
        if i is None or not 0 <= i <= self.total:
            raise ValueError(f"start_step must be an int in 0..{self.total} (the run's steps), got {start_step!r}")
        return i


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def _checked_mask(model: nn.Module, mask, dev: torch.device) -> dict[str, torch.Tensor]:
    mask = {k: v.to(dev, torch.bool) for k, v in (mask or {}).items()}
    params = dict(model.named_parameters())
    unknown = [k for k in mask if k not in params]
    if unknown:
        raise ValueError(f"mask names tensors that are not parameters of the model: {unknown[:3]}")
    for k, m in mask.items():
        if m.shape != params[k].shape:
            raise ValueError(f"mask for {k} has shape {tuple(m.shape)}, the weight {tuple(params[k].shape)}")
    return mask


class _Checkpoints:
    """The checkpoints a run keeps: files in ``directory``, or state dicts in memory without one."""

    def __init__(self, cfg: TrainConfig, steps: _Steps, start_step: int, directory: str | None):
        self.unit, self.wanted, self.directory = cfg.checkpoint_unit, cfg.checkpoints, directory
        limit = steps.epochs if self.unit == "epoch" else steps.total
        first = start_step if self.unit == "step" else -(-start_step // steps.per_epoch)  # first reachable unit
        bad = [c for c in self.wanted if c < first or c > limit]
        if bad:
            raise ValueError(f"checkpoints {bad} are outside the run ({first}..{limit} {self.unit}s"
                             + (f": it starts at step {start_step}" if start_step else "") + ")")
        self.saved: dict[int, str] = {}  # unit index -> file name in directory
        self.in_memory: dict[int, dict[str, torch.Tensor]] = {}

    def keep(self, index: int, model: nn.Module) -> None:
        """Keep the weights as checkpoint ``index`` of the unit, if it is one and not kept yet."""
        if index not in self.wanted or index in self.saved or index in self.in_memory:
            return
        if self.directory:
            name = f"ckpt_{self.unit}{index}.safetensors"
            save_state_dict(model.state_dict(), os.path.join(self.directory, name))
            self.saved[index] = name
        else:  # nothing is written unless asked: keep the weights in memory
            self.in_memory[index] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    def paths(self) -> dict[int, str]:
        return {k: os.path.join(self.directory, v) for k, v in self.saved.items()} if self.directory else {}


@_keeps_global_rng
def train(model: nn.Module | Callable[[], nn.Module], data: Data, config: TrainConfig | None = None, *,
          init_seed: int | None = None, data_seed: int = 0, checkpoint_dir: str | None = None,
          mask: Mapping[str, torch.Tensor] | None = None, init_state: Mapping[str, torch.Tensor] | None = None,
          callbacks: Iterable[Callback] = (), progress: bool = True, device=None, resume: bool = True,
          start_step: int = 0, **settings: Any) -> TrainResult:
    """Train ``model`` (or build it from a factory with ``init_seed``) on ``data``.

    The global torch generators (CPU, and CUDA's once in use) are forked for the run: seeding, building
    and training draw from them as they are, and the caller finds them unchanged afterwards. So a factory
    called without ``init_seed`` builds the same weights on every call until the caller draws or seeds.

    Args:
        config: the schedule (a ``TrainConfig``: length, batch size, optimizer, learning rates,
            checkpoints, evaluation). ``**settings`` are fields of TrainConfig that override it, so
            ``train(model, data, epochs=10, lr=0.05)`` works without one.
        init_seed: the factory is called after ``torch.manual_seed(init_seed)`` (ignored for a module).
            ``data_seed`` alone fixes the order of the training data (the two are independent).
        checkpoint_dir: where checkpoints (``ckpt_{unit}{n}.safetensors``), the resumable state
            (``last.safetensors``, rewritten after every epoch) and the metrics log (``metrics.jsonl``) go.
            Without it nothing is written, and checkpoints stay in memory.
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
        TypeError: a keyword argument that is neither an argument of train nor a TrainConfig field.
        ValueError: invalid settings, or a mask that does not fit the model.
        FileFormatError: ``last.safetensors`` is truncated, not a permgraph training state, or the state
            of another model, optimizer or ``start_step`` (the message names the file; delete it to
            restart).
    """
    unknown = sorted(set(settings) - _CONFIG_FIELDS)
    if unknown:
        raise TypeError(f"train() got unexpected keyword argument(s) {unknown}; the training settings are "
                        f"{sorted(_CONFIG_FIELDS)} (TrainConfig fields)")
    cfg = (config or TrainConfig()).replace(**settings)
    cfg.check()
    steps = _Steps.of(cfg, len(data.train))
    start_step = steps.start(start_step)
    if not isinstance(model, nn.Module):
        if init_seed is not None:
            torch.manual_seed(init_seed)
        model = model()
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(dev)
    if init_state is not None:
        model.load_state_dict(init_state)
    mask = _checked_mask(model, mask, dev)
    apply_mask_(model, mask)
    ckpts = _Checkpoints(cfg, steps, start_step, checkpoint_dir)
    opt = _optimizer(model, cfg)

    step, history = start_step, []
    last = os.path.join(checkpoint_dir, STATE_FILE) if checkpoint_dir else None
    if resume and checkpoint_dir:
        pickled = os.path.join(checkpoint_dir, _PICKLED_STATE_FILE)
        if os.path.exists(pickled):
            then = "resumes from " + STATE_FILE if os.path.exists(last) else "restarts from the beginning"
            warnings.warn(f"{pickled} is an old pickle-based training state: it is not loaded, for safety "
                          f"(unpickling can run code), and training {then}. Delete it to silence this warning.",
                          stacklevel=3)  # 3: the caller of train, past the _keeps_global_rng wrapper
        if os.path.exists(last):
            step, history, ckpts.saved = _load_train_state(last, model, opt, dev, start_step)

    log_path = os.path.join(checkpoint_dir, "metrics.jsonl") if checkpoint_dir else None
    eval_loader = data.loader("test", 512, shuffle=False, subset=cfg.eval_subset)
    if cfg.checkpoint_unit == "step":  # the starting weights, when the start is a checkpoint unit
        ckpts.keep(start_step, model)
    elif start_step % steps.per_epoch == 0:
        ckpts.keep(start_step // steps.per_epoch, model)
    bar = progress_bar(progress, steps.total, "training", initial=step, unit="step")
    model.train()
    while step < steps.total:
        epoch = step // steps.per_epoch
        # the rest of the epoch (all of it, but for a start_step inside it), or up to the end of training
        step, rec = _train_epoch(model, opt, data.train, cfg, steps, step, data_seed, mask, dev, bar, ckpts)
        e = epoch + 1
        rec = {"epoch": e, "step": step, "lr": opt.param_groups[0]["lr"], **rec}
        if cfg.eval_every and (e % cfg.eval_every == 0 or step >= steps.total):
            ev = evaluate(model, eval_loader, dev)
            model.train()
            rec.update({"test_loss": ev["loss"], "test_error": ev["error"]})
        history.append(rec)
        if cfg.checkpoint_unit == "epoch":
            ckpts.keep(e, model)
        if last:
            _save_train_state(last, model, opt, dev, step, history, ckpts.saved, start_step)
        if log_path:  # rewritten whole from the saved history, so a resumed run logs each epoch once
            _atomic_text("".join(json.dumps(r) + "\n" for r in history), log_path)
        for cb in callbacks:
            cb({"event": "epoch_end", "epoch": e, "step": step, "model": model, "metrics": rec})
    if bar is not None:
        bar.close()
    model.eval()
    return TrainResult(model=model, history=history, checkpoints=ckpts.paths(), checkpoint_states=ckpts.in_memory,
                       steps=step)


def _train_epoch(model: nn.Module, opt: torch.optim.Optimizer, train_set, cfg: TrainConfig, steps: _Steps,
                 step: int, data_seed: int, mask: Mapping[str, torch.Tensor], dev: torch.device, bar,
                 ckpts: _Checkpoints) -> tuple[int, dict[str, float]]:
    """Run the rest of the epoch that ``step`` lies in (to the end of training at most); return the step
    reached and the epoch's training loss and error (over the steps run here)."""
    params = dict(model.named_parameters())
    epoch = step // steps.per_epoch
    gen = torch.Generator().manual_seed(data_seed * 100_003 + epoch)
    order = torch.randperm(len(train_set), generator=gen)
    run_loss, run_wrong, run_n = 0.0, 0, 0
    for b in range(step - epoch * steps.per_epoch, steps.per_epoch):
        if step >= steps.total:
            break
        x, y = _batch(train_set, order[b * cfg.batch_size:(b + 1) * cfg.batch_size])
        x, y = x.to(dev), y.to(dev)
        for g in opt.param_groups:
            g["lr"] = steps.lr(cfg, step)
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
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
        if cfg.checkpoint_unit == "step":
            ckpts.keep(step, model)
    return step, {"train_loss": run_loss / max(run_n, 1), "train_error": run_wrong / max(run_n, 1)}
