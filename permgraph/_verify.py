"""Functional verification of a spec: permute a copy with randomised statistics, compare outputs."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils import _pytree as pytree

from . import spec as _spec
from .errors import SpecMismatchError, TraceError, VerificationError
from .permutation import Permutation, nest, permute_state_dict, restrict
from .spec import PermutationSpec

# models up to this many parameters are verified in float64 (tight tolerance), larger ones in float32
FLOAT64_MAX_PARAMS = 30_000_000
TOL = {torch.float64: 1e-7, torch.float32: 1e-4}
# A permutation changes only the order in which sums are rounded, so a correct spec changes the output by
# rounding noise. In a deep model that amplifies perturbations (rounding error grows from block to block),
# that noise can exceed TOL: when a check fails, the noise floor is measured (the output change caused by
# relative perturbations of one machine epsilon) and the tolerance becomes NOISE_FACTOR times the noise
# floor, but never more than TOL_MAX (a change above that is never put down to rounding).
NOISE_FACTOR = 10.0
TOL_MAX = 1e-2


@dataclass
class EquivalenceResult:
    """Result of ``check_equivalence``: the relative output change for all groups permuted at once,
    and per group (when asked)."""

    rel_error: float
    tolerance: float
    dtype: str
    per_group: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.rel_error <= self.tolerance and all(v <= self.tolerance for v in self.per_group.values())

    @property
    def failing(self) -> list[str]:
        return [g for g, v in self.per_group.items() if v > self.tolerance]


def _maybe_constant(t: torch.Tensor, n: int = 4096) -> bool:
    """False when the first ``n`` values already show that ``t`` is neither (nearly) constant nor all tiny:
    they vary clearly (relative std 1e-5, ten times the threshold below) and one of them is not tiny.
    Three reductions over every weight of a 71M-parameter model took 1.2 s; this reads 4,096 values."""
    head = t.detach().reshape(-1)[:n]
    if head.numel() < 2:
        return True
    return not (float(head.std()) >= 1e-5 * max(1.0, float(head.abs().mean())) and float(head.abs().max()) >= 1e-4)


def randomize_(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Give norm statistics, affine vectors and constant-initialised tensors random values in place.

    Fresh models have running_mean 0, running_var 1, norm weight 1, bias 0 (and timm zero-initialises
    some residual branches): with those values a forgotten buffer or branch is invisible.

    A tensor whose only dimension of size > 1 is the first, such as the ``(C, 1, 1, 1)`` gain of timm's
    ``ScaledStdConv2d`` or a ``(C, 1, 1)`` layer scale, is a per-channel vector and is treated like a 1-D
    one. (Given noise of scale ``1/sqrt(fan_in) = 1`` as a constant weight, the gains of a deep NFNet
    became ``1 + N(0, 1)``, and the randomised copy amplified rounding errors so much that float32
    verification rejected correct specs.)
    """
    with torch.no_grad():
        state = model.state_dict(keep_vars=True)
        for name, t in state.items():
            if not t.is_floating_point() or t.ndim == 0 or t.numel() < 2:
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=generator, dtype=t.dtype) * 1.5 + 0.5)
            elif name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=generator, dtype=t.dtype) * 0.5)
            elif t.ndim == 1 or t.numel() == t.shape[0]:
                t.add_(torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device) * 0.5)
            elif _maybe_constant(t) and (float(t.std()) < 1e-6 * max(1.0, float(t.abs().mean()))
                                         or float(t.abs().max()) < 1e-4):
                fan_in = max(1, t.numel() // t.shape[0])
                t.add_(torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device) / math.sqrt(fan_in))
    return model


def _cast_inputs(inputs: tuple, dtype: torch.dtype) -> tuple:
    return tuple(x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs)


def _outputs(model: nn.Module, inputs: tuple) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(*inputs)
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    worst = 0.0
    for x, y in zip(a, b):
        x, y = x.double(), y.double()
        den = max(float(x.norm()), 1e-12)
        worst = max(worst, float((x - y).norm()) / den)
    return worst


def cyclic_permutation(spec: PermutationSpec, generator: torch.Generator) -> Permutation:
    """A random permutation of every group with no fixed point (one random n-cycle per group), so that
    no group escapes the check by drawing the identity."""
    def cycle(n: int) -> torch.Tensor:
        s = torch.randperm(n, generator=generator)
        p = torch.empty_like(s)
        p[s] = torch.roll(s, -1)
        return p

    perms = {}
    for g, grp in spec.groups.items():
        if grp.blocks is None:
            perms[g] = cycle(grp.size)
        else:  # one cycle inside every head; the heads then move by their own group's cycle
            nb = spec.groups[grp.blocks].size
            block = grp.size // nb
            perms[g] = torch.cat([h * block + cycle(block) for h in range(nb)])
    for h, gs in spec.nested().items():
        for g in gs:
            perms[g] = nest(perms[h], perms[g], spec.groups[g].size // spec.groups[h].size)
    return Permutation(perms)


class _Checker:
    def __init__(self, spec: PermutationSpec, model: nn.Module, inputs: tuple, seed: int = 0,
                 dtype: torch.dtype | None = None):
        from ._inputs import _reason, checking_inputs

        gen = torch.Generator().manual_seed(seed)
        nparams = sum(p.numel() for p in model.parameters())
        self.dtype = dtype or (torch.float64 if nparams <= FLOAT64_MAX_PARAMS else torch.float32)
        self.tol = TOL[self.dtype]
        raw, origin = checking_inputs(model, inputs, spec.input_shapes)
        base = randomize_(copy.deepcopy(model).eval().to(self.dtype), gen)
        self.inputs = _cast_inputs(raw, self.dtype)
        self.state = base.state_dict()  # references: permuted states are passed to functional_call
        try:
            self.ref = _outputs(base, self.inputs)
        except Exception as e:
            name = type(model).__name__
            why = "" if inputs is not None or spec.input_shapes else (
                " (the spec does not record the inputs it was traced with)")
            raise TraceError(f"{name} fails on {origin}{why}: {type(e).__name__}: {_reason(e)}\n"
                             f"Pass inputs that {name} accepts as example_inputs, e.g. "
                             "example_inputs=(torch.randn(4, 40),)") from e
        self.work = base
        self.spec = spec
        self.perm = cyclic_permutation(spec, gen)
        self.noise: float | None = None  # the measured rounding-noise floor, once calibrate() ran
        self.float32_noise: float | None = None  # set when a too noisy float32 check was redone in float64

    def calibrate(self) -> float:
        """Measure the rounding-noise floor and widen the tolerance to it (once; returns the tolerance).

        Every floating-point tensor of the state and of the inputs is multiplied by ``1 + eps * N(0, 1)``
        (``eps``: the machine epsilon of the check's dtype), which perturbs each value by about one
        rounding error, as a different summation order does. The relative output change this causes is
        the noise floor; the tolerance becomes ``max(TOL, NOISE_FACTOR * noise)``, at most ``TOL_MAX``.
        """
        if self.noise is not None:
            return self.tol
        gen = torch.Generator().manual_seed(12345)
        eps = torch.finfo(self.dtype).eps

        def jitter(t):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0:
                return t
            n = torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device)
            return t * (1 + eps * n)

        state = {k: jitter(v) for k, v in self.state.items() if k not in self.spec.aliases}
        inputs = tuple(jitter(x) for x in self.inputs)
        with torch.no_grad():
            out = torch.func.functional_call(self.work, state, inputs)
        self.noise = _rel(self.ref, [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)])
        self.tol = min(max(self.tol, NOISE_FACTOR * self.noise), max(self.tol, TOL_MAX))
        return self.tol

    def failed(self, err: float) -> bool:
        """``err`` exceeds the tolerance, also after measuring the noise floor."""
        return err > self.tol and err > self.calibrate()

    @property
    def too_noisy(self) -> bool:
        """The noise floor is above what the tolerance may grow to: this dtype cannot tell a wrong rule
        from rounding."""
        return self.noise is not None and NOISE_FACTOR * self.noise > TOL_MAX

    def error(self, groups) -> float:
        perm = restrict(self.spec, self.perm, groups)
        # functional_call runs the model with the permuted tensors without copying them into it
        state = permute_state_dict(self.state, self.spec, perm)
        state = {k: v for k, v in state.items() if k not in self.spec.aliases}  # tied: given once
        with torch.no_grad():
            out = torch.func.functional_call(self.work, state, self.inputs)
        return _rel(self.ref, [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)])

    def culprits(self, groups: list[str]) -> list[str]:
        if not groups or not self.failed(self.error(set(groups))):
            return []
        if len(groups) == 1:
            return list(groups)
        mid = len(groups) // 2
        return self.culprits(groups[:mid]) + self.culprits(groups[mid:])


def _checker(spec: PermutationSpec, model: nn.Module, inputs, seed: int) -> tuple[_Checker, float]:
    """A checker and the error of permuting every group at once. A float32 check whose error cannot be
    told from rounding noise (a model that amplifies rounding errors strongly) is redone in float64."""
    checker = _Checker(spec, model, inputs, seed)
    err = checker.error(set(spec.groups))
    if checker.dtype != torch.float64 and checker.failed(err) and checker.too_noisy:
        noise = checker.noise
        del checker  # free the float32 copy first
        checker = _Checker(spec, model, inputs, seed, dtype=torch.float64)
        checker.float32_noise = noise
        err = checker.error(set(spec.groups))
    return checker, err


def _check_keys(spec: PermutationSpec, model: nn.Module) -> None:
    state = model.state_dict()
    missing = [k for k in spec.axes if k not in state]
    extra = [k for k in state if k not in spec.axes and k not in spec.aliases]
    wrong = [k for k in spec.axes if k in state and tuple(state[k].shape) != tuple(spec.shapes[k])]
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"keys missing from the model: {missing[:3]}")
        if extra:
            parts.append(f"keys the spec does not know: {extra[:3]}")
        if wrong:
            k = wrong[0]
            parts.append(f"{k} has shape {tuple(state[k].shape)} in the model but {spec.shapes[k]} in the spec")
        raise SpecMismatchError("the spec does not belong to this model (" + "; ".join(parts)
                                + "); trace the model with permgraph.trace(model)")


def verify_and_repair(spec: PermutationSpec, model: nn.Module, inputs, seed: int = 0) -> PermutationSpec:
    """Check ``spec`` on ``model``; freeze any group whose permutation changes the output."""
    checker, err = _checker(spec, model, inputs, seed)
    status = "passed"
    for _ in range(3):
        if not checker.failed(err):
            break
        bad = checker.culprits(list(spec.groups))
        if not bad:  # only a combination fails: give up on every group rather than guess
            bad = list(spec.groups)
        spec = spec.freeze_groups(bad, "a permutation of this group changed the model's output in "
                                       "verification (an op permgraph models wrongly); frozen")
        status = f"passed after freezing {len(bad)} group(s)"
        checker.spec = spec
        checker.perm = Permutation({g: checker.perm[g] for g in spec.groups})
        err = checker.error(set(spec.groups))
    if checker.failed(err):
        spec = spec.freeze_groups(list(spec.groups), "verification failed")
        status = "failed: every group frozen"
        err = 0.0
    record = {"status": status, "rel_error": err, "dtype": str(checker.dtype).split(".")[-1], "tolerance": checker.tol}
    if checker.noise is not None:
        record["noise_floor"] = checker.noise
    if checker.float32_noise is not None:
        record["float32_noise_floor"] = checker.float32_noise
    return spec.with_info(verification=record)


def verify_spec(spec: PermutationSpec, model: nn.Module, example_inputs=None, seed: int = 0) -> None:
    """Raise unless ``spec`` matches ``model``'s keys and shapes and a random permutation of every group
    leaves its output unchanged."""
    _check_keys(spec, model)
    checker, err = _checker(spec, model, example_inputs, seed)
    if checker.failed(err):
        bad = checker.culprits(list(spec.groups))
        raise VerificationError(f"permuting groups {bad[:10]} changes the model's output (relative change "
                                f"{err:.2e}); this spec does not describe this model's symmetry")


def check_equivalence(model: nn.Module, spec: PermutationSpec, example_inputs=None, *, per_group: bool = True,
                      seed: int = 0) -> EquivalenceResult:
    """Permute a randomised copy of ``model`` by a random permutation of every group (and, with
    ``per_group``, of each group alone) and report the relative output change."""
    _check_keys(spec, model)
    checker, err = _checker(spec, model, example_inputs, seed)
    per = {g: checker.error({g}) for g in spec.groups} if per_group else {}
    checker.failed(max([err, *per.values()]))  # a change above TOL: widen the tolerance to the noise floor
    return EquivalenceResult(err, checker.tol, str(checker.dtype).split(".")[-1], per)


_spec._VERIFY[0] = verify_spec  # PermutationSpec.from_json(text, model=...) verifies with it
