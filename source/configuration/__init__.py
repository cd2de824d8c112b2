"""Experiment configuration: configobj file + ``--set`` overrides, validated by configspec.ini."""

from source.configuration.loading import *  # noqa: F401,F403 — the package re-exports loading's API
from source.configuration.loading import __all__  # noqa: F401
