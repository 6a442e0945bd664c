"""Unit tests of the op rules on tiny modules: structure of the traced spec, and function preserved."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import permgraph
from permgraph import _rules


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def assert_equivalent(model, spec, x, seeds=(0, 1, 2)):
    res = permgraph.check_equivalence(model, spec, (x,))
    assert res.ok, (res.rel_error, res.failing)
    model = model.eval()
    for s in seeds:
        perm = permgraph.random_permutation(spec, s)
        out = permgraph.apply(model, spec, perm)(x)
        ref = model(x)
        assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 5)
        self.b = nn.Linear(8, 7)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(torch.cat([F.relu(self.a(x)), torch.tanh(self.b(x))], dim=1))


def test_concat_of_unequal_sizes_is_a_sum_of_two_groups():
    m = Concat()
    x = torch.randn(4, 8, generator=_gen())
    spec = permgraph.trace(m, x)
    ga, gb = spec.axes["a.weight"][0], spec.axes["b.weight"][0]
    assert isinstance(ga, str) and isinstance(gb, str) and ga != gb
    assert spec.groups[ga].size == 5 and spec.groups[gb].size == 7
    assert spec.axes["head.weight"][1] == {"sum": [ga, gb]}
    assert spec.axes["head.weight"][0] == 3  # output: frozen
    assert_equivalent(m, spec, x)


class Grouped(nn.Module):
    def __init__(self, groups=4):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 1)
        self.g = nn.Conv2d(8, 12, 3, padding=1, groups=groups)
        self.c2 = nn.Conv2d(12, 5, 1)

    def forward(self, x):
        return self.c2(F.relu(self.g(F.relu(self.c1(x))))).mean((2, 3))


def test_grouped_conv_is_blocks_with_a_shared_block_permutation():
    m = Grouped(4)
    x = torch.randn(2, 3, 6, 6, generator=_gen())
    spec = permgraph.trace(m, x)
    t_in = spec.axes["c1.weight"][0]
    assert set(t_in) == {"prod"}
    g_blocks, g_inner_in = t_in["prod"]
    assert spec.groups[g_blocks].size == 4  # whole groups move together
    assert spec.groups[g_inner_in].size == 2
    assert spec.axes["g.weight"][1] == g_inner_in  # the same in-group permutation in every group
    # the output channels: each group reorders its own 3 (the weight's input axis is per group, not per
    # output channel), so they are a group nested in the block group
    g_out = spec.axes["g.weight"][0]
    assert spec.groups[g_out].size == 12 and spec.groups[g_out].blocks == g_blocks
    assert spec.axes["c2.weight"][1] == g_out
    assert_equivalent(m, spec, x)
    shared = permgraph.trace(m, x, nested_heads=False)  # the subgroup: one order shared by all groups
    assert shared.axes["g.weight"][0] == {"prod": [g_blocks, shared.axes["g.weight"][0]["prod"][1]]}
    assert_equivalent(m, shared, x)


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = F.relu6(self.bn1(self.c1(x)))
        x = F.relu6(self.bn2(self.dw(x)))
        return self.c2(x).mean((2, 3))


def test_depthwise_conv_couples_input_and_output_channels():
    m = Depthwise()
    x = torch.randn(2, 3, 6, 6, generator=_gen())
    spec = permgraph.trace(m, x)
    assert len(spec.groups) == 1
    (g,) = spec.groups
    keys = {(mm.axis.tensor, mm.axis.dim) for mm in spec.groups[g].members}
    for k in ["c1.weight", "bn1.weight", "bn1.running_mean", "bn1.running_var", "dw.weight", "bn2.bias",
              "bn2.running_var"]:
        assert (k, 0) in keys
    assert ("c2.weight", 1) in keys
    assert_equivalent(m, spec, x)


class GN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(4, 8)
        self.c2 = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        return self.c2(F.silu(self.gn(self.c1(x)))).amax((2, 3))


def test_group_norm_splits_channels_into_groups():
    m = GN()
    x = torch.randn(2, 3, 5, 5, generator=_gen())
    spec = permgraph.trace(m, x)
    g = spec.axes["gn.weight"][0]
    # the 4 groups move as wholes and each reorders its own 2 channels: a group nested in a block group
    assert spec.groups[g].size == 8 and spec.groups[spec.groups[g].blocks].size == 4
    assert spec.axes["c1.bias"][0] == g
    assert_equivalent(m, spec, x)
    shared = permgraph.trace(m, x, nested_heads=False)  # one order shared by all groups
    tree = shared.axes["gn.weight"][0]
    assert set(tree) == {"prod"}
    assert [shared.groups[g].size for g in tree["prod"]] == [4, 2]


class FlattenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.bn(self.conv(x))), 1))


def test_flatten_into_linear_is_a_kronecker_product():
    m = FlattenLinear()
    x = torch.randn(2, 3, 4, 4, generator=_gen())
    spec = permgraph.trace(m, x)
    g = spec.axes["conv.weight"][0]
    assert spec.axes["fc.weight"][1] == {"prod": [g, 16]}
    assert_equivalent(m, spec, x)


class Attention(nn.Module):
    def __init__(self, dim=12, heads=3):
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(5, dim)
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 2)

    def forward(self, x):
        x = self.embed(x)
        b, n, c = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = self.attend(*qkv.unbind(0))
        x = x + self.proj(y.transpose(1, 2).reshape(b, n, c))
        return self.head(x.mean(1))

    def attend(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


def test_fused_qkv_attention_has_heads_and_separate_qk_and_vo_dims():
    m = Attention()
    x = torch.randn(2, 7, 5, generator=_gen())
    spec = permgraph.trace(m, x)
    resid = spec.axes["embed.weight"][0]
    assert spec.axes["norm.weight"][0] == resid and spec.axes["proj.weight"][0] == resid
    tree = spec.axes["qkv.weight"][0]
    assert set(tree) == {"sum"}
    qk1, qk2, vo = tree["sum"]
    assert qk1 == qk2 and vo != qk1  # queries and keys share a permutation, values have their own
    # each head has its own order of its 4 query/key dims and of its 4 value dims; the 3 heads move as
    # wholes, by one head permutation shared by both nested groups
    h = spec.groups[qk1].blocks
    assert h is not None and spec.groups[vo].blocks == h and spec.groups[h].size == 3
    assert spec.groups[qk1].size == 12 and spec.groups[vo].size == 12
    assert spec.groups[h].members == ()  # the heads act on no axis of their own here
    assert spec.axes["proj.weight"][1] == vo
    assert len(spec.groups) == 4 and spec.nested() == {h: [qk1, vo]}
    assert_equivalent(m, spec, x)
    # a permutation that reorders the dims of one head only keeps the function
    p = permgraph.identity(spec)
    inner = torch.arange(12)
    inner[4:8] = torch.tensor([6, 4, 7, 5])
    p = permgraph.Permutation({**p, qk1: inner})
    y = m(x)
    assert torch.allclose(permgraph.apply(m, spec, p)(x), y, atol=1e-6)
    # ... and a head permutation must carry the blocks of its nested groups: anything else is refused
    bad = permgraph.Permutation({**permgraph.identity(spec), h: torch.tensor([1, 0, 2])})
    with pytest.raises(permgraph.SpecMismatchError, match="heads"):
        permgraph.apply(m, spec, bad)
    assert len(permgraph.trace(m, x, nested_heads=False).groups) == 4  # heads x one shared order of dims


class SharedQNorm(Attention):
    """A norm of the query/key dims with one weight vector shared by all heads (timm's qk_norm)."""

    def __init__(self, dim=12, heads=3):
        super().__init__(dim, heads)
        self.qn = nn.LayerNorm(dim // heads)

    def attend(self, q, k, v):
        return F.scaled_dot_product_attention(self.qn(q), self.qn(k), v)


class HeadMean(Attention):
    """Adds the mean over heads to every head: dim d of one head meets dim d of the others."""

    def attend(self, q, k, v):
        y = F.scaled_dot_product_attention(q, k, v)
        return y + y.mean(1, keepdim=True)


def test_head_dims_stay_shared_where_heads_are_compared_dim_by_dim():
    x = torch.randn(2, 7, 5, generator=_gen())
    m = SharedQNorm()
    spec = permgraph.trace(m, x)
    qk, _, vo = spec.axes["qkv.weight"][0]["sum"]
    # the shared norm weight ties dim d of every head: one order of the query/key dims for all heads
    assert spec.axes["qn.weight"][0] == qk["prod"][1] and spec.groups[qk["prod"][1]].size == 4
    assert isinstance(vo, str) and spec.groups[vo].blocks == qk["prod"][0]  # values: per head still
    assert_equivalent(m, spec, x)
    m = HeadMean()
    spec = permgraph.trace(m, x)
    qk, _, vo = spec.axes["qkv.weight"][0]["sum"]
    assert isinstance(qk, str) and spec.groups[qk].blocks is not None  # queries/keys: per head
    assert set(vo) == {"prod"}  # values are averaged over heads dim by dim: one shared order
    assert_equivalent(m, spec, x)


class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 6)
        self.c = nn.Linear(6, 3)

    def forward(self, x):
        return self.c(F.relu(self.b(torch.special.i0(self.a(x)))))


def test_unknown_op_freezes_what_it_touches_and_reports_it():
    m = Unknown()
    x = torch.randn(3, 4, generator=_gen())
    spec = permgraph.trace(m, x)
    assert spec.axes["a.weight"][0] == 6  # frozen by the unknown op
    assert isinstance(spec.axes["b.weight"][0], str)  # the next hidden layer is still permutable
    assert any("i0" in r for r in spec.info["unsupported_ops"])
    assert any("unsupported op" in f.reason and "i0" in f.reason for f in spec.frozen)
    assert "i0" in spec.report()
    assert_equivalent(m, spec, x)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.a(x)
        return x


def test_untraceable_model_raises_a_trace_error_naming_the_problem():
    with pytest.raises(permgraph.TraceError, match="torch.export could not trace DataDependent"):
        permgraph.trace(DataDependent(), torch.randn(2, 4))


def test_missing_example_inputs_say_how_to_pass_them():
    with pytest.raises(permgraph.TraceError, match="Pass them explicitly"):
        permgraph.trace(nn.ReLU())


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        x = F.relu(self.bn1(self.c1(x)))
        x = F.relu(self.bn2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


def test_verification_freezes_groups_that_a_wrong_rule_would_break(monkeypatch):
    """A rule that forgets BatchNorm's running_var: verification must catch it (randomised statistics),
    freeze exactly the affected group, and still return a function-preserving spec."""

    def forgetful(cx, node):
        lx = cx.label(node.args[0])
        for p in node.args[1:4]:  # weight, bias, running_mean, but not running_var
            if p is not None:
                cx.unify(cx.label(p)[0], lx[1])
        return lx

    monkeypatch.setitem(_rules.RULES, torch.ops.aten.batch_norm, forgetful)
    m = BNNet()
    x = torch.randn(2, 3, 5, 5, generator=_gen())
    spec = permgraph.trace(m, x)
    assert spec.info["verification"]["status"].startswith("passed after freezing")
    assert len(spec.groups) == 0  # both hidden groups touched a forgotten running_var
    assert any("changed the model's output" in f.reason for f in spec.frozen)
    assert permgraph.check_equivalence(m, spec, (x,)).ok


def test_check_equivalence_detects_a_broken_spec():
    m = BNNet()
    x = torch.randn(2, 3, 5, 5, generator=_gen())
    spec = permgraph.trace(m, x)
    assert len(spec.groups) == 2
    axes = dict(spec.axes)
    axes["bn1.running_var"] = [6]  # forget one buffer, as other tools do
    broken = permgraph.PermutationSpec.from_axes(axes, spec.shapes, spec.group_sizes())
    res = permgraph.check_equivalence(m, broken, (x,))
    assert not res.ok
    assert res.failing == [spec.axes["bn1.weight"][0]]


# --------------------------------------------------------------------------- batch norm on other shapes
class BNShapes(nn.Module):
    """batch_norm applied to tensors that are not (N, C, H, W): its statistics run over every dim but dim
    1, so dim 1 is the channel axis whatever the other dims hold."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        if mode in ("train_3d", "groups_as_channels"):
            self.w = nn.Parameter(torch.ones(8))
            self.b = nn.Parameter(torch.zeros(8))
        elif mode == "5d":
            self.bn = nn.BatchNorm3d(8)
        else:
            self.bn = nn.BatchNorm1d(8)
        self.c2 = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        y = F.relu(self.c1(x))
        n, c, h, w = y.shape
        if self.mode == "train_3d":  # training-mode statistics over (batch, positions) of a (N, C, HW) view
            y = F.batch_norm(y.reshape(n, c, -1), None, None, self.w, self.b, training=True).reshape(n, c, h, w)
        elif self.mode == "tokens":  # (N, L, C) tokens, transposed to (N, C, L) for BatchNorm1d
            t = y.flatten(2).transpose(1, 2)
            y = self.bn(t.transpose(1, 2)).reshape(n, c, h, w)
        elif self.mode == "vectors":  # (N, C) after pooling, then broadcast back
            y = y + self.bn(y.mean((2, 3)))[:, :, None, None]
        elif self.mode == "5d":  # (N, C, 1, H, W)
            y = self.bn(y.unsqueeze(2)).squeeze(2)
        elif self.mode == "groups_as_channels":  # GroupNorm written with batch_norm on (1, N*G, C/G*H*W)
            y = F.batch_norm(y.reshape(1, n * 2, -1), None, None, training=True).reshape(n, c, h, w)
            y = y * self.w[:, None, None] + self.b[:, None, None]
        return self.fc(F.relu(self.c2(y)).mean((2, 3)))


@pytest.mark.parametrize("mode", ["train_3d", "tokens", "vectors", "5d", "groups_as_channels"])
def test_batch_norm_on_reshaped_tensors_keeps_its_channel_axis(mode):
    m = BNShapes(mode).eval()
    x = torch.randn(2, 3, 5, 5, generator=_gen())
    spec = permgraph.trace(m, x)
    assert spec.info["verification"]["status"] == "passed"
    assert not spec.info["unsupported_ops"]
    ch = spec.axes["c1.weight"][0]
    if mode == "groups_as_channels":  # the 2 groups move as wholes, each reorders its 4 channels
        assert isinstance(ch, str) and spec.groups[ch].size == 8 and spec.groups[ch].blocks is not None
        assert spec.groups[spec.groups[ch].blocks].size == 2
    else:
        assert isinstance(ch, str) and spec.groups[ch].size == 8
    assert spec.axes["c2.weight"][1] == ch
    params = ["w", "b"] if hasattr(m, "w") else [f"bn.{k}" for k in ("weight", "bias", "running_mean", "running_var")]
    for key in params:
        assert spec.axes[key] == [ch], (key, spec.axes[key])
    assert len(spec.groups) == (3 if mode == "groups_as_channels" else 2)
    assert_equivalent(m, spec, x)


# --------------------------------------------------------------------------- weight standardisation
class HandScaledStdConv2d(nn.Conv2d):
    """ScaledStdConv2d written out: each output channel's weights standardised over (in, kh, kw), then
    scaled by a per-channel gain of shape (C, 1, 1, 1). ``via="batch_norm"`` standardises with a
    training-mode batch_norm on the (1, out, in*kh*kw) view, as timm does; ``via="moments"`` with
    mean/var."""

    def __init__(self, cin, cout, k, groups=1, via="batch_norm", eps=1e-6):
        super().__init__(cin, cout, k, padding=k // 2, groups=groups)
        self.gain = nn.Parameter(torch.ones(cout, 1, 1, 1))
        self.scale = self.weight[0].numel() ** -0.5
        self.via, self.eps = via, eps

    def forward(self, x):
        if self.via == "batch_norm":
            w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                             weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0,
                             eps=self.eps).reshape_as(self.weight)
        else:
            mean = self.weight.mean(dim=(1, 2, 3), keepdim=True)
            var = self.weight.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
            w = (self.weight - mean) * torch.rsqrt(var + self.eps) * self.gain * self.scale
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class WSNet(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        from timm.layers import ScaledStdConv2d, StdConv2d

        def conv(cin, cout, k, groups=1):
            if kind == "timm_scaled":
                return ScaledStdConv2d(cin, cout, k, groups=groups)
            if kind == "timm_std":
                return StdConv2d(cin, cout, k, groups=groups, bias=True)
            return HandScaledStdConv2d(cin, cout, k, groups=groups, via=kind)

        self.c1 = conv(3, 8, 3)
        self.c2 = conv(8, 8, 3, groups=2)
        self.c3 = conv(8, 6, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        x = F.gelu(self.c1(x))
        x = x + F.gelu(self.c2(x))
        return self.fc(F.gelu(self.c3(x)).mean((2, 3)))


@pytest.mark.parametrize("kind", ["timm_scaled", "timm_std", "batch_norm", "moments"])
def test_weight_standardisation_keeps_channels_permutable_for_any_weights(kind):
    """Standardising a conv weight over (in, kh, kw) does not depend on their order: the output channels
    (rows, biases, gains) and input channels stay groups. Checked on several random weights and gains."""
    m = WSNet(kind).eval()
    x = torch.randn(2, 3, 6, 6, generator=_gen())
    spec = permgraph.trace(m, x)
    assert spec.info["verification"]["status"] == "passed"
    g1, g3 = spec.axes["c1.weight"][0], spec.axes["c3.weight"][0]
    assert isinstance(g3, str) and spec.groups[g3].size == 6
    # the residual stream through the grouped conv: 2 groups of 4 channels, one order inside both groups
    blocks, inner = g1["prod"]
    assert spec.groups[blocks].size == 2 and spec.groups[inner].size == 4
    assert spec.axes["c2.weight"][:2] == [g1, inner] and spec.axes["c3.weight"][:2] == [g3, g1]
    assert spec.axes["c1.bias"] == spec.axes["c2.bias"] == [g1] and spec.axes["c3.bias"] == [g3]
    if kind != "timm_std":
        assert spec.axes["c1.gain"] == spec.axes["c2.gain"] == [g1, 1, 1, 1]
        assert spec.axes["c3.gain"] == [g3, 1, 1, 1]
    state = m.state_dict()
    unmoved = [k for k in state if k not in spec.permutable_keys()]
    assert unmoved == ["fc.bias"]
    for seed in range(3):  # arbitrary weights and gains, checked in float64
        g = torch.Generator().manual_seed(seed)
        w = copy.deepcopy(m).double()
        with torch.no_grad():
            for k, t in w.state_dict(keep_vars=True).items():
                t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) * (1.0 if t.ndim == 1 or "gain" in k else
                                                                             t.std().clamp_min(0.1)))
        res = permgraph.check_equivalence(w, spec, (x.double(),), seed=seed)
        assert res.ok and res.dtype == "float64", (seed, res.rel_error, res.failing)
