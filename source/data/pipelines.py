"""How batches reach the model: from a copy of the data set on the training device, or through a DataLoader.

- device: the stored splits (uint8 images, float features) are copied once to the training device
  (the GPU, or the CPU's memory); each batch is gathered there by index, cropped, flipped and
  normalised as a whole. No worker processes, no per-sample Python, no host-to-device copy of
  images during training.
- loader: a ``torch.utils.data.DataLoader`` loads and transforms sample by sample, in
  ``num_workers`` worker processes with pinned memory, persistent workers and prefetching.
  It is the path for data sets that do not fit in memory, such as ImageNet, and for the
  large-image pipeline (RandomResizedCrop), which the device path does not implement.

Both follow the epoch plans of sampling.py and give bitwise the same batches. A training batch is
named by its key (epoch, batch number): ``load(key)`` produces it again, so an optimizer that
replays batches (LABPAL) keeps keys instead of copies. With ``world_size`` processes each takes
its share of every global batch and of every evaluation split.
"""

import os
import sys
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from tqdm import tqdm

from source.data.sampling import EpochPlan, batch_positions, batches_per_epoch, epoch_plan, share_of
from source.data.splits import DataSplits, StoredSplit, TensorStore
from source.errors import UserError

__all__ = [
    "PIPELINE_CHOICES",
    "DataPipelines",
    "DeviceTrainingBatches",
    "LoaderTrainingBatches",
    "build_pipelines",
]

PIPELINE_CHOICES = ("auto", "device", "loader")

MEMORY_SHARE = 0.5
"""The share of the device's free memory that the device pipeline's data may take."""

_GPU_LOADER_WORKERS = 8
_PREFETCH_BATCHES = 4
_PLANS_KEPT = 2  # the current epoch's plan, and the last one's for batches replayed across the boundary


@dataclass
class DataPipelines:
    """The training batches and the validation and test batches of a run, and how they are made.

    ``kind`` is "device" or "loader"; ``note`` says why "auto" chose the loader (None otherwise).
    """

    kind: str
    training: object
    validation: object
    test: object
    note: str | None = None


def _placed(batch, device, memory_format):
    """(inputs, targets) on ``device``, the inputs in ``memory_format``."""
    inputs, targets = batch
    inputs = inputs.to(device, non_blocking=True, memory_format=memory_format)
    return inputs, targets.to(device, non_blocking=True)


class DeviceTrainingBatches:
    """Training batches gathered and augmented on the device from a split held there."""

    kind = "device"

    def __init__(self, split, *, batch_size, seed, rank=0, world_size=1, memory_format=torch.contiguous_format):
        self.split = split
        self.memory_format = memory_format
        self.batch_size = batch_size
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = batches_per_epoch(len(split), batch_size)
        self._plans = {}

    def epoch(self, epoch, first_batch=0):
        """This process's batches of ``epoch`` from batch ``first_batch`` on: (inputs, targets, key)."""
        for batch in range(first_batch, self.steps_per_epoch):
            key = (epoch, batch)
            yield *self.load(key), key

    def load(self, key):
        """The batch ``key`` names, (inputs, targets) on the device."""
        epoch, batch = key
        positions = batch_positions(batch, self.batch_size, self.rank, self.world_size)
        plan = self._plan(epoch)
        rows = slice(positions.start, positions.stop)
        batch = self.split.batch(plan.indices[rows], plan.offsets[rows], plan.flips[rows])
        return _placed(batch, self.split.indices.device, self.memory_format)

    def _plan(self, epoch) -> EpochPlan:
        # Drawn on the CPU, so every device gets the same numbers, and copied over once per epoch.
        if epoch not in self._plans:
            if len(self._plans) == _PLANS_KEPT:
                del self._plans[min(self._plans)]
            device = self.split.indices.device
            self._plans[epoch] = epoch_plan(len(self.split), self.seed, epoch, _crop_padding(self.split)).to(device)
        return self._plans[epoch]


class _PlannedSamples(Dataset):
    """A split whose items are asked for by epoch-plan keys; one call loads one batch's samples."""

    def __init__(self, split):
        self.split = split

    def __len__(self):
        return len(self.split)

    def __getitem__(self, key):
        return self.split.training_sample(key)

    def __getitems__(self, keys):
        return [self.split.training_sample(key) for key in keys]


class _PlanBatchSampler(Sampler):
    """Yields the sample keys of this process's batches of one epoch, from a given batch on."""

    def __init__(self, batches):
        self.batches = batches
        self.epoch, self.first_batch = 0, 0

    def __len__(self):
        return self.batches.steps_per_epoch - self.first_batch

    def __iter__(self):
        plan = self.batches.plan(self.epoch)
        for batch in range(self.first_batch, self.batches.steps_per_epoch):
            yield self.batches.sample_keys(plan, batch)


class LoaderTrainingBatches:
    """Training batches loaded sample by sample by a DataLoader, then moved to the device."""

    kind = "loader"

    def __init__(
        self,
        split,
        *,
        batch_size,
        seed,
        device,
        num_workers,
        rank=0,
        world_size=1,
        memory_format=torch.contiguous_format,
    ):
        self.split = split
        self.memory_format = memory_format
        self.batch_size = batch_size
        self.seed = seed
        self.device = device
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = batches_per_epoch(len(split), batch_size)
        self.samples = _PlannedSamples(split)
        self.sampler = _PlanBatchSampler(self)
        self.loader = DataLoader(self.samples, batch_sampler=self.sampler, **_loader_options(num_workers, device))
        self._last_loaded = None

    def plan(self, epoch) -> EpochPlan:
        """The plan of ``epoch``, on the CPU."""
        return epoch_plan(len(self.split), self.seed, epoch, _crop_padding(self.split))

    def sample_keys(self, plan, batch):
        """The keys of this process's samples of batch ``batch`` of ``plan``."""
        positions = batch_positions(batch, self.batch_size, self.rank, self.world_size)
        rows = plan.rows(slice(positions.start, positions.stop))
        return list(
            zip(
                rows.indices.tolist(),
                rows.sample_seeds.tolist(),
                rows.offsets[:, 0].tolist(),
                rows.offsets[:, 1].tolist(),
                rows.flips.tolist(),
            )
        )

    def epoch(self, epoch, first_batch=0):
        """This process's batches of ``epoch`` from batch ``first_batch`` on: (inputs, targets, key)."""
        self.sampler.epoch, self.sampler.first_batch = epoch, first_batch
        for batch, loaded in enumerate(self.loader, start=first_batch):
            yield *_placed(loaded, self.device, self.memory_format), (epoch, batch)

    def load(self, key):
        """The batch ``key`` names, loaded again in this process, (inputs, targets) on the device.

        The last batch loaded is kept: a replaying optimizer evaluates one batch several times in a row.
        """
        if self._last_loaded is None or self._last_loaded[0] != key:
            epoch, batch = key
            samples = self.samples.__getitems__(self.sample_keys(self.plan(epoch), batch))
            loaded = _placed(torch.utils.data.default_collate(samples), self.device, self.memory_format)
            self._last_loaded = (key, loaded)
        return self._last_loaded[1]


class _DeviceEvaluationBatches:
    """This process's share of a split held on the device, in order, in batches."""

    def __init__(self, split, batch_size, share, memory_format):
        self.split = split
        self.batch_size = batch_size
        self.share = share
        self.memory_format = memory_format

    def __iter__(self):
        device = self.split.indices.device
        for start in range(self.share.start, self.share.stop, self.batch_size):
            stop = min(start + self.batch_size, self.share.stop)
            yield _placed(self.split.batch(torch.arange(start, stop, device=device)), device, self.memory_format)


class _LoaderEvaluationBatches:
    """This process's share of a split through a DataLoader, in order, moved to the device."""

    def __init__(self, split, batch_size, share, device, num_workers, memory_format):
        self.device = device
        self.memory_format = memory_format
        self.loader = DataLoader(
            Subset(split, share), batch_size=batch_size, shuffle=False, **_loader_options(num_workers, device)
        )

    def __iter__(self):
        for batch in self.loader:
            yield _placed(batch, self.device, self.memory_format)


def _crop_padding(split):
    augmentation = getattr(split, "augmentation", None)
    return augmentation.padding if augmentation is not None else 0


def _loader_options(num_workers, device):
    options = dict(
        num_workers=num_workers,
        # Pinned host memory makes the copies to the GPU asynchronous.
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
        # The loader draws a base seed for its workers when an iteration starts; its own generator
        # keeps that draw out of the global one, which would otherwise shift with every iteration.
        generator=torch.Generator().manual_seed(0),
    )
    if num_workers > 0:
        options["prefetch_factor"] = _PREFETCH_BATCHES
    return options


def loader_workers(num_workers, device, processes_on_node=1):
    """``num_workers`` resolved: "auto" is 0 on the CPU (the workers would take the model's cores)
    and up to 8 per process on a GPU."""
    if num_workers != "auto":
        return num_workers
    if device.type != "cuda":
        return 0
    return max(1, min(_GPU_LOADER_WORKERS, (os.cpu_count() or 1) // processes_on_node - 1))


def _stores(splits):
    """The distinct sample stores under the splits (training and validation share one)."""
    stores = {}
    for split in (splits.train, splits.validation, splits.test):
        stores.setdefault(id(split.store), split.store)
    return list(stores.values())


def free_memory(device):
    """Bytes free on ``device``: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _device_path_refusal(splits, device):
    """Why the device pipeline cannot take ``splits`` onto ``device`` (None: it can)."""
    if not all(isinstance(split, StoredSplit) for split in (splits.train, splits.validation, splits.test)):
        return "the large-image pipeline (image_size above 64, RandomResizedCrop) is loaded sample by sample"
    needed = sum(len(store) * store.bytes_per_sample for store in _stores(splits))
    available = free_memory(device)
    if needed > MEMORY_SHARE * available:
        return (
            f"the data need {needed / 2**30:.2f} GiB, more than {MEMORY_SHARE:.0%} of the "
            f"{available / 2**30:.2f} GiB free on {device}"
        )
    return None


def _to_device(store, device):
    """``store`` as a TensorStore on ``device``; image files are read once, showing progress."""
    if isinstance(store, TensorStore):
        return store.to(device)
    chunks, targets = [], []
    indices = torch.arange(len(store))
    with tqdm(total=len(store), unit="image", desc="reading images", disable=not sys.stderr.isatty()) as bar:
        for chunk in indices.split(1024):
            inputs, chunk_targets = store.gather(chunk)
            chunks.append(inputs)
            targets.append(chunk_targets)
            bar.update(len(chunk))
    return TensorStore(torch.cat(chunks), torch.cat(targets)).to(device)


def build_pipelines(
    splits: DataSplits,
    *,
    choice,
    device,
    batch_size,
    evaluation_batch_size,
    seed,
    num_workers,
    rank=0,
    world_size=1,
    processes_on_node=1,
    memory_format=torch.contiguous_format,
):
    """The training, validation and test batches of ``splits`` for the pipeline ``choice``.

    The batches come on ``device``, inputs in ``memory_format``; with ``world_size`` processes, this
    process's (``rank``) share of them.

    "auto" takes the device path when the data fit there; "device" asks for it and falls back to
    the loader with a note only where the device path does not implement the pipeline; a
    device path that does not fit raises ``UserError``.
    """
    if choice not in PIPELINE_CHOICES:
        raise UserError(f"unknown data pipeline {choice!r}; set data.pipeline to one of: {', '.join(PIPELINE_CHOICES)}")
    refusal = None if choice == "loader" else _device_path_refusal(splits, device)
    if choice == "device" and refusal is not None and isinstance(splits.train, StoredSplit):
        raise UserError(f"the device pipeline cannot hold {splits.name}: {refusal}; set data.pipeline = loader")
    validation_share = share_of(len(splits.validation), rank, world_size)
    test_share = share_of(len(splits.test), rank, world_size)
    if choice != "loader" and refusal is None:
        on_device = {id(store): _to_device(store, device) for store in _stores(splits)}
        train, validation, test = (
            split.on(on_device[id(split.store)]) for split in (splits.train, splits.validation, splits.test)
        )
        return DataPipelines(
            kind="device",
            training=DeviceTrainingBatches(
                train, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size, memory_format=memory_format
            ),
            validation=_DeviceEvaluationBatches(validation, evaluation_batch_size, validation_share, memory_format),
            test=_DeviceEvaluationBatches(test, evaluation_batch_size, test_share, memory_format),
        )
    workers = loader_workers(num_workers, device, processes_on_node)
    return DataPipelines(
        kind="loader",
        training=LoaderTrainingBatches(
            splits.train,
            batch_size=batch_size,
            seed=seed,
            device=device,
            num_workers=workers,
            rank=rank,
            world_size=world_size,
            memory_format=memory_format,
        ),
        validation=_LoaderEvaluationBatches(
            splits.validation, evaluation_batch_size, validation_share, device, workers, memory_format
        ),
        test=_LoaderEvaluationBatches(splits.test, evaluation_batch_size, test_share, device, workers, memory_format),
        note=None if refusal is None else f"data pipeline: loader, as {refusal}",
    )
