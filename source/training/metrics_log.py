"""The run's metric log: records appended to its metrics file, and TensorBoard scalars.

The records are those ``source.records.metrics`` describes and reads back. The metric values go to
TensorBoard as "<split>/<metric>" (e.g. validation/accuracy); an event's numbers as "<event>/<key>"
(e.g. measurement/learning_rate) and a failure's reason as text.
"""

import json
import os
import secrets
from pathlib import Path

from source.errors import UserError, writing
from source.files import open_for_append
from source.records.metrics import read_metrics

__all__ = ["MetricsLog"]


class MetricsLog:
    """Appends records to ``metrics_path`` and, when ``tensorboard`` is set, to event files in ``folder``.

    A resumed run passes the byte offset and step its checkpoint recorded: records written after
    that checkpoint are cut from the file, and TensorBoard hides events after that step, so the
    resumed run appends no duplicates.
    """

    def __init__(self, folder, metrics_path, *, tensorboard, resume_offset=0, resume_step=None):
        self.metrics_path = Path(metrics_path)
        self.folder = Path(folder)
        with writing(self.metrics_path):
            self._file = open_for_append(self.metrics_path)
        try:
            size = os.fstat(self._file.fileno()).st_size
            if size < resume_offset:
                raise UserError(
                    f"{self.metrics_path} has {size} bytes but its checkpoint expects {resume_offset}; "
                    "the file was changed, so the run cannot resume"
                )
            if resume_offset:
                # A damaged record is found now, before training, not by the figures at the end.
                read_metrics(self.metrics_path, up_to=resume_offset)
            with writing(self.metrics_path):
                self._file.truncate(resume_offset)
        except BaseException:
            self._file.close()
            raise
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported only when used: it is slow to load

            purge_step = None if resume_step is None else resume_step + 1
            # TensorBoard writes its event file by name, following links; a random suffix makes the
            # name one that nothing can be waiting under.
            with self._writing_events():
                self.writer = SummaryWriter(
                    log_dir=str(folder), purge_step=purge_step, filename_suffix=f".{secrets.token_hex(8)}"
                )

    def _writing_events(self):
        # The event writer works in a thread of its own and reports a failed write at its next call.
        return writing(f"the TensorBoard event file in {self.folder}")

    def write(self, step, split, values, details=None):
        """Append one record: ``values`` (metric names to numbers) also go to TensorBoard,
        ``details`` (such as the epoch) only to the metrics file."""
        record = {"step": step, "split": split, **values, **(details or {})}
        self._append(record)
        if self.writer is not None:
            with self._writing_events():
                for name, value in values.items():
                    self.writer.add_scalar(f"{split}/{name}", value, step)

    def _append(self, record):
        with writing(self.metrics_path):
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def write_event(self, step, event):
        """Append one event record (``event`` holds its name under "event" and plain values)."""
        self._append({"step": step, "split": "event", **event})
        if self.writer is not None:
            name = event["event"]
            with self._writing_events():
                for key, value in event.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        self.writer.add_scalar(f"{name}/{key}", value, step)
                    elif key != "event":
                        self.writer.add_text(f"{name}/{key}", str(value), step)

    def offset(self):
        """The file's length in bytes: where a resume from a checkpoint taken now continues."""
        with writing(self.metrics_path):
            self._file.flush()
            return os.fstat(self._file.fileno()).st_size

    def flush(self):
        """Push pending TensorBoard events to disk (the metrics file is flushed on every write)."""
        if self.writer is not None:
            with self._writing_events():
                self.writer.flush()

    def close(self):
        """Flush and close the metrics file and the event writer."""
        with writing(self.metrics_path):
            self._file.close()
        if self.writer is not None:
            with self._writing_events():
                self.writer.close()
