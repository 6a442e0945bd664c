"""The tracer's walk: one pass over the exported ATen graph that labels every tensor dim (an
fx-Interpreter-like pass that needs no real tensors: shapes come from ``node.meta["val"]``), dispatching
each op to its rule in ``_rules.py``."""

from __future__ import annotations

import os
import warnings

import torch
from torch.export.graph_signature import InputKind, OutputKind

from ._atoms import StructureError
from ._labels import Label, Labels
from ._rules import lookup

# Strict mode (the test suite sets it): an exception other than StructureError inside a rule is a bug in
# permgraph and raises RuleError, instead of freezing the op with a warning. PERMGRAPH_STRICT_RULES=1 sets it.
STRICT_RULES = os.environ.get("PERMGRAPH_STRICT_RULES", "") not in ("", "0")


class RuleError(RuntimeError):
    """A rule of permgraph failed on an op (a bug: please report it)."""


class RuleWarning(UserWarning):
    """A rule of permgraph failed on an op, which was frozen so that the spec stays correct."""


class Propagator(Labels):
    """Walks the exported graph once (``run``), labelling every node's tensors; the parameters' and
    buffers' labels end in ``param_labels`` (by state-dict key), ops without a rule in ``unknown_ops``."""

    def __init__(self, exported: torch.export.ExportedProgram, tied: dict[str, str] | None = None):
        super().__init__()
        self.ep = exported
        self.tied = tied or {}  # state-dict key -> the key it shares storage with
        self.param_labels: dict[str, Label] = {}
        self.unknown_ops: dict[str, int] = {}

    def unknown(self, node, reason: str | None = None):
        """An op permgraph does not understand: freeze every atom it touches; fresh frozen outputs."""
        why = reason or f"unsupported op {self.opname(node)}"
        self.unknown_ops[why] = self.unknown_ops.get(why, 0) + 1
        msg = self.located(why, node)

        def freeze_all(x):
            if isinstance(x, tuple):
                for a in x:
                    self.atoms.freeze(a, msg)
            elif isinstance(x, list):
                for y in x:
                    freeze_all(y)

        for a in node.all_input_nodes:
            freeze_all(self.env.get(a))
        return self._fresh_like(self.meta(node), msg)

    def run(self) -> None:
        sig = self.ep.graph_signature
        specs = {s.arg.name: s for s in sig.input_specs if hasattr(s.arg, "name")}
        for node in self.ep.graph.nodes:
            self.node = node
            if node.op == "placeholder":
                self.env[node] = self._placeholder(node, specs.get(node.name))
            elif node.op == "call_function":
                self.env[node] = self._call(node)
            elif node.op == "output":
                self._outputs(node)
            else:
                self.env[node] = self._fresh_like(self.meta(node), f"{node.op} node {node.name}")

    def _placeholder(self, node, spec):
        val = self.meta(node)
        if not isinstance(val, torch.Tensor):
            return None
        shape = tuple(val.shape)
        if spec is None:
            return self.fresh(shape, f"input {node.name}")
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and getattr(spec, "persistent", True) is not False:
            canon = self.tied.get(spec.target)
            if canon is not None and canon in self.param_labels:  # tied weights: one tensor, one label
                return self.param_labels[canon]
            lab = self.fresh(shape)
            self.param_labels[spec.target] = lab
            return lab
        if spec.kind == InputKind.USER_INPUT:
            return self.fresh(shape, "model input")
        return self.fresh(shape, f"constant tensor {spec.target} is not in the state dict")

    def _call(self, node):
        fn = lookup(node.target)
        if fn is None:
            if self.meta(node) is None or not node.all_input_nodes:
                return None
            return self.unknown(node)
        try:
            out = fn(self, node)
        except StructureError as e:  # the rule's own verdict: these axes cannot be tracked through the op
            return self.unknown(node, f"{self.opname(node)}: {e}")
        except (IndexError, TypeError, ValueError, KeyError, AttributeError) as e:
            # a bug in the rule (or an op signature it does not expect): loud in strict mode (the test suite),
            # otherwise the op is frozen, so the spec stays correct, and the failure is reported
            if STRICT_RULES:
                raise RuleError(f"permgraph's rule for {self.opname(node)} failed at {self._where(node)}: "
                                f"{type(e).__name__}: {e}") from e
            why = (f"{self.opname(node)}: permgraph's rule failed ({type(e).__name__}: {e}); frozen, please "
                   "report it")
            warnings.warn(f"{why} ({self._where(node)})", RuleWarning, stacklevel=2)
            return self.unknown(node, why)
        if not self._shapes_match(out, self.meta(node)):
            return self.unknown(node, f"{self.opname(node)}: propagated shape disagrees with the graph")
        return out

    def _shapes_match(self, lab, val) -> bool:
        if isinstance(val, torch.Tensor):
            return isinstance(lab, tuple) and tuple(self.size(a) for a in lab) == tuple(val.shape)
        if isinstance(val, (list, tuple)):
            return isinstance(lab, list) and len(lab) == len(val) and all(
                self._shapes_match(a, v) for a, v in zip(lab, val))
        return lab is None or not isinstance(lab, tuple)

    def _outputs(self, node):
        sig = self.ep.graph_signature
        outs = node.args[0]
        for spec, arg in zip(sig.output_specs, outs):
            lab = self.env.get(arg) if isinstance(arg, torch.fx.Node) else None
            if spec.kind == OutputKind.BUFFER_MUTATION and spec.target in self.param_labels and isinstance(lab, tuple):
                for a, b in zip(self.param_labels[spec.target], lab):
                    self.unify(a, b)
            elif isinstance(lab, tuple):
                for a in lab:
                    self.atoms.freeze(a, "model output")
