"""Run one experiment, or a comparison of optimizers, of the LABPAL project from a configuration file.

    python main.py                                   # ./configuration_lab_pal.txt
    python main.py --config configs/other.txt --set training.batch_size=64
    python main.py --set optimizer.arguments.step_adaptation=3.6
    python main.py --resume                          # continue the run from its last checkpoint
    python main.py --config configs/compare_digits.txt   # a comparison: every entry, one by one
    python main.py --config configs/paper.txt            # a grid file: each comparison it names
    python main.py --config a.txt --config b.txt --set launcher.parallel=2   # two comparisons, 2 runs at once
    python main.py --config configs/compare_digits.txt --status      # the state of every run; --dry-run: the plan

A run trains in <runs_folder>/<experiment name>/ (metrics, TensorBoard events, checkpoints, the
resolved configuration) and draws figures into <plots_folder>/<experiment name>/. A comparison (a
file with a [comparison] section) trains each entry and seed as such a run inside
<runs_folder>/<experiment name>/ and writes the results table and figures there. Both print where
everything went.

[launcher] places the runs of comparisons (source/launcher/): in this process one after another
(parallel = 1), in child processes on this machine (parallel = N or auto), or as SLURM jobs
(name = slurm, through submitit; --wait waits for them and writes the results).

Several processes: ``torchrun --nproc_per_node=N main.py ...`` trains one run in N processes
(source/training/distributed.py); rank 0 alone writes and prints the report.

Exit status: 0 when the run (or comparison) finished or stopped after --stop-after-steps; 2 after
one line on stderr about a problem with the input; 3 when the run diverged (a comparison: when
every run diverged; otherwise its table marks the diverged ones); 4 when a process of a run in
several processes died or stopped answering (the others stop; continue with --resume); 5 after
one line naming a file the system would not let it write (full disk, file-size limit,
permissions; the last checkpoint is kept, continue with --resume) or a figure that could not be
drawn (the finished run's results are kept); 10 + N when N runs of a comparison or grid failed
(at most 99; the others went on); 130 and 143 when SIGINT (Ctrl-C) or SIGTERM stopped it, after
saving its checkpoint in training (a second signal, or one during the test or the figures, stops
at once, same status; one before training began leaves nothing that blocks a new start). A second
process that starts or resumes a run or comparison another one is working on gets one line naming
that process, and status 2.
"""

import argparse
import contextlib
import signal
import sys
import threading
from pathlib import Path

from source.comparison import run_comparison
from source.comparison.grid import expand_grids
from source.errors import UserError, WriteFailed
from source.files import check_writable_folder
from source.launcher import (
    FAILED_RUNS_BASE,
    MOST_FAILED_STATUS,
    build_grid,
    check_several,
    comparison_folder_of,
    failed_runs_status,
    launch,
    print_plan,
    print_status,
    read_launcher,
    runs_in_children,
)
from source.plotting import PlottedRun, check_plot_folder, claim_plot_folder, legend_label, plot_runs
from source.records.run_files import CONFIGURATION_FILE, LAST_CHECKPOINT_FILE
from source.registries import load_configuration
from source.training import RunFolder, run_experiment
from source.training.distributed import (
    RankLost,
    ReportedElsewhere,
    from_environment,
    reported_once_per_node,
    speaks_for_node,
)
from source.training.trainer import Aborted
from source.training.run_folder import configuration_to_resume

DEFAULT_CONFIGURATION = "configuration_lab_pal.txt"
USAGE_ERROR = 2
DIVERGED = 3
SIGNAL_STATUS_BASE = 128
"""A run stopped by signal N exits with 128 + N, as the shell reports a process killed by it."""


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as a one-line ``UserError``."""

    def error(self, message):
        raise UserError(f"{message} (see python main.py --help)")


def _positive_integer(text):
    value = int(text) if text.strip().isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def parse_arguments(argv):
    """The command line: --config, --set (repeatable), --resume, --stop-after-steps."""
    parser = _ArgumentParser(
        description="Train and evaluate one LABPAL experiment, or a comparison of optimizers.", allow_abbrev=False
    )
    parser.add_argument(
        "--config",
        dest="configs",
        action="append",
        metavar="PATH",
        help=f"configuration file (default: {DEFAULT_CONFIGURATION}), or a grid file naming several comparison "
        "files; repeat it to launch several together",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one configuration key, e.g. training.batch_size=64 or "
        "optimizer.arguments.step_adaptation=3.6 (repeatable)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run (or comparison) in <runs_folder>/<experiment name> from its last checkpoint, "
        "with the configuration saved there; --set may change only where and how it runs, its length and "
        "its logging",
    )
    parser.add_argument(
        "--stop-after-steps",
        type=_positive_integer,
        metavar="N",
        help="stop after N more training steps (in all, for a comparison), saving a checkpoint as if "
        "interrupted (continue with --resume)",
    )
    parser.add_argument(
        "--status",
        action="store_true",
        help="print the state of every run (finished, stopped, failed, diverged, not started; step; last "
        "validation result) from the run folders, and exit without touching anything",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="list every run, where it would train and the steps in all, and exit without writing anything",
    )
    parser.add_argument(
        "--wait",
        action="store_true",
        help="with [launcher] name = slurm: wait for the jobs, then write the results (default: submit and return)",
    )
    arguments = parser.parse_args(argv)
    arguments.configs = arguments.configs or [DEFAULT_CONFIGURATION]
    return arguments


def _report(run_folder, plot_files, outcome):
    """Print where the run's files went and its test result."""
    folder = run_folder.path
    event_files = run_folder.event_files()
    checkpoints = [path for path in (run_folder.last_checkpoint_path, run_folder.best_checkpoint_path) if path.exists()]
    lines = [
        ("run folder", str(folder)),
        ("configuration", str(run_folder.configuration_path)),
        ("metrics", str(run_folder.metrics_path)),
        (
            "event files",
            f"{', '.join(map(str, event_files))} (view: tensorboard --logdir {folder.parent})"
            if event_files
            else "none ([logging] tensorboard = false)",
        ),
        ("checkpoints", ", ".join(map(str, checkpoints)) or "none yet"),
        ("plots", ", ".join(map(str, plot_files)) or "none yet"),
    ]
    if outcome.test is not None:
        quality = "accuracy" if "accuracy" in outcome.test else "rmse"
        lines.append(
            (
                f"test {quality}",
                f"{outcome.test[quality]:.4f} (checkpoint of step {outcome.best_step}, "
                f"validation {quality} {outcome.best_validation[quality]:.4f})",
            )
        )
    width = max(len(name) for name, _ in lines) + 1
    for name, value in lines:
        print(f"{name + ':':<{width}} {value}")


def _report_comparison(outcome):
    """Print where the comparison's files went, and its results table."""
    figures = [path for path in outcome.files if path.suffix == ".png"]
    tables = [path for path in outcome.files if path.suffix != ".png"]
    lines = [
        ("comparison folder", str(outcome.folder)),
        ("runs", f"{len(outcome.run_folders)} run folders, {outcome.folder}/<entry>/[<point>/]seed_<seed>/ "
                 f"(view: tensorboard --logdir {outcome.folder})"),
        ("results", ", ".join(map(str, tables))),
        ("figures", ", ".join(map(str, figures)) + " (and .pdf)" if figures else "none yet"),
    ]  # fmt: skip
    width = max(len(name) for name, _ in lines) + 1
    print()
    print(outcome.table, end="")
    print()
    for name, value in lines:
        print(f"{name + ':':<{width}} {value}")


def _exit_status(stopped_by_signal, diverged, figures_failed=False):
    """128 + the signal that stopped the run, DIVERGED, WriteFailed's status when the figures failed, or 0."""
    if stopped_by_signal is not None:
        return SIGNAL_STATUS_BASE + stopped_by_signal
    if diverged:
        return DIVERGED
    return WriteFailed.EXIT_STATUS if figures_failed else 0


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the process at once; ``left`` says what remains to continue from."""

    def __init__(self, signal_number, left):
        super().__init__(f"interrupted by signal {signal_number}")
        self.signal_number = signal_number
        self.left = left


def _what_is_left(folder):
    """What a run or comparison folder keeps after an abort, and how to go on."""
    if any(folder.glob(LAST_CHECKPOINT_FILE)) or any(folder.glob(f"*/*/{LAST_CHECKPOINT_FILE}")):
        return "the last checkpoint is kept, continue with --resume"
    if (folder / CONFIGURATION_FILE).is_file():
        return f"{folder} has no checkpoint yet; --resume starts it from step 0"
    return "nothing was saved; start it again"


def run(arguments):
    """Load every configuration (a grid file: each file it names); show the state or plan, launch the
    grid, or train each configuration in turn here; return the exit status."""
    with reported_once_per_node():
        configurations = [load_configuration(path, arguments.overrides) for path in expand_grids(arguments.configs)]
    settings = read_launcher(configurations)
    check_several(configurations)
    if arguments.status:
        print_status(build_grid(configurations, resume=False, check=False))
        return 0
    in_children = runs_in_children(configurations, settings)
    if arguments.dry_run:
        print_plan(build_grid(configurations, resume=arguments.resume, check=True), settings, in_children)
        return 0
    if in_children:
        if arguments.stop_after_steps is not None:
            raise UserError(
                "--stop-after-steps stops runs trained in this process: use it with [launcher] parallel = 1"
            )
        return launch(configurations, settings, resume=arguments.resume, wait=arguments.wait)
    statuses = []
    for configuration in configurations:
        statuses.append(run_configuration(arguments, configuration))
        if statuses[-1] > SIGNAL_STATUS_BASE:
            break
    return _status_of_all(statuses)


def _status_of_all(statuses):
    """The exit status of configurations trained one after another: a signal's; else, when runs failed,
    FAILED_RUNS_BASE + their number in all, as the launcher counts them; else the worst."""
    failed = sum(status - FAILED_RUNS_BASE for status in statuses if FAILED_RUNS_BASE <= status <= MOST_FAILED_STATUS)
    if failed and max(statuses) <= MOST_FAILED_STATUS:
        return min(FAILED_RUNS_BASE + failed, MOST_FAILED_STATUS)
    return max(statuses)


def run_configuration(arguments, configuration):
    """Join the other processes (torchrun), train, plot, report; return the exit status."""
    experiment = configuration.settings.experiment
    folder = Path(experiment.runs_folder) / experiment.name
    try:
        return _run_configuration(arguments, configuration)
    except KeyboardInterrupt as error:
        raise Interrupted(getattr(error, "signal_number", signal.SIGINT), _what_is_left(folder)) from None


def _run_configuration(arguments, configuration):
    with reported_once_per_node():
        if arguments.resume and not configuration.is_comparison:
            # A resumed run continues with the configuration saved in its folder.
            configuration, ignored = configuration_to_resume(configuration)
            if ignored:
                print(ignored, flush=True)
        experiment = configuration.settings.experiment
        with configuration.blame("experiment", "device"):
            distributed = from_environment(experiment.device, experiment.distributed_timeout_seconds)
    try:
        with distributed.quiet_unless_main():
            return _run(arguments, configuration, distributed)
    finally:
        distributed.shutdown()


def _run(arguments, configuration, distributed):
    if configuration.is_comparison:
        if distributed.is_distributed:
            raise UserError(
                f"{configuration.source} is a comparison, which runs in one process; start it without torchrun, "
                "or train its entries one by one with torchrun as ordinary runs"
            )
        outcome = run_comparison(configuration, resume=arguments.resume, stop_after_steps=arguments.stop_after_steps)
        _report_comparison(outcome)
        if outcome.failed and outcome.stopped_by_signal is None:
            return failed_runs_status(outcome.failed, len(outcome.run_folders))
        if outcome.diverged and not outcome.tested:
            print("error: every run of the comparison diverged; see results.md", file=sys.stderr)
        return _exit_status(outcome.stopped_by_signal, outcome.diverged and not outcome.tested)
    run_folder = RunFolder.of(configuration)
    # A run of a comparison (a child of a launcher) draws no figures of its own: the comparison's are its figures.
    in_comparison = comparison_folder_of(run_folder.path) is not None
    settings = configuration.settings
    plot_folder = Path(settings.logging.plots_folder) / settings.experiment.name
    if not in_comparison:
        with configuration.blame("logging", "plots_folder"):
            check_writable_folder(plot_folder)
            check_plot_folder(plot_folder, run_folder.path)
    outcome = run_experiment(
        configuration, resume=arguments.resume, stop_after_steps=arguments.stop_after_steps, distributed=distributed
    )
    plot_files, figures_failed = [], None
    has_metrics = run_folder.metrics_path.exists() and run_folder.metrics_path.stat().st_size
    redraw = f"python -m source.plotting {run_folder.path} --out {plot_folder}"
    if distributed.is_main and has_metrics and not in_comparison:
        try:
            claim_plot_folder(plot_folder, run_folder.path)
            plot_files = plot_runs(
                [PlottedRun(legend_label(configuration), run_folder.metrics_path)],
                plot_folder,
                dataset=settings.data.name,
                model=settings.model.name,
            )
        except WriteFailed as error:
            figures_failed = error
        except KeyboardInterrupt as error:
            print(f"stopped while drawing the figures; the run's results are kept in {run_folder.path}; "
                  f"draw them with {redraw}", file=sys.stderr)  # fmt: skip
            return SIGNAL_STATUS_BASE + getattr(error, "signal_number", signal.SIGINT)
    _report(run_folder, plot_files, outcome)
    if outcome.diverged and distributed.is_main:
        print(f"error: {outcome.diverged}", file=sys.stderr)
    if figures_failed is not None:
        print(f"error: {figures_failed}; the run's results are kept in {run_folder.path}; once that is fixed, "
              f"draw the figures with {redraw}", file=sys.stderr)  # fmt: skip
    return _exit_status(outcome.stopped_by_signal, outcome.diverged, figures_failed is not None)


@contextlib.contextmanager
def _signals_stop_at_once():
    """Inside, SIGTERM stops the process as Ctrl-C does (``Aborted``), so that it reports what it kept;
    the training loop installs its own handlers, which stop at the next step and save."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {number: signal.getsignal(number) for number in signals}

    def stop(number, frame):
        raise Aborted(number)

    for number in signals:
        signal.signal(number, stop)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def main(argv=None):
    """Entry point: returns the exit status (see the module docstring)."""
    try:
        with _signals_stop_at_once():
            with reported_once_per_node():
                arguments = parse_arguments(argv)
            return run(arguments)
    except ReportedElsewhere as error:
        return error.exit_status
    except RankLost as error:
        print(f"error: {error}", file=sys.stderr)
        return RankLost.EXIT_STATUS
    except UserError as error:
        print(f"error: {' '.join(str(error).splitlines())}", file=sys.stderr)
        return USAGE_ERROR
    except WriteFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return WriteFailed.EXIT_STATUS
    except OSError as error:
        # Any write the steps above do not name themselves: the system's words and the file.
        print(f"error: {error.filename or 'a file'}: {error.strerror or error}; once that is fixed, "
              "continue with --resume", file=sys.stderr)  # fmt: skip
        return WriteFailed.EXIT_STATUS
    except KeyboardInterrupt as error:
        # torchrun passes a Ctrl-C to every process, and stops the others with SIGTERM when one fails.
        if speaks_for_node():
            print(f"aborted; {getattr(error, 'left', 'nothing was written yet')}", file=sys.stderr)
        return SIGNAL_STATUS_BASE + getattr(error, "signal_number", signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
