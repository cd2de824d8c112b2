"""What runs leave on disk and how it is read back, without the training: the readers of finished
runs (figures, tables, reports) need none of the models, data sets or optimizers.

``run_files``: the names of a run folder's files; ``metrics``: the metric records of metrics.jsonl;
``comparison``: a comparison's entries, sweep points and seeds and the folders of their runs.
"""

from source.records.metrics import SPLITS, read_metrics
from source.records.run_files import (
    BEST_CHECKPOINT_FILE,
    CONFIGURATION_FILE,
    EVENT_FILES,
    LAST_CHECKPOINT_FILE,
    METRICS_FILE,
    RunFiles,
)

__all__ = [
    "BEST_CHECKPOINT_FILE",
    "CONFIGURATION_FILE",
    "EVENT_FILES",
    "LAST_CHECKPOINT_FILE",
    "METRICS_FILE",
    "SPLITS",
    "RunFiles",
    "read_metrics",
]
