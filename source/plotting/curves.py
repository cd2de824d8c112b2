"""Figures of one or several runs, read from their metrics files, as .png and .pdf.

One call draws any number of entries into the same figures, one colour per entry (by its
position in the list, the same in every figure): the learning rate (log scale, a line search's
measurements marked on it), the training loss (log scale), the validation accuracy or RMSE, the
test accuracy or RMSE of the best validation checkpoint (one dot per entry), and the training
batch size. An entry with several metrics files (seeds) is drawn as the mean with a min–max band.
Titles read "<metric> <data set> <model>". Figures use matplotlib's Figure API (Agg canvas): no
display, no global pyplot state. A figure with nothing to draw is left out, and so is any value a
metrics file does not have (older files lack the passes, batch sizes and events).
"""

import math
import os
import statistics
import textwrap
from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from source.errors import UserError, WriteFailed, cause_of, writing
from source.files import replace_atomically, write_text_atomically
from source.quality_metric import ACCURACY, metric_named, metric_of
from source.records.comparison import arguments_text
from source.records.metrics import read_metrics

__all__ = [
    "OWNER_FILE",
    "PALETTE",
    "Panel",
    "PlottedRun",
    "check_plot_folder",
    "claim_plot_folder",
    "draw_dots",
    "draw_lines",
    "figure_panels",
    "label_log_axis",
    "legend_label",
    "measurement_handle",
    "plot_runs",
    "quality_of",
]

OWNER_FILE = "run_folder.txt"
"""Names the run folder whose plots a plot folder holds, so another run's plots are never overwritten."""
_LONGEST_OWNER = 4096

PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
    "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#000000", "#e6ab02",
)  # fmt: skip
"""Entry colours in entry order; entries past its end repeat them with dashed lines."""

_PLAIN_TEXT = {"parse_math": False, "usetex": False}
"""Labels and names are drawn as written: a "$" is a dollar sign, not the start of a formula."""

_FORMATS = (".png", ".pdf")
# Without a creation date the PDF files of the same figures are the same bytes.
_METADATA = {".png": {}, ".pdf": {"CreationDate": None}}


@dataclass(frozen=True)
class PlottedRun:
    """One entry to draw: its legend label, the metrics files of its runs (one per seed; a single
    path is one run), a short label for the axis of the test figure (default: the label), and its
    colour's index in ``PALETTE`` (default: its position among the entries drawn)."""

    label: str
    metrics_paths: tuple
    short_label: str | None = None
    colour: int | None = None

    def __post_init__(self):
        paths = self.metrics_paths
        paths = (paths,) if isinstance(paths, (str, Path)) else tuple(paths)
        object.__setattr__(self, "metrics_paths", tuple(Path(path) for path in paths))
        object.__setattr__(self, "short_label", self.short_label or self.label)


def legend_label(configuration, label=None):
    """A run's legend text: ``label`` (default: [experiment] label, or name) and its explicit optimizer
    and schedule arguments, e.g. "PAL (update_step_adaptation 1.66, measuring_step 1)"."""
    settings = configuration.settings
    label = label or settings.experiment.label or settings.experiment.name
    details = [arguments_text(settings.optimizer.arguments)]
    schedule = settings.schedule
    if schedule.name != "none":
        details.append(" ".join(filter(None, (schedule.name, arguments_text(schedule.arguments)))))
    details = [detail for detail in details if detail]
    return f"{label} ({'; '.join(details)})" if details else label


def quality_of(runs_records):
    """"accuracy" for classification runs, "rmse" for regression runs (as their records name it)."""
    for records in runs_records:
        for record in records:
            if record["split"] in ("training", "validation", "test"):
                return metric_of(record).name
    return ACCURACY.name


def _per_step(records, split, key, *, positive_only=False):
    """{step: value} of ``key`` in the records of ``split``; a log scale needs ``positive_only``."""
    series = {}
    for record in records:
        value = record.get(key)
        if record["split"] != split or not isinstance(value, (int, float)) or value != value:
            continue
        if value > 0 or not positive_only:
            series[record["step"]] = value
    return series


def _band(per_seed):
    """Steps that every seed has, with the mean, minimum and maximum over the seeds at each."""
    steps = sorted(set.intersection(*(set(series) for series in per_seed))) if per_seed else []
    columns = [[series[step] for series in per_seed] for step in steps]
    return (
        steps,
        [statistics.fmean(column) for column in columns],
        [min(column) for column in columns],
        [max(column) for column in columns],
    )


def _style(index):
    return PALETTE[index % len(PALETTE)], "-" if index < len(PALETTE) else "--"


def _new_figure(title, height):
    figure = Figure(figsize=(7.0, height), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.set_title(title, **_PLAIN_TEXT)
    axes.grid(True, alpha=0.3)
    return figure, axes


def _save(figure, stem):
    """Draw ``figure`` into ``stem``.png and .pdf; ``WriteFailed`` naming the file when either fails."""
    for suffix in _FORMATS:
        path = stem.with_suffix(suffix)
        try:
            replace_atomically(
                path, lambda file, suffix=suffix: figure.savefig(file, format=suffix[1:], metadata=_METADATA[suffix])
            )
        except (OSError, WriteFailed):
            raise
        except Exception as error:  # matplotlib draws only now; whatever it trips on, the results stay
            raise WriteFailed(f"cannot draw {path}: {cause_of(error)}") from error
    return stem.with_suffix(_FORMATS[0])


LEGEND_LINE_CHARACTERS = 80
"""The longest legend line that fits a figure's width in the legend's font."""


def _legend_columns(labels):
    # Long labels (many hyper-parameters) get the figure's whole width.
    return 1 if max(map(len, labels)) > 40 else 2


def _wrapped(label):
    # A label with many hyper-parameters is wider than the figure; it continues on the next line.
    return textwrap.fill(label, LEGEND_LINE_CHARACTERS, subsequent_indent="    ")


def _legend(figure, handles, labels):
    legend = figure.legend(
        handles,
        [_wrapped(label) for label in labels],
        loc="outside lower center",
        ncols=_legend_columns(labels),
        fontsize="small",
        frameon=False,
    )
    for text in legend.get_texts():
        text.update(_PLAIN_TEXT)


def _legend_height(labels):
    """Inches the legend below the axes needs."""
    lines = sum(_wrapped(label).count("\n") + 1 for label in labels)
    return 0.2 * -(-(lines + 1) // _legend_columns(labels))


def label_log_axis(axis):
    """Label enough ticks on a log ``axis`` to read a value off it, whatever its range.

    Matplotlib labels the powers of ten and, within a decade, a few multiples: a training loss
    between 1.9 and 3.1 would show two labels. Ticks per range: below one decade evenly spaced
    values (nearly even on a log scale there), then 1-2-5 per decade, 1-3 per decade, and powers
    of ten from four decades on; labels as plain numbers, minor ticks unlabelled.
    """
    low, high = sorted(axis.get_view_interval())
    decades = math.log10(high / low) if low > 0 else math.inf
    if decades < 1:
        locator = _PositiveTicks(nbins=6, steps=[1, 2, 2.5, 5, 10])
    elif decades < 2:
        locator = LogLocator(base=10, subs=(1.0, 2.0, 5.0))
    elif decades < 4:
        locator = LogLocator(base=10, subs=(1.0, 3.0))
    else:
        locator = LogLocator(base=10)
    axis.set_major_locator(locator)
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


class _PositiveTicks(MaxNLocator):
    """Evenly spaced ticks without the zero or negative values a log scale cannot place."""

    def tick_values(self, vmin, vmax):
        return [value for value in super().tick_values(vmin, vmax) if value > 0]


@dataclass(frozen=True)
class Panel:
    """What one figure shows, or one panel of a figure grid (source/plotting/report.py).

    ``name`` is the file name's stem ("learning_rate", "validation_accuracy", ...), ``title`` the
    metric in words and ``axis_label`` the label of its value axis. A line panel has ``curves``
    ((colour index, label, per-seed {step: value} series) triples) and ``marks`` ((colour index,
    steps, values) of events); a dot panel ``dots`` ((colour index, short label, values over seeds)).
    ``levels``: the values are piecewise constant, drawn as steps on an axis from 0.
    """

    name: str
    title: str
    axis_label: str
    curves: tuple = ()
    dots: tuple = ()
    marks: tuple = ()
    mark_label: str | None = None
    log_scale: bool = False
    levels: bool = False

    @property
    def bands(self):
        """(colour index, label, (steps, mean, minimum, maximum)) of each curve with a point."""
        bands = [(index, label, _band(series)) for index, label, series in self.curves]
        return [(index, label, band) for index, label, band in bands if band[0]]

    @property
    def is_empty(self):
        return not self.dots and not self.bands


def draw_lines(axes, panel):
    """Draw a line panel into ``axes``; returns the legend's handles and labels.

    A curve that coincides with later ones (Adam and AdamW at one learning rate, most batch
    sizes) is drawn wider than they are, so that each shows as a stripe.
    """
    bands = panel.bands
    handles, labels = [], []
    for position, (index, label, (steps, mean, low, high)) in enumerate(bands):
        colour, line_style = _style(index)
        hidden_under = sum(later[2][:2] == (steps, mean) for later in bands[position + 1:])
        width = 1.2 + 1.0 * hidden_under
        drawstyle = "steps-post" if panel.levels else "default"
        (line,) = axes.plot(steps, mean, color=colour, linestyle=line_style, linewidth=width, drawstyle=drawstyle)
        if low != high:
            axes.fill_between(steps, low, high, color=colour, alpha=0.2, linewidth=0,
                              step="post" if panel.levels else None)  # fmt: skip
        handles.append(line)
        labels.append(label)
    for index, steps, values in panel.marks:
        colour, _ = _style(index)
        axes.plot(steps, values, linestyle="none", marker="o", markersize=4, color=colour, markeredgecolor="black",
                  markeredgewidth=0.5)  # fmt: skip
    if panel.marks and panel.mark_label:
        handles.append(measurement_handle())
        labels.append(panel.mark_label)
    axes.set_xlabel("training step")
    axes.set_ylabel(panel.axis_label)
    if panel.log_scale:
        axes.set_yscale("log")
        label_log_axis(axes.yaxis)
    if panel.levels:
        axes.set_ylim(bottom=0)
    return handles, labels


def measurement_handle():
    """The legend's sample of a measurement mark."""
    return Line2D([], [], linestyle="none", marker="o", markersize=4, color="white", markeredgecolor="black",
                  markeredgewidth=0.5)  # fmt: skip


def draw_dots(axes, panel, *, compact=False):
    """Draw a dot panel into ``axes``: per entry the mean, with min–max bars over its seeds, and the
    mean written beside it; ``compact`` (a panel of a grid): no numbers, the metric's name as label."""
    dots = panel.dots
    several = any(len(values) > 1 for _, _, values in dots)
    for position, (index, _, values) in enumerate(dots):
        colour, _ = _style(index)
        mean, low, high = statistics.fmean(values), min(values), max(values)
        axes.errorbar([mean], [position], xerr=[[mean - low], [high - mean]], fmt="o", color=colour, capsize=4,
                      markersize=7)  # fmt: skip
        if len(values) > 1:
            axes.plot(values, [position] * len(values), linestyle="none", marker="|", markersize=10, color=colour)
        if not compact:
            axes.annotate(f"{mean:.4f}", (high, position), xytext=(8, 0), textcoords="offset points", va="center")
    axes.set_yticks(range(len(dots)), [label for _, label, _ in dots], **_PLAIN_TEXT)
    axes.invert_yaxis()
    axes.margins(x=0.2, y=0.5 / len(dots))
    if compact:
        axes.xaxis.set_major_locator(MaxNLocator(nbins=4))
        axes.set_xlabel(panel.title)
        return
    axes.set_xlabel(panel.axis_label + ("; dot: mean, bar: min–max over seeds" if several else ""))


def figure_panels(runs):
    """The panels of ``runs`` (``PlottedRun``s): learning rate, training loss, validation accuracy
    (or RMSE), test accuracy (or RMSE) and training batch size; each may be empty. A run's colour
    is its ``colour`` index, else its position in ``runs``."""
    entries = [
        (index if run.colour is None else run.colour, run, [read_metrics(path) for path in run.metrics_paths])
        for index, run in enumerate(runs)
    ]
    entries = [(index, run, seeds) for index, run, seeds in entries if seeds]
    quality = quality_of([records for _, _, seeds in entries for records in seeds])
    words = metric_named(quality).words

    def curves(split, key, positive_only=False):
        return tuple(
            (index, run.label, [_per_step(records, split, key, positive_only=positive_only) for records in seeds])
            for index, run, seeds in entries
        )

    measurements = []
    for index, _, seeds in entries:
        points = [
            (record["step"], record["learning_rate"])
            for records in seeds
            for record in records
            if record["split"] == "event" and record.get("event") == "measurement"
            and isinstance(record.get("learning_rate"), (int, float)) and record["learning_rate"] > 0
        ]  # fmt: skip
        logged = sum(len(_per_step(records, "training", "learning_rate")) for records in seeds)
        # Marks show when a rarely measuring method (LABPAL) measured; a search that measures at
        # every step would only bury its own curve under them.
        if points and len(points) < logged:
            measurements.append((index, [step for step, _ in points], [value for _, value in points]))
    tests = []
    for index, run, seeds in entries:
        values = [_per_step(records, "test", quality) for records in seeds]
        values = [value for series in values for value in series.values()]
        if values:
            tests.append((index, run.short_label, values))
    return [
        # A learning rate of 0 (a line search before its first measurement) has no place on a log scale.
        Panel("learning_rate", "learning rate", "learning rate", curves("training", "learning_rate", True),
              marks=tuple(measurements), mark_label="measurement", log_scale=True),
        Panel("training_loss", "training loss", "training loss", curves("training", "loss", True), log_scale=True),
        Panel(f"validation_{quality}", f"validation {words}", f"validation {words}", curves("validation", quality)),
        Panel(f"test_{quality}", f"test {words}", f"test {words} of the best validation checkpoint",
              dots=tuple(tests)),
        Panel("training_batch_size", "training batch size", "training batch size (samples)",
              curves("training", "training_batch_size"), levels=True),
    ]  # fmt: skip


def plot_runs(runs, folder, *, dataset, model):
    """Draw the figures of ``runs`` (``PlottedRun``s) into ``folder`` as .png and .pdf.

    Writes learning_rate, training_loss, validation_accuracy, test_accuracy and
    training_batch_size (regression: validation_rmse, test_rmse), each titled
    "<metric> <data set> <model>", leaving out those with nothing to draw. Returns the paths of
    the PNG files; each has its PDF beside it. ``WriteFailed`` names the file that could not be
    written or drawn.
    """
    folder = Path(folder)
    with writing(folder):
        folder.mkdir(parents=True, exist_ok=True)
    written = []
    for panel in figure_panels(runs):
        if panel.is_empty:
            continue
        title = f"{panel.title} {dataset} {model}"
        if panel.dots:
            figure, axes = _new_figure(title, 1.6 + 0.42 * len(panel.dots))
            draw_dots(axes, panel)
        else:
            figure, axes = _new_figure(title, 4.2 + _legend_height([label for _, label, _ in panel.bands]))
            _legend(figure, *draw_lines(axes, panel))
        written.append(_save(figure, folder / panel.name))
    return written


def _owner(folder):
    """The run folder that ``folder`` holds the plots of, resolved, or None when it names none."""
    try:
        # Never through a link: a planted one names no run, and its target is not read.
        descriptor = os.open(Path(folder) / OWNER_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        recorded = os.read(descriptor, _LONGEST_OWNER).decode("utf-8", errors="replace").strip()
    except OSError:
        return None
    finally:
        os.close(descriptor)
    # Recorded relative to the plot folder (older files: absolute), so a moved project keeps its plots.
    return (Path(os.path.realpath(folder)) / recorded).resolve() if recorded else None


def check_plot_folder(folder, run_folder):
    """Raise ``UserError`` if ``folder`` holds figures that belong to a run other than ``run_folder``."""
    folder = Path(folder)
    owner = _owner(folder)
    has_figures = folder.is_dir() and any(folder.glob("*.png"))
    if has_figures and owner != Path(run_folder).resolve():
        raise UserError(
            f"{folder} holds the plots of {owner or 'another run'}; choose another experiment name "
            "or [logging] plots_folder"
        )


def claim_plot_folder(folder, run_folder):
    """Create ``folder`` and record that it holds the plots of ``run_folder`` (as a path relative to it)."""
    folder = Path(folder)
    with writing(folder):
        folder.mkdir(parents=True, exist_ok=True)
    relative = os.path.relpath(Path(run_folder).resolve(), os.path.realpath(folder))
    write_text_atomically(f"{relative}\n", folder / OWNER_FILE)
