"""The report over several experiments (data set × model), as the paper shows its comparisons in one page.

``write_paper_report(entries, out)`` takes the entries of comparison (or run) folders of at least
two experiments and writes into ``out``:

- ``<data set>_<model>/``: each experiment's own results and figures (``write_results``);
- per metric one figure grid, ``<metric>.png``/``.pdf``: rows data sets, columns models, each
  optimizer (entry label) in one colour everywhere, one legend;
- ``test_accuracy_table.csv``/``.md``: rows optimizers, columns experiments ("digits small_cnn"),
  the test accuracy of the best validation checkpoint as mean ± sample standard deviation over the
  seeds (a swept entry: its point chosen on validation), runs that have not ended marked;
- ``performance_profile.png``/``.pdf``: for τ from 0 to 0.1, the fraction of experiments in which
  an optimizer's mean test accuracy is within τ of the best optimizer's there (experiments measured
  in RMSE are left out of it).
"""

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from source.errors import UserError, writing
from source.files import write_text_atomically
from source.plotting.curves import PlottedRun, figure_panels, quality_of
from source.plotting.report_figures import plot_panel_grid, plot_performance_profile
from source.plotting.results import entry_values, result_rows, shown_entries, sweep_groups, write_results
from source.quality_metric import metric_named
from source.records.run_files import METRICS_FILE

__all__ = [
    "PROFILE_TAUS",
    "ExperimentResults",
    "group_experiments",
    "performance_profile",
    "tabulate_test_results",
    "write_paper_report",
]

TABLE_FILE = "test_accuracy_table"
PROFILE_FILE = "performance_profile"
PROFILE_TAUS = tuple(step / 1000 for step in range(101))
"""τ from 0 to 0.1 in steps of 0.001."""


@dataclass(frozen=True)
class ExperimentResults:
    """The entries of one experiment: one data set, one model."""

    dataset: str
    model: str
    entries: tuple

    @property
    def name(self):
        """"<data set> <model>", e.g. "digits small_cnn"."""
        return f"{self.dataset} {self.model}"

    @property
    def quality(self):
        return quality_of([run.records for entry in self.entries for run in entry.runs])


@dataclass(frozen=True)
class TableCell:
    """One optimizer in one experiment: test mean and standard deviation over the seeds, and its runs.

    ``ended`` counts the runs that finished or diverged out of ``runs`` (a swept entry: every point's).
    """

    mean: float | None
    std: float | None
    ended: int
    runs: int
    diverged: bool

    @property
    def status(self):
        if self.diverged:
            return "diverged"
        if self.ended == 0 and self.mean is None:
            return "not started" if self.runs else "no runs"
        if self.ended < self.runs:
            return f"incomplete: {self.ended}/{self.runs} runs ended"
        return "finished"


def group_experiments(entries):
    """The entries grouped by experiment, in the order experiments first appear.

    Raises ``UserError`` when two entries of one experiment share a label: the report could not
    tell their rows apart.
    """
    groups = {}
    for entry in entries:
        groups.setdefault(entry.experiment, []).append(entry)
    experiments = []
    for (dataset, model), members in groups.items():
        labels = [item.label for item in shown_entries(members)]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise UserError(
                f"{dataset} {model} has several entries labelled {repeated[0]!r}: give each experiment once "
                "(one comparison folder, or the run folders of one comparison)"
            )
        experiments.append(ExperimentResults(dataset, model, tuple(members)))
    return experiments


def _ended_runs(members, quality):
    runs = ended = 0
    for member in members:
        values = entry_values(member, quality)
        runs += len(member.seeds)
        ended += sum(any(pair) for pair in zip(values.get("finished", []), values.get("diverged", [])))
    return ended, runs


def tabulate_test_results(experiments):
    """{optimizer label: {experiment name: ``TableCell``}}, labels in the order they first appear."""
    table = {}
    for experiment in experiments:
        quality = experiment.quality
        _, rows = result_rows(list(experiment.entries))
        summary = {row["label"]: row for row in rows if row["kind"] in ("entry", "best")}
        for swept, members in sweep_groups(list(experiment.entries)):
            label = members[0].label if swept is None else swept.label
            row = summary[label]
            ended, runs = _ended_runs(members, quality)
            diverged = row["status"] == "diverged" or row["status"] == "none chosen: every point diverged"
            table.setdefault(label, {})[experiment.name] = TableCell(
                row[f"test_{quality}_mean"], row[f"test_{quality}_std"], ended, runs, diverged
            )
    return table


def performance_profile(table, experiments, taus=PROFILE_TAUS):
    """{label: fraction of ``experiments`` (names) at each τ in ``taus``}: the experiments in which the
    label's mean test accuracy is at most τ below the best label's; a missing result is never within."""
    best = {}
    for name in experiments:
        means = [cells[name].mean for cells in table.values() if name in cells and cells[name].mean is not None]
        if means:
            best[name] = max(means)
    profile = {}
    for label, cells in table.items():
        gaps = [
            best[name] - cells[name].mean
            for name in best
            if name in cells and cells[name].mean is not None
        ]
        # The best one's own gap is 0 exactly; 1e-12 only absorbs rounding in differences of other values.
        profile[label] = [sum(gap <= tau + 1e-12 for gap in gaps) / len(best) for tau in taus] if best else []
    return profile


def _spread(cell):
    if cell.mean is None:
        return cell.status
    return f"{cell.mean:.4f}" if cell.std is None else f"{cell.mean:.4f} ± {cell.std:.4f}"


def _table_texts(table, experiments):
    """The test table as CSV and Markdown text."""
    csv_text = io.StringIO()
    writer = csv.writer(csv_text, lineterminator="\n")
    columns = [(experiment.name, f"{experiment.name} std", f"{experiment.name} status") for experiment in experiments]
    writer.writerow(["optimizer", *(column for names in columns for column in names)])
    for label, cells in table.items():
        row = [label]
        for experiment in experiments:
            cell = cells.get(experiment.name)
            if cell is None:
                row += ["", "", ""]
                continue
            row += [_number(cell.mean), _number(cell.std), cell.status]
        writer.writerow(row)
    header = [
        experiment.name + ("" if experiment.quality == "accuracy" else " (RMSE)") for experiment in experiments
    ]
    lines = ["| optimizer | " + " | ".join(header) + " |", "|" + "|".join([" --- "] * (len(header) + 1)) + "|"]
    best = {}
    for experiment in experiments:
        means = [cells[experiment.name].mean for cells in table.values()
                 if experiment.name in cells and cells[experiment.name].mean is not None]  # fmt: skip
        if means:
            best[experiment.name] = metric_named(experiment.quality).best(means)
    for label, cells in table.items():
        texts = []
        for experiment in experiments:
            cell = cells.get(experiment.name)
            if cell is None:
                texts.append("")
                continue
            text = _spread(cell)
            if cell.mean is not None and cell.mean == best.get(experiment.name):
                text = f"**{text}**"
            if cell.mean is not None and cell.status != "finished":
                text += f" ({cell.status})"
            texts.append(text)
        escaped = label.replace("|", "\\|")
        lines.append(f"| {escaped} | " + " | ".join(texts) + " |")
    measured = "Test accuracy"
    if any(experiment.quality != "accuracy" for experiment in experiments):
        measured += " (RMSE: test RMSE)"
    note = (
        f"{measured} of the checkpoint with the best validation result, mean ± sample standard deviation over "
        "the seeds; a swept entry shows the point chosen on validation. Bold: the best in each column. A mark "
        "in brackets: not every run of the entry has ended."
    )
    return csv_text.getvalue(), "\n".join(lines) + f"\n\n{note}\n"


def _number(value):
    return "" if value is None else format(value, ".8g")


def _grid_figures(experiments, colours, out):
    datasets = list(dict.fromkeys(experiment.dataset for experiment in experiments))
    models = list(dict.fromkeys(experiment.model for experiment in experiments))
    grids = {}
    for experiment in experiments:
        shown = shown_entries(list(experiment.entries))
        runs = [
            PlottedRun(item.label, tuple(run.folder / METRICS_FILE for run in item.runs.runs) if item.runs else (),
                       colour=colours[item.label])
            for item in shown
        ]  # fmt: skip
        ended, total = _ended_runs(experiment.entries, experiment.quality)
        title = experiment.name + ("" if ended == total else f" (incomplete: {ended}/{total} runs ended)")
        for panel in figure_panels(runs):
            grid = grids.setdefault(panel.name, (panel.title, {}))
            grid[1][experiment.dataset, experiment.model] = (title, panel)
    written = [
        plot_panel_grid(out / name, title, cells, datasets, models, colours) for name, (title, cells) in grids.items()
    ]
    return [path for path in written if path is not None]


def write_paper_report(entries, out):
    """Write the report of ``entries`` (from ``collect_entries``, at least two experiments) into
    ``out``; returns the paths written (figures: their PNG files) and the Markdown test table."""
    out = Path(out)
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    experiments = group_experiments(entries)
    table = tabulate_test_results(experiments)
    colours = {label: index for index, label in enumerate(table)}
    files = []
    for experiment in experiments:
        experiment_files, _ = write_results(
            list(experiment.entries), out / f"{experiment.dataset}_{experiment.model}", colours
        )
        files += experiment_files
    csv_text, markdown = _table_texts(table, experiments)
    for path, text in ((out / f"{TABLE_FILE}.csv", csv_text), (out / f"{TABLE_FILE}.md", markdown)):
        write_text_atomically(text, path)
    files += [out / f"{TABLE_FILE}.csv", out / f"{TABLE_FILE}.md"]
    files += _grid_figures(experiments, colours, out)
    measured = [experiment.name for experiment in experiments if experiment.quality == "accuracy"]
    profile = performance_profile(table, measured)
    counted = sum(any(name in cells and cells[name].mean is not None for cells in table.values()) for name in measured)
    if counted:
        files.append(plot_performance_profile(out / PROFILE_FILE, PROFILE_TAUS, profile, colours, counted))
    return files, markdown
