"""A comparison's entries and the run configuration of each entry and seed.

A comparison configuration is an ordinary configuration with a [comparison] section instead of
[optimizer] and [schedule]: ``seeds``, and one subsection per entry, ``[[<entry id>]]`` with
``label``, ``optimizer``, ``[[[arguments]]]``, ``schedule`` and ``[[[schedule_arguments]]]``.
Each entry and seed trains as an ordinary run whose configuration is the comparison's with the
entry's optimizer and schedule, the seed, ``[experiment] label`` = the entry's label, and the run
folder ``<runs_folder>/<experiment name>/<entry id>/seed_<seed>/``.
"""

import copy
import re
from dataclasses import dataclass
from pathlib import Path

from source.configuration import COMPARISON, Configuration, key_label, section_label
from source.errors import UserError
from source.training import RunFolder, build_experiment

__all__ = ["Comparison", "Entry", "EntryRunConfiguration", "read_comparison", "run_name"]

_ENTRY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_ENTRY_KEYS = ("label", "optimizer", "arguments", "schedule", "schedule_arguments")


def run_name(seed):
    """The experiment name, and folder name, of an entry's run with ``seed``."""
    return f"seed_{seed}"


@dataclass(frozen=True)
class Entry:
    """One optimizer of a comparison, with its arguments, schedule and legend label."""

    id: str
    label: str
    optimizer: str
    arguments: dict
    schedule: str
    schedule_arguments: dict


@dataclass(frozen=True)
class EntryRunConfiguration(Configuration):
    """The configuration of one entry's run: messages about its optimizer, schedule and seed name
    the [comparison] keys they come from, not [optimizer], [schedule] and [experiment] seed."""

    entry_id: str = ""

    def where(self, section, key=None):
        entry = (COMPARISON, self.entry_id)
        if section == "optimizer":
            label = key_label(entry, "optimizer") if key == "name" else section_label(entry)
        elif section == "schedule":
            label = key_label(entry, "schedule") if key == "name" else section_label(entry)
        elif (section, key) == ("experiment", "seed"):
            label = key_label((COMPARISON,), "seeds")
        else:
            return super().where(section, key)
        return f"{self.source}: {label}"


@dataclass(frozen=True)
class Comparison:
    """A validated comparison configuration: its entries (in file order) and seeds."""

    configuration: Configuration
    entries: tuple
    seeds: tuple

    @property
    def folder(self):
        """The comparison folder: <runs_folder>/<experiment name>."""
        experiment = self.configuration["experiment"]
        return Path(experiment["runs_folder"]) / experiment["name"]

    def run_configuration(self, entry, seed):
        """The configuration of ``entry``'s run with ``seed``, as an ordinary run would have it."""
        sections = copy.deepcopy(self.configuration.sections)
        del sections[COMPARISON]
        sections["experiment"].update(
            name=run_name(seed), seed=seed, runs_folder=str(self.folder / entry.id), label=entry.label
        )
        entry_sections = {
            "optimizer": {"name": entry.optimizer, "arguments": copy.deepcopy(entry.arguments)},
            "schedule": {"name": entry.schedule, "arguments": copy.deepcopy(entry.schedule_arguments)},
        }
        # In the configspec's order: the entry's sections where a run has them, after [model].
        ordered = {}
        for name, section in sections.items():
            ordered[name] = section
            if name == "model":
                ordered.update(entry_sections)
        return EntryRunConfiguration(sections=ordered, source=self.configuration.source, entry_id=entry.id)

    def run_folder(self, entry, seed):
        """The run folder of ``entry``'s run with ``seed``."""
        return RunFolder.of(self.run_configuration(entry, seed))

    def runs(self):
        """(entry, seed) pairs in the order they train: entry by entry, each with every seed."""
        return [(entry, seed) for entry in self.entries for seed in self.seeds]

    def check_entries_build(self):
        """Build every entry's experiment (data, model, optimizer, schedule) once, training nothing.

        Raises ``UserError`` naming the entry's key for an optimizer or schedule that its class
        refuses on the real model, before any run starts.
        """
        for entry in self.entries:
            build_experiment(self.run_configuration(entry, self.seeds[0]))


def read_comparison(configuration):
    """The ``Comparison`` a configuration with a [comparison] section describes.

    Raises ``UserError`` for a comparison without entries, an entry id that is not a plain folder
    name, and two entries with the same label.
    """
    section = configuration[COMPARISON]
    where = configuration.where(COMPARISON)
    names = [name for name in section if isinstance(section[name], dict)]
    if not names:
        raise UserError(
            f"{where} has no entries; add one subsection per optimizer, e.g. "
            f"{section_label((COMPARISON, 'sgd'))} with label = SGD and optimizer = sgd"
        )
    entries, labels = [], {}
    for name in names:
        if not _ENTRY_ID.fullmatch(name):
            raise UserError(
                f"{where}: entry {section_label((COMPARISON, name))}: its id names the entry's folder; "
                "use letters, digits, '_' and '-' only, starting with a letter or digit"
            )
        values = section[name]
        if values["label"] in labels:
            raise UserError(
                f"{configuration.source}: {key_label((COMPARISON, name), 'label')} = {values['label']!r} is the "
                f"label of {section_label((COMPARISON, labels[values['label']]))} too; give each entry its own label"
            )
        labels[values["label"]] = name
        entries.append(Entry(name, *(values[key] for key in _ENTRY_KEYS)))
    seeds = tuple(section["seeds"]) or (configuration["experiment"]["seed"],)
    return Comparison(configuration=configuration, entries=tuple(entries), seeds=seeds)
