"""Writers of tiny data sets in the real on-disk formats, and a few real CIFAR-10 JPEGs, for tests.

Every image is 32x32 RGB with random pixels, except pixel (row 0, column 0),
whose red value is the image's id: a test reads it back after normalisation to
know which file an item came from.
"""

from __future__ import annotations

import io
import pickle
import shutil
import struct
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

IMAGE_SIDE = 32

REPOSITORY = Path(__file__).resolve().parents[1]
SHARED_CIFAR10_ARCHIVE = REPOSITORY.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
UNPACKED_CIFAR10_COPIES = (REPOSITORY / "data" / "cifar10-jpeg", REPOSITORY.parent / "shared" / "data" / "cifar10-jpeg")


@dataclass(frozen=True)
class WrittenImages:
    """What a writer stored: images as (N, 32, 32, 3) uint8 and their class labels."""

    images: np.ndarray
    labels: np.ndarray


def tagged_images(ids: range, labels: list[int], seed: int) -> WrittenImages:
    """Random images whose red value at (0, 0) is the id (0..255)."""
    images = np.random.default_rng(seed).integers(0, 256, size=(len(ids), IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.array(ids, dtype=np.uint8)
    return WrittenImages(images=images, labels=np.array(labels, dtype=np.int64))


def _cifar_rows(images: np.ndarray) -> np.ndarray:
    """CIFAR's row format: 3,072 bytes per image, the red plane, then green, then blue."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def _pickle(path: Path, content: dict) -> None:
    with open(path, "wb") as file:
        pickle.dump(content, file)


def write_cifar10(root: Path, *, per_batch: int = 4, test_count: int = 6) -> tuple[WrittenImages, WrittenImages]:
    """root/cifar-10-batches-py with five training batches, a test batch and batches.meta.

    Training ids are 0..5*per_batch-1, test ids start at 100.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    count = 5 * per_batch
    training = tagged_images(range(count), [index % 10 for index in range(count)], seed=1)
    for batch in range(5):
        part = slice(batch * per_batch, (batch + 1) * per_batch)
        _pickle(
            folder / f"data_batch_{batch + 1}",
            {
                "batch_label": f"training batch {batch + 1} of 5",
                "labels": training.labels[part].tolist(),
                "data": _cifar_rows(training.images[part]),
                "filenames": [f"image_{index}.png" for index in range(count)[part]],
            },
        )
    test = tagged_images(range(100, 100 + test_count), [(3 * index + 1) % 10 for index in range(test_count)], seed=2)
    _pickle(
        folder / "test_batch",
        {"batch_label": "testing batch 1 of 1", "labels": test.labels.tolist(), "data": _cifar_rows(test.images)},
    )
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _pickle(folder / "batches.meta", {"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072})
    return training, test


def write_cifar100(root: Path, *, train_count: int = 12, test_count: int = 5) -> tuple[WrittenImages, WrittenImages]:
    """root/cifar-100-python with train, test and meta; labels are fine labels 0..99."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    written = []
    for file_name, ids, seed in (("train", range(train_count), 3), ("test", range(100, 100 + test_count), 4)):
        images = tagged_images(ids, [(7 * index + 50) % 100 for index in ids], seed=seed)
        _pickle(
            folder / file_name,
            {
                "fine_labels": images.labels.tolist(),
                "coarse_labels": (images.labels // 5).tolist(),
                "data": _cifar_rows(images.images),
            },
        )
        written.append(images)
    _pickle(
        folder / "meta",
        {
            "fine_label_names": [f"fine_{index}" for index in range(100)],
            "coarse_label_names": [f"coarse_{index}" for index in range(20)],
        },
    )
    return written[0], written[1]


def write_svhn(folder: Path, *, train_count: int = 12, test_count: int = 5) -> tuple[WrittenImages, WrittenImages]:
    """train_32x32.mat and test_32x32.mat in ``folder`` with SVHN's keys: X (32, 32, 3, N), y (N, 1).

    The files store digit 0 as label 10, as SVHN does; the returned labels are 0..9.
    """
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    files = (("train_32x32.mat", range(train_count), 5), ("test_32x32.mat", range(200, 200 + test_count), 6))
    for file_name, ids, seed in files:
        images = tagged_images(ids, [index % 10 for index in ids], seed=seed)
        stored_labels = np.where(images.labels == 0, 10, images.labels).astype(np.uint8).reshape(-1, 1)
        scipy.io.savemat(folder / file_name, {"X": images.images.transpose(1, 2, 3, 0), "y": stored_labels})
        written.append(images)
    return written[0], written[1]


def write_image_folder(
    folder: Path, classes: list[str], *, per_class: int, first_id: int, suffix: str = ".png", seed: int = 7
) -> WrittenImages:
    """folder/<class>/<n><suffix> for each class; labels are the classes' positions in sorted order."""
    ordered = sorted(classes)
    count = per_class * len(classes)
    labels = [ordered.index(classes[index // per_class]) for index in range(count)]
    written = tagged_images(range(first_id, first_id + count), labels, seed=seed)
    for index, image in enumerate(written.images):
        class_folder = folder / classes[index // per_class]
        class_folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(class_folder / f"{index:04d}{suffix}")
    return written


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bad_image_bytes(kind: str) -> bytes:
    """The bytes of an image file that cannot be read, of one of four ``BAD_IMAGES`` kinds.

    The decompression bomb is a PNG header that announces 15,000 x 15,000 pixels, more than
    twice PIL's limit, so PIL refuses it before decoding anything.
    """
    if kind == "random bytes":
        return np.random.default_rng(0).integers(0, 256, size=3000, dtype=np.uint8).tobytes()
    if kind == "zero bytes":
        return b""
    if kind == "truncated JPEG":
        encoded = io.BytesIO()
        Image.fromarray(tagged_images(range(1), [0], seed=9).images[0]).save(encoded, format="JPEG")
        return encoded.getvalue()[:400]
    if kind == "decompression bomb":
        header = struct.pack(">IIBBBBB", 15_000, 15_000, 8, 0, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IEND", b"")
    raise ValueError(f"unknown kind of bad image: {kind}")


BAD_IMAGES = {"random bytes": ".jpg", "zero bytes": ".png", "truncated JPEG": ".jpg", "decompression bomb": ".png"}
"""The kinds of unreadable image files ``bad_image_bytes`` writes, with the suffix each is named by."""


def copy_a_few_cifar10_jpegs(destination: Path, classes: tuple[str, ...], train_per_class: int, test_per_class: int):
    """destination/{train,test}/<class>/ with a few real images, from an unpacked copy or the archive."""
    wanted = {"train": train_per_class, "test": test_per_class}
    unpacked = next((folder for folder in UNPACKED_CIFAR10_COPIES if (folder / "train").is_dir()), None)
    if unpacked is not None:
        for split, count in wanted.items():
            for name in classes:
                (destination / split / name).mkdir(parents=True)
                for path in sorted((unpacked / split / name).glob("*.jpg"))[:count]:
                    shutil.copy(path, destination / split / name / path.name)
        return
    if not SHARED_CIFAR10_ARCHIVE.is_file():
        pytest.skip(f"real CIFAR-10 JPEGs not found: neither {SHARED_CIFAR10_ARCHIVE} nor an unpacked copy")
    remaining = {(split, name): count for split, count in wanted.items() for name in classes}
    # Stream the archive and stop once enough files are copied; members are written
    # by name under destination, never extracted with their archive paths.
    with tarfile.open(SHARED_CIFAR10_ARCHIVE) as archive:
        for member in archive:
            parts = Path(member.name).parts  # cifar10-jpeg/<split>/<class>/<file>
            if not member.isfile() or len(parts) != 4 or remaining.get(parts[1:3], 0) == 0:
                continue
            target = destination / parts[1] / parts[2] / parts[3]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.extractfile(member).read())
            remaining[parts[1:3]] -= 1
            if not any(remaining.values()):
                break
