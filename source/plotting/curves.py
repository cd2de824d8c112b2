"""PNG figures of one or several runs, read from their metrics files.

One call draws any number of runs into the same four figures, one line (or bar) per run, so a
comparison of optimizers like the paper's is ``plot_runs([PlottedRun("LABPAL-NSGD", path_a),
PlottedRun("SGD", path_b)], folder, dataset="cifar100", model="mobilenet_v2_cifar")``.
Figures are drawn with matplotlib's Figure API (Agg canvas): no display, no global pyplot state.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from source.errors import UserError

__all__ = ["OWNER_FILE", "PlottedRun", "check_plot_folder", "claim_plot_folder", "plot_runs", "read_metrics"]

OWNER_FILE = "run_folder.txt"
"""Names the run folder whose plots a plot folder holds, so another run's plots are never overwritten."""


@dataclass(frozen=True)
class PlottedRun:
    """One run to draw: its legend label and its metrics file (metrics.jsonl in its run folder)."""

    label: str
    metrics_path: Path


def read_metrics(path):
    """The records of a metrics file, in order (one JSON object per line)."""
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


def _series(records, split, metric, *, positive_only=False):
    """Steps and values of ``metric`` in the records of ``split``; a log scale needs ``positive_only``."""
    points = [
        (record["step"], record[metric])
        for record in records
        if record["split"] == split and metric in record and (record[metric] > 0 or not positive_only)
    ]
    return [step for step, _ in points], [value for _, value in points]


def _final_value(records, split, metric):
    """The last value of ``metric`` in the records of ``split``, or None."""
    _, values = _series(records, split, metric)
    return values[-1] if values else None


def _quality_metric(runs_records):
    """"accuracy" for classification runs, "rmse" for regression runs (as their records name it)."""
    for records in runs_records:
        for record in records:
            if record["split"] == "validation":
                return "accuracy" if "accuracy" in record else "rmse"
    return "accuracy"


def _new_figure(title, y_label):
    figure = Figure(figsize=(6.4, 4.4), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.set_title(title)
    axes.set_ylabel(y_label)
    axes.grid(True, alpha=0.3)
    return figure, axes


def _line_figure(path, title, y_label, curves, log_scale):
    """Draw (label, steps, values) curves; return ``path``, or None when there is nothing to draw."""
    curves = [(label, steps, values) for label, steps, values in curves if steps]
    if not curves:
        return None
    figure, axes = _new_figure(title, y_label)
    for label, steps, values in curves:
        axes.plot(steps, values, label=label, linewidth=1.2)
    axes.set_xlabel("training step")
    if log_scale:
        axes.set_yscale("log")
    axes.legend()
    figure.savefig(path)
    return path


def _bar_figure(path, title, y_label, bars, is_accuracy):
    """Draw one bar per (label, value) with its value written on it; None when there is none."""
    if not bars:
        return None
    figure, axes = _new_figure(title, y_label)
    labels = [label for label, _ in bars]
    values = [value for _, value in bars]
    drawn = axes.bar(labels, values, color=[f"C{index}" for index in range(len(bars))], width=0.6)
    axes.bar_label(drawn, labels=[f"{value:.4f}" for value in values], padding=2)
    if is_accuracy:
        # Close accuracies (0.70 against 0.72) would look equal on a 0..1 axis.
        axes.set_ylim(max(0.0, min(values) - 0.05), min(1.0, max(values) + 0.03))
    else:
        axes.set_ylim(0.0, max(values) * 1.1)
    figure.savefig(path)
    return path


def plot_runs(runs, folder, *, dataset, model):
    """Write learning_rate.png, training_loss.png, validation_accuracy.png and test_accuracy.png
    (regression: validation_rmse.png, test_rmse.png) for ``runs`` into ``folder``.

    Titles read "<metric> <dataset> <model>". A figure with nothing to draw (a run without a test
    record yet) is left out. Returns the paths written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    runs_records = [(run.label, read_metrics(run.metrics_path)) for run in runs]
    quality = _quality_metric([records for _, records in runs_records])
    quality_words = "accuracy" if quality == "accuracy" else "RMSE"
    suffix = f"{dataset} {model}"
    written = [
        _line_figure(
            folder / "learning_rate.png",
            f"learning rate {suffix}",
            "learning rate",
            # A learning rate of 0 (LABPAL before its first measurement) has no place on a log scale.
            [
                (label, *_series(records, "training", "learning_rate", positive_only=True))
                for label, records in runs_records
            ],
            log_scale=True,
        ),
        _line_figure(
            folder / "training_loss.png",
            f"training loss {suffix}",
            "training loss",
            [(label, *_series(records, "training", "loss", positive_only=True)) for label, records in runs_records],
            log_scale=True,
        ),
        _line_figure(
            folder / f"validation_{quality}.png",
            f"validation {quality_words} {suffix}",
            f"validation {quality_words}",
            [(label, *_series(records, "validation", quality)) for label, records in runs_records],
            log_scale=False,
        ),
        _bar_figure(
            folder / f"test_{quality}.png",
            f"test {quality_words} {suffix}",
            f"test {quality_words} (best validation checkpoint)",
            [
                (label, _final_value(records, "test", quality))
                for label, records in runs_records
                if _final_value(records, "test", quality) is not None
            ],
            is_accuracy=quality == "accuracy",
        ),
    ]
    return [path for path in written if path is not None]


def _owner(folder):
    owner_path = Path(folder) / OWNER_FILE
    return owner_path.read_text(encoding="utf-8").strip() if owner_path.is_file() else None


def check_plot_folder(folder, run_folder):
    """Raise ``UserError`` if ``folder`` holds figures that belong to a run other than ``run_folder``."""
    folder = Path(folder)
    owner = _owner(folder)
    has_figures = folder.is_dir() and any(folder.glob("*.png"))
    if has_figures and owner != str(Path(run_folder).resolve()):
        raise UserError(
            f"{folder} holds the plots of {owner or 'another run'}; choose another experiment name "
            "or [logging] plots_folder"
        )


def claim_plot_folder(folder, run_folder):
    """Create ``folder`` and record that it holds the plots of ``run_folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / OWNER_FILE).write_text(f"{Path(run_folder).resolve()}\n", encoding="utf-8")
