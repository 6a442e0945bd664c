"""Recurrent layers as single ops while a model is exported.

``aten.lstm`` (and ``gru``, ``rnn_tanh``, ``rnn_relu``) are composite ops: torch.export keeps them as one
node in the graph, but to learn their output shapes it runs their decomposition under fake tensors, about
250 fake ops per LSTM layer; a Sequencer with 36 LSTMs spent 5 of its 6.5 s of tracing there. While
``permgraph`` exports a model, ``nn.LSTM``/``nn.GRU``/``nn.RNN`` call the custom ops below instead: the same
arguments and results as the ATen op, a real kernel that calls it, and a fake kernel that only computes
shapes. The tracer's rule for recurrent layers reads them exactly like the ATen ops, and the exported
graph still runs (activation matching runs it) through the real kernel.

Only calls made while exporting are redirected (``torch.compiler.is_exporting()``); packed sequences keep
the ATen op.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.modules.rnn as _rnn_module
from torch import Tensor


def _out(input: Tensor, h: Tensor, bidirectional: bool) -> Tensor:
    """The output's shape: the input's, with the feature dim replaced by directions x hidden (projected) size."""
    return input.new_empty(tuple(input.shape[:-1]) + ((2 if bidirectional else 1) * h.shape[-1],))


@torch.library.custom_op("permgraph::lstm", mutates_args=())
def lstm(input: Tensor, hx: list[Tensor], params: list[Tensor], has_biases: bool, num_layers: int,
         dropout: float, train: bool, bidirectional: bool, batch_first: bool) -> tuple[Tensor, Tensor, Tensor]:
    out, h, c = torch.lstm(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)
    return out, h, c


@lstm.register_fake
def _lstm_fake(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    return _out(input, hx[0], bidirectional), hx[0].new_empty(hx[0].shape), hx[1].new_empty(hx[1].shape)


def _single_state(name: str):
    aten_op = getattr(torch, name)

    def impl(input: Tensor, hx: Tensor, params: list[Tensor], has_biases: bool, num_layers: int,
             dropout: float, train: bool, bidirectional: bool, batch_first: bool) -> tuple[Tensor, Tensor]:
        out, h = aten_op(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)
        return out, h

    impl.__name__ = name
    op = torch.library.custom_op(f"permgraph::{name}", impl, mutates_args=())

    @op.register_fake
    def _fake(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
        return _out(input, hx, bidirectional), hx.new_empty(hx.shape)

    return op


gru = _single_state("gru")
rnn_tanh = _single_state("rnn_tanh")
rnn_relu = _single_state("rnn_relu")

#: the custom ops, by the name of the ATen op each stands for
OPS = {"lstm": lstm, "gru": gru, "rnn_tanh": rnn_tanh, "rnn_relu": rnn_relu}
#: their op packets (what an exported graph's nodes target), for the tracer's rules
PACKETS = [getattr(torch.ops.permgraph, name) for name in OPS]


class _VFWhileExporting:
    """Stands in for ``torch._VF`` inside ``torch.nn.modules.rnn``: the unpacked recurrent calls made while
    exporting go to the custom ops, everything else to ``torch._VF``."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        fn = getattr(self._real, name)
        op = OPS.get(name)
        if op is None:
            return fn

        def call(*args, **kwargs):
            # unpacked: (input, hx, params, ...), with an LSTM's hx a pair and the params a list; packed:
            # (data, batch_sizes, hx, params, ...), with batch_sizes a tensor
            unpacked = len(args) == 9 and not kwargs and isinstance(args[1 if name == "lstm" else 2], (list, tuple))
            if unpacked and torch.compiler.is_exporting():
                return op(args[0], list(args[1]) if name == "lstm" else args[1], list(args[2]), *args[3:])
            return fn(*args, **kwargs)

        return call


_lock = threading.Lock()
_depth = 0
_saved = None


@contextlib.contextmanager
def recurrent_as_ops():
    """Inside the block, ``nn.LSTM``/``nn.GRU``/``nn.RNN`` export as the custom ops above (re-entrant)."""
    global _depth, _saved
    with _lock:
        if _depth == 0:
            _saved = _rnn_module._VF
            _rnn_module._VF = _VFWhileExporting(_saved)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _rnn_module._VF = _saved
                _saved = None
