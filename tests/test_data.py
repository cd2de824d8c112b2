"""Data set registry: loaders read files in the real formats, splits, transforms, errors."""

from __future__ import annotations

import pickle
import re

import urllib.error
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torchvision.datasets.cifar
import torchvision.datasets.svhn
from PIL import Image
from sklearn.datasets import load_diabetes, load_digits
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import CIFAR10

import main
from source.data import DataSplits, available_datasets, build_datasets, image_folder
from source.data.presets import PRESETS
from source.data.splits import StoredSplit
from source.data.transforms import NORMALIZATION, CropAndFlip
from source.errors import UserError
from source.training.checkpoints import load_checkpoint
from tests.data_files import (
    BAD_IMAGES,
    bad_image_bytes,
    copy_a_few_cifar10_jpegs,
    write_cifar10,
    write_cifar100,
    write_image_folder,
    write_svhn,
)
from tests.tiny_run import set_options, workspace  # noqa: F401 (workspace is a fixture)



def normalised(pixels: np.ndarray, normalization: str) -> torch.Tensor:
    """Expected model input for HWC uint8 pixels: scaled to [0, 1], then per-channel normalised."""
    mean, std = NORMALIZATION[normalization]
    scaled = torch.as_tensor(pixels, dtype=torch.float32).permute(2, 0, 1) / 255
    return (scaled - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def image_id(item: torch.Tensor, normalization: str) -> int:
    """The id the test files store in the red value of pixel (0, 0), read back from a normalised input."""
    mean, std = NORMALIZATION[normalization]
    return round((float(item[0, 0, 0]) * std[0] + mean[0]) * 255)


def ids_and_labels(dataset, normalization: str) -> list[tuple[int, int]]:
    return [(image_id(item, normalization), int(label)) for item, label in dataset]


def varies_with_augmentation(split, position: int) -> bool:
    """Whether some crop offsets or a flip change the training sample at ``position``."""
    plain = split.training_sample((position, 0, 4, 4, False))[0]
    keys = [(position, 0, row, column, flip) for row, column, flip in [(0, 0, False), (8, 3, False), (4, 4, True)]]
    return any(not torch.equal(plain, split.training_sample(key)[0]) for key in keys)


# --- registry ----------------------------------------------------------------------------------


def test_available_datasets_are_the_interface_names_and_all_have_presets():
    expected = ["cifar10", "cifar100", "diabetes", "digits", "image_folder", "imagenet", "svhn"]
    assert available_datasets() == expected
    assert sorted(PRESETS) == expected


def test_unknown_name_suggests_the_closest_and_lists_all(tmp_path):
    with pytest.raises(UserError, match=r"unknown data set 'cifar_10'; did you mean 'cifar10'\?.*svhn"):
        build_datasets("cifar_10", tmp_path)


# --- digits and diabetes -----------------------------------------------------------------------


def test_digits_splits_sizes_shapes_and_known_pixel():
    splits = build_datasets("digits", "unused")
    assert isinstance(splits, DataSplits)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (1150, 288, 359)
    assert (splits.num_classes, splits.input_shape, splits.task) == (10, (1, 8, 8), "classification")
    assert splits.target_scale == 1.0
    bundle = load_digits()
    index = int(splits.test.indices[0])
    item, label = splits.test[0]
    assert item.dtype == torch.float32 and item.shape == (1, 8, 8)
    assert label.dtype == torch.int64 and int(label) == bundle.target[index]
    (mean,), (std,) = NORMALIZATION["digits"]
    assert torch.allclose(item[0], torch.as_tensor((bundle.images[index] / 16 - mean) / std, dtype=torch.float32))
    training_inputs = torch.stack([inputs for inputs, _ in splits.train])
    assert abs(float(training_inputs.mean())) < 0.05 and abs(float(training_inputs.std()) - 1) < 0.05


def test_digits_test_split_is_fixed_stratified_and_disjoint_from_training():
    first, second = build_datasets("digits", "unused", split_seed=0), build_datasets("digits", "unused", split_seed=1)
    assert torch.equal(first.test.indices, second.test.indices)
    assert not torch.equal(first.validation.indices, second.validation.indices)
    test, train, validation = (set(split.indices.tolist()) for split in (first.test, first.train, first.validation))
    assert not (test & train) and not (test & validation) and not (train & validation)
    assert len(test | train | validation) == 1797
    labels = load_digits().target
    per_class = np.bincount(labels[first.test.indices.numpy()], minlength=10) / np.bincount(labels)
    assert np.all(np.abs(per_class - 0.2) < 0.01)


def test_diabetes_targets_are_standardised_with_training_statistics():
    splits = build_datasets("diabetes", "unused", train_size=300)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (300, 54, 88)
    assert (splits.num_classes, splits.input_shape, splits.task) == (1, (10,), "regression")
    features, targets = load_diabetes(return_X_y=True, scaled=False)
    training_targets = targets[splits.train.indices.numpy()]
    assert splits.target_scale == pytest.approx(training_targets.std())
    item, target = splits.test[3]
    assert item.dtype == torch.float32 and item.shape == (10,)
    assert target.dtype == torch.float32 and target.shape == (1,)
    raw = targets[int(splits.test.indices[3])]
    assert float(target) * splits.target_scale + training_targets.mean() == pytest.approx(raw, rel=1e-5)
    training_outputs = torch.cat([output for _, output in splits.train])
    assert float(training_outputs.mean()) == pytest.approx(0, abs=1e-5)
    assert float(training_outputs.std(unbiased=False)) == pytest.approx(1, abs=1e-5)


@pytest.mark.parametrize(
    "name, option",
    [("digits", {"image_size": 16}), ("digits", {"crop_padding": 2}), ("diabetes", {"normalization": "cifar10"})],
)
def test_image_options_on_bundled_sets_are_rejected(name, option):
    with pytest.raises(UserError, match=f"{name} takes no {next(iter(option))}"):
        build_datasets(name, "unused", **option)


def test_train_size_of_whole_training_split_is_rejected():
    with pytest.raises(UserError, match="train_size 1438 leaves no validation examples.*below 1438"):
        build_datasets("digits", "unused", train_size=1438)


# --- CIFAR -------------------------------------------------------------------------------------


def test_cifar10_reads_pickled_batches_with_known_pixels_and_labels(tmp_path):
    training, test = write_cifar10(tmp_path)
    splits = build_datasets("cifar10", tmp_path, train_size=15)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (15, 5, 6)
    assert (splits.num_classes, splits.input_shape, splits.task) == (10, (3, 32, 32), "classification")
    item, label = splits.test[2]
    assert item.dtype == torch.float32 and item.shape == (3, 32, 32)
    assert label.dtype == torch.int64 and int(label) == test.labels[2]
    assert torch.allclose(item, normalised(test.images[2], "cifar10"), atol=1e-6)
    expected = {(index, int(training.labels[index])) for index in range(20)}
    validation = ids_and_labels(splits.validation, "cifar10")
    unaugmented = build_datasets("cifar10", tmp_path, train_size=15, augment=False)
    unaugmented_train = ids_and_labels(unaugmented.train, "cifar10")
    assert set(validation) | set(unaugmented_train) == expected
    assert not set(validation) & set(unaugmented_train)


def test_validation_and_test_are_never_augmented_but_training_is(tmp_path):
    write_cifar10(tmp_path)
    splits = build_datasets("cifar10", tmp_path, train_size=15)
    assert splits.train.augmentation == CropAndFlip(4)
    assert splits.validation.augmentation is None and splits.test.augmentation is None
    assert all(varies_with_augmentation(splits.train, index) for index in range(3))
    unaugmented = build_datasets("cifar10", tmp_path, train_size=15, augment=False)
    assert not any(varies_with_augmentation(unaugmented.train, index) for index in range(3))
    assert torch.equal(unaugmented.train.training_sample((2, 0, 1, 7, True))[0], unaugmented.train[2][0])


def test_same_split_seed_gives_same_validation_and_another_seed_another(tmp_path):
    write_cifar10(tmp_path)

    def validation_ids(seed):
        splits = build_datasets("cifar10", tmp_path, train_size=15, split_seed=seed)
        return sorted(ids_and_labels(splits.validation, "cifar10"))

    assert validation_ids(0) == validation_ids(0)
    assert validation_ids(0) != validation_ids(1)


def test_cifar_preset_train_size_too_large_for_the_files_is_a_user_error(tmp_path):
    write_cifar10(tmp_path)
    with pytest.raises(UserError, match=r"train_size 40000 \(the cifar10 preset\).*20 training examples"):
        build_datasets("cifar10", tmp_path)


def test_cifar100_reads_fine_labels_and_uses_padding_8(tmp_path):
    _, test = write_cifar100(tmp_path)
    splits = build_datasets("cifar100", tmp_path, train_size=10, normalization="imagenet")
    assert (len(splits.train), len(splits.validation), len(splits.test), splits.num_classes) == (10, 2, 5, 100)
    item, label = splits.test[4]
    assert int(label) == test.labels[4]
    assert torch.allclose(item, normalised(test.images[4], "imagenet"), atol=1e-6)
    assert splits.train.augmentation == CropAndFlip(8)


def test_data_loader_batches_have_the_interface_types(tmp_path):
    write_cifar10(tmp_path)
    splits = build_datasets("cifar10", tmp_path, train_size=15)
    inputs, targets = next(iter(DataLoader(splits.train, batch_size=4)))
    assert inputs.shape == (4, 3, 32, 32) and inputs.dtype == torch.float32
    assert targets.shape == (4,) and targets.dtype == torch.int64


def test_missing_cifar_files_name_the_files_the_folder_and_download(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    (tmp_path / "cifar-10-batches-py" / "batches.meta").unlink()
    folder = tmp_path / "cifar-10-batches-py"
    with pytest.raises(UserError) as raised:
        build_datasets("cifar10", tmp_path, train_size=10)
    message = str(raised.value)
    assert message.startswith(f"CIFAR-10 files missing: put data_batch_3, batches.meta into {folder}")
    assert "set data.download = True" in message and "\n" not in message
    with pytest.raises(UserError, match=r"CIFAR-100 files missing: put train, test, meta into .*cifar-100-python"):
        build_datasets("cifar100", tmp_path)


def test_download_goes_through_torchvision_and_its_failure_is_a_user_error(tmp_path, monkeypatch):
    requested = []

    def fake_download(url, download_root, filename, md5):
        requested.append((url, filename, md5))
        write_cifar10(Path(download_root))

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", fake_download)
    splits = build_datasets("cifar10", tmp_path, download=True, train_size=10)
    assert len(splits.test) == 6
    assert requested == [(CIFAR10.url, CIFAR10.filename, CIFAR10.tgz_md5)]

    def failing_download(url, download_root, filename, md5):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torchvision.datasets.svhn, "download_url", failing_download)
    with pytest.raises(UserError, match=r"downloading SVHN into .*svhn failed \(<urlopen error no route to host>\)"):
        build_datasets("svhn", tmp_path, download=True)


def test_corrupt_cifar_file_is_a_user_error(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="cannot read the CIFAR-10 files in .*delete them and download them again"):
        build_datasets("cifar10", tmp_path, train_size=10)


# --- SVHN --------------------------------------------------------------------------------------


def test_svhn_test_split_is_the_official_test_file_and_label_10_is_zero(tmp_path):
    training, test = write_svhn(tmp_path / "svhn")
    splits = build_datasets("svhn", tmp_path, train_size=9)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (9, 3, 5)
    assert ids_and_labels(splits.test, "svhn") == [(200 + index, int(test.labels[index])) for index in range(5)]
    assert torch.allclose(splits.test[0][0], normalised(test.images[0], "svhn"), atol=1e-6)
    assert int(splits.test[0][1]) == 0  # stored as 10 in the file
    validation = set(ids_and_labels(splits.validation, "svhn"))
    assert validation < {(index, int(training.labels[index])) for index in range(12)}


def test_svhn_files_directly_in_root_are_accepted(tmp_path):
    write_svhn(tmp_path)
    assert len(build_datasets("svhn", tmp_path, train_size=10).test) == 5


def test_missing_svhn_files_name_the_files_and_folder(tmp_path):
    with pytest.raises(UserError) as raised:
        build_datasets("svhn", tmp_path)
    assert str(raised.value) == (
        f"SVHN files missing: put train_32x32.mat, test_32x32.mat (from http://ufldl.stanford.edu/housenumbers/) "
        f"into {tmp_path / 'svhn'}, or set data.download = True"
    )


def _rewrite_svhn_training_file(folder, change):
    """Rewrite folder/train_32x32.mat with its (X, y) passed through ``change``."""
    path = folder / "train_32x32.mat"
    content = scipy.io.loadmat(path)
    images, labels = change(content["X"], content["y"])
    scipy.io.savemat(path, {"X": images, "y": labels})


SVHN_DAMAGE = {
    "a label of 11": (lambda X, y: (X, np.where(np.arange(len(y))[:, None] == 3, 11, y)), "labels outside 1..10"),
    "10 labels for 12 images": (lambda X, y: (X, y[:10]), "it holds 12 images and 10 labels"),
    "1-channel images": (lambda X, y: (X[:, :, :1], y), "uint8 array of shape (32, 32, 1, 12), not uint8 images"),
    "28x28 images": (lambda X, y: (X[:28, :28], y), "of shape (28, 28, 3, 12)"),
    "float images": (lambda X, y: (X.astype(np.float32), y), "X is a float32 array"),
}


@pytest.mark.parametrize("case", list(SVHN_DAMAGE))
def test_svhn_contents_that_break_the_format_are_refused_naming_the_file(tmp_path, case):
    change, fragment = SVHN_DAMAGE[case]
    write_svhn(tmp_path / "svhn")
    _rewrite_svhn_training_file(tmp_path / "svhn", change)
    with pytest.raises(UserError) as raised:
        build_datasets("svhn", tmp_path, train_size=9)
    message = str(raised.value)
    assert message.startswith(f"{tmp_path / 'svhn' / 'train_32x32.mat'} is not an SVHN data file: ")
    assert fragment in message and message.endswith("; delete it and download it again") and "\n" not in message


CIFAR_DAMAGE = {
    "a label of 10": (lambda batch: batch["labels"].__setitem__(0, 10), "holds labels outside 0..9"),
    "3 labels for 4 images": (lambda batch: batch["labels"].pop(), "it holds 4 images, 3 labels"),
    "rows of another size": (lambda batch: batch.update(data=batch["data"][:, :1024]), "not uint8 rows of 3072 bytes"),
}


@pytest.mark.parametrize("case", list(CIFAR_DAMAGE))
def test_cifar_contents_that_break_the_format_are_refused_naming_the_file(tmp_path, case):
    change, fragment = CIFAR_DAMAGE[case]
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch = pickle.loads(path.read_bytes())
    change(batch)
    path.write_bytes(pickle.dumps(batch))
    with pytest.raises(UserError, match=f"^{path} is not a CIFAR-10 data file: .*{re.escape(fragment)}"):
        build_datasets("cifar10", tmp_path, train_size=10)


# --- image folders -----------------------------------------------------------------------------


@pytest.mark.parametrize("image_size", [32, 224], ids=["small_images", "large_images"])
@pytest.mark.parametrize("kind", list(BAD_IMAGES))
def test_an_unreadable_image_is_refused_before_training_naming_the_file(tmp_path, kind, image_size):
    write_image_folder(tmp_path / "train", ["a", "b"], per_class=3, first_id=0)
    write_image_folder(tmp_path / "val", ["a", "b"], per_class=1, first_id=50)
    bad = tmp_path / "train" / "b" / f"bad{BAD_IMAGES[kind]}"
    bad.write_bytes(bad_image_bytes(kind))
    with pytest.raises(UserError) as raised:
        build_datasets("image_folder", tmp_path, image_size=image_size)
    message = str(raised.value)
    assert message.startswith(f"cannot read the image file {bad}: ") and message.endswith("; replace it or remove it")
    assert "\n" not in message


def test_image_folder_with_test_folder_and_cifar_options_trains_like_cifar(tmp_path):
    training = write_image_folder(tmp_path / "train", ["dog", "cat"], per_class=5, first_id=0)
    test = write_image_folder(tmp_path / "test", ["dog", "cat"], per_class=2, first_id=100, seed=8)
    splits = build_datasets("image_folder", tmp_path, image_size=32, normalization="cifar10")
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (9, 1, 4)  # preset: 90 % training
    assert (splits.num_classes, splits.input_shape) == (2, (3, 32, 32))
    expected_test = {(100 + index, int(test.labels[index])) for index in range(4)}
    assert set(ids_and_labels(splits.test, "cifar10")) == expected_test
    item, _ = splits.validation[0]
    written = training.images[image_id(item, "cifar10")]
    assert torch.allclose(item, normalised(written, "cifar10"), atol=1e-6)
    assert isinstance(splits.train, StoredSplit) and splits.train.augmentation == CropAndFlip(4)


def test_image_folder_prefers_val_and_large_images_take_the_imagenet_pipeline(tmp_path):
    write_image_folder(tmp_path / "train", ["a", "b", "c"], per_class=2, first_id=0, suffix=".jpg")
    write_image_folder(tmp_path / "val", ["a", "b", "c"], per_class=1, first_id=50, suffix=".jpg")
    (tmp_path / "test").mkdir()  # ignored: val/ exists
    splits = build_datasets("image_folder", tmp_path, train_size=4)
    assert (len(splits.train), len(splits.validation), len(splits.test), splits.num_classes) == (4, 2, 3, 3)
    assert splits.input_shape == (3, 224, 224)
    assert splits.train[0][0].shape == splits.validation[0][0].shape == splits.test[0][0].shape == (3, 224, 224)
    assert [int(label) for _, label in splits.test] == [0, 1, 2]
    evaluation = [type(step) for step in splits.test.transform.transforms]
    assert evaluation[:2] == [transforms.Resize, transforms.CenterCrop]
    assert splits.test.transform.transforms[0].size == 256


def test_imagenet_reads_train_and_val_and_crop_padding_does_not_apply_at_224(tmp_path):
    write_image_folder(tmp_path / "train", ["n01", "n02"], per_class=3, first_id=0)
    write_image_folder(tmp_path / "val", ["n01", "n02"], per_class=1, first_id=50)
    splits = build_datasets("imagenet", tmp_path, train_size=5)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (5, 1, 2)
    with pytest.raises(UserError, match="crop_padding applies to images of at most 64 pixels"):
        build_datasets("imagenet", tmp_path, train_size=5, crop_padding=4)


def test_missing_image_folders_name_the_expected_layout(tmp_path):
    with pytest.raises(UserError, match=r"imagenet data not found: no folder .*train; expected .*/val/<class>/"):
        build_datasets("imagenet", tmp_path)
    write_image_folder(tmp_path / "train", ["a"], per_class=2, first_id=0)
    (tmp_path / "test").mkdir()
    with pytest.raises(UserError, match=r"imagenet data not found: no folder .*val; expected"):
        build_datasets("imagenet", tmp_path)  # ImageNet's test split is val/, never test/
    with pytest.raises(UserError, match=r"image_folder data incomplete \(Couldn't find any class folder"):
        build_datasets("image_folder", tmp_path)


def test_image_folder_with_different_classes_in_train_and_val_is_a_user_error(tmp_path):
    write_image_folder(tmp_path / "train", ["a", "b"], per_class=2, first_id=0)
    write_image_folder(tmp_path / "val", ["a", "c"], per_class=1, first_id=50)
    with pytest.raises(UserError, match=r"same class folders \(only in train/: b; only in val/: c\)"):
        build_datasets("image_folder", tmp_path)


# --- normalisation -----------------------------------------------------------------------------


def test_normalization_by_name_and_its_errors(tmp_path):
    _, test = write_cifar10(tmp_path)
    splits = build_datasets("cifar10", tmp_path, train_size=10, normalization="svhn")
    assert torch.allclose(splits.test[0][0], normalised(test.images[0], "svhn"), atol=1e-6)
    with pytest.raises(UserError, match="unknown normalization 'cifar'; set data.normalization to one of: cifar10, "):
        build_datasets("cifar10", tmp_path, train_size=10, normalization="cifar")
    with pytest.raises(UserError, match="normalization 'digits' has 1 channel"):
        build_datasets("cifar10", tmp_path, train_size=10, normalization="digits")


# --- the real CIFAR-10 JPEGs -------------------------------------------------------------------


def test_real_cifar10_jpegs_load_as_a_cifar_style_image_folder(tmp_path):
    # bird and frog come first in the shared archive, which keeps the scan short.
    copy_a_few_cifar10_jpegs(tmp_path, ("bird", "frog"), train_per_class=10, test_per_class=5)
    splits = build_datasets("image_folder", tmp_path, image_size=32, normalization="cifar10", train_size=16)
    assert (len(splits.train), len(splits.validation), len(splits.test), splits.num_classes) == (16, 4, 10, 2)
    first_test_file = sorted((tmp_path / "test" / "bird").glob("*.jpg"))[0]
    expected = normalised(np.array(Image.open(first_test_file).convert("RGB")), "cifar10")
    item, label = splits.test[0]
    assert item.shape == (3, 32, 32) and int(label) == 0
    assert torch.allclose(item, expected, atol=1e-6)
    assert [int(label) for _, label in splits.test] == [0] * 5 + [1] * 5
    assert splits.train[0][0].shape == (3, 32, 32)
    assert all(varies_with_augmentation(splits.train, index) for index in range(3))


@pytest.mark.parametrize(("pipeline", "workers"), [("loader", 2), ("loader", 0), ("device", 0)])
def test_an_unreadable_image_of_a_large_folder_stops_the_run_with_one_line(workspace, monkeypatch, capsys, pipeline,
                                                                         workers):
    """Too many files to check before training: the bad one, in the test split, is met after the last checkpoint
    (loader), or when the device pipeline reads every image before training."""
    monkeypatch.setattr(image_folder, "VERIFIED_FILES", 0)
    write_image_folder(workspace / "images" / "train", ["a", "b"], per_class=10, first_id=0)
    write_image_folder(workspace / "images" / "test", ["a", "b"], per_class=2, first_id=50)
    bad = workspace / "images" / "test" / "b" / "bad.jpg"
    bad.write_bytes(bad_image_bytes("truncated JPEG"))
    settings = set_options(
        "data.name=image_folder", "data.root=images", "data.image_size=32", "data.normalization=cifar10",
        f"data.pipeline={pipeline}", f"data.num_workers={workers}", "training.batch_size=4",
        "training.training_steps=4", "training.evaluate_every_steps=2", "logging.tensorboard=false",
    )  # fmt: skip
    assert main.main(["--config", "tiny.txt", *settings]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: cannot read the image file images/test/b/bad.jpg: ") and error.count("\n") == 1
    assert error.endswith("; replace it or remove it\n")
    folder = workspace / "runs" / "tiny"
    if pipeline == "device":
        assert not folder.exists()
    else:
        assert load_checkpoint(folder / "last.pt")["step"] == 4
