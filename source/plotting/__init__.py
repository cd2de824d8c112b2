"""Figures of one or several runs from their metrics files (PNG and PDF).

``python -m source.plotting FOLDER... [--out DIR]`` redraws the figures and the results table of
run or comparison folders without training (see ``__main__.py``).
"""

from source.plotting.curves import (
    OWNER_FILE,
    PALETTE,
    PlottedRun,
    check_plot_folder,
    claim_plot_folder,
    legend_label,
    plot_runs,
    quality_of,
)
from source.records.metrics import read_metrics

__all__ = [
    "OWNER_FILE",
    "PALETTE",
    "PlottedRun",
    "check_plot_folder",
    "claim_plot_folder",
    "legend_label",
    "plot_runs",
    "quality_of",
    "read_metrics",
]
