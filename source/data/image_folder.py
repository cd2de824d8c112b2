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

Every file is opened and decoded before training when the folders hold at most
``VERIFIED_FILES`` files (and by the device pipeline, which reads them all); in
larger folders a file that cannot be read stops the run when it is reached, and
the last checkpoint is kept. Either way the message is one line naming the file.

The shared CIFAR-10 JPEG archive trains like CIFAR-10 with
``image_folder, image_size=32, normalization="cifar10"``: 32 pixels selects the
small-image pipeline (random crop with padding 4, horizontal flip), see transforms.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from torchvision.datasets import ImageFolder
from tqdm import tqdm

from source.data.options import DataOptions
from source.data.splits import DataSplits, ImageFileStore, class_index, image_classification_splits
from source.data.transforms import dataset_image_pipelines
from source.errors import DataFileError, UserError

__all__ = ["VERIFIED_FILES", "UnreadableImage", "build_imagenet", "build_image_folder", "read_image"]

_TRAINING_FOLDER = "train"

VERIFIED_FILES = 20_000
"""Folders with at most this many image files are read completely before training (seconds for
small images); larger ones, such as ImageNet's 1.3 million, report a bad file when they reach it."""


class UnreadableImage(DataFileError):
    """An image file that cannot be opened or decoded.

    A DataLoader worker's exception reaches the main process rebuilt from one text, the worker's
    whole traceback; only its last line, this exception's own message, is kept, so the message
    stays one line wherever the file was read.
    """

    def __init__(self, message):
        last_line = message.rstrip().splitlines()[-1] if message.strip() else message
        super().__init__(last_line.partition(f"{type(self).__name__}: ")[2] or last_line)


def read_image(path: str) -> Image.Image:
    """The RGB image in the file ``path``; ``UnreadableImage`` naming the file when it cannot be read."""
    try:
        with open(path, "rb") as file, Image.open(file) as image:
            return image.convert("RGB")
    # Damaged, foreign or oversized files fail in many ways (OSError, SyntaxError, ValueError,
    # PIL's DecompressionBombError); each is the file's, to be replaced or removed.
    except Exception as error:  # noqa: BLE001
        raise UnreadableImage(f"cannot read the image file {path}: {_reason(error)}; replace it or remove it") from None


def _reason(error: Exception) -> str:
    """Why PIL could not read an image file, in a few words."""
    if isinstance(error, UnidentifiedImageError):
        return "it is empty or not an image in a format PIL reads"
    if isinstance(error, Image.DecompressionBombError):
        # PIL's text goes on about "decompression bomb DOS attacks"; the sizes are what matter.
        return str(error).partition(", could be")[0].lower()
    return " ".join(str(error).split())[:100] or type(error).__name__


def _verify(folders: list[ImageFolder]) -> None:
    """Open and decode every file of ``folders`` now, so that a bad one stops the run before it starts."""
    paths = [path for folder in folders for path, _ in folder.samples]
    for path in tqdm(paths, unit="image", desc="checking images", disable=not sys.stderr.isatty()):
        read_image(path)


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
        training_base = ImageFolder(training_folder, loader=read_image, target_transform=class_index)
        test_base = ImageFolder(evaluation_folder, loader=read_image, target_transform=class_index)
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
    if len(training_base) + len(test_base) <= VERIFIED_FILES:
        _verify([training_base, test_base])
    num_classes = len(training_base.classes)
    if pipelines.is_small:
        training_base = ImageFileStore(training_base, pipelines.image_size)
        test_base = ImageFileStore(test_base, pipelines.image_size)
    return image_classification_splits(
        name, training_base, test_base, pipelines=pipelines, num_classes=num_classes, options=options
    )
