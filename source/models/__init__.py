"""Model registry: build any architecture by name for a data set's input shape and class count.

Names and the input each accepts (input shape excludes the batch dimension):

- CIFAR-style nets ``resnet20 resnet32 resnet44 resnet56 resnet110 mobilenet_v2_cifar
  densenet40 densenet_bc_100``: images of 8 to 64 pixels a side, any channel count. They
  keep full resolution in the first stage, so larger images cost too much; use an
  ImageNet net for those.
- ``small_cnn``: images of 4 to 64 pixels a side, any channel count (8x8 digits).
- ``mlp``: vectors of any length, or images of at most 4096 values, flattened.
- torchvision's ``resnet18 resnet34 resnet50 mobilenet_v2 densenet121``: 3-channel images
  of 32 to 1024 pixels a side (they downsample by 32).

Example:
    >>> model = build_model("resnet20", num_classes=10, input_shape=(3, 32, 32))
"""

import difflib
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from torch import nn

from source.errors import UserError
from source.models.densenet_cifar import DenseNetCifar
from source.models.imagenet import IMAGENET_ARCHITECTURES, build_imagenet_model
from source.models.input_requirements import FlattenedInput, ImageInput
from source.models.mobilenet_v2_cifar import MobileNetV2Cifar
from source.models.resnet_cifar import ResNetCifar
from source.models.small import Mlp, SmallCnn

__all__ = ["available_models", "build_model", "MODELS", "ModelEntry"]

SMALL_IMAGES = ImageInput(min_side=8, max_side=64)
TINY_IMAGES = ImageInput(min_side=4, max_side=64)
IMAGENET_IMAGES = ImageInput(min_side=32, max_side=1024, channels=3)
VECTORS_OR_SMALL_FLATTENED_IMAGES = FlattenedInput(max_image_values=4096)

CIFAR_RESNET_DEPTHS = (20, 32, 44, 56, 110)


@dataclass(frozen=True)
class ModelEntry:
    """How to build one model, ``build(num_classes, input_shape)``, and what input it accepts."""

    build: Callable[[int, tuple[int, ...]], nn.Module]
    accepts: ImageInput | FlattenedInput


def _resnet_cifar(depth: int, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    return ResNetCifar(depth, num_classes, in_channels=input_shape[0])


def _densenet40(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    return DenseNetCifar(40, 12, bottleneck=False, compression=1.0, num_classes=num_classes, in_channels=input_shape[0])


def _densenet_bc_100(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    return DenseNetCifar(100, 12, bottleneck=True, compression=0.5, num_classes=num_classes, in_channels=input_shape[0])


def _mobilenet_v2_cifar(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    return MobileNetV2Cifar(num_classes, in_channels=input_shape[0])


def _small_cnn(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    return SmallCnn(num_classes, in_channels=input_shape[0])


def _mlp(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    return Mlp(num_classes, input_shape)


def _imagenet(name: str, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    return build_imagenet_model(name, num_classes)


MODELS: dict[str, ModelEntry] = {
    **{f"resnet{depth}": ModelEntry(partial(_resnet_cifar, depth), SMALL_IMAGES) for depth in CIFAR_RESNET_DEPTHS},
    "mobilenet_v2_cifar": ModelEntry(_mobilenet_v2_cifar, SMALL_IMAGES),
    "densenet40": ModelEntry(_densenet40, SMALL_IMAGES),
    "densenet_bc_100": ModelEntry(_densenet_bc_100, SMALL_IMAGES),
    "small_cnn": ModelEntry(_small_cnn, TINY_IMAGES),
    "mlp": ModelEntry(_mlp, VECTORS_OR_SMALL_FLATTENED_IMAGES),
    **{name: ModelEntry(partial(_imagenet, name), IMAGENET_IMAGES) for name in IMAGENET_ARCHITECTURES},
}


def available_models() -> list[str]:
    """Return the registered model names, sorted."""
    return sorted(MODELS)


def build_model(name: str, num_classes: int, input_shape: Sequence[int]) -> nn.Module:
    """Build a freshly initialised model ``name`` with ``num_classes`` outputs for inputs of ``input_shape``.

    ``input_shape`` is (channels, height, width) for images and (features,) for vectors;
    ``num_classes`` is 1 for scalar regression. Raises UserError for an unknown name, a bad
    class count or shape, or a model that cannot take this input (naming the models that can).
    """
    entry = MODELS.get(name) if isinstance(name, str) else None
    if entry is None:
        close_matches = difflib.get_close_matches(str(name), MODELS, n=1)
        suggestion = f" (did you mean '{close_matches[0]}'?)" if close_matches else ""
        raise UserError(f"Unknown model '{name}'{suggestion}; valid names: {', '.join(available_models())}.")
    num_classes = _positive_integer(num_classes, "num_classes")
    shape = _input_shape(input_shape)
    problem = entry.accepts.problem_with(shape)
    if problem is not None:
        fitting = [other for other in available_models() if MODELS[other].accepts.problem_with(shape) is None]
        fitting_words = ", ".join(fitting) if fitting else "none"
        raise UserError(f"Model '{name}' {problem}; models that fit input shape {shape}: {fitting_words}.")
    return entry.build(num_classes, shape)


def _positive_integer(value: object, what: str) -> int:
    """Return ``value`` as an int, or raise UserError unless it is a positive integer."""
    try:
        number = operator.index(value)
    except TypeError:
        number = 0
    if isinstance(value, bool) or number < 1:
        raise UserError(f"{what} must be a positive integer, got {value!r}.")
    return number


def _input_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    """Return ``input_shape`` as a tuple of ints, or raise UserError unless it holds 1 or 3 positive integers."""
    try:
        shape = tuple(operator.index(extent) for extent in input_shape)
    except TypeError:
        shape = ()
    if len(shape) not in (1, 3) or min(shape) < 1:
        raise UserError(
            f"input_shape must be (channels, height, width) or (features,) with positive sizes, got {input_shape!r}."
        )
    return shape
