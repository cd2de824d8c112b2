"""Data set registry: ``build_datasets(name, root, ...)`` returns train, validation and test splits.

Data sets (defaults in presets.PRESETS; pipelines in transforms.py):

- digits, diabetes: bundled with scikit-learn (embedded.py)
- cifar10, cifar100, svhn: torchvision's readers of the official files (torchvision_sets.py)
- imagenet, image_folder: class folders read with torchvision's ImageFolder (image_folder.py)

``build_pipelines`` (pipelines.py) turns the splits into the batches a run trains and evaluates
on: from a copy of the data on the training device, or through a DataLoader; sampling.py draws
each epoch's order and augmentation.

Validation is always drawn from the training split with ``split_seed`` and is
never augmented; test is the official test split (or a fixed held-out part for
the scikit-learn sets) and is never augmented either.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Callable

from source.data.embedded import build_diabetes, build_digits
from source.data.image_folder import build_image_folder, build_imagenet
from source.data.options import DataOptions
from source.data.pipelines import PIPELINE_CHOICES, DataPipelines, build_pipelines
from source.data.sampling import batches_per_epoch
from source.data.splits import DataSplits
from source.data.torchvision_sets import build_cifar10, build_cifar100, build_svhn
from source.errors import UserError

__all__ = [
    "PIPELINE_CHOICES",
    "DataPipelines",
    "DataSplits",
    "available_datasets",
    "batches_per_epoch",
    "build_datasets",
    "build_pipelines",
]

_BUILDERS: dict[str, Callable[[Path, DataOptions], DataSplits]] = {
    "digits": build_digits,
    "diabetes": build_diabetes,
    "cifar10": build_cifar10,
    "cifar100": build_cifar100,
    "svhn": build_svhn,
    "imagenet": build_imagenet,
    "image_folder": build_image_folder,
}


def available_datasets() -> list[str]:
    """Names ``build_datasets`` accepts, sorted."""
    return sorted(_BUILDERS)


def build_datasets(
    name: str,
    root: str | Path,
    *,
    download: bool = False,
    train_size: int | None = None,
    split_seed: int = 0,
    augment: bool = True,
    crop_padding: int | None = None,
    image_size: int | None = None,
    normalization: str | None = None,
) -> DataSplits:
    """Train, validation and test splits of the data set ``name`` stored under ``root``.

    Items are (float32 input tensor, target): an int64 class index, or for
    regression a float32 tensor of shape (1,).

    Args:
        name: one of ``available_datasets()``.
        root: folder holding the data set's files (layouts in the data set modules).
        The other keywords become the fields of DataOptions (options.py), whose
        docstring says what each means; left None they take the data set's preset.

    Raises:
        UserError: unknown name, missing files, or options that do not fit.
    """
    if name not in _BUILDERS:
        close = difflib.get_close_matches(str(name), _BUILDERS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UserError(f"unknown data set {name!r}; {hint}valid names: {', '.join(available_datasets())}")
    options = DataOptions(
        download=download,
        train_size=train_size,
        split_seed=split_seed,
        augment=augment,
        crop_padding=crop_padding,
        image_size=image_size,
        normalization=normalization,
    )
    return _BUILDERS[name](Path(root).expanduser(), options)
