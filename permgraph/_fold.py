"""BatchNorm folding for weight matching (``align(..., method="weight", fold_bn=True)``).

Weight matching compares raw weights. In a BatchNorm network the function of a conv's output channel
``c`` is ``s_c * (W_c x + b_c - mean_c) + beta_c`` with ``s_c = gamma_c / sqrt(var_c + eps)``: two
networks whose raw rows look alike can mean different things once their BatchNorms are applied, and
vice versa. ``fold`` returns a copy of a state dict in which every BatchNorm that directly consumes a
conv's (or linear's) output is folded into it:

* the layer's output rows are scaled: ``W'_c = s_c * W_c``;
* the folded shift ``beta_c + (b_c - mean_c) * s_c`` takes the place of the BatchNorm's bias (the layer's
  bias, if any, becomes 0; if the BatchNorm has no affine bias, the shift goes into the layer's bias);
* the BatchNorm becomes the identity: weight 1, running_mean 0, running_var ``1 - eps``.

The folded copy computes the same function as the original in eval mode. It is used only to compute
weight matching's similarity; the permutation found is applied to the real, unfolded weights. Folding
is a per-channel rescaling of the tensors that carry the BatchNorm's channel axis, all of which the
spec permutes together, so it commutes with every permutation of the spec's groups.

Which layer feeds which BatchNorm:

* with a model (``plan(spec, model)``): one forward pass in eval mode on example inputs with hooks, and a
  BatchNorm is paired with a Conv1d/2d/3d (not transposed) or Linear only when the BatchNorm's input
  *is* that layer's output tensor, on every call; each BatchNorm's ``eps`` is read from the module;
* with state dicts only (``plan(spec)``): a BatchNorm is paired with the one ``*.weight`` tensor (2-D or
  more) whose output axis carries the same group tree as the BatchNorm's channel axis; BatchNorms with
  several candidates (a residual stream) or none are skipped; ``eps`` is 1e-5 (PyTorch's default).

Either way a pair is folded only if the spec's trees agree: the layer's output axis, its bias and all
four BatchNorm tensors carry the same axis tree, with matching sizes. Anything else is skipped, with a
reason (``FoldPlan.skipped``), never guessed. The BatchNorm's momentum plays no part (it only updates
running statistics in training).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .errors import TraceError
from .spec import PermutationSpec, tree_groups

DEFAULT_EPS = 1e-5
_STATS = ("running_mean", "running_var")


@dataclass(frozen=True)
class FoldPair:
    """A BatchNorm (module prefix ``norm``) folded into the layer that feeds it (prefix ``layer``)."""

    norm: str
    layer: str
    eps: float = DEFAULT_EPS


@dataclass
class FoldPlan:
    """The BatchNorms to fold, the ones skipped (with the reason), and how the pairs were found
    ("model": forward hooks on the model; "spec": the spec's axis trees only)."""

    pairs: list[FoldPair] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    source: str = "spec"

    def to_log(self) -> dict:
        return {"fold_bn": {"source": self.source, "folded": {p.norm: p.layer for p in self.pairs},
                            "eps": {p.norm: p.eps for p in self.pairs}, "skipped": dict(self.skipped)}}

    def with_eps_from(self, model: nn.Module | None) -> FoldPlan:
        """The same pairs with each BatchNorm's ``eps`` read from ``model`` (another network of the same
        architecture), where it has a BatchNorm of that name."""
        if not isinstance(model, nn.Module):
            return self
        mods = dict(model.named_modules())
        bn = nn.modules.batchnorm._BatchNorm
        pairs = [replace(p, eps=float(mods[p.norm].eps)) if isinstance(mods.get(p.norm), bn) else p
                 for p in self.pairs]
        return FoldPlan(pairs, dict(self.skipped), self.source)


def check_option(value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"fold_bn must be True or False, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------- pairing
def _bn_prefixes(spec: PermutationSpec) -> list[str]:
    """Module prefixes with running statistics in the spec (BatchNorm-like)."""
    out = []
    for k in spec.axes:
        if k.endswith(".running_mean"):
            p = k[: -len(".running_mean")]
            if f"{p}.running_var" in spec.axes and len(spec.shapes[k]) == 1:
                out.append(p)
    return out


def _check_pair(spec: PermutationSpec, norm: str, layer: str) -> str | None:
    """Why ``layer`` cannot be folded with BatchNorm ``norm`` according to the spec (None: it can)."""
    axes, shapes = spec.axes, spec.shapes
    w = f"{layer}.weight"
    if w not in axes or w in spec.aliases:
        return f"{w} is not a tensor of the spec"
    if len(shapes[w]) < 2:
        return f"{w} is not a conv or linear weight"
    tree = axes[f"{norm}.running_var"][0]
    n = shapes[f"{norm}.running_var"][0]
    for k in (f"{norm}.weight", f"{norm}.bias", f"{norm}.running_mean", f"{layer}.bias", w):
        if k not in axes:
            if k in (f"{norm}.weight", f"{norm}.bias", f"{layer}.bias"):
                continue  # absent affine / bias
            return f"{k} is not a tensor of the spec"
        if axes[k][0] != tree or shapes[k][0] != n or (k != w and len(shapes[k]) != 1):
            return f"{k}'s axis 0 ({axes[k][0]!r}) differs from the BatchNorm's channel axis ({tree!r})"
    if f"{norm}.bias" not in axes and f"{layer}.bias" not in axes:
        return "neither the BatchNorm nor the layer has a bias to hold the folded shift"
    return None


def _plan_from_spec(spec: PermutationSpec, skipped: dict[str, str] | None = None) -> FoldPlan:
    norms = _bn_prefixes(spec)
    norm_set = set(norms)
    weights = [k for k in spec.axes if k.endswith(".weight") and len(spec.shapes[k]) >= 2
               and k[: -len(".weight")] not in norm_set and k not in spec.aliases]
    plan = FoldPlan(source="spec", skipped=dict(skipped or {}))
    claimed: dict[str, list[str]] = {}
    for norm in norms:
        tree = spec.axes[f"{norm}.running_var"][0]
        if not any(True for _ in tree_groups(tree)):
            plan.skipped[norm] = "its channel axis is not permuted (cannot tell its layer from the spec alone)"
            continue
        cands = [k[: -len(".weight")] for k in weights if spec.axes[k][0] == tree]
        if len(cands) != 1:
            plan.skipped[norm] = (f"{len(cands)} layers have outputs in its channel group "
                                  f"({', '.join(cands[:4])}{', ...' if len(cands) > 4 else ''}); pass the models "
                                  "to tell which feeds it" if cands else "no conv or linear output shares its group")
            continue
        claimed.setdefault(cands[0], []).append(norm)
    for layer, ns in claimed.items():
        for norm in ns:
            if len(ns) > 1:
                plan.skipped[norm] = f"{layer} is the only candidate of several BatchNorms ({', '.join(ns)})"
                continue
            why = _check_pair(spec, norm, layer)
            if why:
                plan.skipped[norm] = why
            else:
                plan.pairs.append(FoldPair(norm, layer, DEFAULT_EPS))
    return plan


def _inputs(spec: PermutationSpec, model: nn.Module, example_inputs) -> tuple | None:
    from ._inputs import _as_tuple, inputs_like, resolve_inputs

    if example_inputs is not None:
        return _as_tuple(example_inputs)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    if spec.input_shapes:
        return inputs_like(spec.input_shapes, device)
    try:
        return tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in resolve_inputs(model, None))
    except TraceError:  # no inputs can be inferred: the plan is made from the spec alone
        return None


def _observed_pairs(model: nn.Module, inputs: tuple) -> tuple[dict[str, str], dict[str, str]]:
    """Forward hooks: for every BatchNorm, the conv/linear whose output tensor it consumed (on every call);
    and the BatchNorms that consumed something else (with the reason)."""
    from ._inputs import kept_modes

    mods = dict(model.named_modules())
    producers = {n: m for n, m in mods.items()
                 if (isinstance(m, nn.modules.conv._ConvNd) and not m.transposed) or isinstance(m, nn.Linear)}
    norms = {n: m for n, m in mods.items() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # keeps the tensors alive: ids are not reused
    fed: dict[str, list[str | None]] = {n: [] for n in norms}

    def post(name):
        def hook(mod, args, out):
            if isinstance(out, torch.Tensor):
                outputs[id(out)] = (name, out)
        return hook

    def pre(name):
        def hook(mod, args):
            x = args[0] if args else None
            hit = outputs.get(id(x)) if isinstance(x, torch.Tensor) else None
            ok = hit is not None and hit[1] is x and (isinstance(producers[hit[0]], nn.modules.conv._ConvNd)
                                                      or x.ndim == 2)  # a Linear's features on axis 1
            fed[name].append(hit[0] if ok else None)
        return hook

    handles = [m.register_forward_hook(post(n)) for n, m in producers.items()]
    handles += [m.register_forward_pre_hook(pre(n)) for n, m in norms.items()]
    try:
        with kept_modes(model), torch.no_grad():
            model.eval()
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
        outputs.clear()
    pairs, skipped = {}, {}
    for n, seen in fed.items():
        if not seen:
            skipped[n] = "not called by the forward pass"
        elif any(s is None for s in seen):
            skipped[n] = "its input is not the output of a conv or linear layer"
        elif len(set(seen)) > 1:
            skipped[n] = f"fed by different layers on different calls ({sorted(set(seen))})"
        elif not norms[n].track_running_stats or norms[n].running_var is None:
            skipped[n] = "it has no running statistics (it normalises with batch statistics in eval mode)"
        else:
            pairs[n] = seen[0]
    by_layer: dict[str, list[str]] = {}
    for n, layer in pairs.items():
        by_layer.setdefault(layer, []).append(n)
    for layer, ns in by_layer.items():
        if len(ns) > 1:
            for n in ns:
                skipped[n] = f"{layer} feeds several BatchNorms ({', '.join(ns)})"
                del pairs[n]
    return pairs, skipped


def plan(spec: PermutationSpec, model: nn.Module | None = None, example_inputs=None) -> FoldPlan:
    """Which BatchNorms to fold into which layers (see the module's docstring)."""
    if model is None:
        return _plan_from_spec(spec)
    inputs = _inputs(spec, model, example_inputs)
    if inputs is None:
        out = _plan_from_spec(spec)
        out.source = "spec (no example inputs to run the model on)"
        return out
    try:
        pairs, skipped = _observed_pairs(model, inputs)
    except Exception as e:  # a model that needs other inputs: the spec's rule still applies
        out = _plan_from_spec(spec)
        out.source = f"spec (the model did not run on example inputs: {type(e).__name__})"
        return out
    mods = dict(model.named_modules())
    out = FoldPlan(source="model", skipped=skipped)
    for norm, layer in pairs.items():
        why = (_check_pair(spec, norm, layer) if f"{norm}.running_var" in spec.axes
               else "its statistics are not in the spec")
        if why:
            out.skipped[norm] = why
        else:
            out.pairs.append(FoldPair(norm, layer, float(mods[norm].eps)))
    return out


# ---------------------------------------------------------------------------------------------- folding
def fold(spec: PermutationSpec, state: Mapping[str, torch.Tensor], fold_plan: FoldPlan | None = None
         ) -> dict[str, torch.Tensor]:
    """A copy of ``state`` with every planned BatchNorm folded into its layer (``fold_plan``; default
    ``plan(spec)``, from the spec alone). ``state`` is not changed; untouched tensors are shared."""
    if fold_plan is None:
        fold_plan = plan(spec)
    out = dict(state)
    for p in fold_plan.pairs:
        w = state[f"{p.layer}.weight"]
        mean, var = state[f"{p.norm}.running_mean"], state[f"{p.norm}.running_var"]
        dev, f64 = w.device, torch.float64
        gamma = state.get(f"{p.norm}.weight")
        beta = state.get(f"{p.norm}.bias")
        bias = state.get(f"{p.layer}.bias")
        s = (gamma.to(dev, f64) if gamma is not None else 1.0) / torch.sqrt(var.to(dev, f64) + p.eps)
        shift = (bias.to(dev, f64) if bias is not None else 0.0) - mean.to(dev, f64)
        shift = shift * s + (beta.to(dev, f64) if beta is not None else 0.0)
        out[f"{p.layer}.weight"] = (w.to(f64) * s.view(-1, *[1] * (w.ndim - 1))).to(w.dtype)
        if beta is not None:
            out[f"{p.norm}.bias"] = shift.to(beta.dtype)
            if bias is not None:
                out[f"{p.layer}.bias"] = torch.zeros_like(bias)
        else:
            out[f"{p.layer}.bias"] = shift.to(bias.dtype)
        if gamma is not None:
            out[f"{p.norm}.weight"] = torch.ones_like(gamma)
        out[f"{p.norm}.running_mean"] = torch.zeros_like(mean)
        out[f"{p.norm}.running_var"] = torch.full_like(var, 1.0 - p.eps)
    return out


def fold_pair(spec: PermutationSpec, a, b, sa: Mapping[str, torch.Tensor], sb: Mapping[str, torch.Tensor],
              example_inputs=None) -> tuple[dict, dict, dict]:
    """For ``align``: the folded state dicts of A and B (pairs found on A, or from the spec when A is a
    state dict; eps read from each model) and a log entry saying what was folded."""
    p = plan(spec, a if isinstance(a, nn.Module) else None, example_inputs)
    pb = p.with_eps_from(b)
    return fold(spec, sa, p), fold(spec, sb, pb), p.to_log()
