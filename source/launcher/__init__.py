"""Launchers: place the runs of a grid (one or more comparisons) in this process, in child
processes on this machine, or on a SLURM cluster through submitit; show its state and its plan.
"""

from source.launcher.grid import Grid, GridRun, RunState, build_grid, comparison_folder_of, run_state
from source.launcher.launch import (
    FAILED_RUNS_BASE,
    MOST_FAILED_STATUS,
    check_several,
    failed_runs_status,
    launch,
    print_plan,
    print_status,
    runs_in_children,
)
from source.launcher.settings import LauncherSettings, read_launcher

__all__ = [
    "FAILED_RUNS_BASE",
    "MOST_FAILED_STATUS",
    "Grid",
    "GridRun",
    "LauncherSettings",
    "RunState",
    "build_grid",
    "check_several",
    "comparison_folder_of",
    "failed_runs_status",
    "launch",
    "print_plan",
    "print_status",
    "read_launcher",
    "run_state",
    "runs_in_children",
]
