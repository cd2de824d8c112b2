"""Sensitivity figures of sweeps: the best validation result against each swept argument's values.

One figure per swept argument, one line per entry that sweeps it, in the entry's colour: at each
value the mean over the seeds of each run's best validation result, with a min–max band over the
seeds. Where an entry sweeps several arguments, each value shows the best point among those with
that value (the other arguments at their best for it). A value whose every point diverged is
marked with a cross at the foot of the axes. Numbers spanning a decade or more get a log axis;
values that are not all numbers are placed side by side in the order given. The figures of one
comparison share their value axis.
"""

import statistics
from dataclasses import dataclass

from matplotlib.lines import Line2D

from source.plotting.curves import _legend, _legend_height, _new_figure, _save, _style
from source.records.comparison import value_text

__all__ = ["SensitivityLine", "SensitivityPoint", "plot_sensitivity", "sensitivity_file_stem", "value_range"]


@dataclass(frozen=True)
class SensitivityPoint:
    """One swept value: the best validation results of its seeds' runs, or ``diverged``."""

    value: object
    results: tuple
    diverged: bool = False


@dataclass(frozen=True)
class SensitivityLine:
    """One entry's line: its label, its colour index (as in the other figures) and its points."""

    label: str
    colour_index: int
    points: tuple


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positions(values):
    """x positions of ``values`` and whether the axis is logarithmic (positive numbers over a decade or more)."""
    if all(map(_is_number, values)):
        logarithmic = min(values) > 0 and max(values) >= 10 * min(values)
        return {value: value for value in values}, logarithmic, False
    return {value: position for position, value in enumerate(values)}, False, True


def sensitivity_file_stem(argument, arguments):
    """"sensitivity" when ``argument`` is the only swept argument, else "sensitivity_<argument>"."""
    return "sensitivity" if len(arguments) == 1 else f"sensitivity_{argument}"


def value_range(lines):
    """The lowest and highest result of ``lines`` (None without results): sensitivity figures of one
    comparison share it, so that a flat line and a steep one look so side by side."""
    results = [result for line in lines for point in line.points for result in point.results]
    return (min(results), max(results)) if results else None


def plot_sensitivity(folder, argument, lines, *, stem, title, y_label, y_range=None):
    """Draw the sensitivity figure of ``argument`` (``SensitivityLine``s) as <stem>.png and .pdf in
    ``folder``, its value axis spanning ``y_range`` (default: its own values); returns the PNG path,
    or None when no line has a point."""
    lines = [line for line in lines if line.points]
    if not lines:
        return None
    values = list(dict.fromkeys(point.value for line in lines for point in line.points))
    positions, logarithmic, categorical = _positions(values)
    labels = [line.label for line in lines]
    figure, axes = _new_figure(title, 4.2 + _legend_height(labels + ["diverged"]))
    handles = []
    any_diverged = False
    for line in lines:
        colour, line_style = _style(line.colour_index)
        shown = sorted((point for point in line.points if point.results), key=lambda point: positions[point.value])
        x = [positions[point.value] for point in shown]
        mean = [statistics.fmean(point.results) for point in shown]
        low = [min(point.results) for point in shown]
        high = [max(point.results) for point in shown]
        (handle,) = axes.plot(x, mean, color=colour, linestyle=line_style, marker="o", markersize=5)
        if low != high:
            axes.fill_between(x, low, high, color=colour, alpha=0.2, linewidth=0)
        handles.append(handle)
        diverged = [positions[point.value] for point in line.points if point.diverged]
        if diverged:
            any_diverged = True
            # At the foot of the axes: a diverged run has no result to place on the y axis.
            axes.plot(diverged, [0.03] * len(diverged), linestyle="none", marker="x", markersize=8, color=colour,
                      transform=axes.get_xaxis_transform())  # fmt: skip
    if any_diverged:
        handles.append(Line2D([], [], linestyle="none", marker="x", markersize=8, color="black"))
        labels.append("diverged")
    if logarithmic:
        axes.set_xscale("log")
    # Ticks at the swept values, named as the configuration names them.
    axes.set_xticks(list(positions.values()), [value_text(value) for value in positions])
    axes.minorticks_off()
    if categorical:
        axes.margins(x=0.15)
    axes.set_xlabel(argument)
    axes.set_ylabel(y_label)
    if y_range is not None:
        low, high = y_range
        margin = 0.05 * (high - low) or 0.01 * abs(high) or 0.01
        axes.set_ylim(low - margin, high + margin)
    _legend(figure, handles, labels)
    return _save(figure, folder / stem)
