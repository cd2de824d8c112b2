"""LABPAL trained on a tiny problem by one process or by each rank of a process group, for test_lab_pal_distributed.

``train`` is the shared body: every process builds the same model and data from fixed seeds and takes
its equal share of each global batch (as the runner's ``training_shard`` does), evaluating the plain
model, not a DistributedDataParallel wrapper. The workers run it on the ranks of ``run_ranks``
(``tests/distributed_workers.py``); the tests run it in one process for comparison.
"""

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from source.optimizer.lab_pal import LabPal, make_batch_closure

SAMPLES = 64
FEATURES = 5
CLASSES = 3


def problem(dtype: torch.dtype):
    """The model (no BatchNorm) and the classification data, the same in every process."""
    generator = torch.Generator().manual_seed(7)
    inputs = torch.randn(SAMPLES, FEATURES, generator=generator, dtype=dtype)
    targets = torch.randint(0, CLASSES, (SAMPLES,), generator=generator)
    order = torch.randperm(SAMPLES, generator=generator)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, CLASSES)).to(dtype)
    return model, inputs[order], targets[order]


@contextlib.contextmanager
def counted_all_reduces(calls: list):
    """Record ``(numel, dtype)`` of every ``torch.distributed.all_reduce`` call into ``calls``."""
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append((tensor.numel(), str(tensor.dtype)))
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        yield
    finally:
        dist.all_reduce = original


def _counting_communication_hook(calls: list, bucket):
    """A DistributedDataParallel communication hook that records its gradient buckets and reduces nothing."""
    calls.append(bucket.buffer().numel())
    future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


def train(settings: dict, steps: int, global_batch: int, dtype_name: str = "float32", rank: int = 0,
          world_size: int = 1, process_group=None, state: dict | None = None, wrap: bool = False) -> dict:
    """``steps`` LABPAL steps on the global batches; what every rank must agree on, step by step.

    ``state`` ({"model": ..., "optimizer": ...}) resumes from a saved state, at its step count. With
    ``wrap`` the model is wrapped in DistributedDataParallel, as the runner does, and the closures
    evaluate its ``module``; ``record["ddp_buckets"]`` lists the gradient buckets DDP tried to reduce.
    """
    dtype = getattr(torch, dtype_name)
    model, inputs, targets = problem(dtype)
    ddp_buckets = []
    if wrap:
        wrapped = nn.parallel.DistributedDataParallel(model, process_group=process_group)
        wrapped.register_comm_hook(ddp_buckets, _counting_communication_hook)
        model = wrapped.module
    optimizer = LabPal(model.parameters(), buffers=model.buffers(), process_group=process_group, **settings)
    first_step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        first_step = state["optimizer"]["lab_pal"]["steps"]
    share = global_batch // world_size
    batches_per_epoch = SAMPLES // global_batch
    record = {"effective_learning_rates": [], "losses": [], "events": [], "collectives": [], "partial": []}
    for step in range(first_step, first_step + steps):
        start = (step % batches_per_epoch) * global_batch + rank * share
        closure = make_batch_closure(model, nn.functional.cross_entropy, inputs[start:start + share],
                                     targets[start:start + share])
        calls = []
        with counted_all_reduces(calls):
            loss = optimizer.step(closure)
        record["collectives"].append(calls)
        record["losses"].append(loss.item())
        rate = optimizer.effective_learning_rate
        record["effective_learning_rates"].append(None if rate is None else rate.item())
        record["events"].append(optimizer.take_events())
        record["partial"].append(optimizer.holds_partial_sums)
    record["ddp_buckets"] = ddp_buckets
    record["parameters"] = [p.detach().clone() for p in model.parameters()]
    record["log_values"] = optimizer.log_values()
    record["parameter_count"] = sum(p.numel() for p in model.parameters())
    record["state"] = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    return record


def lock_step(distributed, settings, steps, global_batch, dtype_name, wrap=False):
    """``train`` on this rank's shares, over the whole group."""
    return train(settings, steps, global_batch, dtype_name, distributed.rank, distributed.world_size,
                 dist.group.WORLD, wrap=wrap)


def resume_from_rank_0(distributed, settings, first_steps, more_steps, global_batch):
    """Train, then every rank resumes from rank 0's saved state and trains on; both records."""
    group = dist.group.WORLD
    rank, world_size = distributed.rank, distributed.world_size
    before = train(settings, first_steps, global_batch, "float32", rank, world_size, group)
    saved = distributed.broadcast_object(before["state"] if rank == 0 else None)
    resumed = train(settings, more_steps, global_batch, "float32", rank, world_size, group, state=saved)
    return {"before": before, "resumed": resumed}


def research_code_steps_refused(distributed):
    """The message of LabPal(research_code_steps=True) with the whole group; None if it was accepted."""
    try:
        LabPal([nn.Parameter(torch.zeros(2))], research_code_steps=True, process_group=dist.group.WORLD)
    except ValueError as error:
        return str(error)
    return None
