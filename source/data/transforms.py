"""Normalisation constants and the training/evaluation image pipelines.

Pipeline rule, the same for every image data set: images of side ``image_size``
at most ``SMALL_IMAGE_MAX_SIZE`` (64) get the CIFAR-style pipeline, larger ones the
ImageNet-style pipeline.

- small, training:   [Resize] -> RandomCrop(size, padding=crop_padding) -> horizontal flip
- small, evaluation: [Resize]
- large, training:   RandomResizedCrop(size) -> horizontal flip
- large, evaluation: Resize(size * 256 / 224) -> CenterCrop(size)

Both end in ToTensor (pixels scaled to [0, 1]) and Normalize with the chosen
data set's mean and std. The Resize to (size, size) is left out when the data
set's images already have that side. With ``augment=False`` training uses the
evaluation pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torchvision import transforms

from source.data.options import DataOptions
from source.data.presets import PRESETS
from source.errors import UserError

__all__ = [
    "NORMALIZATION",
    "SMALL_IMAGE_MAX_SIZE",
    "ImagePipelines",
    "normalization_constants",
    "image_transforms",
    "dataset_image_pipelines",
]

# Per-channel (mean, std) of pixels scaled to [0, 1]. The CIFAR, SVHN and ImageNet
# values are the ones the paper's experiments used. (CIFAR-10's std is the widely
# copied 0.20; the std over all training pixels is about 0.25. Only the input scale
# differs, and reproducing the paper matters more here.) digits: mean and std over
# the 1,438 images outside its fixed test split.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "digits": ((0.3055,), (0.3761,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "svhn": ((0.4380, 0.4440, 0.4730), (0.1751, 0.1771, 0.1744)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

SMALL_IMAGE_MAX_SIZE = 64

# torchvision's reference ImageNet evaluation: resize to 256, centre-crop 224.
_EVALUATION_RESIZE_RATIO = 256 / 224


def normalization_constants(name: str, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the data set ``name`` from NORMALIZATION, checked against ``channels``."""
    if name not in NORMALIZATION:
        raise UserError(
            f"unknown normalization {name!r}; set data.normalization to one of: {', '.join(sorted(NORMALIZATION))}"
        )
    mean, std = NORMALIZATION[name]
    if len(mean) != channels:
        fitting = sorted(key for key, (other_mean, _) in NORMALIZATION.items() if len(other_mean) == channels)
        raise UserError(
            f"normalization {name!r} has {len(mean)} channel(s) but the images have {channels}; "
            f"set data.normalization to one of: {', '.join(fitting)}"
        )
    return mean, std


def image_transforms(
    *,
    image_size: int,
    crop_padding: int,
    augment: bool,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    native_size: int | None = None,
) -> tuple[Callable, Callable]:
    """(training, evaluation) transforms from PIL images to normalised float tensors.

    ``native_size`` is the side of the data set's own images when all share one
    (CIFAR, SVHN: 32); None when they vary (image folders).
    """
    finish = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    if image_size <= SMALL_IMAGE_MAX_SIZE:
        resize = [] if native_size == image_size else [transforms.Resize((image_size, image_size))]
        evaluation = resize
        crop = [transforms.RandomCrop(image_size, padding=crop_padding)] if crop_padding > 0 else []
        training = resize + crop + [transforms.RandomHorizontalFlip()]
    else:
        evaluation = [
            transforms.Resize(round(image_size * _EVALUATION_RESIZE_RATIO)),
            transforms.CenterCrop(image_size),
        ]
        training = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
    evaluation_transform = transforms.Compose(evaluation + finish)
    training_transform = transforms.Compose(training + finish) if augment else evaluation_transform
    return training_transform, evaluation_transform


@dataclass(frozen=True)
class ImagePipelines:
    """The resolved transforms of an image data set and the shape they produce."""

    training: Callable
    evaluation: Callable
    input_shape: tuple[int, int, int]


def dataset_image_pipelines(name: str, options: DataOptions, *, native_size: int | None = None) -> ImagePipelines:
    """Transforms of the RGB image data set ``name``, options left None taken from its preset."""
    preset = PRESETS[name]
    crop_padding = options.crop_padding
    size = preset.image_size if options.image_size is None else options.image_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise UserError(f"image_size must be a positive whole number of pixels, got {size!r}; set data.image_size")
    if crop_padding is not None:
        if isinstance(crop_padding, bool) or not isinstance(crop_padding, int) or crop_padding < 0:
            raise UserError(f"crop_padding must be a whole number >= 0, got {crop_padding!r}; set data.crop_padding")
        if size > SMALL_IMAGE_MAX_SIZE:
            raise UserError(
                f"crop_padding applies to images of at most {SMALL_IMAGE_MAX_SIZE} pixels, but image_size is "
                f"{size} (RandomResizedCrop pipeline); leave data.crop_padding unset"
            )
    mean, std = normalization_constants(
        preset.normalization if options.normalization is None else options.normalization, 3
    )
    training, evaluation = image_transforms(
        image_size=size,
        crop_padding=preset.crop_padding if crop_padding is None else crop_padding,
        augment=options.augment,
        mean=mean,
        std=std,
        native_size=native_size,
    )
    return ImagePipelines(training=training, evaluation=evaluation, input_shape=(3, size, size))
