"""CIFAR-10, CIFAR-100 and SVHN through torchvision's readers of their official files.

On-disk layout under ``root`` (what torchvision downloads and unpacks there):

- cifar10:  root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
- cifar100: root/cifar-100-python/{train, test, meta}
- svhn:     root/svhn/{train_32x32.mat, test_32x32.mat}  (files directly in root are
            accepted too, as torchvision's SVHN reader lays them out)

The test split is each data set's official test file; for SVHN that is
test_32x32.mat. Training and validation are two views of one in-memory uint8 copy
of the training file(s), resized once when ``image_size`` is not 32.
"""

from __future__ import annotations

import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, NoReturn

import numpy as np
import torch
from PIL import Image
from scipy.io.matlab import MatReadError
from torchvision.datasets import CIFAR10, CIFAR100, SVHN, VisionDataset

from source.data.options import DataOptions
from source.data.safe_pickle import RefusedPickle, load_data_pickle
from source.data.splits import DataSplits, TensorStore, image_classification_splits
from source.data.transforms import dataset_image_pipelines, stored_image
from source.errors import UserError

__all__ = ["build_cifar10", "build_cifar100", "build_svhn"]

_NATIVE_SIZE = 32
_ROW_BYTES = 3 * _NATIVE_SIZE * _NATIVE_SIZE
_SVHN_FOLDER = "svhn"
_SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
_SVHN_SOURCE = "http://ufldl.stanford.edu/housenumbers/"
_CIFAR_SOURCE = "https://www.cs.toronto.edu/~kriz/cifar.html"
# What a truncated or foreign file raises while it is read, and what torchvision
# raises when a download fails its checksum (RuntimeError).
_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, IndexError, pickle.UnpicklingError, MatReadError, RuntimeError)


# torchvision compares each file's MD5 with the one official release every time a
# data set is constructed, and unpickles the files with ``pickle.load``, which runs
# whatever code a crafted file names. These readers check only that the files exist
# (torchvision still verifies the archive's MD5 when it downloads), so any faithful
# copy in the same format loads, including the small files the tests write, and it
# skips hashing 180 MB at every start. In exchange they read every file through
# ``load_data_pickle``, which admits only pickled numpy arrays and plain values, and
# check that its content has the format's keys, types and shapes.
class _SafeCIFARFiles:
    """Loads torchvision's CIFAR files safely; mixed in before CIFAR10 or CIFAR100.

    Sets what torchvision's own constructor sets (``data`` as (N, 32, 32, 3) uint8,
    ``targets``, ``classes``, ``class_to_idx``), so its ``__getitem__`` serves the images.
    """

    title: str
    num_classes: int
    label_key: str

    def __init__(
        self,
        root: str | Path,
        train: bool = True,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        download: bool = False,
    ) -> None:
        # VisionDataset's constructor, not CIFAR10's: that one is what reads the files with pickle.load.
        VisionDataset.__init__(self, root, transform=transform, target_transform=target_transform)
        self.train = train
        if download:
            self.download()
        self._load_meta()
        batches = [self._read_batch(file_name) for file_name, _ in (self.train_list if train else self.test_list)]
        rows = np.concatenate([batch_rows for batch_rows, _ in batches])
        # Each row holds the red plane, then green, then blue; images are served as HWC.
        self.data = rows.reshape(-1, 3, _NATIVE_SIZE, _NATIVE_SIZE).transpose(0, 2, 3, 1)
        self.targets = [label for _, labels in batches for label in labels]

    def _load_meta(self) -> None:
        key = self.meta["key"]
        content = self._read_dictionary(self.meta["filename"], [key])
        names = content[key]
        is_name_list = isinstance(names, list) and all(isinstance(name, str) for name in names)
        if not is_name_list or len(names) != self.num_classes:
            self._refuse(self.meta["filename"], f"'{key}' is not a list of {self.num_classes} class names")
        self.classes = names
        self.class_to_idx = {name: index for index, name in enumerate(names)}

    def _read_batch(self, file_name: str) -> tuple[np.ndarray, list[int]]:
        """One batch file's image rows, (N, 3072) uint8, and its N labels, each checked."""
        content = self._read_dictionary(file_name, ["data", self.label_key])
        rows, labels = content["data"], content[self.label_key]
        if not isinstance(rows, np.ndarray):
            self._refuse(file_name, f"'data' is of type {type(rows).__name__}, not uint8 rows of {_ROW_BYTES} bytes")
        if rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape[1] != _ROW_BYTES:
            self._refuse(
                file_name, f"'data' is a {rows.dtype} array of shape {rows.shape}, not uint8 rows of {_ROW_BYTES} bytes"
            )
        if not isinstance(labels, list) or not all(type(label) is int for label in labels):
            self._refuse(file_name, f"'{self.label_key}' is not a list of ints")
        if len(labels) != len(rows):
            self._refuse(file_name, f"it holds {len(rows)} images, {len(labels)} labels")
        if labels and not 0 <= min(labels) <= max(labels) < self.num_classes:
            self._refuse(file_name, f"'{self.label_key}' holds labels outside 0..{self.num_classes - 1}")
        return rows, labels

    def _read_dictionary(self, file_name: str, keys: list[str]) -> dict:
        """The pickled dictionary in ``file_name``, refused unless it is one and holds ``keys``."""
        try:
            content = load_data_pickle(self._path(file_name))
        except RefusedPickle as error:
            self._refuse(file_name, str(error))
        if not isinstance(content, dict):
            self._refuse(file_name, f"it holds a {type(content).__name__}, not a dict")
        missing = [key for key in keys if key not in content]
        if missing:
            self._refuse(file_name, f"it has no {', '.join(repr(key) for key in missing)}")
        return content

    def _path(self, file_name: str) -> Path:
        return Path(self.root) / self.base_folder / file_name

    def _refuse(self, file_name: str, reason: str) -> NoReturn:
        raise UserError(
            f"{self._path(file_name)} is not a {self.title} data file: {reason}; delete it and download it again"
        )


class _CIFAR10Files(_SafeCIFARFiles, CIFAR10):
    """CIFAR-10 read safely, checking that its files exist instead of their MD5."""

    title, num_classes, label_key = "CIFAR-10", 10, "labels"
    train_list = [[file_name, None] for file_name, _ in CIFAR10.train_list]
    test_list = [[file_name, None] for file_name, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}


class _CIFAR100Files(_SafeCIFARFiles, CIFAR100):
    """CIFAR-100 (fine labels) read safely, checking that its files exist instead of their MD5."""

    title, num_classes, label_key = "CIFAR-100", 100, "fine_labels"
    train_list = [[file_name, None] for file_name, _ in CIFAR100.train_list]
    test_list = [[file_name, None] for file_name, _ in CIFAR100.test_list]
    meta = {**CIFAR100.meta, "md5": None}


class _SVHNFiles(SVHN):
    """torchvision's SVHN reader, checking that its file exists instead of its MD5."""

    def _check_integrity(self) -> bool:
        return (Path(self.root) / self.filename).is_file()


def build_cifar10(root: Path, options: DataOptions) -> DataSplits:
    """CIFAR-10 (50,000 training / 10,000 test images, 10 classes)."""
    return _build_cifar("cifar10", _CIFAR10Files, root, options)


def build_cifar100(root: Path, options: DataOptions) -> DataSplits:
    """CIFAR-100 (50,000 / 10,000 images, 100 fine-label classes)."""
    return _build_cifar("cifar100", _CIFAR100Files, root, options)


def _build_cifar(name: str, reader: type[_SafeCIFARFiles], root: Path, options: DataOptions) -> DataSplits:
    """CIFAR-10 or CIFAR-100 read by ``reader`` from root/<reader.base_folder>."""
    pipelines = dataset_image_pipelines(name, options)
    folder = root / reader.base_folder
    expected = [file_name for file_name, _ in reader.train_list + reader.test_list] + [reader.meta["filename"]]
    missing = [file_name for file_name in expected if not (folder / file_name).is_file()]
    if missing and not options.download:
        raise UserError(
            f"{reader.title} files missing: put {', '.join(missing)} into {folder} (unpack {reader.filename} "
            f"from {_CIFAR_SOURCE} into {root}), or set data.download = True"
        )
    with _reading(reader.title, folder, download=bool(missing)):
        training_files = reader(root, train=True, download=bool(missing))
        test_files = reader(root, train=False)
    size = pipelines.image_size
    training_base = _stored(training_files.data.transpose(0, 3, 1, 2), training_files.targets, size)
    test_base = _stored(test_files.data.transpose(0, 3, 1, 2), test_files.targets, size)
    return image_classification_splits(
        name, training_base, test_base, pipelines=pipelines, num_classes=reader.num_classes, options=options
    )


def build_svhn(root: Path, options: DataOptions) -> DataSplits:
    """SVHN cropped digits (73,257 training / 26,032 test images, 10 classes, label 10 read as 0).

    The test split is test_32x32.mat. The 'extra' file is not used, as in the paper.
    """
    pipelines = dataset_image_pipelines("svhn", options)
    folder = _svhn_folder(root)
    missing = [file_name for file_name in _SVHN_FILES.values() if not (folder / file_name).is_file()]
    if missing and not options.download:
        raise UserError(
            f"SVHN files missing: put {', '.join(missing)} (from {_SVHN_SOURCE}) into {folder}, "
            f"or set data.download = True"
        )
    with _reading("SVHN", folder, download=bool(missing)):
        training_files = _SVHNFiles(folder, split="train", download=bool(missing))
        test_files = _SVHNFiles(folder, split="test", download=bool(missing))
    for files in (training_files, test_files):
        _check_svhn(files, folder / files.filename)
    size = pipelines.image_size
    training_base = _stored(training_files.data, training_files.labels, size)
    test_base = _stored(test_files.data, test_files.labels, size)
    return image_classification_splits("svhn", training_base, test_base, pipelines=pipelines, num_classes=10, options=options)


def _check_svhn(files: SVHN, path: Path) -> None:
    """``UserError`` unless the file held uint8 32x32 RGB images and one label from 1 to 10 for each.

    torchvision's reader takes any arrays under the keys X and y; images of another size would
    train without a word, and a stray label would fail mid-run.
    """
    images, labels = files.data, files.labels
    problem = None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (3, _NATIVE_SIZE, _NATIVE_SIZE):
        stored = (*images.shape[2:], *images.shape[1:2], *images.shape[:1]) if images.ndim == 4 else images.shape
        problem = (
            f"X is a {images.dtype} array of shape {stored}, not uint8 images of shape "
            f"({_NATIVE_SIZE}, {_NATIVE_SIZE}, 3, N)"
        )
    elif labels.size != len(images):
        problem = f"it holds {len(images)} images and {labels.size} labels"
    elif len(labels) and not 0 <= labels.min() <= labels.max() <= 9:
        problem = "y holds labels outside 1..10"
    if problem is not None:
        raise UserError(f"{path} is not an SVHN data file: {problem}; delete it and download it again")


def _stored(images: np.ndarray, labels, size: int) -> TensorStore:
    """uint8 images (N, 3, 32, 32) and their labels as a store of images of side ``size``."""
    inputs = torch.from_numpy(np.ascontiguousarray(images))
    if size != _NATIVE_SIZE:
        inputs = torch.stack([stored_image(Image.fromarray(image.transpose(1, 2, 0)), size) for image in images])
    return TensorStore(inputs, torch.as_tensor(np.asarray(labels), dtype=torch.int64))


def _svhn_folder(root: Path) -> Path:
    """root/svhn, unless the files sit directly in root (torchvision's own layout)."""
    if not (root / _SVHN_FOLDER).is_dir() and all((root / file_name).is_file() for file_name in _SVHN_FILES.values()):
        return root
    return root / _SVHN_FOLDER


@contextmanager
def _reading(title: str, folder: Path, *, download: bool) -> Iterator[None]:
    """Turns a failed download or an unreadable file into a one-line UserError."""
    try:
        yield
    except _READ_ERRORS as error:
        reason = " ".join(str(error).split())
        if download:
            raise UserError(
                f"downloading {title} into {folder} failed ({reason}); "
                f"put the files there by hand or check the connection"
            ) from error
        raise UserError(
            f"cannot read the {title} files in {folder} ({reason}); delete them and download them again"
        ) from error
