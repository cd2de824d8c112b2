"""Experiment configuration: configobj file + ``--set`` overrides, validated by configspec.ini."""

from source.configuration.loading import (
    SPECIFICATION_PATH,
    Configuration,
    differing_keys,
    format_configuration,
    key_label,
    load_configuration,
    section_label,
)

__all__ = [
    "SPECIFICATION_PATH",
    "Configuration",
    "differing_keys",
    "format_configuration",
    "key_label",
    "load_configuration",
    "section_label",
]
