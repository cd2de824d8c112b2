"""Training data order and augmentation randomness as pure functions of (seed, epoch, position).

The sampler draws each epoch's permutation, and one random seed per position, from a generator
seeded with (seed, epoch). The training set is wrapped so that every sample's transforms run
with torch's and Python's generators seeded from that sample seed. So the batches of an epoch,
augmentation included, do not depend on what ran before, on the number of loader workers, or on
whether the run was resumed: a resumed run sets the sampler to the epoch and position it stopped
at and sees exactly the batches an uninterrupted run would have seen.
"""

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["EpochShuffleSampler", "SeededSamples", "evaluation_loader", "training_loader"]

_SEED_BOUND = 2**63 - 1


def epoch_seed(seed, epoch):
    """A 63-bit seed that mixes the experiment seed and the epoch (numpy's SeedSequence hash)."""
    high, low = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    return (int(high) << 31 ^ int(low)) & _SEED_BOUND


class EpochShuffleSampler(Sampler):
    """Yields (index, sample_seed) pairs: epoch ``epoch``'s permutation, from ``start`` on.

    Call ``set_position(epoch, start)`` before iterating; a DataLoader with ``drop_last`` then
    yields the remaining full batches of that epoch.
    """

    def __init__(self, dataset_size, seed):
        self.dataset_size = dataset_size
        self.seed = seed
        self.epoch = 0
        self.start = 0

    def set_position(self, epoch, start=0):
        """Iterate epoch ``epoch`` from sample position ``start`` (a multiple of the batch size)."""
        self.epoch = epoch
        self.start = start

    def __len__(self):
        return self.dataset_size - self.start

    def __iter__(self):
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(self.dataset_size, generator=generator)
        sample_seeds = torch.randint(_SEED_BOUND, (self.dataset_size,), generator=generator)
        return zip(order[self.start :].tolist(), sample_seeds[self.start :].tolist())


class SeededSamples(Dataset):
    """``dataset`` indexed by (index, sample_seed): transforms run with generators seeded by it.

    The caller's torch CPU and Python generator states are restored afterwards, so loading data
    in the main process (num_workers = 0) leaves the training randomness (dropout, ...) alone.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys):
        """Load one batch's samples; the DataLoader calls this once per batch."""
        torch_state, python_state = torch.get_rng_state(), random.getstate()
        try:
            samples = []
            for index, sample_seed in keys:
                torch.default_generator.manual_seed(sample_seed)
                random.seed(sample_seed)
                samples.append(self.dataset[index])
            return samples
        finally:
            torch.set_rng_state(torch_state)
            random.setstate(python_state)


def _loader_options(num_workers, pin_memory):
    # The loader draws a base seed for its workers when an iteration starts; its own generator
    # keeps that draw out of the global one, which would otherwise shift with every iteration.
    return dict(
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(0),
    )


def training_loader(dataset, batch_size, seed, *, num_workers, pin_memory):
    """A loader of full training batches; returns (loader, sampler) — position it with the sampler."""
    sampler = EpochShuffleSampler(len(dataset), seed)
    loader = DataLoader(
        SeededSamples(dataset),
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        **_loader_options(num_workers, pin_memory),
    )
    return loader, sampler


def evaluation_loader(dataset, batch_size, *, num_workers, pin_memory):
    """A loader over ``dataset`` in its order, every sample once."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, **_loader_options(num_workers, pin_memory))
