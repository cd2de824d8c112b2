"""CIFAR-10, CIFAR-100 and SVHN through torchvision's readers of their official files.

On-disk layout under ``root`` (what torchvision downloads and unpacks there):

- cifar10:  root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
- cifar100: root/cifar-100-python/{train, test, meta}
- svhn:     root/svhn/{train_32x32.mat, test_32x32.mat}  (files directly in root are
            accepted too, as torchvision's SVHN reader lays them out)

The test split is each data set's official test file; for SVHN that is
test_32x32.mat. Training and validation are two views of one in-memory copy of
the training file(s).
"""

from __future__ import annotations

import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from scipy.io.matlab import MatReadError
from torchvision.datasets import CIFAR10, CIFAR100, SVHN

from source.data.options import DataOptions
from source.data.splits import DataSplits, class_index, image_classification_splits
from source.data.transforms import dataset_image_pipelines
from source.errors import UserError

__all__ = ["build_cifar10", "build_cifar100", "build_svhn"]

_NATIVE_SIZE = 32
_SVHN_FOLDER = "svhn"
_SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
_SVHN_SOURCE = "http://ufldl.stanford.edu/housenumbers/"
_CIFAR_SOURCE = "https://www.cs.toronto.edu/~kriz/cifar.html"
# What a truncated or foreign file raises while it is read, and what torchvision
# raises when a download fails its checksum (RuntimeError).
_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, IndexError, pickle.UnpicklingError, MatReadError, RuntimeError)


# torchvision compares each file's MD5 with the one official release every time a
# data set is constructed. These readers check only that the files exist (torchvision
# still verifies the archive's MD5 when it downloads), so any faithful copy in the
# same format loads, including the small files the tests write; a damaged file fails
# when it is unpickled and becomes a UserError below. It also skips hashing 180 MB
# at every start.
class _CIFAR10Files(CIFAR10):
    """torchvision's CIFAR-10 reader, checking that its files exist instead of their MD5."""

    train_list = [[file_name, None] for file_name, _ in CIFAR10.train_list]
    test_list = [[file_name, None] for file_name, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}


class _CIFAR100Files(CIFAR100):
    """torchvision's CIFAR-100 reader, checking that its files exist instead of their MD5."""

    train_list = [[file_name, None] for file_name, _ in CIFAR100.train_list]
    test_list = [[file_name, None] for file_name, _ in CIFAR100.test_list]
    meta = {**CIFAR100.meta, "md5": None}


class _SVHNFiles(SVHN):
    """torchvision's SVHN reader, checking that its file exists instead of its MD5."""

    def _check_integrity(self) -> bool:
        return (Path(self.root) / self.filename).is_file()


def build_cifar10(root: Path, options: DataOptions) -> DataSplits:
    """CIFAR-10 (50,000 training / 10,000 test images, 10 classes)."""
    return _build_cifar("cifar10", "CIFAR-10", _CIFAR10Files, root, options, num_classes=10)


def build_cifar100(root: Path, options: DataOptions) -> DataSplits:
    """CIFAR-100 (50,000 / 10,000 images, 100 fine-label classes)."""
    return _build_cifar("cifar100", "CIFAR-100", _CIFAR100Files, root, options, num_classes=100)


def _build_cifar(
    name: str, title: str, reader: type[CIFAR10], root: Path, options: DataOptions, *, num_classes: int
) -> DataSplits:
    """CIFAR-10 or CIFAR-100 read by ``reader`` from root/<reader.base_folder>."""
    pipelines = dataset_image_pipelines(name, options, native_size=_NATIVE_SIZE)
    folder = root / reader.base_folder
    expected = [file_name for file_name, _ in reader.train_list + reader.test_list] + [reader.meta["filename"]]
    missing = [file_name for file_name in expected if not (folder / file_name).is_file()]
    if missing and not options.download:
        raise UserError(
            f"{title} files missing: put {', '.join(missing)} into {folder} (unpack {reader.filename} "
            f"from {_CIFAR_SOURCE} into {root}), or set data.download = True"
        )
    with _reading(title, folder, download=bool(missing)):
        training_base = reader(root, train=True, target_transform=class_index, download=bool(missing))
        test = reader(root, train=False, transform=pipelines.evaluation, target_transform=class_index)
    return image_classification_splits(
        name, training_base, test, pipelines=pipelines, num_classes=num_classes, options=options
    )


def build_svhn(root: Path, options: DataOptions) -> DataSplits:
    """SVHN cropped digits (73,257 training / 26,032 test images, 10 classes, label 10 read as 0).

    The test split is test_32x32.mat. The 'extra' file is not used, as in the paper.
    """
    pipelines = dataset_image_pipelines("svhn", options, native_size=_NATIVE_SIZE)
    folder = _svhn_folder(root)
    missing = [file_name for file_name in _SVHN_FILES.values() if not (folder / file_name).is_file()]
    if missing and not options.download:
        raise UserError(
            f"SVHN files missing: put {', '.join(missing)} (from {_SVHN_SOURCE}) into {folder}, "
            f"or set data.download = True"
        )
    with _reading("SVHN", folder, download=bool(missing)):
        training_base = _SVHNFiles(folder, split="train", target_transform=class_index, download=bool(missing))
        test = _SVHNFiles(
            folder, split="test", transform=pipelines.evaluation, target_transform=class_index, download=bool(missing)
        )
    return image_classification_splits(
        "svhn", training_base, test, pipelines=pipelines, num_classes=10, options=options
    )


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
