"""Masks, magnitude pruning, IMP with rewinding, and IMP mask transfer across seeds.

Conventions:

* A ``Mask`` maps the state-dict keys of the *prunable* tensors (by default the weights of Linear and
  Conv layers; biases and norms never) to boolean tensors of the same shapes; True = kept.
* ``magnitude(..., fraction)`` prunes ``fraction`` of the weights that are *still unpruned*, by
  magnitude, globally (default) or per tensor; ties are broken by position, so counts are exact.
* IMP (Frankle et al.; open_lth): level 0 trains dense and keeps the weights at the rewind point; level L
  prunes level L-1's trained weights, rewinds the survivors to the rewind point and retrains. By default
  (``retrain="continue"``) retraining runs the rest of level 0's schedule, from the rewind step to the
  end (its learning rates and data order); ``retrain="restart"`` trains a whole schedule from step 0.
* Mask transfer: ``alignment = align(a, b)`` maps B's units onto A's; a mask in A's unit order moves into
  B's unit order by the *inverse* permutation: ``transfer_mask(mask_a, alignment) ==
  alignment.inverse().apply(mask_a)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import SpecMismatchError
from .training import _keeps_global_rng

PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                  nn.ConvTranspose3d)


# ---------------------------------------------------------------------------------------------- Mask
class Mask(Mapping[str, torch.Tensor]):
    """Boolean keep-masks of the prunable tensors (True = kept), validated on construction.

    Args:
        masks: key -> tensor of 0/1 or bool values.
        reference: optional model or state dict; every key must exist there with the same shape.
    """

    def __init__(self, masks: Mapping[str, torch.Tensor], reference=None):
        self._m: dict[str, torch.Tensor] = {}
        for k, v in masks.items():
            t = torch.as_tensor(v)
            if t.dtype != torch.bool:
                if not torch.all((t == 0) | (t == 1)):
                    raise ValueError(f"mask for {k!r} holds values other than 0 and 1")
                t = t.bool()
            self._m[k] = t.detach()
        if reference is not None:
            self.check(reference)

    def check(self, reference) -> None:
        sd = reference.state_dict() if isinstance(reference, nn.Module) else reference
        for k, t in self._m.items():
            if k not in sd:
                raise SpecMismatchError(f"mask key {k!r} is not a tensor of the model")
            if tuple(sd[k].shape) != tuple(t.shape):
                raise SpecMismatchError(f"mask for {k!r} has shape {tuple(t.shape)}, the model's tensor "
                                        f"{tuple(sd[k].shape)}")

    def __getitem__(self, k: str) -> torch.Tensor:
        return self._m[k]

    def __iter__(self) -> Iterator[str]:
        return iter(self._m)

    def __len__(self) -> int:
        return len(self._m)

    def __repr__(self) -> str:
        return f"Mask({len(self)} tensors, density {self.density():.4f})"

    def kept(self) -> int:
        return sum(int(t.sum()) for t in self._m.values())

    def total(self) -> int:
        return sum(t.numel() for t in self._m.values())

    def density(self) -> float:
        """Fraction of the masked tensors' values that are kept."""
        return self.kept() / max(self.total(), 1)

    def sparsity(self) -> float:
        return 1.0 - self.density()

    def densities(self) -> dict[str, float]:
        """Per-tensor density."""
        return {k: float(t.float().mean()) for k, t in self._m.items()}

    @classmethod
    def ones(cls, model_or_state, keys: Iterable[str] | None = None, **select) -> Mask:
        """The all-kept mask of the prunable tensors (see ``prunable_keys``)."""
        sd = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
        keys = list(keys) if keys is not None else prunable_keys(model_or_state, **select)
        return cls({k: torch.ones_like(sd[k], dtype=torch.bool) for k in keys})

    def apply(self, obj):
        """A new model (or state dict) with the masked-out weights set to zero."""
        if isinstance(obj, nn.Module):
            import copy

            self.check(obj)
            m = copy.deepcopy(obj)
            sd = m.state_dict()
            with torch.no_grad():
                for k, t in self._m.items():
                    sd[k].mul_(t.to(sd[k].device, sd[k].dtype))
            return m
        self.check(obj)
        return {k: (v * self._m[k].to(v.device, v.dtype) if k in self._m else v) for k, v in obj.items()}

    def save(self, path: str | os.PathLike) -> None:
        """Write as safetensors (uint8), atomically."""
        from .io import save_state_dict

        save_state_dict({k: v.to(torch.uint8) for k, v in self._m.items()}, os.fspath(path))

    @classmethod
    def load(cls, path: str | os.PathLike, reference=None) -> Mask:
        from .io import load_state_dict

        return cls({k: v.bool() for k, v in load_state_dict(os.fspath(path)).items()}, reference)


def prunable_keys(model_or_state, *, include: Iterable[str] | None = None, exclude: Iterable[str] = (),
                  exclude_classifier: bool = False) -> list[str]:
    """State-dict keys of the weights of Linear and Conv layers (biases and norms never).

    For a state dict (no module types), weights with two or more dims whose key ends in ".weight".
    ``include``/``exclude`` are glob patterns; ``exclude_classifier`` drops the last Linear layer.
    """
    import fnmatch

    if isinstance(model_or_state, nn.Module):
        keys = [f"{n}.weight" if n else "weight" for n, m in model_or_state.named_modules()
                if isinstance(m, PRUNABLE_TYPES)]
        linears = [f"{n}.weight" for n, m in model_or_state.named_modules() if isinstance(m, nn.Linear)]
    else:
        keys = [k for k, v in model_or_state.items() if k.endswith("weight") and v.ndim >= 2]
        linears = [k for k in keys if model_or_state[k].ndim == 2]
    if exclude_classifier and linears:
        keys = [k for k in keys if k != linears[-1]]
    if include is not None:
        inc = list(include)
        keys = [k for k in keys if any(fnmatch.fnmatchcase(k, p) for p in inc)]
    exc = list(exclude)
    return [k for k in keys if not any(fnmatch.fnmatchcase(k, p) for p in exc)]


def magnitude(model_or_state, fraction: float, *, mask: Mapping[str, torch.Tensor] | None = None,
              scope: str = "global", include: Iterable[str] | None = None, exclude: Iterable[str] = (),
              exclude_classifier: bool = False) -> Mask:
    """Prune ``fraction`` of the *remaining* prunable weights by magnitude; returns the new Mask.

    The model is not changed. With ``scope="global"`` the smallest magnitudes over all prunable tensors
    go (exactly ``round(fraction * remaining)`` weights); with ``"layer"`` each tensor loses
    ``round(fraction * its remaining)``. Ties are broken by position (deterministic). Weights already
    pruned by ``mask`` stay pruned (masks never regrow).
    """
    if not 0.0 < float(fraction) < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    sd = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    if mask is not None:
        keys = list(mask)
        Mask(mask, sd)
    else:
        keys = prunable_keys(model_or_state, include=include, exclude=exclude,
                             exclude_classifier=exclude_classifier)
    if not keys:
        raise ValueError("nothing to prune: no prunable tensors selected")
    cur = {k: (mask[k].bool().cpu() if mask is not None else torch.ones(sd[k].shape, dtype=torch.bool))
           for k in keys}
    new = {k: v.clone() for k, v in cur.items()}

    def drop(scores: torch.Tensor, alive: torch.Tensor, n: int) -> torch.Tensor:
        """Indices (into the flat vector) of the n smallest alive scores; ties by position."""
        idx = alive.nonzero().squeeze(1)
        order = torch.sort(scores[idx], stable=True).indices
        return idx[order[:n]]

    if scope == "global":
        flat = torch.cat([sd[k].detach().abs().flatten().double().cpu() for k in keys])
        alive = torch.cat([cur[k].flatten() for k in keys])
        n = int(round(float(fraction) * int(alive.sum())))
        gone = drop(flat, alive, n)
        keep = alive.clone()
        keep[gone] = False
        pos = 0
        for k in keys:
            size = cur[k].numel()
            new[k] = keep[pos:pos + size].view(cur[k].shape)
            pos += size
    else:
        for k in keys:
            alive = cur[k].flatten()
            n = int(round(float(fraction) * int(alive.sum())))
            gone = drop(sd[k].detach().abs().flatten().double().cpu(), alive, n)
            keep = alive.clone()
            keep[gone] = False
            new[k] = keep.view(cur[k].shape)
    return Mask(new)


def random_mask_like(mask: Mapping[str, torch.Tensor], generator: torch.Generator | int | None = None) -> Mask:
    """A random mask with exactly the same number of kept weights in every tensor."""
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    out = {}
    for k, t in mask.items():
        n = int(t.sum())
        keep = torch.zeros(t.numel(), dtype=torch.bool)
        keep[torch.randperm(t.numel(), generator=generator)[:n]] = True
        out[k] = keep.view(t.shape)
    return Mask(out)


def transfer_mask(mask_a: Mapping[str, torch.Tensor], alignment) -> Mask:
    """Move A's mask into B's unit order. ``alignment = align(a, b)`` maps B onto A, so the mask moves by
    its inverse: the result is ``alignment.inverse().apply(mask_a)``."""
    return Mask(alignment.inverse().apply(dict(mask_a)))


# ---------------------------------------------------------------------------------------------- IMP
@dataclass
class IMPLevel:
    level: int
    density: float
    mask: Mask
    state: dict[str, torch.Tensor]  # trained weights at the end of the level
    metrics: dict[str, Any]


@dataclass
class IMPResult:
    """Per-level masks, trained weights and metrics; ``rewind_state`` is the level-0 rewind point."""

    levels: list[IMPLevel]
    rewind_state: dict[str, torch.Tensor]
    settings: dict[str, Any] = field(default_factory=dict)

    def table(self) -> list[dict[str, Any]]:
        return [{"level": lv.level, "density": lv.density, **{k: v for k, v in lv.metrics.items()
                                                              if isinstance(v, (int, float))}}
                for lv in self.levels]


RETRAIN_MODES = ("continue", "restart")
_STORE_SETTINGS = "imp.json"  # in an IMP store: the settings its levels were retrained with


def _rewind_step(rewind: int, rewind_unit: str, data, train_kw: Mapping[str, Any]) -> int:
    """The optimizer step of the rewind point (``rewind`` epochs or steps into training)."""
    if rewind_unit == "step":
        return int(rewind)
    per_epoch = -(-len(data.train) // int(train_kw.get("batch_size", 128)))
    return int(rewind) * per_epoch


def _check_retrain(retrain: str) -> None:
    if retrain not in RETRAIN_MODES:
        raise ValueError(f"retrain must be 'continue' (the rest of the schedule from the rewind point, the "
                         f"default) or 'restart' (a whole schedule from step 0), got {retrain!r}")


def _check_store(store: str, retrain: str, start_step: int) -> None:
    """Refuse a store whose levels were retrained from another step; record the step in a new store."""
    from .io import atomic_text as _atomic_text

    path = os.path.join(store, _STORE_SETTINGS)
    retrained = any(name.startswith("level_") and name != "level_0" for name in os.listdir(store))
    if os.path.exists(path):
        with open(path) as f:
            found = json.load(f)
    elif retrained:  # written before the option existed, when every level restarted the schedule
        found = {"retrain": "restart", "start_step": 0}
    else:
        found = None
    if found is not None and found.get("start_step") == start_step:
        return
    if retrained:
        raise ValueError(f"the IMP store {store} holds levels retrained from step {found.get('start_step')} "
                         f"(retrain={found.get('retrain')!r}), this run retrains from step {start_step} "
                         f"(retrain={retrain!r}): use another store folder, or the store's settings")
    # level 0 alone (if any) is the same in every mode: (re)record the mode the levels will use
    _atomic_text(json.dumps({"retrain": retrain, "start_step": start_step}), path)


@_keeps_global_rng
def imp(model: nn.Module | Callable[[], nn.Module], data, *, levels: int, fraction: float = 0.2,
        rewind: int = 0, rewind_unit: str = "epoch", epochs: int | None = None, steps: int | None = None,
        init_seed: int = 0, data_seed: int = 0, scope: str = "global", include: Iterable[str] | None = None,
        exclude: Iterable[str] = (), exclude_classifier: bool = False, store: str | None = None,
        retrain: str = "continue", progress: bool = True, device=None, **train_kw) -> IMPResult:
    """Iterative magnitude pruning with weight rewinding.

    Args:
        model: a model (not changed), or a factory called after ``torch.manual_seed(init_seed)``. The
            global torch generators are forked as in ``permgraph.train``: the caller's are unchanged.
        levels: number of pruning levels after the dense level 0.
        fraction: fraction of the remaining prunable weights removed per level (0.2 = open_lth's default).
        rewind: the rewind point, in ``rewind_unit`` ("epoch" or "step") of level 0's training;
            survivors are reset to these weights at every level (0 = the initialisation).
        epochs / steps, **train_kw: training settings of every level (see ``permgraph.train``).
        store: folder for checkpoints; levels already finished there are loaded, not retrained, and a
            level interrupted mid-training resumes from its last checkpoint. The store records the step
            retraining begins at (``imp.json``) and refuses a run that retrains from another step (the
            other ``retrain`` mode, with ``rewind`` > 0); a store without that file but with retrained
            levels was written when every level restarted, and counts as "restart".
        retrain: how levels 1.. retrain from the rewind point. "continue" (default; open_lth, Frankle et
            al. 2020): the rest of level 0's schedule, steps k..T-1 for the rewind step k, with level 0's
            learning rates and data order at those steps, ending at level 0's final step T; the
            optimizer starts fresh (no momentum), as in open_lth. Metrics count epochs from the rewind
            point on (``epoch`` and ``step`` are positions in the schedule). "restart": a whole new
            schedule of T steps from step 0 (warm-up again, milestones shifted by k; the behaviour before
            this option). With ``rewind=0`` the two are the same.

    Returns:
        an IMPResult; level L's mask keeps (1 - fraction)^L of the prunable weights. Its ``settings``
        include ``retrain`` and ``start_step`` (the step retraining begins at: k, or 0 with "restart").
    """
    from .io import atomic_text as _atomic_text
    from .io import load_state_dict, save_state_dict
    from .training import train

    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if rewind_unit not in ("epoch", "step"):
        raise ValueError(f"rewind_unit must be 'epoch' or 'step', got {rewind_unit!r}")
    _check_retrain(retrain)
    per_epoch = -(-len(data.train) // int(train_kw.get("batch_size", 128)))
    if rewind_unit == "epoch":
        length = epochs if epochs is not None else -(-steps // per_epoch)
    else:
        length = steps if steps is not None else epochs * per_epoch
    if not 0 <= rewind <= length:
        raise ValueError(f"the rewind point ({rewind_unit} {rewind}) lies after the end of training "
                         f"({length} {rewind_unit}s)")
    total = steps if steps is not None else epochs * per_epoch
    start_step = _rewind_step(rewind, rewind_unit, data, train_kw) if retrain == "continue" else 0
    if start_step >= total and levels > 0:
        raise ValueError(f"with retrain='continue' the levels retrain from the rewind point ({rewind_unit} "
                         f"{rewind}) to the end of training ({length} {rewind_unit}s): nothing is left to "
                         "retrain; rewind earlier or use retrain='restart'")
    if store:
        os.makedirs(store, exist_ok=True)
        _check_store(store, retrain, start_step)
    if isinstance(model, nn.Module):
        import copy

        model = copy.deepcopy(model)  # the caller's model is not trained
    else:
        torch.manual_seed(init_seed)
        model = model()
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    select = dict(include=include, exclude=exclude, exclude_classifier=exclude_classifier)

    def level_dir(level: int) -> str | None:
        return os.path.join(store, f"level_{level}") if store else None

    def run(level: int, mask: Mask | None, start: dict) -> dict:
        d = level_dir(level)
        if d and os.path.exists(os.path.join(d, "final.safetensors")):  # finished earlier: load
            with open(os.path.join(d, "metrics.json")) as f:
                return {"state": load_state_dict(os.path.join(d, "final.safetensors")), "metrics": json.load(f)}
        out = train(model, data, epochs=epochs, steps=steps, data_seed=data_seed, mask=mask, init_state=start,
                    checkpoints=[rewind] if level == 0 else [], checkpoint_unit=rewind_unit, checkpoint_dir=d,
                    progress=progress, device=device, start_step=start_step if level else 0, **train_kw)
        state = {k: v.detach().cpu().clone() for k, v in out.model.state_dict().items()}
        metrics = out.final
        if d:
            save_state_dict(state, os.path.join(d, "final.safetensors"))
            if mask is not None:
                mask.save(os.path.join(d, "mask.safetensors"))
            _atomic_text(json.dumps(metrics), os.path.join(d, "metrics.json"))
        return {"state": state, "metrics": metrics, "rewind": out.checkpoint_states.get(rewind)}

    lv0 = run(0, None, init)
    if lv0.get("rewind") is not None:
        rewind_state = lv0["rewind"]
    else:  # written to the store (possibly by an earlier, interrupted run)
        rewind_state = load_state_dict(os.path.join(level_dir(0), f"ckpt_{rewind_unit}{rewind}.safetensors"))
    dense_mask = Mask.ones(model, **select)
    levels_out = [IMPLevel(0, 1.0, dense_mask, lv0["state"], lv0["metrics"])]
    mask = dense_mask
    prev = lv0["state"]
    for level in range(1, levels + 1):
        mask = magnitude(prev, fraction, mask=mask, scope=scope)
        start = mask.apply({k: v.clone() for k, v in rewind_state.items()})
        out = run(level, mask, start)
        levels_out.append(IMPLevel(level, mask.density(), mask, out["state"], out["metrics"]))
        prev = out["state"]
    return IMPResult(levels_out, rewind_state, {"fraction": fraction, "rewind": rewind, "rewind_unit": rewind_unit,
                                                "retrain": retrain, "start_step": start_step, "scope": scope,
                                                "init_seed": init_seed, "data_seed": data_seed})


# ---------------------------------------------------------------------------------------------- mask-transfer arms
ARMS = ("own", "dense_perm", "level_perm", "unpermuted", "random", "oneshot")


def transfer_arms(model_b: nn.Module, imp_a: IMPResult, imp_b: IMPResult, data, *, spec=None,
                  levels: Iterable[int] | None = None, arms: Iterable[str] = ARMS, method: str = "weight",
                  loader=None, epochs: int | None = None, steps: int | None = None, data_seed: int = 0,
                  seed: int = 0, retrain: str | None = None, progress: bool = True, device=None,
                  align_kw: dict | None = None, **train_kw) -> list[dict[str, Any]]:
    """Retrain B from its own rewind point with masks from A, for each IMP level, in several arms:

    * ``own``: B's own IMP ticket (taken from ``imp_b``, not retrained);
    * ``dense_perm``: A's mask permuted by the alignment found between the dense trained A and B (the method);
    * ``level_perm``: A's mask permuted by the alignment found between A and B at that level;
    * ``unpermuted``: A's mask as it is;
    * ``random``: a random mask with B's per-layer densities of that level;
    * ``oneshot``: one-shot magnitude pruning of B's dense trained weights to the same density.

    ``model_b`` supplies the architecture (its weights are not used); ``align_kw`` is passed on to
    ``align`` (e.g. ``{"similarity": "inner"}``). The arms retrain as B's IMP levels did: ``retrain``
    (None = ``imp_b.settings["retrain"]``; another mode than the IMP runs' is an error) "continue" runs
    the rest of the schedule from B's rewind step (``imp_b.settings`` ``rewind`` and ``rewind_unit``),
    "restart" a whole schedule. Returns rows {level, density, arm, test_loss, test_error, test_accuracy}.
    """
    import copy

    from ._eval import evaluate
    from .alignment import align
    from .training import train

    arms = list(arms)
    bad = [a for a in arms if a not in ARMS]
    if bad:
        raise ValueError(f"unknown arms {bad}; available: {ARMS}")
    levels = list(levels) if levels is not None else [lv.level for lv in imp_a.levels if lv.level > 0]
    modes = {r.settings["retrain"] for r in (imp_a, imp_b) if "retrain" in r.settings}
    if retrain is None:
        if not modes:
            raise ValueError("the IMP results do not say how their levels retrained (settings['retrain']): "
                             "pass retrain='continue' or 'restart'")
        retrain = imp_b.settings.get("retrain", imp_a.settings.get("retrain"))
    _check_retrain(retrain)
    if modes - {retrain}:
        raise ValueError(f"retrain={retrain!r}, but the IMP levels were retrained with retrain="
                         f"{sorted(modes - {retrain})[0]!r}: the arms must retrain as the levels did")
    start_step = 0
    if retrain == "continue":
        if "rewind" not in imp_b.settings:
            raise ValueError("retrain='continue' needs B's rewind point: imp_b.settings has no 'rewind'")
        start_step = _rewind_step(imp_b.settings["rewind"], imp_b.settings.get("rewind_unit", "epoch"), data,
                                  train_kw)

    def as_model(state):
        m = copy.deepcopy(model_b)
        m.load_state_dict(state)
        return m.to(device) if device is not None else m

    dense_a, dense_b = as_model(imp_a.levels[0].state), as_model(imp_b.levels[0].state)
    if spec is None:
        from ._trace import trace

        spec = trace(dense_a)
    kw = dict(loader=loader) if method == "activation" else {}
    kw.update(align_kw or {})
    p_dense = align(dense_a, dense_b, method, spec=spec, progress=False, seed=seed, **kw)
    test_loader = data.loader("test", 512, shuffle=False)
    rows = []
    for level in levels:
        la, lb = imp_a.levels[level], imp_b.levels[level]
        for arm in arms:
            if arm == "own":
                m = as_model(lb.state)
                ev = evaluate(m, test_loader, device)
                rows.append({"level": level, "density": lb.density, "arm": arm, "test_loss": ev["loss"],
                             "test_error": ev["error"], "test_accuracy": ev["accuracy"]})
                continue
            if arm == "dense_perm":
                mask = transfer_mask(la.mask, p_dense)
            elif arm == "level_perm":
                p_level = align(as_model(la.state), as_model(lb.state), method, spec=spec, progress=False,
                                seed=seed, **kw)
                mask = transfer_mask(la.mask, p_level)
            elif arm == "unpermuted":
                mask = Mask(la.mask)
            elif arm == "random":
                mask = random_mask_like(lb.mask, seed + level)
            else:  # oneshot
                density = lb.density
                mask = magnitude(imp_b.levels[0].state, 1.0 - density, mask=Mask.ones(imp_b.levels[0].state,
                                                                                      keys=list(lb.mask)))
            start = mask.apply({k: v.clone() for k, v in imp_b.rewind_state.items()})
            out = train(copy.deepcopy(model_b), data, epochs=epochs, steps=steps, data_seed=data_seed,
                        mask=mask, init_state=start, progress=progress, device=device, start_step=start_step,
                        **train_kw)
            ev = evaluate(out.model, test_loader, device)
            rows.append({"level": level, "density": mask.density(), "arm": arm, "test_loss": ev["loss"],
                         "test_error": ev["error"], "test_accuracy": ev["accuracy"]})
    return rows


def imp_barriers(model: nn.Module, imp_a: IMPResult, imp_b: IMPResult, loader, *, spec=None,
                 alphas: int = 11, method: str = "weight", match_loader=None, bn: str = "auto",
                 reset_loader=None, seed: int = 0, progress: bool = False,
                 align_kw: dict | None = None) -> list[dict[str, Any]]:
    """Simultaneous alignment along IMP: at every level, the error/loss barrier between A_L and B_L
    unaligned, aligned by the dense permutation, and aligned by the permutation found at that level; and
    the same at the rewind point with A's and B's level masks. BatchNorm statistics (``bn`` "reset" or
    "repair", or "auto" on a network with BatchNorm) are recomputed on ``reset_loader``, which is then
    required: pass training data, never the evaluation ``loader`` (see ``permgraph.barrier``).
    ``align_kw`` goes to ``align``. Returns rows {level, density, point, alignment, barrier_error,
    barrier_loss}."""
    import copy

    from .alignment import align
    from .interpolation import barrier, check_reset_loader

    check_reset_loader(model, bn, reset_loader)  # before any alignment is computed
    dev = next(model.parameters()).device

    def as_model(state):
        m = copy.deepcopy(model)
        m.load_state_dict(state)
        return m.to(dev)

    kw = dict(loader=match_loader) if method == "activation" else {}
    kw.update(align_kw or {})
    dense_a, dense_b = as_model(imp_a.levels[0].state), as_model(imp_b.levels[0].state)
    if spec is None:
        from ._trace import trace

        spec = trace(dense_a)
    p_dense = align(dense_a, dense_b, method, spec=spec, progress=False, seed=seed, **kw)
    rows = []
    for la, lb in zip(imp_a.levels, imp_b.levels):
        a, b = as_model(la.state), as_model(lb.state)
        p_level = align(a, b, method, spec=spec, progress=False, seed=seed, **kw) if la.level else p_dense
        for name, al in (("none", None), ("dense", p_dense), ("level", p_level)):
            bb = b if al is None else al.apply(b)
            c = barrier(a, bb, loader, alphas=alphas, bn=bn, reset_loader=reset_loader, progress=progress)
            rows.append({"level": la.level, "density": la.density, "point": "trained", "alignment": name,
                         "barrier_error": c.barrier("error"), "barrier_loss": c.barrier("loss")})
        # at the rewind point, with each network's own mask of this level
        ra = as_model(la.mask.apply(imp_a.rewind_state))
        rb = as_model(lb.mask.apply(imp_b.rewind_state))
        for name, al in (("none", None), ("dense", p_dense)):
            bb = rb if al is None else al.apply(rb)
            c = barrier(ra, bb, loader, alphas=alphas, bn=bn, reset_loader=reset_loader, progress=progress)
            rows.append({"level": la.level, "density": la.density, "point": "rewind", "alignment": name,
                         "barrier_error": c.barrier("error"), "barrier_loss": c.barrier("loss")})
    return rows
