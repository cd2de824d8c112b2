"""Normalisation constants and the training/evaluation image pipelines.

Pipeline rule, the same for every image data set: images of side ``image_size``
at most ``SMALL_IMAGE_MAX_SIZE`` (64) get the CIFAR-style pipeline, larger ones the
ImageNet-style pipeline.

- small: stored as uint8 images of side ``image_size`` (resized once when the data
  set's images have another side); training crops at random with zero padding
  ``crop_padding`` and flips horizontally (``CropAndFlip``, its random numbers drawn
  per epoch in sampling.py), evaluation takes the stored image. Both end in
  ``Normalisation``: pixels scaled to [0, 1], then the data set's mean and std. Every
  step works on whole batches on any device, and on one sample as a batch of one.
- large, training:   RandomResizedCrop(size) -> horizontal flip, on PIL images
- large, evaluation: Resize(size * 256 / 224) -> CenterCrop(size), on PIL images
  Both end in ToTensor and Normalize, which compute what ``Normalisation`` does.

With ``augment=False`` training uses the evaluation pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms
from torchvision.transforms.functional import pil_to_tensor

from source.data.options import DataOptions
from source.data.presets import PRESETS
from source.errors import UserError

__all__ = [
    "NORMALIZATION",
    "SMALL_IMAGE_MAX_SIZE",
    "CropAndFlip",
    "ImagePipelines",
    "Normalisation",
    "dataset_image_pipelines",
    "normalization_constants",
    "stored_image",
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


@dataclass(frozen=True)
class Normalisation:
    """uint8 images (..., C, H, W) to float32: scaled to [0, 1], then (x - mean) / std per channel.

    The operations and their order are ToTensor's and Normalize's, so the result is bitwise theirs.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    _constants: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        mean, std = self._on(images.device)
        return images.to(torch.float32).div_(255).sub_(mean).div_(std)

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # Built once per device: a fresh host-to-device copy per batch would wait for the host.
        if device not in self._constants:
            self._constants[device] = tuple(
                torch.tensor(values, dtype=torch.float32).view(-1, 1, 1).to(device) for values in (self.mean, self.std)
            )
        return self._constants[device]


@dataclass(frozen=True)
class CropAndFlip:
    """Random crops of zero-padded images and horizontal flips, with their random numbers given.

    ``offsets`` (B, 2) are each crop's top-left (row, column) in the image padded by ``padding``
    on every side, in [0, 2 padding]; ``flips`` (B,) mirror the crop. One gather does both, on
    whatever device the images are; it is RandomCrop(size, padding) and RandomHorizontalFlip with
    the parameters drawn beforehand.
    """

    padding: int

    def __call__(self, images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        count, channels, height, width = images.shape
        padding = self.padding
        padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
        device = images.device
        rows = offsets[:, :1] + torch.arange(height, device=device)
        columns = offsets[:, 1:] + torch.arange(width, device=device)
        columns = torch.where(flips[:, None], columns.flip(1), columns)
        # Flat pixel positions in each padded image, the same for every channel: one gather along
        # the pixels is ten times faster on the CPU than indexing rows and columns separately.
        pixels = rows[:, :, None] * padded.shape[-1] + columns[:, None, :]
        pixels = pixels.view(count, 1, height * width).expand(count, channels, height * width)
        crops = torch.gather(padded.reshape(count, channels, -1), 2, pixels)
        return crops.view(count, channels, height, width)


def stored_image(image: Image.Image, size: int) -> torch.Tensor:
    """A PIL image as the small-image pipeline stores it: RGB uint8 (3, size, size), resized when needed."""
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return pil_to_tensor(image)


@dataclass(frozen=True)
class ImagePipelines:
    """The resolved pipelines of an image data set and the shape they produce.

    Small images (``is_small``): stored as uint8 of side ``image_size``, augmented for training by
    ``augmentation`` (None: no augmentation), finished by ``normalisation``. Large images:
    ``training`` and ``evaluation`` are torchvision transforms from PIL images to tensors.
    """

    input_shape: tuple[int, int, int]
    normalisation: Normalisation
    augmentation: CropAndFlip | None = None
    training: Callable | None = None
    evaluation: Callable | None = None

    @property
    def is_small(self) -> bool:
        """Whether this is the stored-image (CIFAR-style) pipeline."""
        return self.training is None

    @property
    def image_size(self) -> int:
        """The side of the model's input images."""
        return self.input_shape[-1]


def _large_image_transforms(size: int, augment: bool, mean, std) -> tuple[Callable, Callable]:
    """(training, evaluation) torchvision transforms of the ImageNet-style pipeline."""
    finish = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    evaluation = transforms.Compose(
        [transforms.Resize(round(size * _EVALUATION_RESIZE_RATIO)), transforms.CenterCrop(size), *finish]
    )
    if not augment:
        return evaluation, evaluation
    training = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(), *finish])
    return training, evaluation


def dataset_image_pipelines(name: str, options: DataOptions) -> ImagePipelines:
    """Pipelines of the RGB image data set ``name``, options left None taken from its preset."""
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
    input_shape = (3, size, size)
    if size <= SMALL_IMAGE_MAX_SIZE:
        padding = preset.crop_padding if crop_padding is None else crop_padding
        return ImagePipelines(
            input_shape=input_shape,
            normalisation=Normalisation(mean, std),
            augmentation=CropAndFlip(padding) if options.augment else None,
        )
    training, evaluation = _large_image_transforms(size, options.augment, mean, std)
    return ImagePipelines(
        input_shape=input_shape, normalisation=Normalisation(mean, std), training=training, evaluation=evaluation
    )
