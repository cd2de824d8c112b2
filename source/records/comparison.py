"""A comparison's entries, sweep points and seeds as its configuration names them, and its runs' folders.

A comparison configuration is an ordinary configuration with a [comparison] section instead of
[optimizer] and [schedule]: ``seeds``, and one subsection per entry, ``[[<entry id>]]`` with
``label``, ``optimizer``, ``[[[arguments]]]``, ``schedule``, ``[[[schedule_arguments]]]`` and
``[[[sweep]]]``. The run of each entry and seed lives in ``<comparison folder>/<entry id>/seed_<seed>/``.

An entry with a [[[sweep]]] (optimizer or schedule arguments, each with a list of values) stands
for one point per combination of values: an entry of its own with those arguments added, the id
``<entry id>/<point>`` (run folders ``<entry id>/<point>/seed_<seed>/``, e.g. ``sgd/lr_0.1``) and a
label that names the point ("SGD lr 0.1").

Reading a comparison needs no registry; given what each optimizer and schedule takes
(``arguments_of``), ``read_comparison_entries`` also checks the swept arguments and sends each to
the class that takes it, as ``source.comparison`` does before the runs start.
"""

import itertools
import re
from dataclasses import dataclass, field

from source.arguments import did_you_mean
from source.configuration import COMPARISON, key_label, section_label
from source.configuration.checks import CHECKS, MAX_NAME_LENGTH, InvalidValue
from source.errors import UserError

__all__ = [
    "Entry",
    "SweptArgument",
    "arguments_text",
    "point_name",
    "read_comparison_entries",
    "run_name",
    "value_text",
]

_ENTRY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_ENTRY_KEYS = ("label", "optimizer", "arguments", "schedule", "schedule_arguments")


def value_text(value):
    """A configuration value as legends and folder names show it: 0.1, 1e-05, true, 500:2/750:4."""
    if isinstance(value, list):
        return "/".join(value_text(item) for item in value)
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def arguments_text(arguments):
    """Arguments as a legend shows them: "lr 0.1, momentum 0.9"."""
    return ", ".join(f"{name} {value_text(value)}" for name, value in arguments.items())


def run_name(seed):
    """The experiment name, and folder name, of an entry's run with ``seed``."""
    return f"seed_{seed}"


@dataclass(frozen=True)
class SweptArgument:
    """One key of an entry's [[[sweep]]]: the argument, where it goes ("arguments": the optimizer's,
    "schedule_arguments", or "" where that was not asked) and its values in file order."""

    name: str
    target: str
    values: tuple


@dataclass(frozen=True)
class Entry:
    """One optimizer of a comparison, with its arguments, schedule and legend label.

    A swept entry has its ``sweep`` (``SweptArgument``s) and trains as its ``points()``; a point
    has its swept values in ``point`` and the id of the entry it belongs to in ``swept_entry``.
    A point's ``arguments`` and ``schedule_arguments`` hold its swept values where their targets
    are known (``read_comparison_entries`` with ``arguments_of``).
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
                if swept.target:
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


def read_comparison_entries(configuration, arguments_of=None):
    """The entries (in file order) and seeds of a configuration with a [comparison] section.

    ``arguments_of(optimizer name, schedule name)`` gives the names of the arguments each takes;
    with it, a swept argument that neither takes, or that the entry also sets, is refused, and each
    goes to the one that takes it. Raises ``UserError`` for a comparison without entries, an entry
    id that is not a plain folder name of at most ``MAX_NAME_LENGTH`` characters, two entries with
    the same label, and swept values that are not distinct or cannot name a folder.
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
        sweep = _read_sweep(configuration, name, values, arguments_of)
        entries.append(Entry(name, *(values[key] for key in _ENTRY_KEYS), sweep=sweep))
    _check_point_labels(configuration, entries)
    seeds = tuple(section["seeds"]) or (configuration.settings.experiment.seed,)
    return tuple(entries), seeds


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


def _read_sweep(configuration, name, values, arguments_of):
    """The ``SweptArgument``s of entry ``name``'s [[[sweep]]]; ``UserError`` for values that are not
    a list of distinct values that can name a folder and, with ``arguments_of``, for an argument that
    neither its optimizer nor its schedule takes, or one given twice."""
    path = (COMPARISON, name, "sweep")
    sweep = []
    for argument, given in values["sweep"].items():
        where = f"{configuration.origin((*path, argument))}: {key_label(path, argument)}"
        target = "" if arguments_of is None else _target(where, argument, name, values, arguments_of)
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


def _target(where, argument, name, values, arguments_of):
    """Where the swept ``argument`` of entry ``name`` goes: "arguments" or "schedule_arguments"."""
    optimizer_arguments, schedule_arguments = arguments_of(values["optimizer"], values["schedule"])
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
    return target


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
