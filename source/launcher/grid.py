"""A grid: the runs of one or more configurations, each a run folder and its resolved configuration.

A comparison expands into one run per entry and seed (``Comparison.runs()``); a configuration
without [comparison] is a grid of its one run. A run is fully described by its configuration,
written to its run folder before it starts, so it trains and resumes on its own wherever a
launcher places it. ``run_state`` reads how far a run has come from its folder, touching nothing.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from source.comparison import create_comparison_folder, prepare_comparison, read_comparison, run_progress
from source.errors import UserError
from source.files import hold_folder, is_held
from source.plotting.results import collect_entries, write_results
from source.quality_metric import metric_of
from source.records.run_files import CONFIGURATION_FILE
from source.registries import load_configuration
from source.training import RunFolder
from source.training.run_folder import configuration_to_resume

__all__ = [
    "Grid",
    "GridRun",
    "RunState",
    "build_grid",
    "comparison_folder_of",
    "comparison_runs",
    "run_state",
    "test_result",
    "write_comparison_results",
]

OUTPUT_FILE = "output.log"
"""In a run folder: what a run in a child process or job printed, each attempt appended."""


@dataclass(frozen=True, eq=False)
class GridRun:
    """One run of a grid: how messages name it, its resolved configuration, its folder, and the
    comparison folder it belongs to (None for a run of its own)."""

    name: str
    configuration: object
    folder: RunFolder
    comparison_folder: Path | None

    @property
    def total_steps(self):
        """The run's length in training steps."""
        return self.configuration.settings.training.training_steps

    @property
    def output_path(self):
        """Where a child process or job writes its output."""
        return self.folder.path / OUTPUT_FILE

    def write_configuration(self):
        """Create the run folder with its configuration.txt, unless it has one: the run can then start anywhere."""
        if not self.folder.configuration_path.is_file():
            self.folder.create(self.configuration).release()


@dataclass(frozen=True)
class Grid:
    """The runs of configurations launched together, and the comparisons among them."""

    runs: tuple
    comparisons: tuple

    def create_folders(self, resume):
        """Create (or tidy) every comparison folder and return their locks, held by this process;
        runs write theirs when they start."""
        return [create_comparison_folder(comparison, resume) for comparison in self.comparisons]


def build_grid(configurations, *, resume, check):
    """The ``Grid`` of ``configurations`` (comparisons and single runs).

    With ``check`` every comparison is checked to start (or, with ``resume``, to continue) and
    every entry is built once, before anything is created; ``UserError`` names the first problem.
    A single run that resumes takes the configuration saved in its folder.
    """
    runs, comparisons = [], []
    for configuration in configurations:
        if configuration.is_comparison:
            comparison = prepare_comparison(configuration, resume) if check else read_comparison(configuration)
            comparisons.append(comparison)
            runs.extend(_grid_runs(comparison))
            continue
        if resume:
            configuration, _ = configuration_to_resume(configuration)
        folder = RunFolder.of(configuration)
        if check:
            folder.check_can_start(configuration, resume)
        runs.append(GridRun(configuration.settings.experiment.name, configuration, folder, None))
    _check_distinct_folders(runs)
    return Grid(tuple(runs), tuple(comparisons))


def _grid_runs(comparison):
    return [GridRun(run.name, run.configuration, run.folder, comparison.folder) for run in comparison.runs()]


def comparison_runs(folder):
    """The ``GridRun``s of the comparison whose folder is ``folder``, from its configuration.txt."""
    return _grid_runs(read_comparison(load_configuration(Path(folder) / CONFIGURATION_FILE)))


def comparison_folder_of(run_folder):
    """The comparison folder a run folder belongs to (<comparison>/<entry>[/<sweep point>]/<run>), or None."""
    run_folder = Path(run_folder)
    for candidate in run_folder.parents[1:3]:
        stored = candidate / CONFIGURATION_FILE
        if not stored.is_file():
            continue
        try:
            configuration = load_configuration(stored)
        except UserError:
            return None
        if not configuration.is_comparison:
            return None
        folders = {run.folder.path.resolve() for run in _grid_runs(read_comparison(configuration))}
        return candidate if run_folder.resolve() in folders else None
    return None


def _check_distinct_folders(runs):
    seen = {}
    for run in runs:
        key = run.folder.path.resolve()
        if key in seen:
            raise UserError(
                f"{run.configuration.source} and {seen[key].configuration.source} both train in {run.folder.path}; "
                "give each its own [experiment] name"
            )
        seen[key] = run


@dataclass(frozen=True)
class RunState:
    """Where a run stands: ``status`` (not started, running, stopped, failed, diverged, finished), the last
    step it logged, its length, its last validation accuracy (or RMSE) and a failure's reason."""

    status: str
    step: int
    total: int
    validation: tuple | None
    failure: str = ""

    @property
    def done(self):
        """Whether nothing is left to train."""
        return self.status in ("finished", "diverged")


def _last_validation(records):
    for record in reversed(records):
        if record.get("split") == "validation":
            quality = metric_of(record).name
            return quality, record.get(quality)
    return None


def _read_records(path):
    """The metrics records of ``path`` (none if missing), ignoring a partial last line of a run still writing."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def run_state(run):
    """The ``RunState`` of ``run`` from its folder, read only."""
    total = run.total_steps
    if not run.folder.path.is_dir():
        return RunState("not started", 0, total, None)
    records = _read_records(run.folder.metrics_path)
    step = max((record.get("step", 0) for record in records), default=0)
    validation = _last_validation(records)
    progress = run_progress(run.folder, total)
    if progress.finished:
        return RunState("finished", total, total, validation)
    if progress.diverged:
        return RunState("diverged", step, total, validation)
    if is_held(run.folder.path):
        return RunState("running", step, total, validation)
    failure = run.folder.failure_path
    if failure.is_file():
        return RunState("failed", step, total, validation, failure.read_text(encoding="utf-8").strip())
    if not records and not run.folder.last_checkpoint_path.exists():
        return RunState("not started", 0, total, None)
    return RunState("stopped", step, total, validation)


def test_result(run):
    """The test result of a finished run, as its line says it: "test accuracy 0.9634"."""
    for record in reversed(_read_records(run.folder.metrics_path)):
        if record.get("split") == "test":
            quality = metric_of(record).name
            return f"test {quality} {record[quality]:.4f}"
    return "no test result"


RESULTS_WAIT_SECONDS = 60
"""How long writing a comparison's results waits for another process that holds its folder."""


def write_comparison_results(folder, *, held=False):
    """(Re)write the results table and figures of the comparison in ``folder``; return (files, table).

    Unless this process holds the comparison folder (``held``), it takes the folder's lock first,
    waiting up to RESULTS_WAIT_SECONDS for another writer (``FolderInUse`` after that).
    """
    if held:
        return write_results(collect_entries([folder]), folder)
    with hold_folder(folder, what="comparison folder", wait_seconds=RESULTS_WAIT_SECONDS):
        return write_results(collect_entries([folder]), folder)
