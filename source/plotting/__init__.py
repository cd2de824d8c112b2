"""Plots: PNG curves of one or several runs from their metrics files."""

from source.plotting.curves import (
    OWNER_FILE,
    PlottedRun,
    check_plot_folder,
    claim_plot_folder,
    plot_runs,
    read_metrics,
)

__all__ = ["OWNER_FILE", "PlottedRun", "check_plot_folder", "claim_plot_folder", "plot_runs", "read_metrics"]
