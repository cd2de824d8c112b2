"""The data pipelines: epoch plans, batch augmentation, and the device and loader paths giving the same batches."""

import itertools
import json

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms

import main
from source.data import build_datasets, build_pipelines, pipelines
from source.data.sampling import batch_positions, batches_per_epoch, epoch_plan, share_of
from source.data.transforms import NORMALIZATION, CropAndFlip, Normalisation
from source.errors import UserError
from source.optimizer import make_batch_closure
from source.registries import load_configuration
from source.training import build_experiment
from tests.data_files import write_cifar10, write_image_folder
from tests.tiny_run import set_options, workspace  # noqa: F401 (a fixture)

CPU = torch.device("cpu")


def _pipelines(splits, choice, *, batch_size=4, num_workers=0, rank=0, world_size=1, **options):
    return build_pipelines(
        splits,
        choice=choice,
        device=CPU,
        batch_size=batch_size,
        evaluation_batch_size=3,
        seed=11,
        num_workers=num_workers,
        rank=rank,
        world_size=world_size,
        **options,
    )


def _epochs(training, epochs=2, first_batch=0):
    return [batch for epoch in range(epochs) for batch in training.epoch(epoch, first_batch)]


def _assert_same_batches(first, second):
    assert len(first) == len(second) > 0
    for (inputs, targets, key), (other_inputs, other_targets, other_key) in zip(first, second):
        assert key == other_key
        assert inputs.dtype == other_inputs.dtype == torch.float32
        assert torch.equal(inputs, other_inputs) and torch.equal(targets, other_targets)


@pytest.fixture
def cifar(tmp_path):
    write_cifar10(tmp_path, per_batch=6)  # 30 training images: 22 training, 8 validation
    return build_datasets("cifar10", tmp_path, train_size=22)


# --- epoch plans and augmentation -----------------------------------------------------------------


def test_an_epoch_plan_is_a_pure_function_of_seed_and_epoch():
    plan = epoch_plan(50, seed=3, epoch=2, crop_padding=4)
    assert sorted(plan.indices.tolist()) == list(range(50))
    assert plan.offsets.min() >= 0 and plan.offsets.max() == 8 and plan.flips.any() and not plan.flips.all()
    again = epoch_plan(50, seed=3, epoch=2, crop_padding=4)
    assert all(torch.equal(getattr(plan, name), getattr(again, name)) for name in plan.__dataclass_fields__)
    assert not torch.equal(plan.indices, epoch_plan(50, seed=3, epoch=1, crop_padding=4).indices)
    assert not torch.equal(plan.indices, epoch_plan(50, seed=4, epoch=2, crop_padding=4).indices)
    # The order and the sample seeds do not depend on the crop padding.
    unpadded = epoch_plan(50, seed=3, epoch=2, crop_padding=0)
    assert torch.equal(plan.indices, unpadded.indices) and torch.equal(plan.sample_seeds, unpadded.sample_seeds)
    assert unpadded.offsets.eq(0).all()


def test_shares_cover_every_item_once_and_batches_split_into_rank_parts():
    for count in (0, 1, 7, 10, 129):
        for world_size in (1, 2, 3, 8):
            shares = [share_of(count, rank, world_size) for rank in range(world_size)]
            assert [index for share in shares for index in share] == list(range(count))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert batch_positions(3, 8) == range(24, 32)
    assert [batch_positions(3, 8, rank, 2) for rank in (0, 1)] == [range(24, 28), range(28, 32)]


@pytest.mark.parametrize("choice", ["device", "loader"])
def test_an_epoch_has_full_batches_only(cifar, choice):
    assert [batches_per_epoch(size, 4) for size in (0, 3, 4, 22)] == [0, 0, 1, 5]
    training = _pipelines(cifar, choice).training
    batches = list(training.epoch(0))
    assert training.steps_per_epoch == len(batches) == 5
    assert all(len(targets) == 4 for _, targets, _ in batches)


@pytest.mark.parametrize("padding", [0, 2, 4])
def test_crop_and_flip_is_torchvisions_random_crop_and_flip_with_the_same_parameters(padding):
    images = torch.randint(0, 256, (6, 3, 10, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    offsets = torch.tensor([[0, 0], [2 * padding, 2 * padding], [padding, 0], [0, padding], [1, 1], [0, 0]])
    offsets = offsets.clamp(max=2 * padding)
    flips = torch.tensor([False, True, True, False, True, False])
    cropped = CropAndFlip(padding)(images, offsets, flips)
    for image, (row, column), flip, result in zip(images, offsets.tolist(), flips, cropped):
        expected = TF.crop(TF.pad(image, padding), row, column, 10, 12)
        expected = TF.hflip(expected) if flip else expected
        assert torch.equal(result, expected)


def test_normalisation_is_bitwise_totensor_and_normalize():
    mean, std = NORMALIZATION["cifar10"]
    pixels = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    expected = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])(Image.fromarray(pixels))
    result = Normalisation(mean, std)(torch.from_numpy(pixels).permute(2, 0, 1))
    assert torch.equal(result, expected)


def test_a_stored_split_serves_one_sample_as_a_batch_of_one(cifar):
    positions = torch.tensor([3, 0, 7])
    offsets, flips = torch.tensor([[1, 8], [0, 0], [4, 2]]), torch.tensor([True, False, True])
    inputs, targets = cifar.train.batch(positions, offsets, flips)
    for row, key in enumerate(zip(positions.tolist(), [0, 0, 0], offsets[:, 0].tolist(), offsets[:, 1].tolist(), flips.tolist())):
        sample, target = cifar.train.training_sample(key)
        assert torch.equal(sample, inputs[row]) and torch.equal(target, targets[row])


# --- the device and the loader path ---------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_device_and_loader_paths_give_bitwise_the_same_batches(cifar, num_workers):
    device = _pipelines(cifar, "device")
    loader = _pipelines(cifar, "loader", num_workers=num_workers)
    assert (device.kind, loader.kind) == ("device", "loader")
    batches = _epochs(device.training)
    assert len(batches) == 2 * (22 // 4)
    _assert_same_batches(batches, _epochs(loader.training))
    # Every epoch is a new order of all training samples, augmented differently.
    first, second = batches[0][0], batches[len(batches) // 2][0]
    assert not torch.equal(first, second)
    for name in ("validation", "test"):
        expected = [(inputs, targets, None) for inputs, targets in getattr(device, name)]
        _assert_same_batches(expected, [(inputs, targets, None) for inputs, targets in getattr(loader, name)])
    assert sum(len(targets) for _, targets in device.validation) == 8


def test_a_batch_key_loads_the_same_batch_again_and_a_late_start_continues_exactly(cifar):
    for choice in ("device", "loader"):
        training = _pipelines(cifar, choice).training
        batches = _epochs(training)
        for inputs, targets, key in batches:
            again_inputs, again_targets = training.load(key)
            assert torch.equal(again_inputs, inputs) and torch.equal(again_targets, targets)
        _assert_same_batches(list(training.epoch(1, 3)), [batch for batch in batches if batch[2][0] == 1][3:])


def test_small_image_folders_go_to_the_device_decoded_as_the_loader_decodes_them(tmp_path):
    write_image_folder(tmp_path / "train", ["dog", "cat"], per_class=6, first_id=0, suffix=".jpg")
    write_image_folder(tmp_path / "test", ["dog", "cat"], per_class=2, first_id=100)
    splits = build_datasets("image_folder", tmp_path, image_size=24, normalization="cifar10", train_size=10)
    device, loader = _pipelines(splits, "device", batch_size=3), _pipelines(splits, "loader", batch_size=3)
    assert device.kind == "device"
    _assert_same_batches(_epochs(device.training), _epochs(loader.training))
    assert next(iter(device.test))[0].shape == (3, 3, 24, 24)


def test_each_rank_gets_its_part_of_the_global_batch(cifar):
    whole = _epochs(_pipelines(cifar, "device").training)
    for choice in ("device", "loader"):
        parts = [_epochs(_pipelines(cifar, choice, rank=rank, world_size=2).training) for rank in (0, 1)]
        for (inputs, targets, key), first, second in zip(whole, *parts):
            assert first[2] == second[2] == key
            assert torch.equal(torch.cat([first[0], second[0]]), inputs)
            assert torch.equal(torch.cat([first[1], second[1]]), targets)
        counted = [sum(len(targets) for _, targets in _pipelines(cifar, choice, rank=rank, world_size=3).test)
                   for rank in range(3)]
        assert counted == [2, 2, 2]


def test_channels_last_batches_hold_the_same_values(cifar):
    plain = _epochs(_pipelines(cifar, "device").training, epochs=1)
    last = _epochs(_pipelines(cifar, "loader", memory_format=torch.channels_last).training, epochs=1)
    assert last[0][0].is_contiguous(memory_format=torch.channels_last)
    _assert_same_batches(plain, last)


# --- choosing a path --------------------------------------------------------------------------------


def test_auto_takes_the_device_when_the_data_fit_and_the_loader_otherwise(cifar, monkeypatch):
    assert _pipelines(cifar, "auto").kind == "device"
    monkeypatch.setattr(pipelines, "free_memory", lambda device: 1000)
    chosen = _pipelines(cifar, "auto")
    assert chosen.kind == "loader"
    assert "GiB, more than 50% of the" in chosen.note
    with pytest.raises(UserError, match="device pipeline cannot hold cifar10: the data need .*set data.pipeline = loader"):
        _pipelines(cifar, "device")


def test_large_images_fall_back_to_the_loader_with_a_note(tmp_path):
    write_image_folder(tmp_path / "train", ["a", "b"], per_class=3, first_id=0)
    write_image_folder(tmp_path / "val", ["a", "b"], per_class=1, first_id=50)
    splits = build_datasets("image_folder", tmp_path, train_size=4, image_size=80)
    chosen = _pipelines(splits, "device", batch_size=2)
    assert chosen.kind == "loader" and "large-image pipeline" in chosen.note
    inputs, targets, key = next(iter(chosen.training.epoch(0)))
    assert inputs.shape == (2, 3, 80, 80) and key == (0, 0)
    again, _ = chosen.training.load(key)
    assert torch.equal(again, inputs)  # the random resized crops are seeded per sample


# --- runs ---------------------------------------------------------------------------------------------


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_run_trains_identically_on_either_path_and_records_its_choice(workspace):
    for choice in ("device", "loader"):
        arguments = ["--config", "tiny.txt", *set_options(f"experiment.name={choice}", f"data.pipeline={choice}")]
        assert main.main(arguments) == 0
    device_records = _records(workspace / "runs" / "device" / "metrics.jsonl")
    loader_records = _records(workspace / "runs" / "loader" / "metrics.jsonl")
    strip = ("elapsed_seconds",)
    assert [{k: v for k, v in r.items() if k not in strip} for r in device_records] == [
        {k: v for k, v in r.items() if k not in strip} for r in loader_records
    ]
    assert main.main(["--config", "tiny.txt", *set_options("experiment.name=auto")]) == 0
    assert "pipeline = device" in (workspace / "runs" / "auto" / "configuration.txt").read_text()


def test_the_pipeline_cannot_change_on_resume(workspace, capsys):
    arguments = ["--config", "tiny.txt"]
    assert main.main([*arguments, "--stop-after-steps", "3"]) == 0
    assert main.main([*arguments, "--resume", *set_options("data.pipeline=loader")]) == 2
    assert "[data] pipeline cannot change when resuming runs/tiny (saved: device)" in capsys.readouterr().err
    assert main.main([*arguments, "--resume"]) == 0


# --- batches replayed by key ------------------------------------------------------------------------


class _CountingBatches:
    """Batches by key (the key is the batch's fill value), counting the loads."""

    def __init__(self):
        self.loads = []

    def load(self, key):
        self.loads.append(key)
        return torch.full((2, 3), float(key)), torch.zeros(2)


def test_a_closure_with_a_key_lets_go_of_its_batch_and_loads_it_again():
    model = torch.nn.Linear(3, 1)
    loss_function = lambda outputs, targets: (outputs.squeeze(1) - targets).square().mean()  # noqa: E731
    batches = _CountingBatches()
    inputs, targets = batches.load(5)
    batches.loads.clear()
    closure = make_batch_closure(model, loss_function, inputs, targets, batches=batches, key=5)
    first = closure()
    assert closure.inputs is None and closure.targets is None and batches.loads == []
    assert torch.equal(closure(), first) and batches.loads == [5]
    state = closure.batch_state()
    assert state["key"] == 5 and "inputs" not in state
    assert torch.equal(closure.for_batch(state)(), first)
    plain = make_batch_closure(model, loss_function, inputs, targets)
    with pytest.raises(ValueError, match="names its batches by key"):
        plain.for_batch(state)


def test_labpal_keeps_keys_of_its_direction_batches_not_copies(workspace):
    configuration = load_configuration(
        "tiny.txt",
        [
            "optimizer.arguments.untrustworthy_updates=0",
            # Training batches of 40 · f = 40 · (128 / 32) · (1150 / 40000) = 4.6, so 4 inference batches.
            "optimizer.arguments.batch_size_schedule=0:40",
        ],
    )
    experiment = build_experiment(configuration)
    training = experiment.data.training
    loss_function = experiment.loss_function
    for inputs, targets, key in itertools.islice(training.epoch(0), 2):
        closure = make_batch_closure(
            experiment.network, loss_function, inputs, targets, experiment.device, batches=training, key=key
        )
        experiment.optimizer.step(closure)
    saved = experiment.optimizer.state_dict()
    pending = [value for value in _values(saved) if isinstance(value, dict) and "cpu_rng_state" in value]
    assert [state["key"] for state in pending] == [(0, 0), (0, 1)]
    assert not any("inputs" in state for state in pending)


def _values(state):
    """Every dict and list inside a nested state, depth first."""
    for value in state.values() if isinstance(state, dict) else state:
        if isinstance(value, (dict, list)):
            yield value
            yield from _values(value)
