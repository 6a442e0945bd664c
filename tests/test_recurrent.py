"""Recurrent layers: nn.LSTM / nn.GRU / nn.RNN (aten.lstm / gru / rnn_tanh / rnn_relu) and their cells.

Each layer and direction has its own permutation of its hidden units. It acts on the rows of every gate
block of weight_ih, weight_hh and the biases (the gate blocks stay in place), on weight_hh's columns and
on whatever reads the hidden state: the next layer's weight_ih columns ([forward, backward] for a
bidirectional layer) or the output. With proj_size the cell units and the projected units are two
permutations. The specs are checked functionally and the planted permutation is recovered by both matchers.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import permgraph
from permgraph._verify import randomize_

GATES = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}


class Seq(nn.Module):
    """Linear input -> recurrent layer -> linear head, reading the output sequence or the final state."""

    def __init__(self, cls=nn.LSTM, read="output", inp=3, hidden=6, **kw):
        super().__init__()
        self.read = read
        self.inp = nn.Linear(inp, 4)
        self.rnn = cls(4, hidden, **kw)
        units = kw.get("proj_size") or hidden
        dirs = 2 if kw.get("bidirectional") else 1
        self.head = nn.Linear(units * (dirs if read == "output" else 1), 2)

    def forward(self, x):
        y, state = self.rnn(torch.tanh(self.inp(x)))
        if self.read == "output":
            return self.head(y.mean(1 if self.rnn.batch_first else 0))
        h = state[0] if isinstance(state, tuple) else state
        return self.head(h[-1])  # the last layer's (last direction's) final state


def _x(batch_first=True, seed=0):
    shape = (2, 5, 3) if batch_first else (5, 2, 3)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _check_function(model, spec, x):
    """Library check (float64, randomised statistics) and an independent one: random permutations of the
    float32 model, applied with permgraph.apply, leave the output unchanged and move the weights."""
    res = permgraph.check_equivalence(model, spec, (x,))
    assert res.ok, (res.rel_error, res.failing)
    model = model.eval()
    ref = model(x)
    for s in range(2):
        perm = permgraph.random_permutation(spec, s)
        permuted = permgraph.apply(model, spec, perm)
        assert torch.allclose(permuted(x), ref, rtol=1e-5, atol=1e-6)
        assert not torch.equal(permuted.rnn.weight_hh_l0, model.rnn.weight_hh_l0)


VARIANTS = [
    pytest.param(cls, kw, id=f"{cls.__name__}-" + "-".join(f"{k}{v}" for k, v in kw.items()))
    for cls in (nn.LSTM, nn.GRU, nn.RNN)
    for kw in (dict(num_layers=1), dict(num_layers=2, batch_first=True),
               dict(num_layers=2, bidirectional=True, batch_first=True))
] + [
    pytest.param(nn.LSTM, dict(num_layers=1, proj_size=3), id="LSTM-proj"),
    pytest.param(nn.LSTM, dict(num_layers=2, bidirectional=True, proj_size=3), id="LSTM-proj-bidirectional"),
]


@pytest.mark.parametrize("cls,kw", VARIANTS)
def test_recurrent_layer_hidden_units_are_groups(cls, kw):
    m = Seq(cls, **kw).eval()
    x = _x(kw.get("batch_first", False))
    spec = permgraph.trace(m, x)
    assert spec.info["verification"]["status"] == "passed"
    assert not spec.info["unsupported_ops"]
    assert "nothing frozen for lack of understanding" in spec.report()
    assert spec.permutable_keys() == [k for k in m.state_dict() if k != "head.bias"]

    g, layers = GATES[cls], kw.get("num_layers", 1)
    dirs = 2 if kw.get("bidirectional") else 1
    proj = kw.get("proj_size")
    feed = spec.axes["inp.weight"][0]  # what layer 0 reads
    seen = set()
    for layer in range(layers):
        outs = []
        for d in range(dirs):
            sfx = f"l{layer}" + ("_reverse" if d else "")
            (rows, cols) = spec.axes[f"rnn.weight_ih_{sfx}"]
            unit = rows if g == 1 else rows["prod"][1]
            assert rows == (unit if g == 1 else {"prod": [g, unit]})  # gate blocks stay, units move
            assert isinstance(unit, str) and spec.groups[unit].size == 6
            assert cols == feed
            out = spec.axes[f"rnn.weight_hr_{sfx}"][0] if proj else unit
            assert spec.axes[f"rnn.weight_hh_{sfx}"] == [rows, out]
            assert spec.axes[f"rnn.bias_ih_{sfx}"] == spec.axes[f"rnn.bias_hh_{sfx}"] == [rows]
            if proj:
                assert spec.axes[f"rnn.weight_hr_{sfx}"] == [out, unit] and spec.groups[out].size == proj
            seen.update({unit, out})
            outs.append(out)
        feed = {"sum": outs} if dirs == 2 else outs[0]
    assert len(seen) == layers * dirs * (2 if proj else 1)  # every layer and direction on its own
    assert spec.axes["head.weight"][1] == feed
    _check_function(m, spec, x)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_reading_the_stacked_final_state_shares_one_permutation(cls):
    """h_n holds every layer and direction in one tensor with one unit axis: reading it ties their
    output units into one group (a subgroup of the symmetry, but valid)."""
    m = Seq(cls, read="state", num_layers=2, bidirectional=True).eval()
    x = _x(False)
    spec = permgraph.trace(m, x)
    assert spec.info["verification"]["status"] == "passed"
    units = {spec.axes[f"rnn.weight_hh_l{i}{s}"][1] for i in range(2) for s in ("", "_reverse")}
    assert len(units) == 1 and spec.axes["head.weight"][1] in units
    _check_function(m, spec, x)


def test_proj_lstm_reading_the_final_state_keeps_the_cell_units_apart():
    m = Seq(nn.LSTM, read="state", num_layers=2, proj_size=3).eval()
    x = _x(False)
    spec = permgraph.trace(m, x)
    outs = {spec.axes[f"rnn.weight_hr_l{i}"][0] for i in range(2)}
    cells = {spec.axes[f"rnn.weight_hr_l{i}"][1] for i in range(2)}
    assert len(outs) == 1 and len(cells) == 2  # h_n ties the projected units only; c_n is not read
    _check_function(m, spec, x)


class LearnedState(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(3, 6, num_layers=2, batch_first=True)
        self.h0 = nn.Parameter(torch.randn(2, 1, 6))
        self.c0 = nn.Parameter(torch.randn(2, 1, 6))
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        b = x.shape[0]
        y, _ = self.rnn(x, (self.h0.expand(-1, b, -1).contiguous(), self.c0.expand(-1, b, -1).contiguous()))
        return self.head(y[:, -1])


class GivenState(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(3, 6, batch_first=True)
        self.head = nn.Linear(6, 2)

    def forward(self, x, h):
        y, _ = self.rnn(x, h)
        return self.head(y[:, -1])


def test_initial_states():
    """A learned initial state joins the units of every layer (one unit axis for all); a state that is a
    model input freezes the units it touches."""
    m = LearnedState().eval()
    x = _x()
    spec = permgraph.trace(m, x)
    (g,) = spec.groups
    assert spec.axes["h0"] == spec.axes["c0"] == [2, 1, g]
    assert spec.axes["rnn.weight_hh_l1"] == [{"prod": [4, g]}, g]
    res = permgraph.check_equivalence(m, spec, (x,))
    assert res.ok

    m = GivenState().eval()
    h = torch.randn(1, 2, 6)
    spec = permgraph.trace(m, (x, h))
    assert spec.axes["rnn.weight_hh_l0"] == [18, 6] and not spec.groups


class Cells(nn.Module):
    def __init__(self, cls):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.cell = cls(4, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        state = None
        for t in range(x.shape[1]):
            state = self.cell(torch.tanh(self.inp(x[:, t])), state)
        return self.head(state[0] if isinstance(state, tuple) else state)


@pytest.mark.parametrize("cls,g", [(nn.LSTMCell, 4), (nn.GRUCell, 3), (nn.RNNCell, 1)])
def test_recurrent_cells(cls, g):
    m = Cells(cls).eval()
    x = _x()
    spec = permgraph.trace(m, x)
    h = spec.axes["head.weight"][1]
    assert spec.axes["cell.weight_hh"] == [h if g == 1 else {"prod": [g, h]}, h]
    assert spec.axes["cell.weight_ih"][1] == spec.axes["inp.weight"][0]
    assert permgraph.check_equivalence(m, spec, (x,)).ok


# --------------------------------------------------------------------------- planted permutations
class Classifier(nn.Module):
    """Token ids (Embedding) or feature vectors (Linear) -> LSTM/GRU -> linear head on the last step."""

    def __init__(self, vocab=None, cls=nn.LSTM, **kw):
        super().__init__()
        self.embed = nn.Embedding(vocab, 8) if vocab else nn.Linear(5, 8)
        self.rnn = cls(8, 16, batch_first=True, **kw)
        dirs = 2 if kw.get("bidirectional") else 1
        self.head = nn.Linear((kw.get("proj_size") or 16) * dirs, 3)

    def forward(self, x):
        y, _ = self.rnn(self.embed(x))
        return self.head(y[:, -1])


def _inputs(vocab, n, g):
    return torch.randint(0, vocab, (n, 7), generator=g) if vocab else torch.randn(n, 7, 5, generator=g)


PLANTED = [
    pytest.param(None, nn.LSTM, {}, id="linear-lstm"),
    pytest.param(50, nn.LSTM, {}, id="embedding-lstm"),
    pytest.param(None, nn.LSTM, dict(num_layers=2, bidirectional=True), id="linear-lstm-2-bidirectional"),
    pytest.param(50, nn.GRU, dict(num_layers=2), id="embedding-gru-2"),
    pytest.param(None, nn.LSTM, dict(num_layers=2, proj_size=6), id="linear-lstm-proj"),
]


@pytest.mark.parametrize("vocab,cls,kw", PLANTED)
def test_both_matchers_recover_a_planted_permutation(vocab, cls, kw):
    a = Classifier(vocab, cls, **kw).eval()
    g = torch.Generator().manual_seed(0)
    x = _inputs(vocab, 2, g)
    spec = permgraph.trace(a, x)
    assert spec.info["verification"]["status"] == "passed"
    randomize_(a, torch.Generator().manual_seed(1))
    perm = permgraph.random_permutation(spec, 3)
    assert all(not torch.equal(p, torch.arange(len(p))) for p in perm.values())
    b = permgraph.apply(a, spec, perm)
    inv = permgraph.inverse(perm)
    loader = [(_inputs(vocab, 16, g), torch.zeros(16)) for _ in range(4)]
    for method in ("weight", "activation"):
        al = permgraph.align(a, b, method, loader=loader if method == "activation" else None, spec=spec,
                             progress=False)
        wrong = {k: int((al.perm[k] != inv[k]).sum()) for k in inv}
        assert not any(wrong.values()), (method, wrong)
        aligned = al.apply(b)
        xs = loader[0][0]
        assert torch.allclose(aligned(xs), b(xs), rtol=1e-5, atol=1e-6)
        sd_a, sd_al = a.state_dict(), aligned.state_dict()
        assert all(torch.allclose(sd_a[k], sd_al[k]) for k in sd_a)


def test_activation_matching_taps_the_last_layer_output_only():
    """The hidden states of inner layers and of the two directions' halves exist only inside the aten.lstm
    op: activation matching taps the output of a unidirectional last layer and leaves the rest to weight
    matching (with the tapped groups held fixed)."""
    for kw, by_act in ((dict(), 2), (dict(num_layers=2), 2), (dict(num_layers=2, bidirectional=True), 1)):
        a = Classifier(None, nn.LSTM, **kw).eval()
        g = torch.Generator().manual_seed(0)
        spec = permgraph.trace(a, _inputs(None, 2, g))
        b = permgraph.apply(a, spec, permgraph.random_permutation(spec, 3))
        al = permgraph.align(a, b, "activation", loader=[_inputs(None, 16, g)], spec=spec, progress=False)
        log = al.log[0]
        assert log["groups_by_activation"] == by_act, (kw, log)
        assert log["groups_by_activation"] + log["groups_by_weight"] == len(spec.groups)


@pytest.mark.parametrize("seed", [0, 1])
def test_lstm_equivalence_with_random_weights(seed):
    """Arbitrary weights (not the default init): gates saturate differently, the spec still holds."""
    m = Seq(nn.LSTM, num_layers=2, bidirectional=True, batch_first=True).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in m.state_dict().values():
            t.copy_(torch.randn(t.shape, generator=g))
    x = _x(True, seed)
    spec = permgraph.trace(m, x)
    assert spec.info["verification"]["status"] == "passed"
    _check_function(copy.deepcopy(m), spec, x)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
def test_recurrent_layers_export_as_one_op_with_a_shape_only_fake_kernel(cls):
    """While permgraph exports, a recurrent layer becomes one permgraph op (no fake run of the ATen op's
    decomposition); the exported graph computes the same function, and nn.LSTM & co are themselves again
    afterwards (the patch is undone, gradients flow)."""
    from permgraph._trace import export

    kw = dict(num_layers=2, bidirectional=True, batch_first=True)
    if cls is nn.LSTM:
        kw["proj_size"] = 3
    m = Seq(cls, **kw).eval()
    x = _x(True)
    ep = export(m, (x,))
    name = {nn.LSTM: "lstm", nn.GRU: "gru", nn.RNN: "rnn_tanh"}[cls]
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert getattr(torch.ops.permgraph, name).default in targets
    assert getattr(torch.ops.aten, name).input not in targets
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), m(x), rtol=0, atol=0)
    assert torch.nn.modules.rnn._VF is torch._VF
    m.train()
    m(x).sum().backward()
    assert m.rnn.weight_hh_l0.grad is not None


def test_export_skips_stack_traces_and_puts_torchs_setting_back():
    """permgraph exports without recording each node's Python stack (it reads module paths only) and with
    lazy graph modules (the code is generated once, when first needed), and leaves both of torch.fx's
    settings as it found them, also when export fails. The lazily compiled graph still runs exactly."""
    import torch.fx._lazy_graph_module as lazy
    import torch.fx.config as fx_config

    from permgraph._trace import export
    from permgraph.errors import TraceError

    m = Seq(nn.GRU).eval()
    x = _x(False)
    ep = export(m, (x,))
    calls = [n for n in ep.graph.nodes if n.op == "call_function" and n.target is torch.ops.permgraph.gru.default]
    assert calls and not calls[0].meta.get("stack_trace") and calls[0].meta.get("nn_module_stack")
    assert fx_config.do_not_emit_stack_traces is False and lazy._use_lazy_graph_module_flag is False
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), m(x), rtol=0, atol=0)
    with pytest.raises(TraceError):
        export(m, (torch.randn(2, 5, 7),))  # wrong feature size
    assert fx_config.do_not_emit_stack_traces is False and lazy._use_lazy_graph_module_flag is False
