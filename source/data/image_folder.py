"""ImageNet and any other image-per-file data set in class folders (torchvision ImageFolder).

Layout under ``root``:

- imagenet:     root/train/<class>/*.JPEG and root/val/<class>/*.JPEG (ILSVRC2012's
                validation images sorted into class folders; they are the test split)
- image_folder: root/train/<class>/* and root/val/<class>/*, or root/test/<class>/*
                when there is no val/ (val/ wins when both exist)

Class indices follow the sorted class-folder names; the evaluation folder must
hold the same classes as train/. Images are read from disk per item, so training
and validation share one file list; small images (``image_size`` at most 64) are
resized to their stored form as they are read, and the device pipeline reads them
all once. Nothing is downloaded: ``options.download`` is ignored.

The shared CIFAR-10 JPEG archive trains like CIFAR-10 with
``image_folder, image_size=32, normalization="cifar10"``: 32 pixels selects the
small-image pipeline (random crop with padding 4, horizontal flip), see transforms.py.
"""

from __future__ import annotations

from pathlib import Path

from torchvision.datasets import ImageFolder

from source.data.options import DataOptions
from source.data.splits import DataSplits, ImageFileStore, class_index, image_classification_splits
from source.data.transforms import dataset_image_pipelines
from source.errors import UserError

__all__ = ["build_imagenet", "build_image_folder"]

_TRAINING_FOLDER = "train"


def build_imagenet(root: Path, options: DataOptions) -> DataSplits:
    """ImageNet (ILSVRC2012) from root/train and root/val."""
    return _build_from_folders(
        "imagenet",
        root,
        options,
        evaluation_folders=("val",),
        layout=f"{root}/train/<class>/*.JPEG and {root}/val/<class>/*.JPEG (ImageNet cannot be downloaded "
        f"automatically: sort the validation images into class folders)",
    )


def build_image_folder(root: Path, options: DataOptions) -> DataSplits:
    """Images in root/train/<class>/ and root/val/<class>/ (or root/test/<class>/)."""
    return _build_from_folders(
        "image_folder",
        root,
        options,
        evaluation_folders=("val", "test"),
        layout=f"{root}/train/<class>/<image files> and {root}/val/<class>/<image files> (or test/ instead of val/)",
    )


def _build_from_folders(
    name: str, root: Path, options: DataOptions, *, evaluation_folders: tuple[str, ...], layout: str
) -> DataSplits:
    """Splits from root/train and the first of ``evaluation_folders`` that exists."""
    pipelines = dataset_image_pipelines(name, options)
    training_folder = root / _TRAINING_FOLDER
    evaluation_folder = next((root / folder for folder in evaluation_folders if (root / folder).is_dir()), None)
    if not training_folder.is_dir() or evaluation_folder is None:
        absent = training_folder if not training_folder.is_dir() else root / evaluation_folders[0]
        raise UserError(f"{name} data not found: no folder {absent}; expected {layout}")
    try:
        training_base = ImageFolder(training_folder, target_transform=class_index)
        test_base = ImageFolder(evaluation_folder, target_transform=class_index)
    except FileNotFoundError as error:
        raise UserError(f"{name} data incomplete ({' '.join(str(error).split())}); expected {layout}") from error
    if training_base.classes != test_base.classes:
        only_training = sorted(set(training_base.classes) - set(test_base.classes))
        only_evaluation = sorted(set(test_base.classes) - set(training_base.classes))
        raise UserError(
            f"{name}: {training_folder} and {evaluation_folder} must hold the same class folders "
            f"(only in {_TRAINING_FOLDER}/: {', '.join(only_training[:5]) or 'none'}; "
            f"only in {evaluation_folder.name}/: {', '.join(only_evaluation[:5]) or 'none'})"
        )
    num_classes = len(training_base.classes)
    if pipelines.is_small:
        training_base = ImageFileStore(training_base, pipelines.image_size)
        test_base = ImageFileStore(test_base, pipelines.image_size)
    return image_classification_splits(
        name, training_base, test_base, pipelines=pipelines, num_classes=num_classes, options=options
    )
