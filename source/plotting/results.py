"""The results of finished (or partly finished) runs: one table row and one legend entry per entry.

Everything is read from the folders on disk, each run's own configuration.txt and metrics.jsonl,
so that a comparison that just trained and ``python -m source.plotting`` on its folder later
write the same files. A folder is a comparison folder (its configuration.txt has [comparison]:
its entries in file order, each with its seeds' runs) or a run folder (an entry of one run; the run
folders of a comparison entry, <entry id>/seed_<seed>, join into one entry named <entry id>).
A run whose metrics hold a "diverged" record is marked so in the status column; it has no test
result, so the test means are over the seeds that finished.

A swept entry has one row per point and then its "best" row: the point with the best mean
validation result (highest accuracy, lowest RMSE) over its seeds, with that point's test result;
a point where a seed diverged is never chosen. The figures draw the chosen point, and the
sensitivity figures every point (source/plotting/sensitivity.py).
"""

import csv
import io
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from source.configuration import load_configuration
from source.errors import UserError, WriteFailed, writing
from source.files import write_text_atomically
from source.plotting.curves import PlottedRun, legend_label, plot_runs, quality_of
from source.plotting.sensitivity import (
    SensitivityLine,
    SensitivityPoint,
    plot_sensitivity,
    sensitivity_file_stem,
    value_range,
)
from source.quality_metric import ACCURACY, RMSE, metric_named
from source.records.comparison import Entry, read_comparison_entries, run_name, value_text
from source.records.metrics import read_metrics
from source.records.run_files import CONFIGURATION_FILE, METRICS_FILE

__all__ = [
    "EntryRuns",
    "Shown",
    "choose_point",
    "collect_entries",
    "entry_values",
    "result_rows",
    "sensitivity_lines",
    "shown_entries",
    "sweep_groups",
    "write_results",
]

CSV_FILE = "results.csv"
MARKDOWN_FILE = "results.md"


@dataclass(frozen=True)
class RunResult:
    """One run: its folder, seed, configuration and metric records."""

    folder: Path
    seed: int
    configuration: object
    records: list


@dataclass(frozen=True)
class EntryRuns:
    """One entry (one table row, one colour in the figures) and the runs of its seeds found on disk."""

    id: str
    label: str
    optimizer: str
    seeds: tuple
    runs: tuple
    point: dict = field(default_factory=dict)
    swept: Entry | None = None
    """For a sweep point: its swept values, and the swept entry it belongs to."""
    experiment: tuple = ()
    """The data set and model it trains on."""

    @property
    def legend(self):
        """The legend text: the label with the entry's explicit hyper-parameters, from its runs."""
        return legend_label(self.runs[0].configuration) if self.runs else self.label


@dataclass(frozen=True)
class Shown:
    """An entry as the figures show it: an entry without a sweep, or a swept entry's chosen point
    (``runs``; None when no point can be chosen yet), with its legend and its short label."""

    label: str
    legend: str
    runs: EntryRuns | None


def _folder_configuration(folder):
    """The configuration.txt of a run or comparison folder; ``UserError`` when it has none."""
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder: give run folders or comparison folders")
    path = folder / CONFIGURATION_FILE
    if not path.is_file():
        raise UserError(f"{folder} has no configuration.txt: give a run folder or a comparison folder")
    return load_configuration(path, registries=None)


def _read_run(folder, configuration):
    """The ``RunResult`` of a run folder with its loaded configuration."""
    metrics_path = folder / METRICS_FILE
    records = read_metrics(metrics_path) if metrics_path.is_file() else []
    return RunResult(folder, configuration.settings.experiment.seed, configuration, records)


def _experiment(configuration):
    """The data set and model a run or comparison configuration trains on."""
    settings = configuration.settings
    return settings.data.name, settings.model.name


def _comparison_entries(folder, configuration):
    comparison_entries, seeds = read_comparison_entries(configuration)
    entries = []
    for entry in comparison_entries:
        for point in entry.points():
            run_folders = [folder / point.id / run_name(seed) for seed in seeds]
            runs = [
                _read_run(run_folder, load_configuration(run_folder / CONFIGURATION_FILE, registries=None))
                for run_folder in run_folders
                if (run_folder / CONFIGURATION_FILE).is_file()
            ]
            swept = entry if entry.sweep else None
            entries.append(
                EntryRuns(point.id, point.label, point.optimizer, seeds, tuple(runs), point.point, swept,
                          _experiment(configuration))
            )  # fmt: skip
    return entries


def _is_entry_seed(run, folder):
    """Whether a run folder is one seed of a comparison entry: <entry id>/seed_<seed>."""
    return folder.name == run_name(run.seed)


def collect_entries(folders):
    """The entries of ``folders`` (comparison or run folders), in the order given.

    Raises ``UserError`` for a folder that is neither, or whose files cannot be read.
    """
    entries, by_key = [], {}
    for folder in map(Path, folders):
        configuration = _folder_configuration(folder)
        if configuration.is_comparison:
            entries.extend(_comparison_entries(folder, configuration))
            continue
        run = _read_run(folder, configuration)
        if not run.records:
            raise UserError(f"{folder} has no metrics yet (no metrics.jsonl): train the run first")
        # The seeds of one comparison entry form one entry; any other run folder is an entry of its own.
        key = folder.parent.resolve() if _is_entry_seed(run, folder) else folder.resolve()
        if key in by_key:
            previous = by_key[key]
            if any(earlier.folder.resolve() == run.folder.resolve() for earlier in previous.runs):
                continue
            entries[entries.index(previous)] = by_key[key] = EntryRuns(
                previous.id,
                previous.label,
                previous.optimizer,
                previous.seeds + (run.seed,),
                previous.runs + (run,),
                experiment=previous.experiment,
            )
            continue
        settings = configuration.settings
        entry = EntryRuns(
            id=key.name,
            label=settings.experiment.label or settings.experiment.name,
            optimizer=settings.optimizer.name,
            seeds=(run.seed,),
            runs=(run,),
            experiment=_experiment(configuration),
        )
        by_key[key] = entry
        entries.append(entry)
    return entries


def _records(run, split):
    return [record for record in run.records if record["split"] == split]


def _last(records, key):
    values = [record[key] for record in records if key in record]
    return values[-1] if values else None


def _run_values(run, metric):
    """The numbers one run contributes to its row (None where the run has no such record yet)."""
    quality = metric.name
    validation = [record[quality] for record in _records(run, "validation") if not math.isnan(record[quality])]
    test = _records(run, "test")
    training = _records(run, "training")
    best = metric.best(validation) if validation else None
    # The test record carries the totals at the end; an unfinished run has its last log's.
    timed = test or _records(run, "validation")
    counted = test or training
    return {
        "best_validation": best,
        "test": test[-1][quality] if test else None,
        "final_training_loss": _last(training, "loss"),
        "wall_time_seconds": _last(timed, "elapsed_seconds"),
        "forward_passes": _last(counted, "forward_passes"),
        "backward_passes": _last(counted, "backward_passes"),
        "finished": bool(test),
        "diverged": bool(_records(run, "diverged")),
    }


def _mean(values):
    values = [value for value in values if value is not None]
    return statistics.fmean(values) if values else None


def _std(values):
    """The sample standard deviation over seeds; None for fewer than two."""
    values = [value for value in values if value is not None]
    return statistics.stdev(values) if len(values) > 1 else None


def _status(entry, finished_runs, diverged_runs):
    seeds = len(entry.seeds)
    if not entry.runs:
        return "not started"
    if diverged_runs == seeds:
        return "diverged"
    if diverged_runs:
        return f"diverged ({diverged_runs}/{seeds} seeds; {finished_runs}/{seeds} finished)"
    if finished_runs == seeds:
        return "finished"
    return f"incomplete ({finished_runs}/{seeds} seeds finished)"


def point_text(point):
    """A sweep point as the tables show it: "lr=0.1, momentum=0.9"."""
    return ", ".join(f"{name}={value_text(value)}" for name, value in point.items())


def entry_values(entry, quality):
    """The per-seed values of one entry's runs, by key (see ``_run_values``)."""
    values = [_run_values(run, metric_named(quality)) for run in entry.runs]
    return {key: [value[key] for value in values] for key in values[0]} if values else {}


def sweep_groups(entries):
    """The entries grouped as the table shows them: (None, [entry]) for an entry without a sweep,
    (swept entry, [its points]) for a sweep, in order."""
    groups = []
    for entry in entries:
        if entry.swept is not None and groups and groups[-1][0] is entry.swept:
            groups[-1][1].append(entry)
        else:
            groups.append((entry.swept, [entry]))
    return groups


def choose_point(points, quality):
    """The point of a sweep with the best mean validation result over its seeds (highest accuracy,
    lowest RMSE; the first of equals), among the points without a diverged seed; None if none has one."""
    candidates = []
    for point in points:
        column = entry_values(point, quality)
        mean = _mean(column.get("best_validation", []))
        if mean is not None and not any(column["diverged"]):
            candidates.append((mean, point))
    if not candidates:
        return None
    return metric_named(quality).best(candidates, key=lambda candidate: candidate[0])[1]


def shown_entries(entries):
    """What the figures draw (``Shown``s in table order): each entry without a sweep, and each swept
    entry's chosen point, its legend naming the point as the best of the sweep on validation."""
    quality = quality_of([run.records for entry in entries for run in entry.runs])
    shown = []
    for swept, members in sweep_groups(entries):
        if swept is None:
            shown.append(Shown(members[0].label, members[0].legend, members[0]))
            continue
        chosen = choose_point(members, quality)
        if chosen is None or not chosen.runs:
            shown.append(Shown(swept.label, swept.label, None))
            continue
        label = f"{swept.label}, best of {len(members)} on validation"
        shown.append(Shown(swept.label, legend_label(chosen.runs[0].configuration, label=label), chosen))
    return shown


def result_rows(entries):
    """The table: column names, then one row (a dict by column) per entry, seeds aggregated.

    Classification reports accuracy columns, regression rmse ones (the best validation value is
    the highest accuracy, or the lowest RMSE). Passes and wall time are means over the seeds.
    ``kind`` is "entry" for an entry without a sweep, "point" for a sweep point (``point``: its
    values) and "best" for the point of a sweep chosen on validation.
    """
    quality = quality_of([run.records for entry in entries for run in entry.runs])
    columns = [
        "entry",
        "label",
        "optimizer",
        "kind",
        "point",
        "seeds",
        f"best_validation_{quality}_mean",
        f"best_validation_{quality}_std",
        f"test_{quality}_mean",
        f"test_{quality}_std",
        "final_training_loss_mean",
        "wall_time_seconds_mean",
        "forward_passes",
        "backward_passes",
        "status",
    ]
    rows = []
    for swept, members in sweep_groups(entries):
        for entry in members:
            rows.append(_row(entry, quality, "entry" if swept is None else "point"))
        if swept is None:
            continue
        chosen = choose_point(members, quality)
        if chosen is not None:
            best = _row(chosen, quality, "best")
        else:
            best = dict.fromkeys(columns)
            every_diverged = all(any(entry_values(point, quality).get("diverged", [])) for point in members)
            best.update(
                point="",
                seeds=rows[-1]["seeds"],
                status=f"none chosen: {'every point diverged' if every_diverged else 'no validation result yet'}",
            )
        best.update(entry=swept.id, label=swept.label, optimizer=swept.optimizer, kind="best")
        rows.append(best)
    return columns, rows


def _row(entry, quality, kind):
    """One table row: ``entry``'s values, seeds aggregated."""
    column = entry_values(entry, quality)

    def mean(key):
        return _mean(column.get(key, []))

    def whole(key):
        average = mean(key)
        return None if average is None else round(average)

    return {
        "entry": entry.id,
        "label": entry.label,
        "optimizer": entry.optimizer,
        "kind": kind,
        "point": point_text(entry.point),
        "seeds": " ".join(map(str, entry.seeds)),
        f"best_validation_{quality}_mean": mean("best_validation"),
        f"best_validation_{quality}_std": _std(column.get("best_validation", [])),
        f"test_{quality}_mean": mean("test"),
        f"test_{quality}_std": _std(column.get("test", [])),
        "final_training_loss_mean": mean("final_training_loss"),
        "wall_time_seconds_mean": mean("wall_time_seconds"),
        "forward_passes": whole("forward_passes"),
        "backward_passes": whole("backward_passes"),
        "status": _status(entry, sum(column.get("finished", [])), sum(column.get("diverged", []))),
    }


def _csv_value(value):
    """Empty for a missing value; floats to 8 significant digits, which hides summation noise."""
    if value is None:
        return ""
    return format(value, ".8g") if isinstance(value, float) else value


def _csv_text(columns, rows):
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _csv_value(value) for key, value in row.items()})
    return text.getvalue()


def _markdown_text(columns, rows):
    metric = ACCURACY if f"test_{ACCURACY.name}_mean" in columns else RMSE
    quality, words = metric.name, metric.words

    def spread(row, name):
        mean, std = row[f"{name}_mean"], row[f"{name}_std"]
        if mean is None:
            return "–"
        return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"

    def number(value, form):
        return "–" if value is None else format(value, form)

    header = [
        "entry",
        "label",
        "optimizer",
        "point",
        "seeds",
        f"best validation {words}",
        f"test {words}",
        "final training loss",
        "wall time (s)",
        "forward passes",
        "backward passes",
        "status",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    for row in rows:
        cells = [
            row["entry"],
            row["label"].replace("|", "\\|"),
            row["optimizer"],
            f"**best**: {row['point'] or '–'}" if row["kind"] == "best" else row["point"],
            row["seeds"],
            spread(row, f"best_validation_{quality}"),
            spread(row, f"test_{quality}"),
            number(row["final_training_loss_mean"], ".4g"),
            number(row["wall_time_seconds_mean"], ".1f"),
            number(row["forward_passes"], "d"),
            number(row["backward_passes"], "d"),
            row["status"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    note = "Mean ± sample standard deviation over the seeds; test: the checkpoint of best validation."
    if any(row["kind"] == "best" for row in rows):
        note += f" best: the point of the sweep with the best mean validation {words}, none with a diverged seed."
    return "\n".join(lines) + f"\n\n{note}\n"


def _dataset_and_model(entries):
    """The data set and model named in the runs' configurations (joined when they differ)."""
    configurations = [run.configuration for entry in entries for run in entry.runs]
    datasets = dict.fromkeys(configuration.settings.data.name for configuration in configurations)
    models = dict.fromkeys(configuration.settings.model.name for configuration in configurations)
    return ", ".join(datasets), ", ".join(models)


def write_results(entries, out, colours=None):
    """Write results.csv, results.md and the figures (.png and .pdf) of ``entries`` (from
    ``collect_entries``) into ``out``; ``colours`` maps labels to colour indices (default: by
    position). Returns the paths written (figures: their PNG files) and the Markdown table. The
    tables come first: when a figure fails, ``WriteFailed`` says so and that they are written.
    """
    out = Path(out)
    columns, rows = result_rows(entries)
    table = _markdown_text(columns, rows)
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(_csv_text(columns, rows), out / CSV_FILE)
    write_text_atomically(table, out / MARKDOWN_FILE)
    dataset, model = _dataset_and_model(entries)
    shown = shown_entries(entries)
    # A run folder may hold only its configuration.txt: a launcher writes it before the run starts.
    try:
        figures = plot_runs(
            [
                PlottedRun(item.legend,
                           tuple(run.folder / METRICS_FILE for run in item.runs.runs if run.records)
                           if item.runs else (),
                           item.label, colours.get(item.label) if colours else None)
                for item in shown
            ],  # fmt: skip
            out,
            dataset=dataset,
            model=model,
        )
        figures += _sensitivity_figures(entries, out, f"{dataset} {model}", colours)
    except WriteFailed as error:
        raise WriteFailed(f"{error}; the results are written: {out / CSV_FILE}, {out / MARKDOWN_FILE}") from error
    return [out / CSV_FILE, out / MARKDOWN_FILE, *figures], table


def sensitivity_lines(entries, colours=None):
    """{swept argument: one ``SensitivityLine`` per entry that sweeps it}, each point the best
    validation results over the seeds of the best point with that value (a point where a seed
    diverged counts as diverged), coloured as the entry is in the other figures."""
    quality = quality_of([run.records for entry in entries for run in entry.runs])
    colours = colours or {item.label: index for index, item in enumerate(shown_entries(entries))}
    lines = {}
    for swept, members in sweep_groups(entries):
        if swept is None:
            continue
        for argument in swept.sweep:
            points = []
            for value in argument.values:
                having = [member for member in members if member.point[argument.name] == value]
                chosen = choose_point(having, quality)
                results = [] if chosen is None else entry_values(chosen, quality)["best_validation"]
                diverged = chosen is None and any(
                    any(entry_values(member, quality).get("diverged", [])) for member in having
                )
                results = tuple(result for result in results if result is not None)
                points.append(SensitivityPoint(value, results, diverged))
            line = SensitivityLine(swept.label, colours[swept.label], tuple(points))
            lines.setdefault(argument.name, []).append(line)
    return lines


def _sensitivity_figures(entries, out, experiment, colours):
    """The sensitivity figure of each swept argument (see source/plotting/sensitivity.py); PNG paths."""
    words = metric_named(quality_of([run.records for entry in entries for run in entry.runs])).words
    lines = sensitivity_lines(entries, colours)
    shared = value_range([line for argument_lines in lines.values() for line in argument_lines])
    written = [
        plot_sensitivity(
            out,
            argument,
            argument_lines,
            stem=sensitivity_file_stem(argument, lines),
            title=f"sensitivity to {argument} {experiment}",
            y_label=f"best validation {words}",
            y_range=shared,
        )
        for argument, argument_lines in lines.items()
    ]
    return [path for path in written if path is not None]
