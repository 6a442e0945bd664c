"""Tests for the model zoo in permgraph.models."""

from __future__ import annotations

import doctest

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from permgraph.models import (
    MLP,
    VGG,
    ChannelLayerNorm,
    ResNet,
    available,
    create,
    example_inputs_for,
)

ZOO = ["mlp", "vgg11", "vgg13", "vgg16", "vgg19", "resnet20", "resnet32", "resnet56"]
NORMS = ["bn", "ln", "none"]


def _convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def test_available_lists_zoo() -> None:
    assert sorted(available()) == sorted(ZOO)


@pytest.mark.parametrize("name", ZOO)
def test_defaults_build_and_run(name: str) -> None:
    torch.manual_seed(0)
    model = create(name)
    shape = model.example_input_shape
    assert isinstance(shape, tuple) and shape[0] == 2
    (x,) = example_inputs_for(model)
    assert tuple(x.shape) == shape
    assert model(x).shape == (2, 10)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", ZOO)
def test_half_width_all_norms(name: str, norm: str) -> None:
    torch.manual_seed(0)
    model = create(name, width_multiplier=0.5, norm=norm, num_classes=7)
    (x,) = example_inputs_for(model)
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    model.eval()
    assert model(x).shape == (2, 7)
    if name != "mlp":
        for conv in _convs(model):
            assert (conv.bias is None) == (norm != "none")
        norm_type = {"bn": nn.BatchNorm2d, "ln": ChannelLayerNorm, "none": nn.Identity}[norm]
        others = {nn.BatchNorm2d, ChannelLayerNorm} - {norm_type}
        assert any(isinstance(m, norm_type) for m in model.modules())
        assert not any(isinstance(m, tuple(others)) for m in model.modules())


@pytest.mark.parametrize(
    ("norm", "norm_type"), [("bn", nn.BatchNorm1d), ("ln", nn.LayerNorm), ("none", None)]
)
def test_mlp_structure(norm: str, norm_type: type[nn.Module] | None) -> None:
    model = create("mlp", in_features=12, num_classes=4, width=16, depth=2, norm=norm)
    assert isinstance(model, MLP)
    linears = _linears(model)
    assert [(m.in_features, m.out_features) for m in linears] == [(12, 16), (16, 16), (16, 4)]
    layers = list(model.layers)
    step = 2 if norm_type is None else 3
    for i in range(2):
        block = layers[i * step : (i + 1) * step]
        assert isinstance(block[0], nn.Linear)
        assert isinstance(block[-1], nn.ReLU)
        if norm_type is not None:
            assert isinstance(block[1], norm_type)
    assert model.example_input_shape == (2, 12)


def test_mlp_widths_override_and_flatten() -> None:
    model = create("mlp", in_features=3 * 4 * 4, widths=[8, 5], width=99, depth=7)
    assert [m.out_features for m in _linears(model)] == [8, 5, 10]
    assert model(torch.randn(2, 3, 4, 4)).shape == (2, 10)
    assert create("mlp", depth=0).layers[0].in_features == 40
    assert len(_linears(create("mlp", depth=0))) == 1


def test_resnet20_layer_counts() -> None:
    model = create("resnet20")
    assert isinstance(model, ResNet)
    convs = _convs(model)
    assert len(convs) == 21
    assert sum(c.kernel_size == (1, 1) for c in convs) == 2
    assert sum(c.kernel_size == (3, 3) for c in convs) == 19
    assert len(_linears(model)) == 1 and model.fc is _linears(model)[0]
    assert [len(s) for s in (model.layer1, model.layer2, model.layer3)] == [3, 3, 3]
    assert isinstance(model.bn1, nn.BatchNorm2d)
    stages = (model.layer1, model.layer2, model.layer3)
    assert [stage[0].conv1.out_channels for stage in stages] == [16, 32, 64]
    assert len(model.layer1[0].shortcut) == 0
    assert model.layer2[0].conv1.stride == (2, 2)
    assert model.layer2[0].shortcut[0].stride == (2, 2)
    for block in model.layer1:
        for attr in ("conv1", "bn1", "conv2", "bn2", "shortcut"):
            assert hasattr(block, attr)


@pytest.mark.parametrize(("name", "blocks"), [("resnet32", 5), ("resnet56", 9)])
def test_resnet_depths(name: str, blocks: int) -> None:
    model = create(name, width_multiplier=0.25)
    assert [len(s) for s in (model.layer1, model.layer2, model.layer3)] == [blocks] * 3
    assert len(_convs(model)) == 1 + 6 * blocks + 2


def test_resnet_float_width_multiplier() -> None:
    model = create("resnet20", width_multiplier=1.5, norm="ln")
    assert model.conv1.out_channels == 24
    assert model.fc.in_features == 96
    assert isinstance(model.bn1, ChannelLayerNorm)
    assert model(*example_inputs_for(model)).shape == (2, 10)


@pytest.mark.parametrize(("name", "n_convs"), [("vgg11", 8), ("vgg13", 10), ("vgg16", 13), ("vgg19", 16)])
def test_vgg_structure(name: str, n_convs: int) -> None:
    model = create(name, width_multiplier=0.25)
    assert isinstance(model, VGG)
    assert isinstance(model.features, nn.Sequential)
    assert isinstance(model.classifier, nn.Linear)
    assert len(_convs(model)) == n_convs
    assert _linears(model) == [model.classifier]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.features) == 5
    assert model.classifier.in_features == 128


def test_vgg16_full_width_channels() -> None:
    model = create("vgg16")
    convs = _convs(model)
    assert len(convs) == 13
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 256] + [512] * 6
    assert all(c.bias is None and c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert model.classifier.in_features == 512


def test_conv_nets_custom_shapes() -> None:
    model = create("vgg11", width_multiplier=0.25, in_channels=1, input_size=64, num_classes=3)
    assert model.example_input_shape == (2, 1, 64, 64)
    assert model(*example_inputs_for(model)).shape == (2, 3)
    model = create("resnet20", width_multiplier=0.25, in_channels=1, input_size=28)
    assert model.example_input_shape == (2, 1, 28, 28)
    assert model(*example_inputs_for(model)).shape == (2, 10)


def test_width_multiplier_rounding_and_minimum() -> None:
    model = create("vgg11", width_multiplier=0.001)
    assert all(c.out_channels == 1 for c in _convs(model))
    model = create("vgg11", width_multiplier=0.3)
    assert _convs(model)[0].out_channels == round(64 * 0.3)


def test_deterministic_given_seed() -> None:
    torch.manual_seed(123)
    a = create("resnet20", width_multiplier=0.5)
    torch.manual_seed(123)
    b = create("resnet20", width_multiplier=0.5)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb
        assert torch.equal(va, vb)


@pytest.mark.parametrize("shape", [(2, 6, 5, 7), (3, 1, 2, 2)])
def test_channel_layer_norm_matches_manual(shape: tuple[int, ...]) -> None:
    c = shape[1]
    norm = ChannelLayerNorm(c)
    assert norm.weight.shape == (c,) and norm.bias.shape == (c,)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(c))
        norm.bias.copy_(torch.randn(c))
    x = torch.randn(shape) * 3 + 1
    expected = F.layer_norm(x.permute(0, 2, 3, 1), (c,), norm.weight, norm.bias, 1e-5)
    expected = expected.permute(0, 3, 1, 2)
    torch.testing.assert_close(norm(x), expected)
    # with unit affine, every pixel's channel vector has ~zero mean and unit variance
    plain = ChannelLayerNorm(c)(x)
    if c > 1:
        torch.testing.assert_close(plain.mean(1), torch.zeros(plain.mean(1).shape), atol=1e-5, rtol=0)
        torch.testing.assert_close(
            plain.var(1, unbiased=False), torch.ones(plain.mean(1).shape), atol=1e-3, rtol=0
        )


def test_unknown_name_raises() -> None:
    with pytest.raises(ValueError, match="resnet20") as info:
        create("resnet18")
    msg = str(info.value)
    assert "timm:" in msg and "torchvision:" in msg
    for name in available():
        assert name in msg


@pytest.mark.parametrize(
    ("name", "kw", "match"),
    [
        ("vgg16", {"norm": "xx"}, "norm"),
        ("resnet20", {"norm": "batch"}, "norm"),
        ("mlp", {"norm": "gn"}, "norm"),
        ("vgg11", {"width_multiplier": 0}, "width_multiplier"),
        ("resnet20", {"width_multiplier": -1.0}, "width_multiplier"),
        ("mlp", {"width_multiplier": float("nan")}, "width_multiplier"),
        ("resnet20", {"num_classes": 0}, "num_classes"),
        ("vgg11", {"input_size": 16}, "input_size"),
        ("mlp", {"depth": -1}, "depth"),
        ("mlp", {"widths": [4, 0]}, "widths"),
        ("mlp", {"in_features": 2.5}, "in_features"),
    ],
)
def test_bad_kwargs_raise(name: str, kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        create(name, **kw)


def test_bad_norm_message_lists_allowed() -> None:
    with pytest.raises(ValueError) as info:
        create("vgg11", norm="xx")
    assert all(n in str(info.value) for n in NORMS)


def test_resnet_bad_depth() -> None:
    with pytest.raises(ValueError, match="depth"):
        ResNet(depth=21)


def test_example_inputs_zoo_model() -> None:
    model = create("vgg11", width_multiplier=0.25)
    (x,) = example_inputs_for(model)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    (y,) = example_inputs_for(model)
    assert torch.equal(x, y)  # fixed generator seed
    expected = torch.randn((2, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, expected)


def test_example_inputs_follow_param_dtype() -> None:
    model = create("mlp", width=8, depth=1).double()
    (x,) = example_inputs_for(model)
    assert x.dtype == torch.float64
    assert model(x).dtype == torch.float64


def test_example_inputs_timm_pretrained_cfg() -> None:
    pytest.importorskip("timm")
    model = create("timm:resnet18", num_classes=5)
    assert model.pretrained_cfg["input_size"] == (3, 224, 224)
    (x,) = example_inputs_for(model)
    assert x.shape == (2, 3, 224, 224)
    assert model.fc.out_features == 5


def test_example_inputs_torchvision() -> None:
    pytest.importorskip("torchvision")
    model = create("torchvision:resnet18", num_classes=4)
    (x,) = example_inputs_for(model)
    assert x.shape == (2, 3, 224, 224)
    assert model.fc.out_features == 4


@pytest.mark.parametrize(
    ("module", "shape"),
    [
        (nn.Sequential(nn.Linear(5, 3)), (2, 5)),
        (nn.Sequential(nn.Conv1d(4, 8, 3), nn.ReLU()), (2, 4, 64)),
        (nn.Sequential(nn.Conv2d(2, 8, 3), nn.Flatten(), nn.Linear(8, 1)), (2, 2, 224, 224)),
    ],
)
def test_example_inputs_inferred(module: nn.Module, shape: tuple[int, ...]) -> None:
    (x,) = example_inputs_for(module)
    assert x.shape == shape


def test_example_inputs_none_without_linear_or_conv() -> None:
    assert example_inputs_for(nn.Sequential(nn.ReLU(), nn.Dropout())) is None
    assert example_inputs_for(nn.BatchNorm2d(3)) is None


@pytest.mark.parametrize(
    ("name", "kw", "match"),
    [
        ("timm:", {}, "timm"),
        ("timm:not_a_real_model_xyz", {}, "timm"),
        ("torchvision:not_a_real_model_xyz", {}, "torchvision"),
        ("timm:resnet18", {"pretrained": True}, "pretrained"),
        ("torchvision:resnet18", {"weights": "DEFAULT"}, "weights"),
    ],
)
def test_external_bad_names_and_downloads_rejected(name: str, kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        create(name, **kw)


def test_docstring_examples() -> None:
    import permgraph.models
    import permgraph.models._zoo as zoo

    for mod in (zoo, permgraph.models):
        result = doctest.testmod(mod, extraglobs={"torch": torch, "nn": nn}, verbose=False)
        assert result.failed == 0
        assert result.attempted > 0


def test_example_inputs_of_a_timm_model_built_for_another_image_size() -> None:
    """A ViT or Mixer built with ``img_size=32`` keeps its config's 224 px ``input_size`` but refuses
    224 px inputs: the guess follows the patch embedding, and tracing without inputs works."""
    pytest.importorskip("timm")
    import permgraph

    vit = create("timm:vit_tiny_patch16_224", img_size=32, patch_size=4, depth=1, num_classes=10)
    assert vit.pretrained_cfg["input_size"] == (3, 224, 224)
    assert example_inputs_for(vit)[0].shape == (2, 3, 32, 32)
    mixer = create("timm:MlpMixer", img_size=64, patch_size=16, num_blocks=1, embed_dim=32, in_chans=1)
    assert example_inputs_for(mixer)[0].shape == (2, 1, 64, 64)
    assert permgraph.trace(vit).info["verification"]["status"] == "passed"
