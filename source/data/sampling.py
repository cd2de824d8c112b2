"""Each epoch's order and augmentation parameters, as pure functions of (seed, epoch).

An epoch plan lists the training split in the epoch's order and gives each position the random
numbers its sample is augmented with: crop offsets and a flip for small images, a seed for the
per-sample transforms of large images. Both data pipelines (pipelines.py) read the same plan, so
they produce the same batches, and a resumed run that starts at (epoch, batch) sees exactly the
batches an uninterrupted run would have seen, whatever the number of loader workers or processes.
"""

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["EpochPlan", "batch_positions", "batches_per_epoch", "epoch_plan", "epoch_seed", "share_of"]

_SEED_BOUND = 2**63 - 1


def epoch_seed(seed, epoch):
    """A 63-bit seed that mixes the experiment seed and the epoch (numpy's SeedSequence hash)."""
    high, low = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    return (int(high) << 31 ^ int(low)) & _SEED_BOUND


@dataclass(frozen=True)
class EpochPlan:
    """One epoch of a training split, position by position, on the CPU.

    ``indices[p]`` is the split position of the p-th sample of the epoch; ``sample_seeds[p]`` seeds
    its per-sample random transforms (large images); ``offsets[p]`` are its crop's (row, column) in
    the padded image and ``flips[p]`` whether it is mirrored (small images).
    """

    indices: torch.Tensor
    sample_seeds: torch.Tensor
    offsets: torch.Tensor
    flips: torch.Tensor

    def to(self, device):
        """The plan with its tensors on ``device``."""
        return EpochPlan(*(getattr(self, name).to(device, non_blocking=True) for name in self.__dataclass_fields__))

    def rows(self, positions):
        """The plan restricted to ``positions``."""
        return EpochPlan(*(getattr(self, name)[positions] for name in self.__dataclass_fields__))


def epoch_plan(size, seed, epoch, crop_padding):
    """The plan of epoch ``epoch`` of a split of ``size`` samples, crops drawn in [0, 2 crop_padding]."""
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    indices = torch.randperm(size, generator=generator)
    sample_seeds = torch.randint(_SEED_BOUND, (size,), generator=generator)
    offsets = torch.randint(2 * crop_padding + 1, (size, 2), generator=generator)
    flips = torch.randint(2, (size,), generator=generator).bool()
    return EpochPlan(indices, sample_seeds, offsets, flips)


def share_of(count, rank, world_size):
    """Process ``rank``'s contiguous share of ``count`` items: every item once, sizes differ by at most 1."""
    return range(count * rank // world_size, count * (rank + 1) // world_size)


def batches_per_epoch(size, batch_size):
    """Batches, and so training steps, in one epoch of a split of ``size`` samples: full batches of
    ``batch_size`` only, so every step sees a batch of that size; the samples left over are not
    seen in that epoch."""
    return size // batch_size


def batch_positions(batch, batch_size, rank=0, world_size=1):
    """Epoch positions of process ``rank``'s part of global batch number ``batch`` (of ``batch_size``)."""
    share = share_of(batch_size, rank, world_size)
    start = batch * batch_size
    return range(start + share.start, start + share.stop)
