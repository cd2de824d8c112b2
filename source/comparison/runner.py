"""Run a comparison: every entry with every seed, one ordinary run after another, then the results.

The comparison folder ``<runs_folder>/<experiment name>/`` holds the comparison's resolved
configuration.txt, one folder per entry with one run folder per seed, and the results
(results.csv, results.md and the figures as .png and .pdf). As with a single run, an existing
comparison folder is never reused without --resume; --resume skips the runs that finished,
continues the interrupted one from its last checkpoint and starts the rest.

One process owns the comparison folder from start to end (an OS lock, ``source.files.ownership``;
each run inside it is locked too), and a new comparison folder appears complete, holding its
configuration.txt, so a kill at start-up leaves nothing that blocks a new start.

A run that diverges is marked "diverged" in the results table and the comparison goes on with
the next run; --resume skips it like a finished one. A run that fails (an error in its own folder,
such as a damaged checkpoint, or a crash) is reported in one line, its reason kept in its folder's
failure.txt, and the comparison goes on too; main.py then exits with 10 + the number of failed
runs, as a launcher of child processes does. Only Ctrl-C or SIGTERM stops the comparison. A
comparison counts as successful (exit status 0) when no run failed and at least one gave a test
result; when every run diverged, main.py exits with 3.
"""

import sys
import traceback

from dataclasses import dataclass
from pathlib import Path

from source.comparison.entries import read_comparison
from source.configuration import COMPARISON, differing_keys, format_configuration, key_label
from source.errors import UserError, WriteFailed, cause_of
from source.plotting.results import collect_entries, write_results
from source.quality_metric import metric_of
from source.records.metrics import read_metrics
from source.records.run_files import CONFIGURATION_FILE
from source.registries import load_configuration
from source.training import run_experiment
from source.files import create_owned_folder, hold_folder, remove_partial_files, write_text_atomically
from source.training.checkpoints import read_checkpoint
from source.training.run_folder import is_resumable

__all__ = [
    "ComparisonOutcome",
    "RunProgress",
    "create_comparison_folder",
    "prepare_comparison",
    "run_comparison",
    "run_progress",
]


@dataclass(frozen=True)
class ComparisonOutcome:
    """How a comparison ended: its folder, whether every run finished (or diverged), and the files it wrote.

    ``diverged`` and ``failed`` name the runs that diverged (numbered) or failed, ``tested`` counts
    the runs with a test result, and ``stopped_by_signal`` is the signal (SIGINT, SIGTERM) that
    stopped the comparison, if one did.
    """

    folder: Path
    finished: bool
    run_folders: list
    files: list
    table: str
    diverged: list = ()
    failed: list = ()
    tested: int = 0
    stopped_by_signal: int | None = None


def _progress(message):
    print(message, flush=True)


def _check_can_start(comparison, resume):
    """Raise ``UserError`` unless the comparison may start in its folder (or, with ``resume``, continue)."""
    folder = comparison.folder
    stored_path = folder / CONFIGURATION_FILE
    if not resume:
        if folder.exists() and not (folder.is_dir() and not any(folder.iterdir())):
            raise UserError(
                f"{folder} already exists: continue that comparison with --resume, or start a new one "
                "under another name with --set experiment.name=NAME"
            )
        return
    if not folder.exists():
        raise UserError(f"cannot resume {folder}: it does not exist; start the comparison without --resume")
    stored = load_configuration(stored_path) if stored_path.is_file() else None
    if stored is None or not stored.is_comparison:
        raise UserError(f"cannot resume {folder}: it has no comparison configuration.txt, so it is not a comparison")
    changed = [
        key_label(path[:-1], path[-1])
        for path in differing_keys(stored, comparison.configuration)
        if not is_resumable(path) and not _is_addition(path, stored, comparison)
    ]
    if changed:
        raise UserError(
            f"cannot resume {folder}: {', '.join(changed)} differ from its configuration.txt (entries and "
            f"seeds may be added, not changed); resume with --config {stored_path}"
        )


def _is_addition(path, stored, comparison):
    """Whether a difference only adds an entry, seeds, or values of a swept argument to the stored comparison."""
    if path[0] != COMPARISON:
        return False
    if path == (COMPARISON, "seeds"):
        return set(read_comparison(stored).seeds) <= set(comparison.seeds)
    if len(path) == 4 and path[2] == "sweep":
        _, entry, _, argument = path
        before = stored[COMPARISON].get(entry, {}).get("sweep", {}).get(argument)
        after = comparison.configuration[COMPARISON][entry]["sweep"].get(argument)
        return isinstance(before, list) and isinstance(after, list) and set(before) <= set(after)
    return len(path) == 2 and path[1] not in stored[COMPARISON]


@dataclass(frozen=True)
class RunProgress:
    """How far a run folder's last checkpoint has come: its step, and whether it finished or diverged."""

    step: int
    finished: bool
    diverged: bool

    @property
    def done(self):
        """Whether nothing is left to train: the run finished, or diverged."""
        return self.finished or self.diverged


def run_progress(run_folder, total):
    """The ``RunProgress`` of an existing (or not yet started) run of ``total`` steps.

    A run that diverged before its first checkpoint has only its "diverged" record. A damaged
    last.pt counts as step 0 here; resuming the run reports it (or falls back to the previous
    checkpoint).
    """
    if not run_folder.last_checkpoint_path.exists():
        metrics = run_folder.metrics_path
        diverged = metrics.is_file() and any(record["split"] == "diverged" for record in read_metrics(metrics))
        return RunProgress(0, False, diverged)
    try:
        checkpoint = read_checkpoint(run_folder.last_checkpoint_path, ("step", "finished"))
    except UserError:
        return RunProgress(0, False, False)
    finished = bool(checkpoint["finished"]) and checkpoint["step"] == total
    return RunProgress(checkpoint["step"], finished, bool(checkpoint.get("diverged")))


def prepare_comparison(configuration, resume):
    """Check that the comparison ``configuration`` may start (or, with ``resume``, continue) and build
    every entry once; return its ``Comparison``. Creates nothing: ``create_comparison_folder`` does."""
    comparison = read_comparison(configuration)
    _check_can_start(comparison, resume)
    comparison.check_entries_build()
    return comparison


def create_comparison_folder(comparison, resume):
    """Create the comparison folder complete with its resolved configuration (or, with ``resume``,
    tidy it and write the configuration again); return its ``FolderLock``, held by this process."""
    folder = comparison.folder
    configuration = comparison.configuration
    if resume and folder.is_dir() and (folder / CONFIGURATION_FILE).is_file():
        lock = hold_folder(folder, what="comparison folder")
        remove_partial_files(folder)
        _write_configuration(configuration, folder, folder)
        return lock
    return create_owned_folder(
        folder, lambda staging: _write_configuration(configuration, folder, staging), what="comparison folder"
    )


def run_comparison(configuration, *, resume=False, stop_after_steps=None):
    """Train every entry of the comparison ``configuration`` with every seed; write and return the results.

    Everything (each entry's optimizer and schedule on the real model included) is validated
    before the comparison folder is created. ``stop_after_steps`` stops after that many training
    steps in all, as if interrupted; so does Ctrl-C. Returns a ``ComparisonOutcome``.
    """
    comparison = read_comparison(configuration)
    folder = comparison.folder
    lock = None
    try:
        if resume and folder.is_dir() and (folder / CONFIGURATION_FILE).is_file():
            lock = hold_folder(folder, what="comparison folder")
        _check_can_start(comparison, resume)
        comparison.check_entries_build()
        if lock is None:
            lock = create_owned_folder(
                folder, lambda staging: _write_configuration(configuration, folder, staging), what="comparison folder"
            )
        else:
            remove_partial_files(folder)
            _write_configuration(configuration, folder, folder)
        return _run_all(comparison, configuration, stop_after_steps)
    finally:
        if lock is not None:
            lock.release()


def _write_configuration(configuration, folder, target):
    """Write the comparison's resolved configuration.txt of ``folder`` into ``target`` (where it is built)."""
    header = [
        f"Resolved configuration of the comparison in {folder}: {configuration.source},",
        "the --set overrides and the defaults of source/configuration/configspec.ini.",
        f"Resume it with: python main.py --config {folder / CONFIGURATION_FILE} --resume",
    ]
    write_text_atomically(format_configuration(configuration, header), Path(target) / CONFIGURATION_FILE)


def _run_all(comparison, configuration, stop_after_steps):
    """Train the runs that are not finished, then write the results; return the ``ComparisonOutcome``."""
    folder = comparison.folder
    total = configuration.settings.training.training_steps
    runs = comparison.runs()
    steps_left = stop_after_steps
    stopped, diverged, failed, tested, stopped_by_signal = False, [], [], 0, None
    for number, run in enumerate(runs, start=1):
        name = f"[{number}/{len(runs)}] {run.name}"
        run_configuration, run_folder = run.configuration, run.folder
        progress = run_progress(run_folder, total)
        start = progress.step
        if progress.done:
            _progress(f"{name}: {'finished' if progress.finished else 'diverged'} already, skipped")
            tested += progress.finished
            if progress.diverged:
                diverged.append(name)
            continue
        if steps_left == 0:
            stopped = True
            break
        _progress(f"{name}: {'resuming from step ' + str(start) if start else 'starting'} in {run_folder.path}")
        run_folder.failure_path.unlink(missing_ok=True)
        try:
            outcome = run_experiment(run_configuration, resume=run_folder.path.exists(), stop_after_steps=steps_left)
        except Exception as error:  # a failing run never stops the others; Ctrl-C and SIGTERM (not Exceptions) do
            failed.append(run.name)
            _report_failure(name, run_folder, error)
            continue
        if steps_left is not None:
            steps_left -= outcome.step - start
        if outcome.diverged:
            _progress(f"{name}: diverged; going on with the next run")
            diverged.append(name)
            continue
        if not outcome.finished:
            stopped, stopped_by_signal = True, outcome.stopped_by_signal
            break
        tested += 1
        quality = metric_of(outcome.test).name
        _progress(f"{name}: finished, test {quality} {outcome.test[quality]:.4f}")
    if stopped:
        _progress(f"comparison stopped; continue it with --resume (results so far in {folder})")
    if diverged:
        _progress(f"diverged (marked so in the results): {'; '.join(diverged)}")
    files, table = write_results(collect_entries([folder]), folder)
    return ComparisonOutcome(
        folder=folder,
        finished=not stopped and not failed,
        run_folders=[run.folder.path for run in runs],
        files=files,
        table=table,
        diverged=diverged,
        failed=failed,
        tested=tested,
        stopped_by_signal=stopped_by_signal,
    )


def _report_failure(name, run_folder, error):
    """One line naming the failed run and why (after the traceback of a crash), also kept in its failure.txt."""
    if isinstance(error, (UserError, WriteFailed)):
        reason = " ".join(str(error).split())
    elif isinstance(error, OSError):
        reason = f"{error.filename or 'a file'}: {cause_of(error)}"
    else:
        traceback.print_exception(error, file=sys.stderr)
        reason = f"{type(error).__name__}: {' '.join(str(error).split())} (traceback above)"
    _progress(f"{name}: failed ({reason})")
    if run_folder.path.is_dir():
        run_folder.failure_path.write_text(reason + "\n", encoding="utf-8")
