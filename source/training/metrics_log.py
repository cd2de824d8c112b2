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
import secrets
from pathlib import Path

from source.errors import UserError, cause_of, writing
from source.files import open_for_append

__all__ = ["SPLITS", "MetricsLog", "read_metrics"]

SPLITS = ("training", "validation", "test", "event", "diverged")
"""The kinds of record, as their "split" names them."""

_MEASURED = ("training", "validation", "test")


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _problem(record):
    """Why ``record`` is not a metrics record, in words; None when it is one."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not a record"
    step, split = record.get("step"), record.get("split")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return f"its step {step!r:.30} is not a step count"
    if split not in SPLITS:
        return f"its split {split!r:.30} is none of {', '.join(SPLITS)}"
    if split in _MEASURED:
        for key, value in record.items():
            if key != "split" and value is not None and not _is_number(value):
                return f"its {key[:30]} {value!r:.30} is not a number"
    if split in ("validation", "test") and not any(_is_number(record.get(key)) for key in ("accuracy", "rmse")):
        return f"its {split} record has no accuracy or rmse"
    return None


def read_metrics(path, *, up_to=None):
    """The records of the metrics file ``path``, in order (one JSON object per line), each checked.

    A partial last line (a run killed while writing it; a resume cuts it) is left out. With
    ``up_to``, only the file's first ``up_to`` bytes are read: the records a checkpoint counts,
    every line complete. ``UserError`` naming the file and line for anything that is not a record.
    """
    try:
        with open(path, "rb") as file:
            content = file.read() if up_to is None else file.read(up_to)
    except OSError as error:
        raise UserError(f"cannot read {path}: {cause_of(error)}") from None
    lines = content.decode("utf-8", errors="replace").splitlines(keepends=True)
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if up_to is None and number == len(lines) and not line.endswith("\n"):
                break
            raise UserError(f"{path}, line {number}: not a JSON record ({error.msg}); the file was damaged") from None
        problem = _problem(record)
        if problem is not None:
            raise UserError(f"{path}, line {number}: not a metrics record: {problem}; the file was damaged")
        records.append(record)
    return records


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
