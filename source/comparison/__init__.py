"""Comparisons of optimizers: one configuration, several entries, one run per entry (or sweep point) and seed.

``run_comparison(configuration)`` trains them all in ``<runs_folder>/<experiment name>/`` and
writes results.csv, results.md and the figures there (``source.plotting.results``, which writes
the same files again from the folders on disk). ``grid.py`` reads grid files, which name several
comparisons.
"""

from source.comparison.entries import Comparison, ComparisonRun, read_comparison
from source.comparison.runner import (
    ComparisonOutcome,
    RunProgress,
    create_comparison_folder,
    prepare_comparison,
    run_comparison,
    run_progress,
)

__all__ = [
    "Comparison",
    "ComparisonOutcome",
    "ComparisonRun",
    "RunProgress",
    "create_comparison_folder",
    "prepare_comparison",
    "read_comparison",
    "run_comparison",
    "run_progress",
]
