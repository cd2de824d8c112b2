"""A comparison's entries and the run configuration of each entry and seed.

A comparison configuration is an ordinary configuration with a [comparison] section instead of
[optimizer] and [schedule]: ``seeds``, and one subsection per entry, ``[[<entry id>]]`` with
``label``, ``optimizer``, ``[[[arguments]]]``, ``schedule``, ``[[[schedule_arguments]]]`` and
``[[[sweep]]]``. Each entry and seed trains as an ordinary run whose configuration is the
comparison's with the entry's optimizer and schedule, the seed, ``[experiment] label`` = the
entry's label, and the run folder ``<runs_folder>/<experiment name>/<entry id>/seed_<seed>/``.
``Comparison.runs()`` lists them as ``ComparisonRun``s: the unit a launcher places (source/launcher/).

An entry with a [[[sweep]]] (optimizer or schedule arguments, each with a list of values) stands
for one point per combination of values: an entry of its own with those arguments added, the id
``<entry id>/<point>`` (run folders ``<entry id>/<point>/seed_<seed>/``, e.g. ``sgd/lr_0.1``) and a
label that names the point ("SGD lr 0.1").
"""

import copy
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

from source.configuration import COMPARISON, Configuration, key_label, section_label
from source.configuration.checks import CHECKS, MAX_NAME_LENGTH, InvalidValue, did_you_mean
from source.errors import UserError
from source.optimizer import accepted_arguments
from source.plotting.curves import arguments_text, value_text
from source.training import RunFolder, build_experiment, build_optimizer_and_schedule
from source.training.schedules import accepted_schedule_arguments

__all__ = [
    "Comparison",
    "ComparisonRun",
    "Entry",
    "EntryRunConfiguration",
    "SweptArgument",
    "read_comparison",
    "run_name",
]

LAUNCHER = "launcher"
"""The section that says where a comparison's runs go; a run itself trains where it is started."""

_ENTRY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_ENTRY_KEYS = ("label", "optimizer", "arguments", "schedule", "schedule_arguments")


def run_name(seed):
    """The experiment name, and folder name, of an entry's run with ``seed``."""
    return f"seed_{seed}"


@dataclass(frozen=True)
class SweptArgument:
    """One key of an entry's [[[sweep]]]: the argument, where it goes ("arguments": the optimizer's,
    or "schedule_arguments") and its values in file order."""

    name: str
    target: str
    values: tuple


@dataclass(frozen=True)
class Entry:
    """One optimizer of a comparison, with its arguments, schedule and legend label.

    A swept entry has its ``sweep`` (``SweptArgument``s) and trains as its ``points()``; a point
    has its swept values in ``point`` and the id of the entry it belongs to in ``swept_entry``.
    """

    id: str
    label: str
    optimizer: str
    arguments: dict
    schedule: str
    schedule_arguments: dict
    sweep: tuple = ()
    point: dict = field(default_factory=dict)
    swept_entry: str = ""

    @property
    def entry_id(self):
        """The id of the [[entry]] in the configuration: for a sweep point, that of its swept entry."""
        return self.swept_entry or self.id

    def points(self):
        """The entries that train: this one, or one per combination of its swept values (in file order)."""
        if not self.sweep:
            return (self,)
        points = []
        for values in itertools.product(*(swept.values for swept in self.sweep)):
            point = {swept.name: value for swept, value in zip(self.sweep, values)}
            arguments = {"arguments": dict(self.arguments), "schedule_arguments": dict(self.schedule_arguments)}
            for swept, value in zip(self.sweep, values):
                arguments[swept.target][swept.name] = value
            points.append(
                Entry(
                    id=f"{self.id}/{point_name(point)}",
                    label=f"{self.label} {arguments_text(point)}",
                    optimizer=self.optimizer,
                    schedule=self.schedule,
                    point=point,
                    swept_entry=self.id,
                    **arguments,
                )
            )
        return tuple(points)


def point_name(point):
    """The folder name of a sweep point: "lr_0.1", "step_adaptation_1.8-measurement_interval_500"."""
    return "-".join(f"{name}_{value_text(value)}" for name, value in point.items())


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
        experiment = self.configuration["experiment"]
        return Path(experiment["runs_folder"]) / experiment["name"]

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
    """The ``Comparison`` a configuration with a [comparison] section describes.

    Raises ``UserError`` for a comparison without entries, an entry id that is not a plain folder
    name of at most ``MAX_NAME_LENGTH`` characters, and two entries with the same label.
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
        if not _ENTRY_ID.fullmatch(name) or len(name) > MAX_NAME_LENGTH:
            shown = name if len(name) <= MAX_NAME_LENGTH else f"{name[:20]}... ({len(name)} characters)"
            raise UserError(
                f"{where}: entry {section_label((COMPARISON, shown))}: its id names the entry's folder; "
                f"use at most {MAX_NAME_LENGTH} letters, digits, '_' and '-', starting with a letter or digit"
            )
        values = section[name]
        if values["label"] in labels:
            raise UserError(
                f"{configuration.source}: {key_label((COMPARISON, name), 'label')} = {values['label']!r} is the "
                f"label of {section_label((COMPARISON, labels[values['label']]))} too; give each entry its own label"
            )
        labels[values["label"]] = name
        sweep = _read_sweep(configuration, name, values)
        entries.append(Entry(name, *(values[key] for key in _ENTRY_KEYS), sweep=sweep))
    _check_point_labels(configuration, entries)
    seeds = tuple(section["seeds"]) or (configuration["experiment"]["seed"],)
    return Comparison(configuration=configuration, entries=tuple(entries), seeds=seeds)


def _listing(given):
    """A value of the file as it was written: "0.1" or "0.1, 0.1"."""
    return ", ".join(map(value_text, given)) if isinstance(given, list) else value_text(given)


def _check_point_labels(configuration, entries):
    """Raise ``UserError`` when a sweep point's label is that of another run of the comparison."""
    owners = {}
    for entry in entries:
        for point in entry.points():
            owner = owners.setdefault(point.label, point.id)
            if owner != point.id:
                raise UserError(
                    f"{configuration.source}: the runs {owner} and {point.id} both have the label {point.label!r}; "
                    "give the entries labels that the names of their sweep points cannot repeat"
                )


def _read_sweep(configuration, name, values):
    """The ``SweptArgument``s of entry ``name``'s [[[sweep]]]; ``UserError`` for an argument that
    neither its optimizer nor its schedule takes, one given twice, or values that are not a list of
    distinct values that can name a folder."""
    optimizer_arguments = accepted_arguments(values["optimizer"])
    schedule_arguments = accepted_schedule_arguments(values["schedule"])
    path = (COMPARISON, name, "sweep")
    sweep = []
    for argument, given in values["sweep"].items():
        where = f"{configuration.origin((*path, argument))}: {key_label(path, argument)}"
        if argument in optimizer_arguments:
            target = "arguments"
        elif argument in schedule_arguments:
            target = "schedule_arguments"
        else:
            takers = f"optimizer {values['optimizer']!r}"
            if schedule_arguments:
                takers += f" or schedule {values['schedule']!r}"
            known = optimizer_arguments + schedule_arguments
            raise UserError(
                f"{where}: {argument} is not an argument of {takers}{did_you_mean(argument, known)}; "
                f"sweep one of: {', '.join(known)}"
            )
        if argument in values[target]:
            raise UserError(
                f"{where}: {argument} is set in {section_label((COMPARISON, name, target))} too; "
                "give it there (one value) or in the sweep (several), not in both"
            )
        if not isinstance(given, list) or not given:
            raise UserError(
                f"{where} = {_listing(given)!r}: expected a comma-separated list of values, e.g. "
                f"{argument} = 0.01, 0.1, 1.0 (a single one with a trailing comma: 0.1,)"
            )
        if len(set(given)) != len(given):
            raise UserError(f"{where} = {_listing(given)!r}: a value is listed twice; list each value once")
        for value in given:
            try:
                CHECKS["folder_name"](point_name({argument: value}))
            except InvalidValue:
                raise UserError(
                    f"{where}: the value {value_text(value)!r} cannot name a run folder "
                    f"({point_name({argument: value})!r}): use values without spaces at their ends, "
                    f"'#', ';', '/' or '\\', of at most {MAX_NAME_LENGTH} bytes with the argument's name"
                ) from None
        sweep.append(SweptArgument(argument, target, tuple(given)))
    _check_longest_point(configuration, path, sweep)
    return tuple(sweep)


def _check_longest_point(configuration, path, sweep):
    """``UserError`` when the longest point of ``sweep``, its arguments' longest values joined, cannot name a folder."""
    if len(sweep) < 2:
        return
    longest = {
        swept.name: max(swept.values, key=lambda value, name=swept.name: len(point_name({name: value}).encode()))
        for swept in sweep
    }
    name = point_name(longest)
    try:
        CHECKS["folder_name"](name)
    except InvalidValue:
        raise UserError(
            f"{configuration.origin(path)}: {section_label(path)}: the sweep point {name[:40]!r}... names a folder "
            f"of {len(name.encode())} bytes, more than {MAX_NAME_LENGTH}; sweep fewer arguments or shorter values"
        ) from None
