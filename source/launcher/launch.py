"""Launch a grid where [launcher] says, show its state (--status) or its plan (--dry-run).

Everything is checked before anything is created: the [launcher] section, every comparison
(entries built once) and every run folder. Runs that finished or diverged already are skipped, so
launching again (with --resume) starts only what is unfinished. One line per run start and end;
the results and figures of each comparison are written when its last run has ended.
"""

import shlex
import sys
from dataclasses import dataclass

import torch

from source.errors import UserError
from source.launcher.grid import build_grid, run_state, write_comparison_results
from source.launcher.local import child_slots, train_in_children
from source.launcher.slurm import submit_runs, wait_for_jobs

__all__ = [
    "FAILED_RUNS_BASE",
    "MOST_FAILED_STATUS",
    "check_several",
    "failed_runs_status",
    "launch",
    "plan",
    "print_plan",
    "print_status",
    "runs_in_children",
]

FAILED_RUNS_BASE = 10
"""A grid in which N runs failed exits with FAILED_RUNS_BASE + N (at most MOST_FAILED_STATUS)."""
MOST_FAILED_STATUS = 99
DIVERGED_STATUS = 3
ENDED = ("finished", "diverged", "failed")
"""Events after which a run will not train again in this launch (a stopped run resumes on the next)."""


def runs_in_children(configurations, settings):
    """Whether the grid goes through the launcher (children or SLURM) rather than this process."""
    if settings.name == "slurm":
        return True
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return any(configuration.is_comparison for configuration in configurations) and settings.parallel_runs(gpus) > 1


def _say(message):
    print(message, flush=True)


@dataclass(frozen=True)
class PlannedRun:
    """A run of the plan: its number, the run, its state and where it would go."""

    number: int
    run: object
    state: object
    place: str


def _slurm_place(settings, run):
    gpus = settings.gpus_for(run.configuration)
    parts = [f"SLURM job: {gpus} GPU{'s' if gpus != 1 else ''}", f"{settings.cpus_per_run} CPU per task"]
    parts.append(f"{settings.time_minutes} min")
    if settings.memory_gb != "none":
        parts.append(f"{settings.memory_gb} GB")
    parts.extend(
        f"{key} {getattr(settings, key)}"
        for key in ("partition", "account", "qos", "constraint")
        if getattr(settings, key)
    )
    parts.extend(f"--{key.replace('_', '-')}={value}" for key, value in settings.sbatch_options.items())
    return ", ".join(parts)


def plan(grid, settings, parallel):
    """The ``PlannedRun``s of ``grid``: runs that are done are "skipped"; the others go to a child
    slot (in turn), this process (``parallel`` False) or a SLURM job."""
    slots = child_slots(settings, grid.runs) if parallel and settings.name == "local" else None
    planned, started = [], 0
    for number, run in enumerate(grid.runs, start=1):
        state = run_state(run)
        if state.done:
            place = f"{state.status} already, skipped"
        elif settings.name == "slurm":
            place = _slurm_place(settings, run)
        elif slots:
            place = (
                f"child process {started % len(slots) + 1} of {len(slots)}, {slots[started % len(slots)].describe()}"
            )
        else:
            place = f"this process, device {run.configuration.settings.experiment.device}"
        started += not state.done
        planned.append(PlannedRun(number, run, state, place))
    return planned


def print_plan(grid, settings, parallel):
    """--dry-run: every run, where it would go, and the steps in all and still to train; writes nothing."""
    planned = plan(grid, settings, parallel)
    for item in planned:
        _say(
            f"[{item.number}/{len(planned)}] {item.run.name}: {item.run.folder.path}, "
            f"{item.run.total_steps} steps, {item.place}"
        )
    total = sum(item.run.total_steps for item in planned)
    left = sum(item.run.total_steps - item.state.step for item in planned if not item.state.done)
    starting = sum(not item.state.done for item in planned)
    _say(
        f"{len(planned)} runs, {total} steps in all; {starting} to start, {left} steps to train "
        "(dry run: nothing written)"
    )


def _format_validation(state):
    if state.validation is None or state.validation[1] is None:
        return "–"
    quality, value = state.validation
    return f"{quality} {value:.4f}"


def print_status(grid):
    """--status: each run's state, step and last validation result from its folder; touches nothing."""
    counts = {}
    for number, run in enumerate(grid.runs, start=1):
        state = run_state(run)
        counts[state.status] = counts.get(state.status, 0) + 1
        line = (
            f"[{number}/{len(grid.runs)}] {run.name}: {state.status}, step {state.step}/{state.total}, "
            f"last validation {_format_validation(state)}, {run.folder.path}"
        )
        if state.failure:
            line += f" ({state.failure})"
        _say(line)
    _say(", ".join(f"{count} {status}" for status, count in sorted(counts.items())))


def _numbered(grid):
    return {run: f"[{number}/{len(grid.runs)}] {run.name}" for number, run in enumerate(grid.runs, start=1)}


def launch(configurations, settings, *, resume, wait, cluster="slurm"):
    """Train (or submit) the grid of ``configurations``; return the exit status.

    0: every run finished (or, for SLURM without ``wait``, was submitted); 3: every run diverged;
    FAILED_RUNS_BASE + N: N runs failed. SIGINT or SIGTERM stops the children with checkpoints and
    raises ``KeyboardInterrupt``; once SLURM jobs are submitted, it stops the launcher only (the jobs
    go on) and the ``KeyboardInterrupt`` says in ``left`` how to see and cancel them.
    """
    grid = build_grid(configurations, resume=resume, check=True)
    locks = grid.create_folders(resume)
    try:
        return _launch(grid, settings, locks, wait=wait, cluster=cluster)
    finally:
        for lock in locks:
            lock.release()


def _launch(grid, settings, locks, *, wait, cluster):
    """Start the unfinished runs of ``grid``, whose comparison folders this process holds (``locks``)."""
    names = _numbered(grid)
    to_start = []
    for run in grid.runs:
        state = run_state(run)
        if state.done:
            _say(f"{names[run]}: {state.status} already, skipped")
        else:
            to_start.append(run)

    # Each comparison's results are written as soon as its last run has ended.
    unfinished = {comparison.folder: 0 for comparison in grid.comparisons}
    for run in to_start:
        unfinished[run.comparison_folder] = unfinished.get(run.comparison_folder, 0) + 1

    def write_results_of(folder):
        _files, table = write_comparison_results(folder, held=any(lock.held for lock in locks))
        _say(f"\n{table}\nresults and figures: {folder}\n")

    def report(run, event, detail):
        where = f" in {run.folder.path}" if event == "started" else ""
        _say(f"{names[run]}: {event}{where}" + (f" ({detail})" if detail else ""))
        if event in ENDED and run.comparison_folder is not None:
            unfinished[run.comparison_folder] -= 1
            if not unfinished[run.comparison_folder]:
                write_results_of(run.comparison_folder)

    for comparison in grid.comparisons:
        if not unfinished[comparison.folder]:
            write_results_of(comparison.folder)
    if settings.name == "slurm":
        submitted = submit_runs(to_start, settings, cluster=cluster)
        try:
            # The jobs own their runs now; the last one of a comparison writes its results under its lock.
            for lock in locks:
                lock.release()
            for run, job in submitted:
                _say(f"{names[run]}: submitted as job {job.job_id}, {run.folder.path}")
            if not wait:
                _say(
                    f"{len(submitted)} jobs submitted; see their state with {_status_command(grid)}; results are "
                    "written when the last run ends"
                )
                return 0
            ended = wait_for_jobs(submitted, report, cluster=cluster)
        except KeyboardInterrupt as interrupt:
            # The jobs are the cluster's; each owns its run and needs no launcher, so they go on.
            interrupt.left = _jobs_left(grid, submitted)
            raise
    else:
        ended = train_in_children(to_start, child_slots(settings, to_start), report)
    return _exit_status(grid, ended)


def failed_runs_status(failed, total):
    """Say on stderr which of ``total`` runs failed (``failed``: their names); return FAILED_RUNS_BASE + their number."""
    print(f"error: {len(failed)} of {total} runs failed: {'; '.join(failed)}", file=sys.stderr)
    return min(FAILED_RUNS_BASE + len(failed), MOST_FAILED_STATUS)


def _status_command(grid):
    """The command that prints the state of every run of ``grid``, from the configurations saved in its folders."""
    folders = [comparison.folder for comparison in grid.comparisons]
    folders += [run.folder.path for run in grid.runs if run.comparison_folder is None]
    configs = " ".join(f"--config {shlex.quote(str(folder / 'configuration.txt'))}" for folder in folders)
    return f"python main.py {configs} --status"


def _jobs_left(grid, submitted):
    """What an interrupted launcher leaves: the jobs whose runs have not ended go on; how to see and cancel them."""
    jobs = [job.job_id for run, job in submitted if run_state(run).status not in ENDED]
    if not jobs:
        return "every submitted job had ended"
    return (
        f"the {len(jobs)} submitted jobs whose runs have not ended go on: see them with "
        f"{_status_command(grid)}, cancel them with scancel {' '.join(jobs)}"
    )


def _exit_status(grid, ended):
    failed = [run.name for run, event in ended.items() if event == "failed"]
    if failed:
        return failed_runs_status(failed, len(grid.runs))
    states = [run_state(run).status for run in grid.runs]
    if states and all(status == "diverged" for status in states):
        print("error: every run of the grid diverged; see results.md", file=sys.stderr)
        return DIVERGED_STATUS
    return 0


def check_several(configurations):
    """Several configurations launched together must be comparisons; ``UserError`` otherwise."""
    if len(configurations) > 1:
        for configuration in configurations:
            if not configuration.is_comparison:
                raise UserError(
                    f"{configuration.source} is a single run; several --config files launched together must be "
                    "comparisons (with [comparison]): launch it on its own"
                )
