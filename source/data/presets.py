"""Per-data-set defaults for every ``build_datasets`` option left as None."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DatasetPreset", "PRESETS", "TEST_FRACTION", "TEST_SPLIT_SEED"]


@dataclass(frozen=True)
class DatasetPreset:
    """Defaults of one data set.

    ``train_size``: an int is a number of training examples, a float a fraction
    of the data set's training split; the rest is validation. The image fields
    are None for data that are not images.
    """

    train_size: int | float
    image_size: int | None = None
    crop_padding: int | None = None
    normalization: str | None = None


# The paper's splits: CIFAR 40,000 / 10,000, SVHN 65,000 / 8,257, ImageNet
# 1,080,000 / 201,167 (train / validation). Its augmentation: crop padding 4 for
# CIFAR-10 and SVHN, 8 for CIFAR-100; ImageNet at 224 pixels. imagenet and
# image_folder keep a crop padding of 4 for when image_size makes them small images.
PRESETS: dict[str, DatasetPreset] = {
    "digits": DatasetPreset(train_size=0.8, normalization="digits"),
    "diabetes": DatasetPreset(train_size=0.8),
    "cifar10": DatasetPreset(train_size=40_000, image_size=32, crop_padding=4, normalization="cifar10"),
    "cifar100": DatasetPreset(train_size=40_000, image_size=32, crop_padding=8, normalization="cifar100"),
    "svhn": DatasetPreset(train_size=65_000, image_size=32, crop_padding=4, normalization="svhn"),
    "imagenet": DatasetPreset(train_size=1_080_000, image_size=224, crop_padding=4, normalization="imagenet"),
    "image_folder": DatasetPreset(train_size=0.9, image_size=224, crop_padding=4, normalization="imagenet"),
}

# digits and diabetes ship without a test split: a fixed 20 % (per class for
# digits) is held out with a fixed seed, independent of split_seed, so every
# run is scored on the same test examples.
TEST_FRACTION = 0.2
TEST_SPLIT_SEED = 0
