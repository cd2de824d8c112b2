"""The figures of a report over several experiments: per metric a grid of panels, and the performance profile.

A grid has one row per data set and one column per model; each optimizer has one colour in every
panel and one entry in the legend below the grid. The performance profile draws, for each
optimizer, the fraction of experiments in which its test accuracy is within τ of the best one's.
"""

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from source.plotting.curves import (
    _PLAIN_TEXT,
    _legend,
    _legend_height,
    _save,
    _style,
    draw_dots,
    draw_lines,
    measurement_handle,
)

__all__ = ["plot_panel_grid", "plot_performance_profile"]

_PANEL_WIDTH = 4.2
_PANEL_HEIGHT = 3.2


def _grid_figure(rows, columns, legend_labels, title):
    figure = Figure(
        figsize=(_PANEL_WIDTH * columns, _PANEL_HEIGHT * rows + 0.5 + _legend_height(legend_labels)),
        dpi=100,
        layout="constrained",
    )
    FigureCanvasAgg(figure)
    figure.suptitle(title, **_PLAIN_TEXT)
    return figure, figure.subplots(rows, columns, squeeze=False)


def plot_panel_grid(stem, title, cells, datasets, models, colours):
    """Draw one metric's grid as <stem>.png and .pdf; returns the PNG path, or None if every panel is empty.

    ``cells`` maps (data set, model) to (panel title, ``Panel``); ``datasets`` and ``models`` give
    the order of rows and columns; ``colours`` maps each optimizer label to its colour index, in
    the legend's order.
    """
    drawn = {key: cell for key, cell in cells.items() if not cell[1].is_empty}
    if not drawn:
        return None
    shown = {label for _, panel in drawn.values() for _, label, _ in (*panel.curves, *panel.dots)}
    labels = [label for label in colours if label in shown]
    measured = any(panel.marks for _, panel in drawn.values())
    if any(panel.dots for _, panel in drawn.values()):
        title += " of the best validation checkpoint; dot: mean, bar: min–max over seeds"
    figure, axes_grid = _grid_figure(len(datasets), len(models), labels, title)
    for row, dataset in enumerate(datasets):
        for column, model in enumerate(models):
            axes = axes_grid[row][column]
            if (dataset, model) not in drawn:
                axes.set_axis_off()
                if (dataset, model) in cells:
                    axes.text(0.5, 0.5, f"{cells[dataset, model][0]}\nnothing to draw yet", ha="center", va="center",
                              transform=axes.transAxes)  # fmt: skip
                continue
            panel_title, panel = drawn[dataset, model]
            axes.set_title(panel_title, fontsize="medium", **_PLAIN_TEXT)
            axes.grid(True, alpha=0.3)
            if panel.dots:
                draw_dots(axes, panel, compact=True)
            else:
                draw_lines(axes, panel)
    handles = [Line2D([], [], color=_style(colours[label])[0], linestyle=_style(colours[label])[1]) for label in labels]
    if measured:
        handles.append(measurement_handle())
        labels.append("measurement")
    _legend(figure, handles, labels)
    return _save(figure, stem)


def plot_performance_profile(stem, taus, profile, colours, experiments):
    """Draw the performance profile (``profile``: label → fraction at each of ``taus``) as <stem>.png
    and .pdf; ``experiments`` is how many experiments it counts. Returns the PNG path."""
    labels = list(profile)
    figure = Figure(figsize=(7.0, 4.4 + _legend_height(labels)), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.set_title(f"performance profile over {experiments} experiment{'s' if experiments != 1 else ''}")
    axes.grid(True, alpha=0.3)
    handles = []
    for position, label in enumerate(labels):
        colour, line_style = _style(colours[label])
        # A profile that shares a stretch with later ones is drawn wider beneath them, so that each shows.
        hidden_under = sum(
            any(map(float.__eq__, profile[label], profile[later])) for later in labels[position + 1:]
        )
        width = 1.5 + 1.2 * hidden_under
        (line,) = axes.plot(
            taus, profile[label], color=colour, linestyle=line_style, linewidth=width, drawstyle="steps-post"
        )
        handles.append(line)
    axes.set_xlim(taus[0], taus[-1])
    axes.set_ylim(-0.03, 1.03)
    axes.set_xlabel("τ: test accuracy below the best one's by at most")
    axes.set_ylabel("fraction of experiments")
    _legend(figure, handles, labels)
    return _save(figure, stem)
