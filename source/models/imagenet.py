"""torchvision's ImageNet architectures, freshly initialised (never downloads weights)."""

from collections.abc import Callable

from torch import nn
from torchvision import models

__all__ = ["IMAGENET_ARCHITECTURES", "build_imagenet_model"]

IMAGENET_ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": models.resnet18,
    "resnet34": models.resnet34,
    "resnet50": models.resnet50,
    "mobilenet_v2": models.mobilenet_v2,
    "densenet121": models.densenet121,
}


def build_imagenet_model(name: str, num_classes: int) -> nn.Module:
    """Return torchvision's ``name`` with random weights (its own initialisation) and ``num_classes`` outputs."""
    return IMAGENET_ARCHITECTURES[name](weights=None, num_classes=num_classes)
