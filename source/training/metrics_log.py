"""The run's metric records: a JSON-lines file for plots and scripts, and TensorBoard scalars.

Each line of the metrics file is one record: {"step": int, "split": "training" | "validation" |
"test" | "event" | "diverged", then the metric names and values}. Training records carry loss,
accuracy (or rmse), learning_rate, training_batch_size, forward_passes and backward_passes (totals
since step 0) and a line search's own numbers (step_size, measurements, ...); validation records
loss, accuracy (or rmse), epoch and elapsed_seconds; the test record loss, accuracy (or rmse),
best_step (the step of the checkpoint it evaluated), elapsed_seconds and the passes. The metric
values go to TensorBoard as "<split>/<metric>" (e.g. validation/accuracy). Event records
({"step", "split": "event", "event": name, ...}) are a line search's measurements and failures;
their numbers go to TensorBoard as "<event>/<key>" (e.g. measurement/learning_rate) and a
failure's reason as text. A run that diverged ends with one "diverged" record: the reason and the
step it stopped at.
"""

import json
import os
from pathlib import Path

from source.errors import UserError

__all__ = ["MetricsLog"]


class MetricsLog:
    """Appends records to ``metrics_path`` and, when ``tensorboard`` is set, to event files in ``folder``.

    A resumed run passes the byte offset and step its checkpoint recorded: records written after
    that checkpoint are cut from the file, and TensorBoard hides events after that step, so the
    resumed run appends no duplicates.
    """

    def __init__(self, folder, metrics_path, *, tensorboard, resume_offset=0, resume_step=None):
        self.metrics_path = Path(metrics_path)
        size = self.metrics_path.stat().st_size if self.metrics_path.exists() else 0
        if size < resume_offset:
            raise UserError(
                f"{self.metrics_path} has {size} bytes but its checkpoint expects {resume_offset}; "
                "the file was changed, so the run cannot resume"
            )
        self._file = open(self.metrics_path, "a", encoding="utf-8")
        self._file.truncate(resume_offset)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported only when used: it is slow to load

            purge_step = None if resume_step is None else resume_step + 1
            self.writer = SummaryWriter(log_dir=str(folder), purge_step=purge_step)

    def write(self, step, split, values, details=None):
        """Append one record: ``values`` (metric names to numbers) also go to TensorBoard,
        ``details`` (such as the epoch) only to the metrics file."""
        record = {"step": step, "split": split, **values, **(details or {})}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"{split}/{name}", value, step)

    def write_event(self, step, event):
        """Append one event record (``event`` holds its name under "event" and plain values)."""
        self._file.write(json.dumps({"step": step, "split": "event", **event}) + "\n")
        self._file.flush()
        if self.writer is not None:
            name = event["event"]
            for key, value in event.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{name}/{key}", value, step)
                elif key != "event":
                    self.writer.add_text(f"{name}/{key}", str(value), step)

    def offset(self):
        """The file's length in bytes: where a resume from a checkpoint taken now continues."""
        self._file.flush()
        return os.fstat(self._file.fileno()).st_size

    def flush(self):
        """Push pending TensorBoard events to disk (the metrics file is flushed on every write)."""
        if self.writer is not None:
            self.writer.flush()

    def close(self):
        """Flush and close the metrics file and the event writer."""
        self._file.close()
        if self.writer is not None:
            self.writer.close()
