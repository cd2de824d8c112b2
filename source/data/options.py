"""The options every data set builder receives from ``build_datasets``."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DataOptions"]


@dataclass(frozen=True)
class DataOptions:
    """How to build a data set's splits; a field left None takes the data set's preset (presets.PRESETS).

    - download: let torchvision download CIFAR or SVHN files that are missing.
    - train_size: training examples; the rest of the training split is validation
      (the presets hold the paper's splits).
    - split_seed: seed of the random train/validation partition.
    - augment: random crops and flips on the training split (images only).
    - crop_padding: padding of the random crop of small images (transforms.py).
    - image_size: side of the square model input; it selects the CIFAR-style or
      the ImageNet-style pipeline (transforms.py).
    - normalization: name of the data set whose mean/std to normalise with
      (transforms.NORMALIZATION).

    The defaults live in ``build_datasets``' signature, so this class has none.
    """

    download: bool
    train_size: int | None
    split_seed: int
    augment: bool
    crop_padding: int | None
    image_size: int | None
    normalization: str | None
