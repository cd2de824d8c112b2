"""The two small data sets bundled with scikit-learn: digits and diabetes (no download).

digits: 1,797 images of 8x8 pixels (values 0..16), 10 classes; items are 1x8x8
tensors scaled to [0, 1] and normalised. No augmentation: shifting or flipping an
8-pixel digit changes what it shows, so ``augment`` has no effect here.

diabetes: 442 patients, 10 features, one regression target (disease progression
after a year). Features and target are standardised with the mean and std of the
training split only; ``target_scale`` is the target's std, so RMSE * target_scale
is in the data set's own units.

Both have a fixed test split (presets.TEST_FRACTION with presets.TEST_SPLIT_SEED,
stratified by class for digits); ``split_seed`` only draws validation from the rest.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_diabetes, load_digits

from source.data.options import DataOptions
from source.data.presets import PRESETS, TEST_FRACTION, TEST_SPLIT_SEED
from source.data.splits import (
    DataSplits,
    StoredSplit,
    TensorStore,
    random_holdout,
    resolve_train_size,
    split_training_indices,
    stratified_holdout,
)
from source.data.transforms import normalization_constants
from source.errors import UserError

__all__ = ["build_digits", "build_diabetes"]

_DIGITS_MAX_PIXEL = 16.0


def build_digits(root: Path, options: DataOptions) -> DataSplits:
    """scikit-learn's digits as 1x8x8 normalised float tensors with int64 class labels (``root`` is not read)."""
    _reject_options("digits", "its images are 8x8 and not augmented", options, "crop_padding", "image_size")
    bundle = load_digits()
    (mean,), (std,) = normalization_constants(options.normalization or PRESETS["digits"].normalization, 1)
    images = torch.as_tensor(bundle.images / _DIGITS_MAX_PIXEL, dtype=torch.float32).unsqueeze(1)
    inputs = (images - mean) / std
    labels = torch.as_tensor(bundle.target, dtype=torch.int64)
    test_indices = stratified_holdout(bundle.target, TEST_FRACTION, TEST_SPLIT_SEED)
    train_indices, validation_indices = _training_and_validation("digits", len(labels), test_indices, options)
    base = TensorStore(inputs, labels)
    return DataSplits(
        name="digits",
        train=StoredSplit(base, train_indices),
        validation=StoredSplit(base, validation_indices),
        test=StoredSplit(base, torch.as_tensor(test_indices)),
        num_classes=10,
        input_shape=(1, 8, 8),
        task="classification",
        target_scale=1.0,
    )


def build_diabetes(root: Path, options: DataOptions) -> DataSplits:
    """scikit-learn's diabetes regression: 10 standardised features -> 1 standardised target (``root`` is not read)."""
    _reject_options(
        "diabetes", "it has feature vectors, not images", options, "crop_padding", "image_size", "normalization"
    )
    # Unscaled features: scikit-learn's scaled variant uses statistics of all
    # 442 patients, test split included.
    features, targets = load_diabetes(return_X_y=True, scaled=False)
    test_indices = random_holdout(len(targets), TEST_FRACTION, TEST_SPLIT_SEED)
    train_indices, validation_indices = _training_and_validation("diabetes", len(targets), test_indices, options)
    training_features, training_targets = features[train_indices.numpy()], targets[train_indices.numpy()]
    target_std = float(training_targets.std())
    standardised_features = (features - training_features.mean(axis=0)) / training_features.std(axis=0)
    inputs = torch.as_tensor(standardised_features, dtype=torch.float32)
    outputs = torch.as_tensor((targets - training_targets.mean()) / target_std, dtype=torch.float32).unsqueeze(1)
    base = TensorStore(inputs, outputs)
    return DataSplits(
        name="diabetes",
        train=StoredSplit(base, train_indices),
        validation=StoredSplit(base, validation_indices),
        test=StoredSplit(base, torch.as_tensor(test_indices)),
        num_classes=1,
        input_shape=(features.shape[1],),
        task="regression",
        target_scale=target_std,
    )


def _training_and_validation(
    name: str, count: int, test_indices: np.ndarray, options: DataOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (into all ``count`` items) of training and validation, drawn from outside the test split."""
    remaining = torch.as_tensor(np.setdiff1d(np.arange(count), test_indices))
    size = resolve_train_size(name, len(remaining), options.train_size, PRESETS[name].train_size)
    train_positions, validation_positions = split_training_indices(len(remaining), size, options.split_seed)
    return remaining[train_positions], remaining[validation_positions]


def _reject_options(name: str, reason: str, options: DataOptions, *fields: str) -> None:
    """UserError for the first of the image option ``fields`` set on a data set they do not apply to."""
    for field in fields:
        if getattr(options, field) is not None:
            raise UserError(f"{name} takes no {field} ({reason}); leave data.{field} unset")
