"""The registries a configuration chooses names from, handed to the configuration's checks.

The configuration package imports no registry, so that it stays below the models, data sets,
optimizers and schedules it configures; here the two meet, and the project's configurations are
loaded with their names checked against the registries.
"""

from source import configuration
from source.data import available_datasets
from source.models import available_models
from source.optimizer import available_optimizers
from source.optimizer.schedules import available_schedules

__all__ = ["REGISTRIES", "load_configuration"]

REGISTRIES = configuration.Registries(
    models=available_models,
    data_sets=available_datasets,
    optimizers=available_optimizers,
    schedules=available_schedules,
)
"""The models, data sets, optimizers and schedules a configuration may name."""


def load_configuration(path, overrides=()):
    """Read, override and validate the configuration file ``path`` (see ``source.configuration``),
    its names checked against ``REGISTRIES``."""
    return configuration.load_configuration(path, overrides, registries=REGISTRIES)
