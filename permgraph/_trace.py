"""Tracing: torch.export (here) -> the walk over the ATen graph (``_walk.Propagator``, with the label
algebra of ``_labels`` and the op rules of ``_rules``) -> the PermutationSpec (``_build``) -> verification
(``_verify``)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from ._build import build_spec
from ._inputs import (
    _reason,
    describe_inputs,
    kept_modes,
    record_inputs,
    resolve_inputs,
)
from ._rnn import recurrent_as_ops
from ._walk import Propagator
from .errors import TraceError
from .spec import PermutationSpec

# ---------------------------------------------------------------------------------------------- export
# torch.export's failures print the partial graph to stderr (twice) and log through torch's loggers; the
# TraceError already says what failed, so that output is held back while permgraph exports
_EXPORT_LOCK = threading.RLock()
_LOGGERS = ("torch", "torch.export", "torch._export", "torch._dynamo", "torch.fx.experimental.symbolic_shapes",
            "torch._subclasses.fake_tensor", "torch._functorch.aot_autograd")


def _torch_logger_names() -> list[str]:
    try:  # every logger torch gives its own handler (they do not propagate to "torch")
        from torch._logging._internal import log_registry

        return sorted(set(_LOGGERS) | set(log_registry.get_log_qnames()))
    except Exception:  # pragma: no cover - private torch API moved
        return list(_LOGGERS)


class _Held(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class _ThreadStderr:
    """sys.stderr for the duration of an export: this thread's writes are held, other threads' pass."""

    def __init__(self, real) -> None:
        self.real, self.thread, self.held = real, threading.get_ident(), io.StringIO()

    def write(self, s: str) -> int:
        return (self.held if threading.get_ident() == self.thread else self.real).write(s)

    def flush(self) -> None:
        self.real.flush()

    def __getattr__(self, name):
        return getattr(self.real, name)


@contextlib.contextmanager
def _quiet_torch() -> Iterator[list[str]]:
    """Hold back what torch logs or prints to stderr while the body runs. The held text is appended to
    the yielded list; on success it is passed on unchanged (replayed), on an exception it is not printed.
    With ``TORCH_LOGS`` set (the user asked for torch's logs) nothing is held."""
    details: list[str] = []
    if os.environ.get("TORCH_LOGS"):
        yield details
        return
    with _EXPORT_LOCK:
        held = _Held()
        saved = []
        for name in _torch_logger_names():
            lg = logging.getLogger(name)
            saved.append((lg, lg.handlers, lg.propagate))
            lg.handlers, lg.propagate = [held], False
        real_stderr = sys.stderr
        err = _ThreadStderr(real_stderr)
        sys.stderr = err
        failed = True
        try:
            yield details
            failed = False
        finally:
            if sys.stderr is err:
                sys.stderr = real_stderr
            for lg, handlers, propagate in saved:
                lg.handlers, lg.propagate = handlers, propagate
            mine = threading.get_ident()
            fmt = logging.Formatter("%(levelname)s %(name)s: %(message)s")
            for rec in held.records:
                if failed and rec.thread == mine:
                    details.append(fmt.format(rec))
                else:
                    logging.getLogger(rec.name).handle(rec)
            if failed:
                details.append(err.held.getvalue())
            else:
                real_stderr.write(err.held.getvalue())


def _user_location(e: BaseException) -> str:
    """``file:line in function: code`` of the user's code where tracing failed, if it can be found."""
    m = re.search(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(\S[^\n]*)', str(e))
    if m:
        return f"{m.group(1)}:{m.group(2)} in {m.group(3)}: {m.group(4).strip()}"
    torch_dir = os.path.dirname(torch.__file__)
    here = os.path.dirname(os.path.abspath(__file__))
    py_dir = os.path.dirname(os.__file__)
    for fr in reversed(traceback.extract_tb(e.__traceback__)):
        f = os.path.abspath(fr.filename)
        if not f.startswith((torch_dir, here, py_dir)) and "site-packages" not in f and not f.startswith("<"):
            return f"{fr.filename}:{fr.lineno} in {fr.name}: {(fr.line or '').strip()}"
    return ""


@contextlib.contextmanager
def _without_caches(model: nn.Module):
    """Hugging Face models return a key/value cache object (``DynamicCache``) with their outputs when
    ``config.use_cache`` is on; torch.export cannot return it, and it does not change the function of one
    forward pass. Switched off inside the block (every submodule's config), put back afterwards."""
    saved = []
    for m in model.modules():
        config = getattr(m, "config", None)
        if getattr(config, "use_cache", None) is True:
            saved.append(config)
            config.use_cache = False
    try:
        yield
    finally:
        for config in saved:
            config.use_cache = True


@contextlib.contextmanager
def _without_stack_traces():
    """torch records the Python stack of every node it creates while exporting (about 0.6 ms a node,
    a fifth of a Sequencer's export); permgraph reads the nodes' module paths, never their stacks."""
    try:
        import torch.fx.config as config
    except ImportError:  # an older torch: it records them
        config = None
    saved = getattr(config, "do_not_emit_stack_traces", None)
    if saved is None:
        yield
        return
    config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        config.do_not_emit_stack_traces = saved


@contextlib.contextmanager
def _lazy_graph_modules():
    """torch.export's passes regenerate and compile the graph's Python code after each one (six times for
    a DenseNet-121, 0.1-0.3 s); lazy graph modules generate it once, when the code is first needed. The
    flag is torch's own (what torch.compile uses) and is put back on leaving."""
    try:
        from torch.fx._lazy_graph_module import _use_lazy_graph_module
    except ImportError:  # an older or newer torch without it: compile eagerly
        yield
        return
    with _use_lazy_graph_module(True):
        yield


def export(model: nn.Module, example_inputs: tuple, guessed: bool = False) -> torch.export.ExportedProgram:
    """torch.export in eval mode, restoring the caller's train/eval flags afterwards. A failure raises one
    short ``TraceError`` (torch's own log output is in its ``details`` attribute, not printed)."""
    details: list[str] = []
    try:
        with _quiet_torch() as details, kept_modes(model), _without_caches(model), torch.no_grad(), \
                recurrent_as_ops(), _without_stack_traces(), _lazy_graph_modules(), warnings.catch_warnings():
            # nn.LSTM/GRU/RNN reassign their ``_flat_weights`` list while exported; torch warns about it,
            # harmlessly (the weights are the module's parameters and reach the graph as such)
            warnings.filterwarnings("ignore", message=r"The tensor attributes .*_flat_weights")
            model.eval()
            return torch.export.export(model, example_inputs, strict=False)
    except Exception as e:  # torch.export raises many types; re-raise as one permgraph error
        failure = e
    name = type(model).__name__
    where = _user_location(failure)
    shapes = describe_inputs(record_inputs(tuple(example_inputs))) or "not all tensors"
    if "data-dependent" in str(failure).lower() or "DataDependent" in type(failure).__name__:
        what = ("the forward pass branches on tensor values (if/while on a tensor, .item()), which torch.export "
                "cannot capture: rewrite it with torch.where or torch.cond")
    else:
        what = "permgraph needs a model torch.export can capture, and example inputs the model accepts"
    given = (f"the example inputs were guessed ({shapes}): if they are wrong, pass the right ones, e.g. "
             "permgraph.trace(model, (torch.randn(4, 40),))" if guessed else f"the example inputs were {shapes}")
    err = TraceError(
        f"torch.export could not trace {name}: {type(failure).__name__}: {_reason(failure)}\n"
        + (f"  at {where}\n" if where else "")
        + f"{what}; {given}. If {name} is a standard architecture, please report it.")
    err.details = "\n".join(d for d in details if d.strip())
    raise err from failure


def _tied_keys(model: nn.Module) -> dict[str, str]:
    """State-dict keys that share storage with an earlier key (tied weights): key -> first key."""
    first: dict[tuple, str] = {}
    tied: dict[str, str] = {}
    for k, t in model.state_dict(keep_vars=True).items():
        if t.numel() == 0:
            continue
        sig = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if sig in first:
            tied[k] = first[sig]
        else:
            first[sig] = k
    return tied


def trace(model: nn.Module, example_inputs=None, *, verify: bool = True, freeze: Iterable[str] = (),
          seed: int = 0, nested_heads: bool = True) -> PermutationSpec:
    """Trace ``model`` into a verified PermutationSpec.

    Args:
        model: any ``nn.Module`` that ``torch.export`` can capture. It is traced in eval mode and is not
            changed (its train/eval flags are restored).
        example_inputs: a tensor or a tuple of positional inputs. Inferred when omitted (permgraph zoo
            models, timm ``pretrained_cfg["input_size"]``, else the first Linear/Conv layer). Their shapes
            and dtypes (not their values) are kept in ``spec.input_shapes``, so that ``check_equivalence``
            and ``from_json(model=...)`` can build inputs like them later.
        verify: apply a random permutation of every group to a copy with randomised norm statistics and
            affine parameters, and check the output is unchanged; groups that change it are found by
            bisection, frozen and reported. The returned spec always preserves the function.
        freeze: glob patterns of state-dict keys (or module-name prefixes) whose axes must not move,
            e.g. ``["fc.*"]`` or ``["head"]``.
        seed: seed of the verification's random permutation.
        nested_heads: give every attention head its own permutation of its query/key dims and of its
            value/output dims, with the heads permuted as wholes (the full symmetry; ``Group.blocks``).
            False keeps one permutation of the head dims shared by all heads (a subgroup).

    Raises:
        TraceError: ``torch.export`` failed (one short message: torch's reason, where in the model's code,
            what to do; torch's own log output is in the error's ``details``, not printed), or no example
            inputs were given and none can be inferred.

    Example:
        >>> import permgraph
        >>> spec = permgraph.trace(permgraph.models.create("mlp", width=16, depth=2))
        >>> len(spec.groups)
        2
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"trace() takes an nn.Module, not {type(model).__name__}")
    inputs = resolve_inputs(model, example_inputs)
    t0 = time.perf_counter()
    ep = export(model, inputs, guessed=example_inputs is None)
    t1 = time.perf_counter()
    prop = Propagator(ep, _tied_keys(model))
    prop.run()
    info = {"model": type(model).__name__,
            "example_input_shapes": [list(x.shape) for x in inputs if isinstance(x, torch.Tensor)],
            "unsupported_ops": dict(prop.unknown_ops)}
    spec = build_spec(prop, model, info, record_inputs(inputs), nested_heads)
    freeze = list(freeze)
    if freeze:
        spec = spec.freeze_keys(freeze, f"frozen by trace(freeze={freeze})")
    t2 = time.perf_counter()
    if verify:
        from ._verify import verify_and_repair

        spec = verify_and_repair(spec, model, inputs, seed=seed)
    t3 = time.perf_counter()
    return spec.with_info(timings={"export_s": round(t1 - t0, 4), "propagate_s": round(t2 - t1, 4),
                                   "verify_s": round(t3 - t2, 4)})
