"""One propagation rule per ATen op (or family of ops that behave alike).

A rule receives the propagation context and the fx node, and returns the label of the node's output:
a tuple of atom ids (one per dimension) for a tensor, a list of labels for a tuple/list of tensors, or
None for a non-tensor. Rules *unify* atoms that the op couples, *refine* atoms whose structure the op
reveals (reshape, concatenation, grouped convolution), and *freeze* atoms whose order the op depends on.
An op without a rule freezes everything it touches (see ``_walk.Propagator.unknown``).
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch

from . import _rnn
from ._atoms import StructureError

aten = torch.ops.aten

RULES: dict[object, Callable] = {}


def rule(*targets):
    """Register a rule for ops (OpOverloadPackets or OpOverloads); keyed by the op object itself."""

    def deco(fn):
        for t in targets:
            if t in RULES:
                raise ValueError(f"duplicate rule for {t}")
            RULES[t] = fn
        return fn

    return deco


def _ops(*names: str) -> list[object]:
    """ATen op packets by name, skipping those this torch build does not have."""
    out = []
    for n in names:
        try:
            out.append(getattr(aten, n))
        except (AttributeError, RuntimeError):
            continue
    return out


def lookup(target) -> Callable | None:
    fn = RULES.get(target)
    if fn is None and isinstance(target, torch._ops.OpOverload):
        fn = RULES.get(target.overloadpacket)
    return fn


# ---------------------------------------------------------------------------------------------- helpers
def _dim(d: int, nd: int) -> int:
    return d + nd if d < 0 else d


def _arg(node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


# ---------------------------------------------------------------------------------------------- pointwise
POINTWISE = _ops(
    # activations and unary math
    "relu", "relu_", "relu6", "gelu", "gelu_", "silu", "silu_", "mish", "mish_", "hardtanh", "hardtanh_",
    "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "sigmoid", "sigmoid_", "tanh", "tanh_",
    "elu", "elu_", "selu", "selu_", "celu", "celu_", "leaky_relu", "leaky_relu_", "softplus", "prelu",
    "log_sigmoid", "abs", "abs_", "neg", "neg_", "exp", "exp_", "log", "log_", "sqrt", "sqrt_", "rsqrt",
    "rsqrt_", "reciprocal", "reciprocal_", "sin", "cos", "erf", "erf_", "square", "sign", "floor", "ceil",
    "round", "trunc", "logical_not", "bitwise_not", "isnan", "isinf", "nan_to_num", "sgn",
    # binary / ternary with broadcasting
    "add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "pow", "pow_", "maximum",
    "minimum", "fmod", "remainder", "floor_divide", "eq", "ne", "lt", "le", "gt", "ge", "logical_and",
    "logical_or", "bitwise_and", "bitwise_or", "where", "masked_fill", "masked_fill_", "clamp", "clamp_",
    "clamp_min", "clamp_min_", "clamp_max", "clamp_max_", "clip", "clip_", "lerp", "addcmul", "addcdiv",
    "copy", "copy_", "fill_", "zero_", "threshold", "threshold_",
    # identity-like
    "clone", "contiguous", "alias", "detach", "detach_", "lift_fresh_copy", "to", "_to_copy", "type_as",
    "dropout", "dropout_", "feature_dropout", "alpha_dropout", "feature_alpha_dropout", "zeros_like",
    "ones_like", "full_like", "empty_like", "rand_like", "randn_like", "_assert_tensor_metadata",
    # softmax is equivariant along every dimension
    "softmax", "_softmax", "log_softmax", "_log_softmax",
)


@rule(*POINTWISE)
def pointwise(cx, node):
    """Elementwise op with broadcasting: dimensions aligned from the right are the same axis."""
    out_shape = cx.shape(node)
    if out_shape is None:
        return None
    labels = [cx.label(a) for a in cx.tensor_args(node)]
    return cx.broadcast(labels, out_shape)


# ---------------------------------------------------------------------------------------------- creation
@rule(*_ops("zeros", "ones", "full", "empty", "new_zeros", "new_ones", "new_full", "new_empty",
            "scalar_tensor", "empty_strided", "empty_permuted"))
def constant(cx, node):
    """A constant tensor is invariant under every permutation: fresh free atoms."""
    return cx.fresh(cx.shape(node))


@rule(*_ops("arange", "linspace", "logspace", "rand", "randn", "randint", "randperm", "eye", "tril", "triu",
            "normal", "bernoulli", "uniform"))
def ordered(cx, node):
    """Values depend on positions (or on randomness): every atom of input and output is frozen."""
    return cx.unknown(node, f"{cx.opname(node)} depends on positions")


# ---------------------------------------------------------------------------------------------- linear algebra
@rule(aten.linear)
def linear(cx, node):
    x, w = cx.label(node.args[0]), cx.label(node.args[1])
    b = _arg(node, 2, "bias")
    cx.unify(x[-1], w[1])
    if b is not None:
        cx.unify(cx.label(b)[0], w[0])
    return x[:-1] + (w[0],)


@rule(*_ops("matmul", "mm", "bmm"))
def matmul(cx, node):
    return cx.matmul(cx.label(node.args[0]), cx.label(node.args[1]), cx.shape(node))


@rule(*_ops("addmm", "baddbmm", "addbmm"))
def addmm(cx, node):
    prod = cx.matmul(cx.label(node.args[1]), cx.label(node.args[2]), cx.shape(node))
    return cx.broadcast([cx.label(node.args[0]), prod], cx.shape(node))


@rule(aten.einsum)
def einsum(cx, node):
    eq, ops = node.args[0], node.args[1]
    if "..." in eq:
        return cx.unknown(node, "einsum with an ellipsis")
    lhs, _, rhs = eq.replace(" ", "").partition("->")
    letters: dict[str, int] = {}
    for spec, op in zip(lhs.split(","), ops):
        lab = cx.label(op)
        for ch, a in zip(spec, lab):
            if ch in letters:
                cx.unify(letters[ch], a)
            else:
                letters[ch] = a
    if not rhs:
        rhs = "".join(sorted(ch for ch in letters if lhs.count(ch) == 1))
    return tuple(letters[ch] for ch in rhs)


@rule(aten.scaled_dot_product_attention)
def sdpa(cx, node):
    """q (..., L, E), k (..., S, E), v (..., S, Ev) -> (..., L, Ev).

    Batch/head dims are shared by q, k, v and the output; E (the query/key dims) is one axis of q and k;
    Ev (the value dims) is one axis of v and the output; keys and values share S. Causal masks make
    positions matter, so L and S are frozen then.
    """
    q, k, v = (cx.label(a) for a in node.args[:3])
    mask = _arg(node, 3, "attn_mask")
    causal = bool(_arg(node, 5, "is_causal", False))
    gqa = bool(node.kwargs.get("enable_gqa", False))
    out_shape = cx.shape(node)
    if gqa and cx.size(q[-3]) != cx.size(k[-3]):
        return cx.unknown(node, "grouped-query attention (heads that share keys/values)")
    batch = cx.broadcast([q[:-2], k[:-2], v[:-2]], out_shape[:-2])
    cx.unify(q[-1], k[-1])
    cx.unify(k[-2], v[-2])
    if mask is not None:
        full = batch + (q[-2], k[-2])
        cx.broadcast([full, cx.label(mask)], tuple(cx.size(a) for a in full))
    if causal:
        cx.freeze(q[-2], "causal attention mask depends on positions")
        cx.freeze(k[-2], "causal attention mask depends on positions")
    return batch + (q[-2], v[-1])


# ---------------------------------------------------------------------------------------------- conv
def _conv(cx, node, x, w, b, groups: int, transposed: bool):
    out_shape = cx.shape(node)
    nsp = len(cx.label(w)) - 2
    lx, lw = cx.label(x), cx.label(w)
    cdim = len(lx) - nsp - 1
    w_in, w_out = (0, 1) if transposed else (1, 0)
    for d in range(2, 2 + nsp):
        cx.freeze(lw[d], "convolution kernel positions")
    if groups == 1:
        cx.unify(lx[cdim], lw[w_in])
        out_c = lw[w_out]
        if transposed:
            out_c = lw[1]
    else:
        cin, cout = cx.size(lx[cdim]), out_shape[cdim]
        # input channels = (groups) x (channels per group); the same for the output
        gi, ii = cx.split(lx[cdim], [groups, cin // groups])
        if transposed:
            cx.unify(lw[0], lx[cdim])
            go, oo = cx.split(cx.fresh((cout,))[0], [groups, cout // groups])
            cx.unify(go, gi)
            cx.unify(oo, lw[1])
            out_c = cx.atoms.compose("prod", [go, oo])
        else:
            cx.unify(ii, lw[1])
            go, _oo = cx.split(lw[0], [groups, cout // groups])
            cx.unify(go, gi)
            out_c = lw[0]
    if b is not None:
        cx.unify(cx.label(b)[0], out_c)
    spatial = cx.fresh(out_shape[cdim + 1:], frozen="spatial positions after a convolution")
    return lx[:cdim] + (out_c,) + spatial


@rule(*_ops("conv1d", "conv2d", "conv3d"))
def conv(cx, node):
    return _conv(cx, node, node.args[0], node.args[1], _arg(node, 2, "bias"), int(_arg(node, 6, "groups", 1)),
                 False)


@rule(*_ops("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"))
def conv_transpose(cx, node):
    return _conv(cx, node, node.args[0], node.args[1], _arg(node, 2, "bias"), int(_arg(node, 6, "groups", 1)),
                 True)


@rule(aten.convolution)
def convolution(cx, node):
    return _conv(cx, node, node.args[0], node.args[1], node.args[2], int(node.args[8]), bool(node.args[6]))


# ---------------------------------------------------------------------------------------------- norms
def _channel_norm(cx, node, x, params, outputs: int = 1):
    lx = cx.label(x)
    ch = 1 if len(lx) > 1 else 0
    for p in params:
        if p is not None:
            cx.unify(cx.label(p)[0], lx[ch])
    if outputs == 1:
        return lx
    vals = cx.meta(node)
    return [lx] + [cx.fresh(tuple(v.shape)) for v in vals[1:]]


@rule(aten.batch_norm, aten.instance_norm)
def batch_norm(cx, node):
    """BatchNorm: the channel dim (1) is one axis with weight, bias, running_mean and running_var."""
    return _channel_norm(cx, node, node.args[0], node.args[1:5])


@rule(*_ops("_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
            "_native_batch_norm_legit_functional", "native_batch_norm", "_batch_norm_with_update",
            "_batch_norm_no_update", "cudnn_batch_norm"))
def native_batch_norm(cx, node):
    vals = cx.meta(node)
    n = len(vals) if isinstance(vals, (list, tuple)) else 1
    return _channel_norm(cx, node, node.args[0], node.args[1:5], outputs=n)


@rule(aten.layer_norm, *_ops("rms_norm"))
def layer_norm(cx, node):
    """LayerNorm/RMSNorm over the last k dims: statistics are invariant, affine vectors follow the dims."""
    lx = cx.label(node.args[0])
    k = len(node.args[1])
    params = [node.args[2]] if len(node.args) > 2 else []
    if cx.opname(node) == "layer_norm" and len(node.args) > 3:
        params.append(node.args[3])
    for p in params:
        if p is None:
            continue
        lp = cx.label(p)
        for i in range(k):
            cx.unify(lp[i], lx[len(lx) - k + i])
    return lx


@rule(aten.native_layer_norm)
def native_layer_norm(cx, node):
    lx = layer_norm(cx, node)
    return [lx] + [cx.fresh(tuple(v.shape)) for v in cx.meta(node)[1:]]


@rule(aten.group_norm)
def group_norm(cx, node):
    """GroupNorm: channels = (groups) x (channels per group); whole groups and units inside them move."""
    lx = cx.label(node.args[0])
    g = int(node.args[1])
    c = cx.size(lx[1])
    if 1 < g < c:
        cx.split(lx[1], [g, c // g])
    for p in node.args[2:4]:
        if p is not None:
            cx.unify(cx.label(p)[0], lx[1])
    return lx


# ---------------------------------------------------------------------------------------------- spatial ops
def _spatial(k: int):
    def fn(cx, node):
        lx = cx.label(node.args[0])
        vals = cx.meta(node)
        outs = vals if isinstance(vals, (list, tuple)) else [vals]
        labs = [lx[:len(lx) - k] + cx.fresh(tuple(v.shape)[len(lx) - k:],
                                             frozen="spatial positions after pooling/resampling")
                for v in outs]
        if len(outs) > 1:
            # indices of max pooling are positions: never permuted, but they do not reorder channels
            return labs
        return labs[0]

    return fn


for _k, _names in {
    1: ("max_pool1d", "avg_pool1d", "adaptive_avg_pool1d", "adaptive_max_pool1d", "max_pool1d_with_indices"),
    2: ("max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "_adaptive_avg_pool2d", "adaptive_max_pool2d",
        "max_pool2d_with_indices", "upsample_nearest2d", "upsample_bilinear2d", "upsample_bicubic2d",
        "_upsample_nearest_exact2d", "_upsample_bilinear2d_aa", "pixel_unshuffle", "pixel_shuffle"),
    3: ("max_pool3d", "avg_pool3d", "adaptive_avg_pool3d", "adaptive_max_pool3d", "max_pool3d_with_indices",
        "upsample_nearest3d", "upsample_trilinear3d"),
}.items():
    _found = [o for o in _ops(*_names) if o.__name__ not in ("pixel_shuffle", "pixel_unshuffle")]
    rule(*_found)(_spatial(_k))


@rule(*_ops("pixel_shuffle", "pixel_unshuffle"))
def pixel_shuffle(cx, node):
    return cx.unknown(node, "pixel shuffle mixes channels and positions")


@rule(aten.upsample_nearest1d, aten.upsample_linear1d)
def upsample1d(cx, node):
    return _spatial(1)(cx, node)


# ---------------------------------------------------------------------------------------------- reductions
def _reduce(cx, node, dims, keepdim: bool, freeze_reduced: str | None = None):
    lx = cx.label(node.args[0])
    nd = len(lx)
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        dims = list(range(nd))
    elif isinstance(dims, int):
        dims = [dims]
    dims = {_dim(int(d), nd) for d in dims}
    if freeze_reduced:
        for d in dims:
            cx.freeze(lx[d], freeze_reduced)
    out = []
    for i, a in enumerate(lx):
        if i in dims:
            if keepdim:
                out.append(cx.atoms.new(1))
        else:
            out.append(a)
    return tuple(out)


@rule(*_ops("mean", "sum", "amax", "amin", "logsumexp", "nansum", "prod", "any", "all", "count_nonzero"))
def reduction(cx, node):
    """Sums, means and maxima are invariant under permutations of the reduced dims."""
    if len(node.args) == 1 and not node.kwargs.get("dim"):
        return _reduce(cx, node, None, False)
    return _reduce(cx, node, _arg(node, 1, "dim"), bool(_arg(node, 2, "keepdim", False)))


@rule(*_ops("var", "std", "var_mean", "std_mean"))
def variance(cx, node):
    dims = _arg(node, 1, "dim")
    keep = bool(node.kwargs.get("keepdim", False)) or (len(node.args) > 3 and bool(node.args[3]))
    out = _reduce(cx, node, dims, keep)
    vals = cx.meta(node)
    return [out, out] if isinstance(vals, (list, tuple)) else out


@rule(aten.linalg_vector_norm, aten.norm)
def vector_norm(cx, node):
    return _reduce(cx, node, _arg(node, 2, "dim"), bool(_arg(node, 3, "keepdim", False)))


@rule(*_ops("max", "min"))
def max_min(cx, node):
    if len(node.args) == 1:
        return _reduce(cx, node, None, False)
    if not isinstance(node.args[1], int):  # elementwise maximum of two tensors
        return pointwise(cx, node)
    out = _reduce(cx, node, node.args[1], bool(_arg(node, 2, "keepdim", False)),
                  freeze_reduced="argmax/argmin indices are positions")
    return [out, out]


@rule(*_ops("argmax", "argmin"))
def argmax(cx, node):
    return _reduce(cx, node, _arg(node, 1, "dim"), bool(_arg(node, 2, "keepdim", False)),
                   freeze_reduced="argmax/argmin indices are positions")


@rule(*_ops("cumsum", "cumprod", "cummax", "cummin", "flip", "roll", "sort", "argsort", "topk"))
def positional(cx, node):
    """Ops whose result depends on the order along a dim: that dim is frozen, others pass through."""
    lx = cx.label(node.args[0])
    name = cx.opname(node)
    dims = _arg(node, 1, "dims" if name in ("flip",) else "dim")
    if name == "roll":
        dims = _arg(node, 2, "dims")
    if name == "topk":
        dims = _arg(node, 2, "dim", -1)
        for a in lx:
            cx.freeze(a, f"{name} depends on positions")
        vals = cx.meta(node)
        return [cx.fresh(tuple(v.shape), frozen=f"{name} output") for v in vals]
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        dims = list(range(len(lx)))
    if isinstance(dims, int):
        dims = [dims]
    for d in dims:
        cx.freeze(lx[_dim(int(d), len(lx))], f"{name} depends on positions")
    vals = cx.meta(node)
    if isinstance(vals, (list, tuple)):
        return [lx for _ in vals]
    return lx


# ---------------------------------------------------------------------------------------------- shape ops
@rule(*_ops("view", "reshape", "_unsafe_view", "_reshape_alias", "flatten", "unflatten", "view_copy",
            "reshape_as", "view_as"))
def reshape(cx, node):
    x = node.args[0]
    if cx.meta(node).dtype != cx.meta(x).dtype:
        return cx.unknown(node, "view as another dtype")
    return cx.reshape(cx.label(x), cx.shape(x), cx.shape(node))


@rule(aten.permute)
def permute(cx, node):
    lx = cx.label(node.args[0])
    return tuple(lx[_dim(int(d), len(lx))] for d in node.args[1])


@rule(*_ops("transpose", "swapaxes", "swapdims"))
def transpose(cx, node):
    lx = list(cx.label(node.args[0]))
    a, b = _dim(int(node.args[1]), len(lx)), _dim(int(node.args[2]), len(lx))
    lx[a], lx[b] = lx[b], lx[a]
    return tuple(lx)


@rule(*_ops("t", "numpy_T", "mT", "adjoint"))
def t(cx, node):
    lx = cx.label(node.args[0])
    return lx[::-1] if len(lx) <= 2 else lx[:-2] + (lx[-1], lx[-2])


@rule(aten.movedim)
def movedim(cx, node):
    lx = list(cx.label(node.args[0]))
    src, dst = node.args[1], node.args[2]
    src = [src] if isinstance(src, int) else list(src)
    dst = [dst] if isinstance(dst, int) else list(dst)
    nd = len(lx)
    src = [_dim(s, nd) for s in src]
    dst = [_dim(d, nd) for d in dst]
    order = [i for i in range(nd) if i not in src]
    for d, s in sorted(zip(dst, src)):
        order.insert(d, s)
    return tuple(lx[i] for i in order)


@rule(aten.squeeze)
def squeeze(cx, node):
    lx = cx.label(node.args[0])
    in_shape = cx.shape(node.args[0])
    if len(node.args) == 1:
        dims = [i for i, s in enumerate(in_shape) if s == 1]
    else:
        d = node.args[1]
        dims = [d] if isinstance(d, int) else list(d)
        dims = [_dim(int(i), len(lx)) for i in dims if in_shape[_dim(int(i), len(lx))] == 1]
    return tuple(a for i, a in enumerate(lx) if i not in dims)


@rule(aten.unsqueeze)
def unsqueeze(cx, node):
    lx = list(cx.label(node.args[0]))
    d = _dim(int(node.args[1]), len(lx) + 1)
    lx.insert(d, cx.atoms.new(1))
    return tuple(lx)


@rule(aten.expand, *_ops("expand_as", "broadcast_to", "expand_copy"))
def expand(cx, node):
    """Expanded dims repeat the same values: fresh free atoms (permuting copies changes nothing)."""
    lx = cx.label(node.args[0])
    out_shape = cx.shape(node)
    lead = len(out_shape) - len(lx)
    out = list(cx.fresh(out_shape[:lead]))
    for a, s in zip(lx, out_shape[lead:]):
        out.append(a if cx.size(a) == s else cx.atoms.new(s))
    return tuple(out)


@rule(aten.repeat)
def repeat(cx, node):
    """x.repeat(r): each dim becomes (copies) x (the dim): a product with a free copy atom."""
    lx = cx.label(node.args[0])
    reps = list(node.args[1])
    lead = len(reps) - len(lx)
    out = list(cx.fresh(tuple(reps[:lead])))
    for a, r in zip(lx, reps[lead:]):
        out.append(a if r == 1 else cx.atoms.compose("prod", [cx.atoms.new(int(r)), a]))
    return tuple(out)


@rule(aten.cat, *_ops("concat", "concatenate"))
def cat(cx, node):
    """Concatenation: the cat dim is the sum of the pieces' axes; the other dims are shared."""
    tensors = [t for t in node.args[0] if cx.shape(t) is not None and 0 not in cx.shape(t)]
    dim = int(_arg(node, 1, "dim", 0))
    out_shape = cx.shape(node)
    d = _dim(dim, len(out_shape))
    labels = [cx.label(t) for t in tensors]
    if not labels:
        return cx.fresh(out_shape)
    out = list(labels[0])
    for lab in labels[1:]:
        for i, a in enumerate(lab):
            if i != d:
                cx.unify(out[i], a)
    out[d] = cx.atoms.compose("sum", [lab[d] for lab in labels]) if len(labels) > 1 else labels[0][d]
    return tuple(out)


@rule(aten.stack)
def stack(cx, node):
    tensors = list(node.args[0])
    dim = int(_arg(node, 1, "dim", 0))
    out_shape = cx.shape(node)
    d = _dim(dim, len(out_shape))
    labels = [cx.label(t) for t in tensors]
    base = list(labels[0])
    for lab in labels[1:]:
        for a, b in zip(base, lab):
            cx.unify(a, b)
    base.insert(d, cx.fresh((len(labels),), frozen="stacked from different tensors")[0])
    return tuple(base)


@rule(*_ops("split", "split_with_sizes", "chunk", "tensor_split", "unsafe_split", "unsafe_chunk",
            "split_with_sizes_copy", "unsafe_split_with_sizes"))
def split(cx, node):
    """Splits cut the axis into segments (a sum); each piece gets its segment."""
    lx = cx.label(node.args[0])
    name = cx.opname(node)
    dim = _arg(node, 2, "dim", 0)
    dim = _dim(int(dim), len(lx))
    pieces = [tuple(v.shape) for v in cx.meta(node)]
    sizes = [p[dim] for p in pieces]
    try:
        segs = cx.atoms.split_sum(lx[dim], sizes)
    except StructureError as e:
        return cx.unknown(node, f"{name} across structured units ({e})")
    return [lx[:dim] + (s,) + lx[dim + 1:] for s in segs]


@rule(aten.unbind)
def unbind(cx, node):
    lx = cx.label(node.args[0])
    dim = _dim(int(_arg(node, 1, "dim", 0)), len(lx))
    n = cx.size(lx[dim])
    slices = cx.unstack(lx, dim, "indexed by unbind")
    if slices is not None:
        return slices
    for i in range(n):
        cx.select(lx[dim], i, "indexed by unbind")
    return [lx[:dim] + lx[dim + 1:] for _ in range(n)]


@rule(aten.select)
def select(cx, node):
    lx = cx.label(node.args[0])
    dim = _dim(int(node.args[1]), len(lx))
    n = cx.size(lx[dim])
    idx = int(node.args[2])
    idx = idx + n if idx < 0 else idx
    slices = cx.unstack(lx, dim, "indexed by select")
    if slices is not None:
        return slices[idx]
    cx.select(lx[dim], idx, "indexed by select")
    return lx[:dim] + lx[dim + 1:]


@rule(aten.slice, aten.narrow)
def slice_(cx, node):
    lx = cx.label(node.args[0])
    dim = _dim(int(_arg(node, 1, "dim", 0)), len(lx))
    n = cx.size(lx[dim])
    if cx.opname(node) == "narrow":
        start, length = int(node.args[2]), int(node.args[3])
        start = start + n if start < 0 else start
        end, step = start + length, 1
    else:
        start = _arg(node, 2, "start", 0)
        end = _arg(node, 3, "end", None)
        step = int(_arg(node, 4, "step", 1))
        start = 0 if start is None else int(start)
        end = n if end is None else int(end)
        start = max(0, min(n, start + n if start < 0 else start))
        end = max(start, min(n, end + n if end < 0 else end))
    if step == 1 and start == 0 and end == n:
        return lx
    if step != 1:
        cx.freeze(lx[dim], "strided slice")
        return lx[:dim] + cx.fresh((cx.shape(node)[dim],), frozen="strided slice") + lx[dim + 1:]
    try:
        _, mid, _ = cx.atoms.split_sum(lx[dim], [start, end - start, n - end])
    except StructureError:
        cx.freeze(lx[dim], "slice across structured units")
        mid = cx.fresh((end - start,), frozen="slice across structured units")[0]
    return lx[:dim] + (mid,) + lx[dim + 1:]


@rule(*_ops("constant_pad_nd", "pad", "reflection_pad1d", "reflection_pad2d", "replication_pad1d",
            "replication_pad2d", "reflection_pad3d", "replication_pad3d"))
def pad(cx, node):
    lx = cx.label(node.args[0])
    p = list(node.args[1])
    out_shape = cx.shape(node)
    out = list(lx)
    for j in range(len(p) // 2):
        d = len(lx) - 1 - j
        if p[2 * j] or p[2 * j + 1] or cx.opname(node) != "constant_pad_nd":
            cx.freeze(lx[d], "padding depends on positions")
            out[d] = cx.fresh((out_shape[d],), frozen="padding depends on positions")[0]
    return tuple(out)


@rule(aten.embedding)
def embedding(cx, node):
    """Embedding rows are indexed by token ids: frozen; the embedding dim follows the output."""
    lw = cx.label(node.args[0])
    li = cx.label(node.args[1])
    cx.freeze(lw[0], "embedding rows are indexed by token ids")
    return li + (lw[1],)


@rule(operator.getitem)
def getitem(cx, node):
    seq = cx.env.get(node.args[0])
    if isinstance(seq, list):
        return seq[node.args[1]]
    return cx.unknown(node, "indexing a non-sequence")


IGNORED = set(_ops("sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "_assert_scalar",
                   "sym_constrain_range", "sym_constrain_range_for_size", "_assert_async", "dim", "size",
                   "stride"))
for _op in IGNORED:
    RULES[_op] = lambda cx, node: None


# ---------------------------------------------------------------------------------------------- recurrent
GATE_REASON = "gate blocks of a recurrent layer play different roles"
TIME_REASON = "a recurrent layer runs over time steps in order"
STATE_REASON = "layers and directions of a stacked recurrent state"
_GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1,
          "lstm_cell": 4, "gru_cell": 3, "rnn_tanh_cell": 1, "rnn_relu_cell": 1}


def _is_constant(node) -> bool:
    """A tensor created by a constant op (zeros, full, ...): every entry has the same value, so any
    reordering of any slice of it leaves it unchanged."""
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and lookup(node.target) is constant


def _gates(cx, rows: int, n_gates: int) -> tuple[int, int]:
    """Split a gate-stacked row axis (gates x units, gate-major) into (gate atom, unit atom); the gate
    atom is frozen: the gates (input, forget, cell, output of an LSTM; reset, update, new of a GRU) play
    different roles, so the blocks stay in place and one permutation acts inside every block."""
    if n_gates == 1:
        return cx.atoms.new(1), rows
    gate, unit = cx.split(rows, [n_gates, cx.size(rows) // n_gates])
    cx.freeze(gate, GATE_REASON)
    return gate, unit


def _cell(cx, name: str, w_ih, w_hh, biases, w_hr, x_atom: int) -> tuple[int, int]:
    """Couple the weights of one recurrent cell (one layer, one direction). Returns (output units, cell
    units): the hidden state's units, and for an LSTM with a projection the cell state's units (the
    projection's input) -- without a projection both are the hidden units.

    The hidden units are permutable: one permutation acts on the rows of every gate block of ``weight_ih``,
    ``weight_hh`` and the biases, on the columns of ``weight_hh``, and on whatever reads the hidden state.
    With ``proj_size`` the cell units (rows of the gate blocks, columns of ``weight_hr``) and the projected
    units (rows of ``weight_hr``, columns of ``weight_hh``, the output) are two separate permutations.
    """
    g = _GATES[name]
    lih, lhh = cx.label(w_ih), cx.label(w_hh)
    gate, unit = _gates(cx, lih[0], g)
    for rows in [lhh[0]] + [cx.label(b)[0] for b in biases if b is not None]:
        g2, u2 = _gates(cx, rows, g)
        cx.unify(gate, g2)
        cx.unify(unit, u2)
    cx.unify(lih[1], x_atom)
    out = unit
    if w_hr is not None:
        lhr = cx.label(w_hr)
        cx.unify(lhr[1], unit)
        out = lhr[0]
    cx.unify(lhh[1], out)
    return out, unit


def _used_outputs(node) -> set[int]:
    """Indices of a multi-output node's results that some node reads."""
    used = set()
    for u in node.users:
        if u.target is operator.getitem and u.users:
            used.add(int(u.args[1]))
    return used


@rule(*_ops("lstm", "gru", "rnn_tanh", "rnn_relu"), *_rnn.PACKETS)
def recurrent(cx, node):
    """nn.LSTM / nn.GRU / nn.RNN (``aten.lstm.input``, ``aten.gru.input``, ... and the packed ``.data``
    forms; ``permgraph.lstm``, ... stand for the unpacked forms in graphs permgraph exports): one cell per
    layer and direction, each with its own permutation of its hidden units.

    The input's feature dim is the columns of layer 0's ``weight_ih`` (both directions); layer l+1's
    ``weight_ih`` columns are the concatenation [forward units, backward units] of layer l's outputs, as
    is the output's feature dim for the last layer. Time steps are frozen (the recurrence runs over them in
    order); the batch dim is shared by the input, the output and the states. The stacked states
    ``h_0``/``h_n`` (and ``c_0``/``c_n``) hold every layer and direction in one tensor whose last dim is one
    axis: when such a state is given (not a constant) or read, the units of all layers and directions
    become one permutation.
    """
    name = cx.opname(node)
    packed = isinstance(node.target, torch._ops.OpOverload) and node.target._overloadname == "data"
    if packed:
        x, _batch_sizes, hx, params, has_biases, layers, _drop, _train, bidir = node.args[:9]
        batch_first = False
    else:
        x, hx, params, has_biases, layers, _drop, _train, bidir, batch_first = node.args[:9]
    lx = cx.label(x)
    states = list(hx) if isinstance(hx, (list, tuple)) else [hx]
    dirs = 2 if bidir else 1
    per = len(params) // (layers * dirs)
    proj = per == (5 if has_biases else 3)
    if per * layers * dirs != len(params) or per not in ((4, 5) if has_biases else (2, 3)):
        raise ValueError(f"{len(params)} weights for {layers} layer(s) x {dirs} direction(s)")
    if packed:  # (sum of the sequence lengths, features): the packed dim holds time steps
        tdim, bdim = 0, None
    elif len(lx) == 2:  # unbatched (time, features)
        tdim, bdim = 0, None
    else:
        tdim, bdim = (1, 0) if batch_first else (0, 1)
    cx.freeze(lx[tdim], TIME_REASON)
    feed = lx[-1]
    cells: list[tuple[int, int]] = []  # (output units, cell units) per layer and direction
    for layer in range(layers):
        outs = []
        for d in range(dirs):
            ps = list(params[(layer * dirs + d) * per:(layer * dirs + d + 1) * per])
            w_ih, w_hh = ps[0], ps[1]
            biases = ps[2:4] if has_biases else []
            w_hr = ps[-1] if proj else None
            out, unit = _cell(cx, name, w_ih, w_hh, biases, w_hr, feed)
            cells.append((out, unit))
            outs.append(out)
        feed = cx.atoms.compose("sum", outs) if dirs == 2 else outs[0]
    # the states: h (the output units) and, for an LSTM, c (the cell units)
    used = _used_outputs(node)
    state_labels = []
    for k, s in enumerate(states):
        shape = cx.shape(s)
        read = (k + 1) in used
        given = not _is_constant(s)
        units = [c[0] if k == 0 else c[1] for c in cells]
        if given or read:
            for u in units[1:]:
                cx.unify(units[0], u)
        if given:
            ls = cx.label(s)
            cx.freeze(ls[0], STATE_REASON)
            if len(ls) == 3 and bdim is not None:
                cx.unify(ls[1], lx[bdim])
            cx.unify(ls[-1], units[0])
        lab = list(cx.fresh(shape))
        if read:
            cx.freeze(lab[0], STATE_REASON)
            if len(lab) == 3 and bdim is not None:
                lab[1] = lx[bdim]
            lab[-1] = units[0]
        state_labels.append(tuple(lab))
    return [lx[:-1] + (feed,)] + state_labels


@rule(*_ops("lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell"))
def recurrent_cell(cx, node):
    """nn.LSTMCell / nn.GRUCell / nn.RNNCell: one step of one cell; the state's units are its hidden units."""
    name = cx.opname(node)
    x, hx, w_ih, w_hh = node.args[:4]
    biases = [_arg(node, 4, "b_ih"), _arg(node, 5, "b_hh")]
    lx = cx.label(x)
    states = list(hx) if isinstance(hx, (list, tuple)) else [hx]
    out, _unit = _cell(cx, name, w_ih, w_hh, biases, None, lx[-1])
    for s in states:
        ls = cx.label(s)
        cx.unify(ls[-1], out)
        for a, b in zip(ls[:-1], lx[:-1]):
            cx.unify(a, b)
    lab = lx[:-1] + (out,)
    return [lab, lab] if name == "lstm_cell" else lab
