"""A run's sections as frozen, typed settings: what the code outside the configuration reads of it.

``configuration.settings`` (``RunSettings.of``) types a validated configuration's sections; the
code that builds, trains, launches and plots runs reads their fields, never the raw sections. Messages still name keys through the
``Configuration`` (``where``, ``blame``). ``MACHINE_CHOICES`` lists the keys whose "auto" the
machine resolves when a run is built; the run folder's configuration.txt records the choice.
"""

from dataclasses import dataclass, fields
from types import MappingProxyType

__all__ = [
    "AUTOMATIC",
    "MACHINE_CHOICES",
    "DataSettings",
    "ExperimentSettings",
    "LoggingSettings",
    "ModelSettings",
    "OptimizerSettings",
    "RunSettings",
    "ScheduleSettings",
    "TrainingSettings",
]

AUTOMATIC = "auto"
"""The value that leaves a choice to the machine or the data."""

PRESET = "preset"
"""The [data] value that takes the data set's own."""

MACHINE_CHOICES = frozenset({("data", "pipeline"), ("experiment", "channels_last")})
"""Keys whose "auto" is resolved for the machine and recorded: on resume "auto" keeps the recorded value."""


class _Section:
    """Build a settings class from its section of a validated configuration, key by field name."""

    @classmethod
    def of_section(cls, section):
        return cls(**{field.name: section[field.name] for field in fields(cls)})


@dataclass(frozen=True)
class ExperimentSettings(_Section):
    name: str
    seed: int
    device: str
    cpu_threads: int | str
    runs_folder: str
    label: str
    channels_last: str
    autocast: str
    compile: bool
    distributed_timeout_seconds: int


@dataclass(frozen=True)
class DataSettings(_Section):
    name: str
    root: str
    download: bool
    train_size: int | str
    split_seed: int
    augment: bool
    crop_padding: int | str
    image_size: int | str
    normalization: str
    pipeline: str
    num_workers: int | str

    def dataset_arguments(self):
        """The keyword arguments of ``source.data.build_datasets`` besides name and root; "preset" is None."""
        skipped = ("name", "root", "num_workers", "pipeline")
        return {
            field.name: (None if getattr(self, field.name) == PRESET else getattr(self, field.name))
            for field in fields(self)
            if field.name not in skipped
        }


@dataclass(frozen=True)
class ModelSettings(_Section):
    name: str


@dataclass(frozen=True)
class OptimizerSettings(_Section):
    """An optimizer by registry name and the user's keyword arguments (read-only)."""

    name: str
    arguments: MappingProxyType

    @classmethod
    def of_section(cls, section):
        return cls(name=section["name"], arguments=MappingProxyType(dict(section["arguments"])))


@dataclass(frozen=True)
class ScheduleSettings(OptimizerSettings):
    """A learning-rate schedule by name ("none": none) and its keyword arguments (read-only)."""


@dataclass(frozen=True)
class TrainingSettings(_Section):
    training_steps: int
    batch_size: int
    loss: str
    evaluation_batch_size: int
    evaluate_every_steps: int | str
    divergence_steps: int
    divergence_loss_factor: float
    sync_batchnorm: bool


@dataclass(frozen=True)
class LoggingSettings(_Section):
    tensorboard: bool
    progress_bar: bool
    log_every_steps: int
    plots_folder: str


@dataclass(frozen=True)
class RunSettings:
    """The sections of one run (the configspec's meaning of each key)."""

    experiment: ExperimentSettings
    data: DataSettings
    model: ModelSettings
    optimizer: OptimizerSettings | None
    schedule: ScheduleSettings | None
    training: TrainingSettings
    logging: LoggingSettings

    @classmethod
    def of(cls, configuration):
        """The settings of ``configuration``, validated; a comparison has no optimizer or schedule (None)."""
        return cls(**{name: kind.of_section(configuration[name]) if name in configuration.sections else None
                      for name, kind in _SECTION_KINDS.items()})


_SECTION_KINDS = {
    "experiment": ExperimentSettings,
    "data": DataSettings,
    "model": ModelSettings,
    "optimizer": OptimizerSettings,
    "schedule": ScheduleSettings,
    "training": TrainingSettings,
    "logging": LoggingSettings,
}
