"""A model's inputs and modes, for tracing, verification and evaluation: example inputs (given, recorded
in a spec, or guessed from the model), their description in messages, and ``kept_modes``. A leaf: it
imports nothing of permgraph but the errors and (lazily) the model zoo's example inputs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .errors import TraceError


def _as_tuple(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return tuple(example_inputs)


def resolve_inputs(model: nn.Module, example_inputs) -> tuple:
    if example_inputs is None:
        from .models import example_inputs_for

        example_inputs = example_inputs_for(model)
        if example_inputs is None:
            raise TraceError(
                f"cannot infer example inputs for {type(model).__name__}: it has no Linear/Conv layer to "
                "infer them from. Pass them explicitly, e.g. permgraph.trace(model, (torch.randn(2, 3, 32, 32),))")
    return _as_tuple(example_inputs)


def record_inputs(inputs: tuple) -> tuple:
    """The ``(shape, dtype name)`` of each positional input, or ``()`` unless every input is a tensor."""
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        return ()
    return tuple((tuple(int(s) for s in x.shape), str(x.dtype).removeprefix("torch.")) for x in inputs)


def describe_inputs(recorded: tuple) -> str:
    return ", ".join(f"{tuple(shape)} {dtype}" for shape, dtype in recorded)


def inputs_like(recorded: tuple, device: torch.device | str = "cpu", seed: int = 0) -> tuple:
    """Inputs with the recorded shapes and dtypes: standard normal floats, integers in {0, 1}, False
    booleans, drawn from a local generator seeded ``seed`` (the global random state is not touched)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape, name in recorded:
        dtype = getattr(torch, str(name), None)
        if not isinstance(dtype, torch.dtype):
            raise TraceError(f"the spec records an input of dtype {name!r}, which this torch does not know; "
                             "pass example_inputs explicitly")
        if dtype.is_floating_point or dtype.is_complex:
            x = torch.randn(shape, generator=gen, dtype=dtype if dtype.is_complex else torch.float32).to(dtype)
        elif dtype == torch.bool:
            x = torch.zeros(shape, dtype=dtype)
        else:
            x = torch.randint(0, 2, shape, generator=gen).to(dtype)
        out.append(x.to(device))
    return tuple(out)


def checking_inputs(model: nn.Module, example_inputs, recorded: tuple = ()) -> tuple[tuple, str]:
    """The inputs to check a spec on, and where they came from (for error messages): ``example_inputs``
    if given, else inputs shaped like the ones the spec was traced with, else inputs guessed from the model."""
    if example_inputs is not None:
        return _as_tuple(example_inputs), "the given example inputs"
    if recorded:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        return inputs_like(recorded, device), f"inputs shaped like the spec's example inputs ({describe_inputs(recorded)})"
    inputs = resolve_inputs(model, None)
    return inputs, f"guessed example inputs ({describe_inputs(record_inputs(inputs))})"


@contextlib.contextmanager
def kept_modes(model: nn.Module) -> Iterator[nn.Module]:
    """Restore the train/eval flag of every submodule of ``model`` on exit, whatever the body set."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield model
    finally:
        for m, t in flags:
            m.training = t


def _reason(e: BaseException) -> str:
    """The first meaningful line of an exception's message."""
    for line in str(e).splitlines():
        line = line.strip()
        if line and not line.lower().startswith(("the above exception", "while executing", "traceback (")):
            return line if len(line) <= 300 else line[:297] + "..."
    return "(no message)"
