"""Model zoo: small MLP / CIFAR VGG / CIFAR ResNet builders plus timm and torchvision.

Example:
    >>> from permgraph.models import create, example_inputs_for
    >>> model = create("resnet20", width_multiplier=0.5)
    >>> model(*example_inputs_for(model)).shape
    torch.Size([2, 10])
"""

from permgraph.models._zoo import (
    MLP,
    VGG,
    ChannelLayerNorm,
    ResNet,
    available,
    create,
    example_inputs_for,
)

__all__ = [
    "MLP",
    "VGG",
    "ChannelLayerNorm",
    "ResNet",
    "available",
    "create",
    "example_inputs_for",
]
