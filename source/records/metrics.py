"""A run's metric records, the JSON-lines file metrics.jsonl, and reading them back.

Each line of the metrics file is one record: {"step": int, "split": "training" | "validation" |
"test" | "event" | "diverged", then the metric names and values}. Training records carry loss,
accuracy (or rmse), learning_rate, training_batch_size, forward_passes and backward_passes (totals
since step 0) and a line search's own numbers (step_size, measurements, ...); validation records
loss, accuracy (or rmse), epoch and elapsed_seconds; the test record loss, accuracy (or rmse),
best_step (the step of the checkpoint it evaluated), elapsed_seconds and the passes. Event records
({"step", "split": "event", "event": name, ...}) are a line search's measurements and failures. A
run that diverged ends with one "diverged" record: the reason and the step it stopped at. The
training writes them (``source.training.metrics_log``); the figures and tables read them.
"""

import json

from source.errors import UserError, cause_of
from source.quality_metric import QUALITY_METRICS

__all__ = ["SPLITS", "read_metrics"]

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
    if split in ("validation", "test") and not any(_is_number(record.get(name)) for name in QUALITY_METRICS):
        return f"its {split} record has no {' or '.join(QUALITY_METRICS)}"
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
