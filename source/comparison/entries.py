"""A comparison's runs: the run configuration of each entry (or sweep point) and seed.

The entries, sweep points and seeds are read as ``source.records.comparison`` describes; here each
swept argument is checked against the optimizer and schedule that take it. Each entry and seed
trains as an ordinary run whose configuration is the comparison's with the entry's optimizer and
schedule, the seed, ``[experiment] label`` = the entry's label, and the run folder
``<runs_folder>/<experiment name>/<entry id>/seed_<seed>/``. ``Comparison.runs()`` lists them as
``ComparisonRun``s: the unit a launcher places (source/launcher/).
"""

import copy
from dataclasses import dataclass, field
from pathlib import Path

from source.configuration import COMPARISON, Configuration, key_label, section_label
from source.optimizer import accepted_arguments
from source.optimizer.schedules import accepted_schedule_arguments
from source.records.comparison import Entry, read_comparison_entries, run_name, value_text
from source.training import RunFolder, build_experiment, build_optimizer_and_schedule

__all__ = [
    "Comparison",
    "ComparisonRun",
    "EntryRunConfiguration",
    "read_comparison",
]

LAUNCHER = "launcher"
"""The section that says where a comparison's runs go; a run itself trains where it is started."""


@dataclass(frozen=True)
class EntryRunConfiguration(Configuration):
    """The configuration of one entry's run: messages about its optimizer, schedule and seed name
    the [comparison] keys they come from, not [optimizer], [schedule] and [experiment] seed."""

    entry_id: str = ""
    point: dict = field(default_factory=dict)

    def where_argument(self, section, argument):
        """An argument's key in the entry; a swept one's in its [[[sweep]]], with the point's value."""
        entry = (COMPARISON, self.entry_id)
        if argument in self.point:
            path = (*entry, "sweep")
            return f"{self.origin((*path, argument))}: {key_label(path, argument)} = {value_text(self.point[argument])}"
        subsection = "arguments" if section == "optimizer" else "schedule_arguments"
        return f"{self.origin((*entry, subsection, argument))}: {section_label(entry)}"

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
class ComparisonRun:
    """One run of a comparison: its entry and seed, its resolved configuration and its run folder.

    The configuration alone describes the run: written to the run folder's configuration.txt, it
    trains (and resumes) the run as an ordinary one.
    """

    entry: Entry
    seed: int
    configuration: EntryRunConfiguration
    folder: RunFolder

    @property
    def name(self):
        """How messages name the run: "sgd (SGD) seed 1"."""
        return f"{self.entry.id} ({self.entry.label}) seed {self.seed}"


@dataclass(frozen=True)
class Comparison:
    """A validated comparison configuration: its entries (in file order) and seeds."""

    configuration: Configuration
    entries: tuple
    seeds: tuple

    @property
    def folder(self):
        """The comparison folder: <runs_folder>/<experiment name>."""
        experiment = self.configuration.settings.experiment
        return Path(experiment.runs_folder) / experiment.name

    def run_configuration(self, entry, seed):
        """The configuration of ``entry``'s run with ``seed``, as an ordinary run would have it."""
        sections = copy.deepcopy(self.configuration.sections)
        del sections[COMPARISON]
        sections.pop(LAUNCHER, None)
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
        return EntryRunConfiguration(
            sections=ordered,
            source=self.configuration.source,
            overrides=self.configuration.overrides,
            entry_id=entry.entry_id,
            point=entry.point,
        )

    def runs(self):
        """The ``ComparisonRun``s in the order they train: entry by entry (a swept entry point by
        point), each with every seed."""
        runs = []
        for entry in self.entries:
            for point in entry.points():
                for seed in self.seeds:
                    configuration = self.run_configuration(point, seed)
                    runs.append(ComparisonRun(point, seed, configuration, RunFolder.of(configuration)))
        return runs

    def check_entries_build(self):
        """Build every entry's experiment (data, model, optimizer, schedule) once, training nothing;
        the other points of a swept entry build their optimizer and schedule on its model.

        Raises ``UserError`` naming the entry's key (a swept value: its [[[sweep]]] key) for an
        optimizer or schedule that its class refuses on the real model, before any run starts.
        """
        for entry in self.entries:
            first, *others = entry.points()
            experiment = build_experiment(self.run_configuration(first, self.seeds[0]))
            for point in others:
                configuration = self.run_configuration(point, self.seeds[0])
                build_optimizer_and_schedule(configuration, experiment.model, len(experiment.splits.train))


def read_comparison(configuration):
    """The ``Comparison`` a configuration with a [comparison] section describes, each swept argument
    checked against the optimizer and schedule that take it (see ``read_comparison_entries``)."""
    entries, seeds = read_comparison_entries(configuration, _arguments_of)
    return Comparison(configuration=configuration, entries=entries, seeds=seeds)


def _arguments_of(optimizer, schedule):
    return accepted_arguments(optimizer), accepted_schedule_arguments(schedule)
