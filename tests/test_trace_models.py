"""End-to-end tracing of zoo, torchvision and timm models.

For every model: ``permgraph.trace`` must verify without freezing anything, an *independent* float32
check in this file (not the library's verifier) must find that a random permutation of every group
leaves the output unchanged, the permutation must actually move weights, and the share of state-dict
values that the spec permutes must not drop below the floor measured when this test was written.
A few models also get structural checks (ResNet-18 channel axes, ViT group counts).

Nothing is downloaded: every model is built with random weights.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import permgraph
from permgraph.models import create

slow = pytest.mark.slow


@dataclass(frozen=True)
class Case:
    name: str
    kwargs: dict = field(default_factory=dict)
    input_shape: tuple[int, ...] = (2, 3, 64, 64)
    # share of state-dict values (numel) in spec.permutable_keys(); measured value in the comment
    min_coverage: float = 0.995
    tag: str = ""  # tells apart cases of one model with different kwargs

    @property
    def id(self) -> str:
        extra = "-".join([f"{v}" for k, v in self.kwargs.items() if k in ("norm",)] + ([self.tag] if self.tag else []))
        return self.name.replace(":", "-") + (f"-{extra}" if extra else "")


def _case(name: str, *marks, **kw) -> pytest.param:
    fields = {k: kw.pop(k) for k in ("input_shape", "min_coverage", "tag") if k in kw}
    c = Case(name, kw, **fields)
    return pytest.param(c, id=c.id, marks=marks)


# Coverage measured with torch 2.14.1 / torchvision 0.29.1 / timm 1.0.31 on the commit these tests
# were written against (see the comment on each line).
CASES = [
    # --- permgraph zoo
    _case("mlp", input_shape=(2, 40)),  # 0.9997 (the output bias never moves)
    *[_case("vgg16", norm=n, width_multiplier=0.25) for n in ("bn", "ln", "none")],  # 1.0000
    *[_case("resnet20", norm=n, width_multiplier=0.5) for n in ("bn", "ln", "none")],  # 0.9996-0.9999
    # --- torchvision
    _case("torchvision:resnet18"),  # 0.9999
    _case("torchvision:resnet50"),  # 1.0000
    _case("torchvision:vgg11_bn", slow),  # 1.0000
    _case("torchvision:densenet121"),  # 0.9999
    _case("torchvision:mobilenet_v2"),  # 0.9997
    _case("torchvision:mobilenet_v3_small"),  # 0.9996
    _case("torchvision:regnet_x_400mf"),  # 0.9998
    _case("torchvision:efficientnet_b0", slow),  # 0.9998
    _case("torchvision:convnext_tiny", slow),  # 1.0000
    _case("torchvision:vit_b_16", image_size=64),  # 1.0000
    # the channel split of ShuffleNet's blocks is frozen (a chunk that cuts through the shuffle)
    _case("torchvision:shufflenet_v2_x0_5", min_coverage=0.98),  # 0.9865
    _case("torchvision:googlenet", aux_logits=False, init_weights=True),  # 0.9998
    # --- timm
    _case("timm:vit_tiny_patch16_224", input_shape=(2, 3, 224, 224)),  # 0.9998
    _case("timm:convnext_atto"),  # 0.9997
    _case("timm:mobilenetv3_small_050"),  # 0.9994
    _case("timm:efficientnet_b0"),  # 0.9998
    _case("timm:regnetx_002"),  # 0.9996
    _case("timm:mixer_s16_224", input_shape=(2, 3, 224, 224)),  # 0.9999
    _case("timm:resnet26d"),  # 0.9999
    # weight standardisation (ScaledStdConv2d: training-mode batch_norm on the reshaped weight); nfnet_f0
    # (71M parameters) is verified in float32
    _case("timm:test_nfnet"),  # 0.9974 (the 1000-class head bias is a quarter of this tiny model)
    _case("timm:nf_regnet_b0", slow),  # 0.9999
    _case("timm:nfnet_f0", slow),  # 1.0000 (0.999986)
    # LSTMs run over the rows and the columns of the feature map
    _case("timm:sequencer2d_s", layers=(1, 1, 1, 1), tag="1-block-stages"),  # 0.9999
    _case("timm:sequencer2d_s", slow),  # 1.0000 (0.999964)
]


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _build(case: Case) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = create(case.name, **case.kwargs).eval()
    x = torch.randn(case.input_shape, generator=torch.Generator().manual_seed(0))
    return model, x


_CACHE: dict[str, tuple[nn.Module, torch.Tensor, permgraph.PermutationSpec]] = {}
# models whose traced spec is reused by the structural tests below
_CACHED = {"torchvision-resnet18", "torchvision-vit_b_16", "timm-vit_tiny_patch16_224"}


def _traced(case: Case) -> tuple[nn.Module, torch.Tensor, permgraph.PermutationSpec]:
    if case.id in _CACHE:
        return _CACHE[case.id]
    model, x = _build(case)
    spec = permgraph.trace(model, x)
    if case.id in _CACHED:
        _CACHE[case.id] = (model, x, spec)
    return model, x, spec


def _case_by_name(name: str) -> Case:
    for p in CASES:
        (c,) = p.values
        if c.name == name:
            return c
    raise KeyError(name)


def _randomize(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """BN running stats random (mean ~ N(0, .5), var ~ U(.5, 2)); N(0, .5) noise on 1-D float params."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._NormBase) and mod.running_mean is not None:
                mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=gen) * 0.5)
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=gen) * 1.5 + 0.5)
        for p in model.parameters():
            if p.is_floating_point() and p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    return model.eval()


def _outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(x)
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _coverage(model: nn.Module, spec: permgraph.PermutationSpec) -> float:
    state = model.state_dict()
    total = sum(t.numel() for t in state.values())
    perm = sum(state[k].numel() for k in spec.permutable_keys())
    return perm / total


# --------------------------------------------------------------------------- #
# every model
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("case", CASES)
def test_trace_model(case: Case) -> None:
    model, x, spec = _traced(case)

    ver = spec.info["verification"]
    assert ver["status"] == "passed", f"verification had to freeze groups: {ver}"
    assert not any("verification" in f.reason for f in spec.frozen), [f.reason for f in spec.frozen]
    assert len(spec.groups) > 0

    # independent check, float32
    base = _randomize(copy.deepcopy(model).float(), torch.Generator().manual_seed(1))
    perm = permgraph.random_permutation(spec, 2)
    permuted = permgraph.apply(base, spec, perm)
    y1, y2 = _outputs(base, x), _outputs(permuted, x)
    assert len(y1) == len(y2) > 0
    for a, b in zip(y1, y2):
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert torch.isfinite(a).all()
        rel = float((a - b).norm() / a.norm())
        assert rel < 1e-4, f"permuted model's output changed: relative error {rel:.3e}"

    old, new = base.state_dict(), permuted.state_dict()
    moved = [k for k in old if not torch.equal(old[k], new[k])]
    assert moved, "the random permutation did not move any state-dict tensor"
    # only keys that the spec permutes may change
    assert set(moved) <= set(spec.permutable_keys())

    cov = _coverage(model, spec)
    assert cov >= case.min_coverage, f"coverage {cov:.4f} < floor {case.min_coverage}"


# --------------------------------------------------------------------------- #
# structure
# --------------------------------------------------------------------------- #
def test_resnet18_every_channel_axis_is_grouped() -> None:
    model, _, spec = _traced(_case_by_name("torchvision:resnet18"))
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    bns = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert len(convs) == 20 and len(bns) == 20
    for n in convs:
        axes = spec.axes[f"{n}.weight"]
        assert isinstance(axes[0], str), f"{n}.weight output channels not permuted: {axes}"
        if n != "conv1":  # the stem's input is the RGB image
            assert isinstance(axes[1], str), f"{n}.weight input channels not permuted: {axes}"
        assert axes[2:] == [*spec.shapes[f"{n}.weight"][2:]]
    for n in bns:
        for buf in ("weight", "bias", "running_mean", "running_var"):
            assert isinstance(spec.axes[f"{n}.{buf}"][0], str), f"{n}.{buf} not permuted"
    assert isinstance(spec.axes["fc.weight"][1], str)
    assert spec.axes["fc.weight"][0] == 1000 and spec.axes["fc.bias"] == [1000]
    # 4 residual streams (stem + layer1, layer2, layer3, layer4) + one inner group per basic block
    assert len(spec.groups) == 4 + 8


@pytest.mark.parametrize(
    "name,blocks_attr",
    [("timm:vit_tiny_patch16_224", "blocks"), ("torchvision:vit_b_16", "encoder.layers")],
)
def test_vit_group_count(name: str, blocks_attr: str) -> None:
    model, _, spec = _traced(_case_by_name(name))
    depth = len(model.get_submodule(blocks_attr))
    assert depth == 12
    # residual stream + per block: MLP hidden, heads, QK dims, VO dims
    assert len(spec.groups) == 1 + 4 * depth == 49


def test_timm_vit_residual_stream_group() -> None:
    model, _, spec = _traced(_case_by_name("timm:vit_tiny_patch16_224"))
    (gid,) = [g for g, grp in spec.groups.items() if any(m.axis.tensor == "cls_token" for m in grp.members)]
    members = {(m.axis.tensor, m.axis.dim) for m in spec.groups[gid].members}
    assert ("cls_token", 2) in members
    assert ("pos_embed", 2) in members
    assert ("patch_embed.proj.weight", 0) in members
    assert ("head.weight", 1) in members
    norm_weights = [
        k
        for k, t in model.state_dict().items()
        if k.rpartition(".")[0].rpartition(".")[2].startswith("norm") and k.endswith(".weight")
    ]
    assert len(norm_weights) == 2 * 12 + 1
    for k in norm_weights:
        assert (k, 0) in members, f"{k} is not in the residual-stream group"
