"""Build an experiment from a validated configuration: device, data pipelines, model, loss, optimizer,
schedule, the stepper that trains with them, and the training loop's settings.

The configuration is read once, as typed ``RunSettings``; every ``UserError`` raised while
building names the configuration file and the key it comes from. The choices "auto" leaves to
the machine (``MACHINE_CHOICES``: data.pipeline, experiment.channels_last) are resolved here and
returned in ``Experiment.resolved``, for the runner to record in the run folder's configuration.txt,
so that a resumed run keeps them.
"""

import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from source.configuration.settings import AUTOMATIC, RunSettings
from source.data import batches_per_epoch, build_datasets, build_pipelines
from source.errors import UserError
from source.models import build_model
from source.optimizer import build_optimizer
from source.optimizer.schedules import build_schedule
from source.optimizer.steppers import Stepper, stepper_kind
from source.training.losses import choose_loss
from source.training.distributed import Distributed, check_batch_size, process_device

__all__ = [
    "Experiment",
    "LoopSettings",
    "build_experiment",
    "build_optimizer_and_schedule",
    "seed_generators",
    "single_process",
]

_ONE_EPOCH = "epoch"
_ON = "true"
_OFF = "false"
_BFLOAT16 = "bfloat16"


@dataclass(frozen=True)
class LoopSettings:
    """What the training loop takes from the configuration, resolved.

    ``divergence_loss_factor`` is None when the blow-up test is off; ``autocast`` is the dtype
    forward passes run in under ``torch.autocast`` (None: full precision).
    """

    training_steps: int
    batch_size: int
    evaluate_every_steps: int
    log_every_steps: int
    divergence_steps: int
    divergence_loss_factor: float | None
    tensorboard: bool
    progress_bar: bool
    autocast: torch.dtype | None


@dataclass
class Experiment:
    """Everything a training run needs, built and placed on its device.

    ``model`` is the module whose state is saved; ``network`` is what forward passes call: the
    model itself, its DistributedDataParallel wrapper (optimizers whose gradients it averages, in
    several processes), or the ``torch.compile`` wrapper of either. ``stepper`` performs the
    training steps of ``optimizer`` and ``schedule``. ``data`` holds this process's training,
    validation and test batches (source.data.DataPipelines); ``distributed`` its place among the
    run's processes. ``resolved`` maps the ``MACHINE_CHOICES`` keys to what "auto" became (and the
    others to their given values).
    """

    configuration: object
    distributed: Distributed
    device: torch.device
    splits: object
    data: object
    model: torch.nn.Module
    network: object
    loss_function: object
    optimizer: torch.optim.Optimizer
    schedule: object
    stepper: Stepper
    steps_per_epoch: int
    settings: LoopSettings
    resolved: dict


def single_process(configuration):
    """The context of a run in this one process, on the device [experiment] device names."""
    with configuration.blame("experiment", "device"):
        return Distributed.single(process_device(configuration.settings.experiment.device, 0, 1))


def seed_generators(seed):
    """Seed torch (CPU and CUDA), Python's and numpy's global generators."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _resolve_channels_last(configuration, choice, device, splits):
    """experiment.channels_last ``choice`` resolved: "auto" is on for image models on CUDA, where
    convolutions gain from it.

    It depends on the device and the data only, never on the optimizer, so every run of a comparison
    gets the same memory format (which changes results by rounding only).
    """
    if choice == AUTOMATIC:
        choice = _ON if device.type == "cuda" and len(splits.input_shape) == 3 else _OFF
    elif choice == _ON and len(splits.input_shape) != 3:
        raise UserError(
            f"{configuration.where('experiment', 'channels_last')}: true needs images, but {splits.name} has "
            f"inputs of shape {splits.input_shape}; set it to false or auto"
        )
    return choice


def _autocast_dtype(choice):
    """experiment.autocast as a dtype (None: float32). It is never chosen per optimizer, so every run
    of a comparison computes in the same precision."""
    return torch.bfloat16 if choice == _BFLOAT16 else None


def _network(configuration, model, optimizer, distributed):
    """What forward passes call: DDP in several processes where it averages the optimizer's
    gradients, compiled when experiment.compile is true."""
    kind = stepper_kind(optimizer)
    network = model
    if distributed.is_distributed and kind.averages_gradients_through_network:
        device_ids = [distributed.device] if distributed.device.type == "cuda" else None
        # Per-process BatchNorm statistics, as the issue of plain DDP; averaged before evaluations.
        network = DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
    settings = configuration.settings
    if not settings.experiment.compile:
        return network
    if not kind.supports_compiled_model(optimizer):
        raise UserError(
            f"{configuration.where('experiment', 'compile')}: {settings.optimizer.name} computes "
            "per-sample gradients of the plain model, which a compiled model does not offer; set it to false"
        )
    return torch.compile(network)


def _synchronised_batchnorm(configuration, model, distributed):
    """The model with SyncBatchNorm when training.sync_batchnorm is true and there are several processes."""
    if not configuration.settings.training.sync_batchnorm or not distributed.is_distributed:
        return model
    if distributed.device.type != "cuda":
        raise UserError(
            f"{configuration.where('training', 'sync_batchnorm')}: SyncBatchNorm runs on GPUs only; "
            "set it to false for processes on CPUs"
        )
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def build_optimizer_and_schedule(configuration, model, training_set_size, process_group=None):
    """The optimizer and schedule (None for "none") that ``configuration`` gives ``model``.

    A refused argument raises ``UserError`` naming its key; the schedule is rehearsed for the
    whole run (source/optimizer/schedules.py).
    """
    settings = configuration.settings
    training = settings.training
    with configuration.blame("optimizer"):
        optimizer = build_optimizer(
            settings.optimizer.name,
            model,
            dict(settings.optimizer.arguments),
            training_set_size=training_set_size,
            inference_batch_size=training.batch_size,
            process_group=process_group,
            training_steps=training.training_steps,
        )
    with configuration.blame("schedule"):
        schedule = build_schedule(
            settings.schedule.name,
            optimizer,
            dict(settings.schedule.arguments),
            training.training_steps,
            follows_schedule=stepper_kind(optimizer).follows_schedule,
        )
    return optimizer, schedule


def build_experiment(configuration, distributed=None):
    """Build the data splits, model, loss, optimizer, schedule and stepper that ``configuration`` describes.

    The model is initialised after seeding with [experiment] seed, so a seed gives one model;
    in several processes (``distributed``) rank 0's initial weights are copied to the others.
    Without ``distributed`` the experiment runs in this one process on [experiment] device.
    ``configuration`` is not changed: what "auto" became is in the experiment's ``resolved``.
    """
    settings = configuration.settings
    distributed = distributed or single_process(configuration)
    device = distributed.device
    if settings.experiment.cpu_threads != AUTOMATIC:
        torch.set_num_threads(settings.experiment.cpu_threads)
    seed = settings.experiment.seed
    seed_generators(seed)
    data, training = settings.data, settings.training
    with configuration.blame("data"):
        splits = build_datasets(data.name, data.root, **data.dataset_arguments())
    with configuration.blame("training", "batch_size"):
        check_batch_size(training.batch_size, distributed.world_size)
    steps_per_epoch = batches_per_epoch(len(splits.train), training.batch_size)
    if steps_per_epoch == 0:
        raise UserError(
            f"{configuration.where('training', 'batch_size')}: {training.batch_size} exceeds the "
            f"{len(splits.train)} training samples"
        )
    channels_last = _resolve_channels_last(configuration, settings.experiment.channels_last, device, splits)
    memory_format = torch.channels_last if channels_last == _ON else torch.contiguous_format
    with configuration.blame("model", "name"):
        model = build_model(settings.model.name, splits.num_classes, splits.input_shape)
    model = _synchronised_batchnorm(configuration, model, distributed).to(device, memory_format=memory_format)
    distributed.broadcast_tensors([*model.parameters(), *model.buffers()])
    with configuration.blame("training", "loss"):
        loss_function = choose_loss(training.loss, splits.task)
    optimizer, schedule = build_optimizer_and_schedule(
        configuration, model, len(splits.train), process_group=dist.group.WORLD if distributed.is_distributed else None
    )
    network = _network(configuration, model, optimizer, distributed)
    # Last: the device pipeline copies the data to the device, which is wasted on a refused configuration.
    with configuration.blame("data", "pipeline"):
        pipelines = build_pipelines(
            splits,
            choice=data.pipeline,
            device=device,
            batch_size=training.batch_size,
            evaluation_batch_size=training.evaluation_batch_size,
            seed=seed,
            num_workers=data.num_workers,
            memory_format=memory_format,
            rank=distributed.rank,
            world_size=distributed.world_size,
            processes_on_node=distributed.local_world_size,
        )
    evaluate_every_steps = training.evaluate_every_steps
    loop_settings = LoopSettings(
        training_steps=training.training_steps,
        batch_size=training.batch_size,
        evaluate_every_steps=steps_per_epoch if evaluate_every_steps == _ONE_EPOCH else evaluate_every_steps,
        log_every_steps=settings.logging.log_every_steps,
        divergence_steps=training.divergence_steps,
        divergence_loss_factor=training.divergence_loss_factor or None,
        tensorboard=settings.logging.tensorboard,
        progress_bar=settings.logging.progress_bar,
        autocast=_autocast_dtype(settings.experiment.autocast),
    )
    stepper = stepper_kind(optimizer)(
        optimizer,
        schedule,
        network,
        loss_function,
        batch_size=training.batch_size,
        batches=pipelines.training,
        device=device,
        guard=distributed.guard,
    )
    return Experiment(
        configuration=configuration,
        distributed=distributed,
        device=device,
        splits=splits,
        data=pipelines,
        model=model,
        network=network,
        loss_function=loss_function,
        optimizer=optimizer,
        schedule=schedule,
        stepper=stepper,
        steps_per_epoch=steps_per_epoch,
        settings=loop_settings,
        resolved={("data", "pipeline"): pipelines.kind, ("experiment", "channels_last"): channels_last},
    )
