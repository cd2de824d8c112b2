"""The files a run leaves in its folder, by name: what the training writes and the readers read.

A run folder holds configuration.txt (the resolved configuration it was started with),
metrics.jsonl (its metric records, ``source.records.metrics``), the checkpoints last.pt and best.pt,
when TensorBoard logging is on its event files, and failure.txt when its last attempt in a grid
failed. A comparison folder holds its own configuration.txt and one run folder per entry, sweep
point and seed (``source.records.comparison``).
"""

from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BEST_CHECKPOINT_FILE",
    "CONFIGURATION_FILE",
    "EVENT_FILES",
    "FAILURE_FILE",
    "LAST_CHECKPOINT_FILE",
    "METRICS_FILE",
    "RunFiles",
]

CONFIGURATION_FILE = "configuration.txt"
"""The resolved configuration of a run or comparison, in its folder."""

METRICS_FILE = "metrics.jsonl"
"""A run's metric records, one JSON object per line."""

LAST_CHECKPOINT_FILE = "last.pt"
"""The checkpoint a resume continues from."""

BEST_CHECKPOINT_FILE = "best.pt"
"""The weights with the best validation metric."""

EVENT_FILES = "events.out.tfevents.*"
"""The names of TensorBoard's event files, as a glob pattern."""

FAILURE_FILE = "failure.txt"
"""Why a run's last attempt in a grid failed; removed when it starts again."""


@dataclass(frozen=True)
class RunFiles:
    """Where one run's files are."""

    path: Path

    @property
    def configuration_path(self):
        """The resolved configuration the run was started (or last resumed) with."""
        return self.path / CONFIGURATION_FILE

    @property
    def metrics_path(self):
        """The JSON-lines metrics file."""
        return self.path / METRICS_FILE

    @property
    def last_checkpoint_path(self):
        """The checkpoint a resume continues from (saved at every evaluation and at the end)."""
        return self.path / LAST_CHECKPOINT_FILE

    @property
    def best_checkpoint_path(self):
        """The weights with the best validation metric so far."""
        return self.path / BEST_CHECKPOINT_FILE

    @property
    def failure_path(self):
        """Why the run's last attempt in a grid failed, if it did."""
        return self.path / FAILURE_FILE

    def event_files(self):
        """The TensorBoard event files, oldest first."""
        return sorted(self.path.glob(EVENT_FILES))
