"""Aligning two networks: ``align(a, b)`` (weight matching or activation matching on any traced model)
returns an ``Alignment``, one permutation per group that maps B's units onto A's (``alignment.apply(b)``
reorders B to be close to A; B's function is unchanged). Alignments chain with ``ab.after(bc)``.

The matchers live in ``_weight`` (weight matching) and ``_activations`` (activation matching).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._weight import _jsonable, _state, check_same_spec, weight_matching
from .errors import FileFormatError, SpecMismatchError
from .permutation import Permutation, identity
from .permutation import apply as _apply
from .permutation import compose as _compose
from .spec import PermutationSpec


# ---------------------------------------------------------------------------------------------- Alignment
@dataclass
class Alignment:
    """One permutation per group mapping B's units onto A's.

    Attributes:
        perm: the permutation (``new = old[p]``), to be applied to B.
        spec: the spec the groups belong to.
        method: "weight", "activation", "identity", "composed" or "inverse".
        settings: the options used.
        groups: per-group diagnostics (similarity before/after, fraction of units moved, sweeps).
        log: the convergence log (one entry per sweep for weight matching).
    """

    perm: Permutation
    spec: PermutationSpec
    method: str = "weight"
    settings: dict[str, Any] = field(default_factory=dict)
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    log: list[dict[str, Any]] = field(default_factory=list)

    def apply(self, b):
        """Reorder B (a model, or a full or partial state dict such as a mask) onto A's units."""
        return _apply(b, self.spec, self.perm)

    def inverse(self) -> Alignment:
        """The alignment that maps A's units onto B's."""
        return Alignment(self.perm.inverse(), self.spec, "inverse", {"of": self.method})

    def after(self, other: Alignment) -> Alignment:
        """This alignment applied after ``other``: for ``ab = align(a, b)`` (B onto A) and
        ``bc = align(b, c)`` (C onto B), ``ab.after(bc)`` maps C onto A, and ``ab.after(bc).apply(c)`` equals
        ``ab.apply(bc.apply(c))``. (Plain permutations compose with ``permgraph.compose(p, q)``: p, then q.)"""
        if not isinstance(other, Alignment):
            raise TypeError(f"after() takes an Alignment, got {type(other).__name__}; compose permutations with "
                            "permgraph.compose(p, q)")
        if self.spec.fingerprint() != other.spec.fingerprint():
            raise SpecMismatchError("cannot chain alignments of different specs (their spec fingerprints differ); "
                                    "align every model with one spec")
        return Alignment(_compose(other.perm, self.perm), self.spec, "composed", {"of": [self.method, other.method]})

    @property
    def fixed_fraction(self) -> float:
        """Fraction of all units that the alignment leaves in place."""
        tot = sum(len(p) for p in self.perm.values())
        fixed = sum(int((p == torch.arange(len(p))).sum()) for p in self.perm.values())
        return fixed / max(tot, 1)

    def summary(self) -> str:
        lines = [f"Alignment ({self.method}) over {len(self.perm)} groups; "
                 f"{100 * (1 - self.fixed_fraction):.1f}% of units moved"]
        sweeps = [e for e in self.log if "objective" in e]
        if sweeps:
            lines.append(f"  weight-matching sweeps: {len(sweeps)}; objective {sweeps[0]['objective_before']:.4g}"
                         f" -> {sweeps[-1]['objective']:.4g}")
        for e in self.log:
            if "inputs" in e:
                lines.append(f"  activation pass: {e['inputs']} inputs; {e['groups_by_activation']} groups by "
                             f"activations, {e['groups_by_weight']} by weights")
        lines += self._least_certain()
        for g, d in list(self.groups.items())[:40]:
            extras = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())
            lines.append(f"  {g}: {extras}")
        if len(self.groups) > 40:
            lines.append(f"  ... and {len(self.groups) - 40} more groups (see .groups)")
        return "\n".join(lines)

    def _least_certain(self, k: int = 5) -> list[str]:
        """Summary lines naming the ``k`` groups of lowest ``confidence`` (docs/alignment.md, "How sure is
        each group?"), with their sizes and the modules they act on."""
        conf = {}
        for g, d in self.groups.items():
            try:
                c = float(d["confidence"])  # a loaded alignment holds "inf" as a string
            except (KeyError, TypeError, ValueError):
                continue
            if math.isfinite(c) or c < 0:
                conf[g] = c
        if not conf:
            return []
        worst = sorted(conf, key=lambda g: (conf[g], float(self.groups[g].get("margin", 0.0))))[:k]
        lines = ["  least certain groups (lowest confidence; near 0: some units are interchangeable):"]
        for g in worst:
            grp = self.spec.groups.get(g)
            where = ""
            if grp is not None:
                mods = grp.modules
                shown = ", ".join(mods[:3]) + (f" and {len(mods) - 3} more" if len(mods) > 3 else "")
                where = f" ({grp.size} units{'; ' + shown if shown else ''})"
            lines.append(f"    {g}{where}: confidence {conf[g]:.3g}, margin {float(self.groups[g]['margin']):.4g}")
        return lines

    __str__ = summary

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the permutations (safetensors) with JSON metadata: spec fingerprint, method, settings,
        per-group diagnostics, convergence log and the spec itself. Written atomically."""
        from safetensors.torch import save_file

        meta = {"permgraph_alignment": json.dumps({
            "version": 1, "spec_fingerprint": self.spec.fingerprint(), "method": self.method,
            "settings": _jsonable(self.settings), "groups": _jsonable(self.groups), "log": _jsonable(self.log),
        }), "spec": self.spec.to_json(indent=None)}
        tensors = {g: p.contiguous() for g, p in self.perm.items()}
        path = os.fspath(path)
        d = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str | os.PathLike, spec: PermutationSpec | None = None) -> Alignment:
        """Read an alignment written by ``save``. When ``spec`` is given it must match the saved one.

        Raises ``FileNotFoundError`` if ``path`` does not exist, ``FileFormatError`` (naming the file) if it
        is truncated, corrupted or not an alignment file, and ``SpecMismatchError`` if ``spec`` differs."""
        from safetensors import safe_open

        path = os.fspath(path)
        redo = "re-create it with permgraph.align(...).save(path)"
        if not os.path.exists(path):
            raise FileNotFoundError(f"alignment file {path} does not exist; {redo}")
        if os.path.isdir(path):
            raise IsADirectoryError(f"{path} is a folder, not an alignment file")
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except OSError:
            raise
        except Exception as e:  # safetensors' SafetensorError (a bad header) and friends
            raise FileFormatError(f"alignment file {path} is truncated or not a safetensors file ({e}); "
                                  f"delete it and {redo}") from None
        if "permgraph_alignment" not in meta:
            raise FileFormatError(f"{path} is a safetensors file but not a permgraph alignment (it has no "
                                  f"'permgraph_alignment' metadata); {redo}")
        try:
            info = json.loads(meta["permgraph_alignment"])
            try:
                saved = PermutationSpec.from_json(meta.get("spec", ""))
            except FileFormatError:
                raise ValueError("its stored spec is not a valid permgraph spec") from None
            fingerprint, method = info["spec_fingerprint"], info["method"]
            settings, groups, log = info["settings"], info["groups"], info["log"]
            perm = Permutation(tensors)
            sizes = saved.group_sizes()
            if any(sizes.get(g) != len(p) for g, p in perm.items()):
                raise ValueError("its permutations do not fit the spec stored with them")
        except (ValueError, KeyError, TypeError) as e:  # FileFormatError and JSONDecodeError are ValueErrors
            detail = f"missing entry {e}" if isinstance(e, KeyError) else str(e)
            raise FileFormatError(f"alignment file {path} is corrupted ({detail}); delete it and {redo}") from None
        if spec is not None and spec.fingerprint() != fingerprint:
            raise SpecMismatchError(f"{path} was computed for a different spec (fingerprint "
                                    f"{fingerprint} vs {spec.fingerprint()}); align the models again with this spec")
        return cls(perm, spec if spec is not None else saved, method, settings, groups, log)


def compose(p, q) -> Permutation:
    """The permutation equal to applying ``p`` first, then ``q`` (``compose(p, q)[g] = p[g][q[g]]``).
    Alignments chain with ``ab.after(bc)`` instead (C onto A for ``ab``: B onto A and ``bc``: C onto B)."""
    if isinstance(p, Alignment) or isinstance(q, Alignment):
        raise TypeError("compose(p, q) composes permutations (p first, then q); chain alignments with "
                        "ab.after(bc), which maps C onto A for ab = align(a, b) and bc = align(b, c)")
    return _compose(p, q)


# ---------------------------------------------------------------------------------------------- public
def align(a, b, method: str = "weight", loader=None, *, spec: PermutationSpec | None = None,
          example_inputs=None, max_iter: int = 100, seed: int = 0, device=None, num_samples: int | None = None,
          progress: bool = True, **options) -> Alignment:
    """Find the permutation of B's units that makes B closest to A.

    Args:
        a, b: models (or state dicts, with ``spec`` given) of the same architecture.
        method: ``"weight"`` (weight matching) or ``"activation"`` (activation matching, needs ``loader``).
        loader: any iterable of input batches or (input, target) pairs (a DataLoader works as is).
        spec: the PermutationSpec; default ``trace(a, example_inputs)``.
        max_iter: maximum number of weight-matching sweeps.
        seed: seed of the group order in weight matching.
        device: where to compute (default: where A's tensors are).
        num_samples: activation matching: stop after this many inputs.
        progress: show progress bars.
        **options: weight matching: ``include`` / ``exclude`` (glob patterns of state-dict keys),
            ``include_stats`` (BatchNorm running statistics in the objective; default False),
            ``prune_fraction`` and ``prune_mode`` ("small" | "large": match on copies with that fraction of
            each weight tensor's smallest / largest magnitudes zeroed; the result applies to the real
            weights), ``start`` ("auto", default: from the identity, and again from the anchored start
            when a group never moved, keeping the higher objective | "identity" | "anchored" | "both":
            also from an order-free start; see docs/alignment.md, "Where coordinate descent starts"),
            ``fold_bn`` (default False: match on copies with each BatchNorm folded
            into the conv / linear layer that feeds it; the result applies to the real weights; see
            docs/alignment.md). Activation matching: ``similarity`` ("pearson" | "inner" | "cosine"),
            ``residual`` ("activation", default | "weight": groups read only at residual sums, such as a
            transformer's residual stream, are matched by weights with the activation-matched groups fixed).

    Returns:
        an Alignment mapping B's units onto A's: ``alignment.apply(b)`` is B reordered (same function).

    Activation matching exports A's graph once per architecture and input shape and keeps it (without any
    model tensors) for later calls; on the first batch of each call it checks that the graph reproduces
    both models' outputs. A model B whose forward computes a different function of the same tensors
    raises ``SpecMismatchError``.
    """
    if method not in ("weight", "activation"):
        raise ValueError(f"method must be 'weight' or 'activation', got {method!r}")
    if spec is None:
        if not isinstance(a, nn.Module):
            raise TypeError("pass spec=... when aligning state dicts (or pass the models themselves)")
        from ._trace import trace

        spec = trace(a, example_inputs)
    sa, sb = _state(a), _state(b)
    check_same_spec(spec, sa, sb)
    settings = {"method": method, "max_iter": max_iter, "seed": seed, "num_samples": num_samples,
                "device": None if device is None else str(device), **options}
    if method == "weight":
        unknown = set(options) - {"include", "exclude", "include_stats", "prune_fraction", "prune_mode", "start",
                                  "fold_bn"}
        if unknown:
            raise TypeError(f"unknown weight-matching options {sorted(unknown)}")
        folded = None
        if "fold_bn" in options:
            from ._fold import check_option, fold_pair

            if check_option(options.pop("fold_bn")):  # folded copies, for the similarity only
                sa, sb, folded = fold_pair(spec, a, b, sa, sb, example_inputs)
        perm, diag, log = weight_matching(spec, sa, sb, max_iter=max_iter, seed=seed, progress=progress,
                                          device=device, **options)
        if folded is not None:
            log.insert(0, folded)
        return Alignment(perm, spec, "weight", settings, diag, log)
    if loader is None:
        raise ValueError("activation matching needs data: pass loader=<iterable of input batches>")
    if not (isinstance(a, nn.Module) and isinstance(b, nn.Module)):
        raise TypeError("activation matching needs the models themselves, not state dicts")
    from ._activations import activation_matching

    unknown = set(options) - {"similarity", "residual"}
    if unknown:
        raise TypeError(f"unknown activation-matching options {sorted(unknown)}")
    perm, diag, log = activation_matching(spec, a, b, loader, num_samples=num_samples, device=device,
                                          progress=progress, seed=seed, max_iter=max_iter, **options)
    return Alignment(perm, spec, "activation", settings, diag, log)


def identity_alignment(spec: PermutationSpec) -> Alignment:
    """The alignment that moves nothing."""
    return Alignment(identity(spec), spec, "identity")
