"""Build an experiment from a validated configuration: device, data, model, loss, optimizer, schedule.

Every ``UserError`` raised while building names the configuration file and the key it comes from.
"""

import random
from dataclasses import dataclass

import numpy as np
import torch

from source.data import build_datasets
from source.errors import UserError
from source.models import build_model
from source.optimizer import LineSearch, build_optimizer
from source.training.losses import choose_loss
from source.training.schedules import build_schedule

__all__ = ["Experiment", "build_experiment", "resolve_device", "seed_generators"]

_PRESET = "preset"
_AUTOMATIC = "auto"
_ONE_EPOCH = "epoch"


@dataclass
class Experiment:
    """Everything a training run needs, built and placed on its device."""

    configuration: object
    device: torch.device
    splits: object
    model: torch.nn.Module
    loss_function: object
    optimizer: torch.optim.Optimizer
    schedule: object
    steps_per_epoch: int
    evaluate_every_steps: int

    @property
    def is_line_search(self):
        """Whether the optimizer evaluates the batches itself through closures (``LineSearch``)."""
        return isinstance(self.optimizer, LineSearch)


def resolve_device(name):
    """The torch device for the [experiment] device key: auto picks CUDA when present."""
    if name == _AUTOMATIC:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{name} asked for, but this machine has no CUDA device; use cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"{name} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def seed_generators(seed):
    """Seed torch (CPU and CUDA), Python's and numpy's global generators."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _dataset_arguments(data):
    """The build_datasets keyword arguments of the [data] section; "preset" means None there."""
    return {
        key: (None if value == _PRESET else value)
        for key, value in data.items()
        if key not in ("name", "root", "num_workers")
    }


def build_experiment(configuration):
    """Build the data splits, model, loss, optimizer and schedule that ``configuration`` describes.

    The model is initialised after seeding with [experiment] seed, so a seed gives one model.
    """
    with configuration.blame("experiment", "device"):
        device = resolve_device(configuration["experiment"]["device"])
    cpu_threads = configuration["experiment"]["cpu_threads"]
    if cpu_threads != _AUTOMATIC:
        torch.set_num_threads(cpu_threads)
    seed_generators(configuration["experiment"]["seed"])
    data = configuration["data"]
    with configuration.blame("data"):
        splits = build_datasets(data["name"], data["root"], **_dataset_arguments(data))
    training = configuration["training"]
    steps_per_epoch = len(splits.train) // training["batch_size"]
    if steps_per_epoch == 0:
        raise UserError(
            f"{configuration.where('training', 'batch_size')}: {training['batch_size']} exceeds the "
            f"{len(splits.train)} training samples"
        )
    with configuration.blame("model", "name"):
        model = build_model(configuration["model"]["name"], splits.num_classes, splits.input_shape).to(device)
    with configuration.blame("training", "loss"):
        loss_function = choose_loss(training["loss"], splits.task)
    optimizer_section = configuration["optimizer"]
    with configuration.blame("optimizer"):
        optimizer = build_optimizer(
            optimizer_section["name"],
            model,
            dict(optimizer_section["arguments"]),
            training_set_size=len(splits.train),
            inference_batch_size=training["batch_size"],
        )
    schedule_section = configuration["schedule"]
    with configuration.blame("schedule"):
        schedule = build_schedule(
            schedule_section["name"], optimizer, dict(schedule_section["arguments"]), training["training_steps"]
        )
    evaluate_every_steps = training["evaluate_every_steps"]
    return Experiment(
        configuration=configuration,
        device=device,
        splits=splits,
        model=model,
        loss_function=loss_function,
        optimizer=optimizer,
        schedule=schedule,
        steps_per_epoch=steps_per_epoch,
        evaluate_every_steps=steps_per_epoch if evaluate_every_steps == _ONE_EPOCH else evaluate_every_steps,
    )
