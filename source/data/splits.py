"""Train/validation/test splits: the result type, split views and the index arithmetic."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from source.data.options import DataOptions
from source.data.presets import PRESETS
from source.data.transforms import ImagePipelines
from source.errors import UserError

__all__ = [
    "DataSplits",
    "TransformedSubset",
    "class_index",
    "image_classification_splits",
    "resolve_train_size",
    "split_training_indices",
    "random_holdout",
    "stratified_holdout",
]


@dataclass(frozen=True)
class DataSplits:
    """The three splits of one data set and what a model needs to know about them.

    ``validation`` is carved out of the data set's training split and is never
    augmented; ``test`` is the data set's official test split (ImageNet: val).
    For regression, targets are standardised and ``target_scale`` is the training
    targets' standard deviation, so RMSE * target_scale is in the data set's units.
    """

    name: str
    train: Dataset
    validation: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    task: str
    target_scale: float


class TransformedSubset(Dataset):
    """The items of ``base`` at ``indices``, inputs passed through ``transform``.

    Training and validation are two of these over the same base data set: the
    images are read into memory (or listed on disk) once, while each split keeps
    its own transform, so validation never sees training augmentation.
    """

    def __init__(self, base: Dataset, indices: torch.Tensor, transform: Callable[[Any], Any] | None = None):
        self.base = base
        self.indices = indices
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[Any, Any]:
        item, target = self.base[int(self.indices[position])]
        if self.transform is not None:
            item = self.transform(item)
        return item, target


def class_index(label: int) -> torch.Tensor:
    """A class label as the int64 tensor every classification split yields."""
    return torch.tensor(label, dtype=torch.int64)


def resolve_train_size(name: str, available: int, train_size: int | None, preset: int | float) -> int:
    """The number of training examples; the remaining ``available - size`` become validation.

    ``preset`` is used when ``train_size`` is None: an int is a count, a float a
    fraction of the data set's training split.
    """
    if train_size is None:
        size = preset if isinstance(preset, int) else max(1, int(preset * available))
    else:
        size = train_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise UserError(f"train_size must be a positive whole number, got {size!r}; set data.train_size")
    if size >= available:
        source = "" if train_size is not None else f" (the {name} preset)"
        raise UserError(
            f"train_size {size}{source} leaves no validation examples: {name} has {available} training "
            f"examples here; set data.train_size below {available}"
        )
    return size


def split_training_indices(available: int, train_size: int, split_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint, sorted (train, validation) indices into a training split of ``available`` items.

    The first ``train_size`` entries of a seeded random permutation are training,
    the rest validation; this is the membership ``torch.utils.data.random_split``
    gives with the same seed (the paper's code used seed 42).
    """
    generator = torch.Generator().manual_seed(split_seed)
    permutation = torch.randperm(available, generator=generator)
    return permutation[:train_size].sort().values, permutation[train_size:].sort().values


def random_holdout(count: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random ``fraction`` of ``count`` items (rounded)."""
    permutation = np.random.default_rng(seed).permutation(count)
    return np.sort(permutation[: round(fraction * count)])


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random ``fraction`` of each class (rounded per class)."""
    generator = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        chosen.append(generator.permutation(members)[: round(fraction * len(members))])
    return np.sort(np.concatenate(chosen))


def image_classification_splits(
    name: str,
    training_base: Dataset,
    test: Dataset,
    *,
    pipelines: ImagePipelines,
    num_classes: int,
    options: DataOptions,
) -> DataSplits:
    """DataSplits with training and validation as two views over ``training_base``.

    ``training_base`` yields untransformed images; training sees them through the
    training pipeline, validation through the evaluation pipeline. ``test`` comes
    with its evaluation transform already set. ``options`` gives train_size and split_seed.
    """
    size = resolve_train_size(name, len(training_base), options.train_size, PRESETS[name].train_size)
    train_indices, validation_indices = split_training_indices(len(training_base), size, options.split_seed)
    return DataSplits(
        name=name,
        train=TransformedSubset(training_base, train_indices, pipelines.training),
        validation=TransformedSubset(training_base, validation_indices, pipelines.evaluation),
        test=test,
        num_classes=num_classes,
        input_shape=pipelines.input_shape,
        task="classification",
        target_scale=1.0,
    )
