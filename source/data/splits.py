"""Train/validation/test splits: the result type, the two kinds of split and the index arithmetic.

A split is a ``StoredSplit`` when its samples have one stored tensor each (uint8 small images,
float features): it serves any batch of positions with its augmentation applied to the whole
batch, on the CPU or, copied there once, on the training device. The large images of the
ImageNet-style pipeline are a ``TransformedSubset``: read and transformed one by one, in loader
workers. Both serve ``training_sample(key)`` for a sample of an epoch plan (sampling.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from source.data.options import DataOptions
from source.data.presets import PRESETS
from source.data.transforms import CropAndFlip, ImagePipelines, Normalisation, stored_image
from source.errors import UserError

__all__ = [
    "DataSplits",
    "ImageFileStore",
    "SampleKey",
    "StoredSplit",
    "TensorStore",
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


SampleKey = tuple[int, int, int, int, bool]
"""A training sample of an epoch plan: (split position, sample seed, crop row, crop column, flip)."""


class SampleStore(Protocol):
    """A data set's samples in their stored form, one tensor each, and their targets."""

    bytes_per_sample: int

    def __len__(self) -> int: ...

    def gather(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored inputs (B, ...) and targets (B, ...) of the samples at ``indices``."""


class TensorStore:
    """Samples held in memory as one tensor of inputs and one of targets, on any device."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor):
        self.inputs = inputs
        self.targets = targets
        self.bytes_per_sample = inputs[:1].numel() * inputs.element_size() + targets[:1].numel() * targets.element_size()

    def __len__(self) -> int:
        return len(self.inputs)

    def gather(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # index_select copies whole rows; on the CPU it is ten times faster than indexing with [].
        return self.inputs.index_select(0, indices), self.targets.index_select(0, indices)

    def to(self, device: torch.device) -> "TensorStore":
        """The store with both tensors on ``device``."""
        return TensorStore(self.inputs.to(device), self.targets.to(device))


class ImageFileStore:
    """Class-folder image files (torchvision ImageFolder), read and resized to ``size`` when gathered."""

    def __init__(self, folder: ImageFolder, size: int):
        self.folder = folder
        self.size = size
        self.bytes_per_sample = 3 * size * size + 8

    def __len__(self) -> int:
        return len(self.folder)

    def gather(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        items = [self.folder[int(index)] for index in indices]
        return torch.stack([stored_image(image, self.size) for image, _ in items]), torch.stack(
            [target for _, target in items]
        )


class StoredSplit(Dataset):
    """The samples of ``store`` at ``indices``, as the model sees them.

    Stored inputs pass through ``normalisation`` (uint8 images; None for features stored ready).
    Indexing gives a sample without augmentation; ``batch`` and ``training_sample`` apply
    ``augmentation`` with an epoch plan's crop offsets and flips. A sample computed alone is a
    batch of one, so it is bitwise the same as in any batch.
    """

    def __init__(
        self,
        store: SampleStore,
        indices: torch.Tensor,
        normalisation: Normalisation | None = None,
        augmentation: CropAndFlip | None = None,
    ):
        self.store = store
        self.indices = indices
        self.normalisation = normalisation
        self.augmentation = augmentation

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = self.batch(torch.tensor([position]))
        return inputs[0], targets[0]

    def training_sample(self, key: SampleKey) -> tuple[torch.Tensor, torch.Tensor]:
        """The sample of an epoch plan's ``key``, augmented."""
        position, _, row, column, flip = key
        inputs, targets = self.batch(torch.tensor([position]), torch.tensor([[row, column]]), torch.tensor([flip]))
        return inputs[0], targets[0]

    def batch(
        self, positions: torch.Tensor, offsets: torch.Tensor | None = None, flips: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets at ``positions``, augmented when ``offsets`` and ``flips`` are given."""
        inputs, targets = self.store.gather(self.indices[positions])
        if self.augmentation is not None and offsets is not None:
            inputs = self.augmentation(inputs, offsets, flips)
        if self.normalisation is not None:
            inputs = self.normalisation(inputs)
        return inputs, targets

    def on(self, store: TensorStore) -> "StoredSplit":
        """This split over ``store``: the same samples held somewhere else (e.g. on the GPU)."""
        return StoredSplit(store, self.indices.to(store.inputs.device), self.normalisation, self.augmentation)


class TransformedSubset(Dataset):
    """The items of ``base`` at ``indices``, inputs passed through ``transform``.

    Large-image training and validation are two of these over the same file list, each with its
    own transform, so validation never sees training augmentation. ``training_sample`` runs the
    random transform with torch's and Python's generators seeded by the sample's seed and restores
    the caller's generator states afterwards, so loading in the main process leaves the training
    randomness (dropout, ...) alone.
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

    def training_sample(self, key: SampleKey) -> tuple[Any, Any]:
        """The sample of an epoch plan's ``key``, transformed with generators seeded by its seed."""
        position, sample_seed = key[:2]
        torch_state, python_state = torch.get_rng_state(), random.getstate()
        try:
            torch.default_generator.manual_seed(sample_seed)
            random.seed(sample_seed)
            return self[position]
        finally:
            torch.set_rng_state(torch_state)
            random.setstate(python_state)


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
    if available < 2:
        raise UserError(
            f"{name} has {available} training example{'s' if available != 1 else ''} here, too few to split into "
            "training and validation; check that its files hold the data set (see data.root)"
        )
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
    test_base: Dataset,
    *,
    pipelines: ImagePipelines,
    num_classes: int,
    options: DataOptions,
) -> DataSplits:
    """DataSplits with training and validation as two views over ``training_base``.

    Small images: both bases are ``SampleStore``s of stored uint8 images, and every split is a
    ``StoredSplit`` (training augmented). Large images: both are data sets of PIL images, and every
    split is a ``TransformedSubset`` with the pipeline's transform. ``options`` gives train_size and
    split_seed.
    """
    size = resolve_train_size(name, len(training_base), options.train_size, PRESETS[name].train_size)
    train_indices, validation_indices = split_training_indices(len(training_base), size, options.split_seed)
    test_indices = torch.arange(len(test_base))
    if pipelines.is_small:
        normalisation = pipelines.normalisation
        train = StoredSplit(training_base, train_indices, normalisation, pipelines.augmentation)
        validation = StoredSplit(training_base, validation_indices, normalisation)
        test = StoredSplit(test_base, test_indices, normalisation)
    else:
        train = TransformedSubset(training_base, train_indices, pipelines.training)
        validation = TransformedSubset(training_base, validation_indices, pipelines.evaluation)
        test = TransformedSubset(test_base, test_indices, pipelines.evaluation)
    return DataSplits(
        name=name,
        train=train,
        validation=validation,
        test=test,
        num_classes=num_classes,
        input_shape=pipelines.input_shape,
        task="classification",
        target_scale=1.0,
    )
