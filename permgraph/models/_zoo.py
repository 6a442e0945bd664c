"""Small model zoo: MLP, CIFAR-style VGG and CIFAR ResNet, plus timm/torchvision.

All zoo models carry an ``example_input_shape`` attribute (batch size 2 first)
so that :func:`example_inputs_for` can build an input for tracing or testing.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from permgraph.errors import UnknownNameError

__all__ = [
    "MLP",
    "VGG",
    "ResNet",
    "BasicBlock",
    "ChannelLayerNorm",
    "create",
    "available",
    "example_inputs_for",
]

_EXAMPLE_BATCH = 2
_CONV_NORMS = ("bn", "ln", "none")
_MLP_NORMS = ("none", "bn", "ln")

VGG_CONFIGS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (
        64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
        512, 512, 512, "M", 512, 512, 512, "M",
    ),
    "vgg19": (
        64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
        512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
    ),
}  # fmt: skip

RESNET_DEPTHS: dict[str, int] = {"resnet20": 20, "resnet32": 32, "resnet56": 56}


# --------------------------------------------------------------------------- #
# argument checks
# --------------------------------------------------------------------------- #
def _check_pos_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_multiplier(value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"width_multiplier must be a finite number > 0, got {value!r}")
    return float(value)


def _check_norm(value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"norm must be one of {tuple(allowed)}, got {value!r}")
    return value


def _scale(channels: int, width_multiplier: float) -> int:
    return max(1, round(channels * width_multiplier))


# --------------------------------------------------------------------------- #
# normalisation
# --------------------------------------------------------------------------- #
class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel dimension at every spatial position.

    The "LayerNorm" used for conv nets in Git Re-Basin: for an input of shape
    ``(N, C, H, W)`` each pixel's C-vector is normalised and scaled by
    per-channel ``weight``/``bias`` of shape ``(C,)``. (Inputs ``(N, C, *)``
    of any rank are accepted; the channel dim is always dim 1.)

    Example:
        >>> norm = ChannelLayerNorm(8)
        >>> norm(torch.randn(2, 8, 4, 4)).shape
        torch.Size([2, 8, 4, 4])
    """

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_channels = _check_pos_int("num_channels", num_channels)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def reset_parameters(self) -> None:
        """Reset to the identity affine transform (weight 1, bias 0)."""
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.movedim(1, -1), (self.num_channels,), self.weight, self.bias, self.eps)
        return y.movedim(-1, 1)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}"


def _conv_norm(norm: str, channels: int) -> nn.Module:
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    if norm == "ln":
        return ChannelLayerNorm(channels)
    return nn.Identity()


def _init_convs(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- #
# MLP
# --------------------------------------------------------------------------- #
class MLP(nn.Module):
    """Multi-layer perceptron: ``[Linear -> norm -> ReLU] * depth -> Linear``.

    Input shape ``(B, in_features)``; inputs with more dims are flattened from
    dim 1, so ``(B, C, H, W)`` images with ``C*H*W == in_features`` work.
    ``norm`` is ``"none"``, ``"bn"`` (BatchNorm1d) or ``"ln"`` (LayerNorm),
    placed after each hidden Linear. ``widths`` overrides ``width``/``depth``;
    ``width_multiplier`` scales the hidden widths.

    Example:
        >>> model = MLP(in_features=40, num_classes=10, width=64, depth=2)
        >>> model(torch.randn(2, 40)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_features: int = 40,
        num_classes: int = 10,
        width: int = 128,
        depth: int = 3,
        widths: Sequence[int] | None = None,
        norm: str = "none",
        width_multiplier: float = 1.0,
    ) -> None:
        super().__init__()
        _check_pos_int("in_features", in_features)
        _check_pos_int("num_classes", num_classes)
        _check_norm(norm, _MLP_NORMS)
        width_multiplier = _check_multiplier(width_multiplier)
        if widths is None:
            _check_pos_int("width", width)
            if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
                raise ValueError(f"depth must be an int >= 0, got {depth!r}")
            widths = [width] * depth
        else:
            if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence):
                raise ValueError(f"widths must be a sequence of positive ints, got {widths!r}")
            for w in widths:
                _check_pos_int("widths entries", w)
        hidden = [_scale(w, width_multiplier) for w in widths]

        layers: list[nn.Module] = []
        prev = in_features
        for w in hidden:
            layers.append(nn.Linear(prev, w))
            if norm == "bn":
                layers.append(nn.BatchNorm1d(w))
            elif norm == "ln":
                layers.append(nn.LayerNorm(w))
            layers.append(nn.ReLU())
            prev = w
        layers.append(nn.Linear(prev, num_classes))
        self.layers = nn.Sequential(*layers)

        self.in_features = in_features
        self.num_classes = num_classes
        self.hidden_widths: tuple[int, ...] = tuple(hidden)
        self.example_input_shape: tuple[int, ...] = (_EXAMPLE_BATCH, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(torch.flatten(x, 1))


# --------------------------------------------------------------------------- #
# VGG
# --------------------------------------------------------------------------- #
class VGG(nn.Module):
    """CIFAR-style VGG: conv3x3 stack, global average pool, one Linear.

    ``cfg`` lists conv output channels (before ``width_multiplier``) and
    ``"M"`` for ``MaxPool2d(2)``. Each conv is ``Conv3x3(pad 1) -> norm ->
    ReLU`` with ``norm`` in ``"bn"`` (BatchNorm2d), ``"ln"``
    (:class:`ChannelLayerNorm`) or ``"none"`` (Identity); convs have a bias
    only when ``norm == "none"``. Input shape
    ``(B, in_channels, input_size, input_size)``.

    Example:
        >>> model = VGG(VGG_CONFIGS["vgg11"], width_multiplier=0.25)
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        cfg: Sequence[int | str],
        num_classes: int = 10,
        in_channels: int = 3,
        input_size: int = 32,
        width_multiplier: float = 1.0,
        norm: str = "bn",
    ) -> None:
        super().__init__()
        _check_pos_int("num_classes", num_classes)
        _check_pos_int("in_channels", in_channels)
        _check_pos_int("input_size", input_size)
        width_multiplier = _check_multiplier(width_multiplier)
        _check_norm(norm, _CONV_NORMS)
        n_pools = sum(1 for v in cfg if v == "M")
        if input_size < 2**n_pools:
            raise ValueError(f"input_size must be >= {2**n_pools} for {n_pools} max-pools, got {input_size}")

        layers: list[nn.Module] = []
        prev = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            c = _scale(_check_pos_int("cfg entries", v), width_multiplier)
            layers.append(nn.Conv2d(prev, c, 3, padding=1, bias=norm == "none"))
            layers.append(_conv_norm(norm, c))
            layers.append(nn.ReLU())
            prev = c
        if not any(isinstance(m, nn.Conv2d) for m in layers):
            raise ValueError(f"cfg must contain at least one conv channel count, got {cfg!r}")
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(prev, num_classes)
        _init_convs(self)

        self.num_classes = num_classes
        self.example_input_shape: tuple[int, ...] = (
            _EXAMPLE_BATCH,
            in_channels,
            input_size,
            input_size,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


# --------------------------------------------------------------------------- #
# ResNet
# --------------------------------------------------------------------------- #
class BasicBlock(nn.Module):
    """ResNet basic block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    ``shortcut`` is an empty ``nn.Sequential`` (identity) unless the stride or
    channel count changes, in which case it is ``Sequential(conv1x1, norm)``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str) -> None:
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=bias)
        self.bn1 = _conv_norm(norm, out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=bias)
        self.bn2 = _conv_norm(norm, out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=bias),
                _conv_norm(norm, out_channels),
            )
        else:
            self.shortcut = nn.Sequential()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet (He et al. 2016): stem, 3 stages of n basic blocks, GAP, ``fc``.

    ``depth = 6n + 2`` (20, 32, 56, ...). Stage widths are
    ``16, 32, 64`` times ``width_multiplier`` (rounded); stages 2 and 3 start
    with stride 2. ``norm`` in ``"bn"``, ``"ln"`` (:class:`ChannelLayerNorm`),
    ``"none"``. Input shape ``(B, in_channels, input_size, input_size)``.

    Example:
        >>> model = ResNet(depth=20, width_multiplier=0.5)
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        in_channels: int = 3,
        input_size: int = 32,
        width_multiplier: float = 1.0,
        norm: str = "bn",
    ) -> None:
        super().__init__()
        _check_pos_int("depth", depth)
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (e.g. 20, 32, 56), got {depth}")
        _check_pos_int("num_classes", num_classes)
        _check_pos_int("in_channels", in_channels)
        _check_pos_int("input_size", input_size)
        width_multiplier = _check_multiplier(width_multiplier)
        _check_norm(norm, _CONV_NORMS)
        n = (depth - 2) // 6
        widths = [_scale(c, width_multiplier) for c in (16, 32, 64)]

        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=norm == "none")
        self.bn1 = _conv_norm(norm, widths[0])
        self.relu = nn.ReLU()
        prev = widths[0]
        stages: list[nn.Sequential] = []
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(prev, w, stride, norm))
                prev = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(prev, num_classes)
        _init_convs(self)

        self.depth = depth
        self.num_classes = num_classes
        self.example_input_shape: tuple[int, ...] = (
            _EXAMPLE_BATCH,
            in_channels,
            input_size,
            input_size,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(x)
        return self.fc(torch.flatten(x, 1))


# --------------------------------------------------------------------------- #
# registry
# --------------------------------------------------------------------------- #
def _vgg_factory(cfg_name: str) -> Callable[..., nn.Module]:
    def build(**kw: Any) -> nn.Module:
        return VGG(VGG_CONFIGS[cfg_name], **kw)

    return build


def _resnet_factory(depth: int) -> Callable[..., nn.Module]:
    def build(**kw: Any) -> nn.Module:
        return ResNet(depth=depth, **kw)

    return build


_ZOO: dict[str, Callable[..., nn.Module]] = {"mlp": MLP}
_ZOO.update({name: _vgg_factory(name) for name in VGG_CONFIGS})
_ZOO.update({name: _resnet_factory(d) for name, d in RESNET_DEPTHS.items()})

_NO_DOWNLOAD_KW = ("pretrained", "weights", "weights_backbone")


def available() -> list[str]:
    """Return the names accepted by :func:`create` (without the timm:/torchvision: prefixes).

    Example:
        >>> "resnet20" in available()
        True
    """
    return sorted(_ZOO)


def _reject_download_kw(prefix: str, kw: Mapping[str, Any]) -> None:
    for key in _NO_DOWNLOAD_KW:
        if kw.get(key) not in (None, False):
            raise ValueError(
                f"{prefix}: {key}={kw[key]!r} is not allowed; the zoo never downloads weights "
                "(build the model and load a local state_dict instead)"
            )


def _close(name: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(names), n=4, cutoff=0.6)
    return f"did you mean {', '.join(map(repr, close))}? " if close else ""


def _prefixed(name: str) -> list[str]:
    """``timm:name`` and ``torchvision:name`` where those libraries have a model ``name``."""
    out = []
    try:
        import timm

        if timm.is_model(name):
            out.append(f"timm:{name}")
        import torchvision.models as tvm

        if name.lower() in tvm.list_models():
            out.append(f"torchvision:{name}")
    except ImportError:  # pragma: no cover - both are dependencies
        pass
    return out


def _build(label: str, builder: Callable[..., nn.Module], kw: dict[str, Any]) -> nn.Module:
    """Call ``builder(**kw)``; an unexpected keyword argument becomes a TypeError naming the model."""
    try:
        return builder(**kw)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e) and "got multiple values" not in str(e):
            raise
        args = ", ".join(f"{k}={v!r}" for k, v in kw.items())
        hint = ""
        if "got multiple values" in str(e) and label.startswith(("timm:", "torchvision:")):
            lib = label.split(":")[0]
            hint = (f"; the variant fixes that argument: name its model class instead, with every argument "
                    f"(e.g. '{lib}:{'MlpMixer' if lib == 'timm' else 'DenseNet'}')")
        raise TypeError(f"cannot build {label} with {args or 'no arguments'}: {e}{hint}") from None


def _model_class(namespace, name: str) -> type[nn.Module] | None:
    """The nn.Module subclass ``namespace.<name>`` (a model class such as timm's ``MlpMixer``), if any."""
    cls = getattr(namespace, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, nn.Module) else None


def _create_timm(name: str, kw: dict[str, Any]) -> nn.Module:
    import timm
    import timm.models

    cls = None if timm.is_model(name) else _model_class(timm.models, name)
    if cls is not None:  # a model class: every size is an argument (the named variants fix some)
        _reject_download_kw("timm", kw)
        kw.pop("pretrained", None)
        return _build(f"timm:{name}", cls, kw)
    if not timm.is_model(name):
        raise UnknownNameError(
            f"unknown timm model {name!r}; {_close(name, timm.list_models())}see the available ones with "
            f"timm.list_models('*{name.split('.')[0][:12]}*') or timm.list_models()")
    _reject_download_kw("timm", kw)
    kw.pop("pretrained", None)
    return _build(f"timm:{name}", lambda **k: timm.create_model(name, pretrained=False, **k), kw)


def _create_torchvision(name: str, kw: dict[str, Any]) -> nn.Module:
    import torchvision.models as tvm

    names = tvm.list_models()
    cls = None if name.lower() in names else _model_class(tvm, name)
    if cls is not None:  # a model class (DenseNet, ResNet, ...): every size is an argument
        _reject_download_kw("torchvision", kw)
        return _build(f"torchvision:{name}", cls, kw)
    if name.lower() not in names:
        raise UnknownNameError(
            f"unknown torchvision model {name!r}; {_close(name.lower(), names)}see the available ones with "
            "torchvision.models.list_models()")
    _reject_download_kw("torchvision", kw)
    kw.pop("pretrained", None)
    kw.pop("weights", None)
    params = inspect.signature(tvm.get_model_builder(name)).parameters
    if "weights_backbone" in params:
        # detection/segmentation builders default to downloading backbone weights
        kw["weights_backbone"] = None
    return _build(f"torchvision:{name}", lambda **k: tvm.get_model(name, weights=None, **k), kw)


def _create_hf(name: str, kw: dict[str, Any]) -> nn.Module:
    """A Hugging Face ``transformers`` model from a config built offline: ``name`` is a model type
    (``gpt2``, ``bert``, ``llama``, ...: the base model, ``AutoModel``) or a model class
    (``GPT2LMHeadModel``, ``LlamaForCausalLM``, ...); ``kw`` are the config's fields."""
    try:
        import transformers
    except ImportError as e:
        raise UnknownNameError(f"hf:{name} needs Hugging Face transformers: pip install 'permgraph[hf]'") from e
    _reject_download_kw("hf", kw)
    cls = getattr(transformers, name, None)
    if isinstance(cls, type) and issubclass(cls, nn.Module) and getattr(cls, "config_class", None) is not None:
        config = cls.config_class(**kw)
        return _build(f"hf:{name}", lambda **_: cls(config), {})
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if name not in CONFIG_MAPPING:
        raise UnknownNameError(
            f"unknown Hugging Face model type or class {name!r}; {_close(name, list(CONFIG_MAPPING))}a model type "
            "(gpt2, bert, llama, ...) builds the base model, a class (GPT2LMHeadModel, ...) that model")
    config = transformers.AutoConfig.for_model(name, **kw)
    return transformers.AutoModel.from_config(config)


def create(name: str, **kw: Any) -> nn.Module:
    """Build a randomly initialised model by name.

    ``name`` is one of :func:`available` (``"mlp"``, ``"vgg11|13|16|19"``,
    ``"resnet20|32|56"``), ``"timm:<model>"`` or ``"torchvision:<model>"``. A model *class* exported
    by ``timm.models`` or ``torchvision.models`` (``"timm:MlpMixer"``, ``"torchvision:DenseNet"``) is
    built from the keyword arguments alone: the way to set a size that a named variant fixes (timm's
    ``mixer_s16_224`` fixes ``num_blocks``, torchvision's ``densenet121`` fixes ``growth_rate``).
    ``"hf:<model type>"`` (``hf:gpt2``: the base model) or ``"hf:<class>"`` (``hf:GPT2LMHeadModel``)
    builds a Hugging Face ``transformers`` model from a config of the keyword arguments, offline.
    Keyword arguments go to the model constructor. Nothing is ever downloaded.
    An unknown name raises :class:`permgraph.UnknownNameError` (a ``ValueError``)
    that suggests close matches; an unknown keyword argument raises ``TypeError``.

    Example:
        >>> model = create("vgg11", width_multiplier=0.25, norm="ln")
        >>> model(*example_inputs_for(model)).shape
        torch.Size([2, 10])
    """
    if not isinstance(name, str):
        raise ValueError(f"model name must be a str, got {type(name).__name__}")
    for prefix, builder in (("timm:", _create_timm), ("torchvision:", _create_torchvision), ("hf:", _create_hf)):
        if name.startswith(prefix):
            sub = name[len(prefix) :]
            if not sub:
                raise UnknownNameError(f"missing model name after {prefix!r}, e.g. {prefix}resnet18")
            return builder(sub, dict(kw))
    factory = _ZOO.get(name)
    if factory is None:
        pref = _prefixed(name)
        hint = f"did you mean {' or '.join(map(repr, pref))}? " if pref else _close(name, available())
        raise UnknownNameError(
            f"unknown model name {name!r}; {hint}available names: {', '.join(available())}; "
            "or use the 'timm:<name>' / 'torchvision:<name>' prefixes"
        )
    return _build(repr(name), factory, kw)


# --------------------------------------------------------------------------- #
# example inputs
# --------------------------------------------------------------------------- #
def _built_image_size(model: nn.Module) -> tuple[int, ...] | None:
    """(C, H, W) of a timm model built for a fixed image size other than its config's (``img_size=32``):
    the ``img_size`` of its first patch embedding, when that insists on it (``strict_img_size``)."""
    for pe in model.modules():
        size, proj = getattr(pe, "img_size", None), getattr(pe, "proj", None)
        if (getattr(pe, "strict_img_size", False) and isinstance(size, (tuple, list)) and len(size) == 2
                and isinstance(proj, nn.Conv2d)):
            return (proj.in_channels, int(size[0]), int(size[1]))
        if isinstance(pe, (nn.Conv2d, nn.Linear)):  # the first layer comes before any patch embedding
            return None
    return None


def _cfg_input_size(model: nn.Module) -> tuple[int, ...] | None:
    built = _built_image_size(model)
    if built is not None:
        return built
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if cfg is None:
            continue
        size = cfg.get("input_size") if isinstance(cfg, Mapping) else getattr(cfg, "input_size", None)
        if size is not None:
            return tuple(int(s) for s in size)
    return None


def _token_inputs(model: nn.Module) -> tuple[torch.Tensor, ...] | None:
    """``(input_ids,)`` of shape (2, 16) for a Hugging Face model with a vocabulary, else None."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if vocab is None or not hasattr(model, "get_input_embeddings"):
        return None
    length = min(16, int(getattr(config, "max_position_embeddings", 16) or 16))
    gen = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    return (torch.randint(0, int(vocab), (_EXAMPLE_BATCH, length), generator=gen).to(device),)


def _example_shape(model: nn.Module) -> tuple[int, ...] | None:
    shape = getattr(model, "example_input_shape", None)
    if shape is not None:
        return tuple(int(s) for s in shape)
    size = _cfg_input_size(model)
    if size is not None:
        return (_EXAMPLE_BATCH, *size)
    for m in model.modules():
        if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
            continue
        if isinstance(m, nn.Linear):
            return (_EXAMPLE_BATCH, m.in_features)
        if isinstance(m, nn.Conv1d):
            return (_EXAMPLE_BATCH, m.in_channels, 64)
        if isinstance(m, nn.Conv2d):
            return (_EXAMPLE_BATCH, m.in_channels, 224, 224)
    return None


def example_inputs_for(model: nn.Module) -> tuple[torch.Tensor, ...] | None:
    """Return ``(x,)`` with a seeded ``torch.randn`` input for ``model``, or None.

    The shape comes from ``model.example_input_shape`` (zoo models), else the
    image size a timm patch embedding insists on, else the timm
    ``pretrained_cfg``/``default_cfg`` ``input_size``, else the first
    Linear ``(2, in)``, Conv1d ``(2, C, 64)`` or Conv2d ``(2, C, 224, 224)``;
    a Hugging Face model with a vocabulary gets token ids ``(2, 16)``.
    The tensor uses a ``torch.Generator`` seeded 0 and follows the dtype and
    device of the model's first parameter.

    Example:
        >>> example_inputs_for(nn.Sequential(nn.Linear(5, 3)))[0].shape
        torch.Size([2, 5])
    """
    tokens = _token_inputs(model)
    if tokens is not None:
        return tokens
    shape = _example_shape(model)
    if shape is None:
        return None
    param = next(model.parameters(), None)
    dtype = torch.get_default_dtype()
    device = torch.device("cpu")
    if param is not None:
        device = param.device
        if param.is_floating_point() or param.is_complex():
            dtype = param.dtype
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=dtype)
    return (x.to(device),)
