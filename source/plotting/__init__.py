"""The results of finished runs, read from their folders: figures (PNG and PDF), tables and reports.

``curves.py`` draws one or several runs from their metrics files, ``results.py`` writes a
comparison's results table and figures, ``paper_report.py`` the report over several experiments.
``python -m source.plotting FOLDER... [--out DIR]`` redraws them from run or comparison folders
without training (see ``__main__.py``); nothing here imports the training or the models.
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
