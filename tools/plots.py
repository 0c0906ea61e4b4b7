"""Small matplotlib helpers shared by the run tools: one call draws one PNG.

    from loom.tools.plots import line_plot, heatmap
    line_plot("loss.png", {"run a": (steps, losses)}, "step", "loss", "training loss")
    heatmap("load.png", rows_by_expert, "step", "expert", "expert load", "share", x=steps)

Every figure gets labelled axes with ticks, a title, a legend when it has more than one series, is
saved as a PNG of FIGSIZE inches at DPI and is closed afterwards (loops that draw many figures must
not accumulate them). matplotlib is imported inside the functions, on the "Agg" backend, so
importing this module needs neither matplotlib nor a display.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Mapping, Optional, Sequence

FIGSIZE = (8.0, 4.5)
DPI = 100


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (works on a headless box)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextlib.contextmanager
def figure(out, *grid, **subplots):
    """``(fig, axes)`` of ``plt.subplots(*grid, **subplots)``; on leaving, laid out and saved to ``out``
    at DPI, and closed even when drawing failed."""
    plt = pyplot()
    fig, axes = plt.subplots(*grid, **subplots)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(out, dpi=DPI)
    finally:
        plt.close(fig)


def wants_log(values) -> bool:
    """True when the finite values are all positive and span more than a decade."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return bool(finite) and min(finite) > 0 and max(finite) / min(finite) > 10


def draw_lines(ax, series: Mapping[str, tuple], xlabel: str, ylabel: str, title: str,
               logy: Optional[bool] = None, styles: Optional[Mapping[str, dict]] = None) -> None:
    """Draw ``series`` (label -> (xs, ys)) onto an existing Axes; ``styles`` maps a label to plot() kwargs.

    logy=None picks a log y axis when every series' values are positive and span more than a decade.
    """
    styles = styles or {}
    if logy is None:
        logy = wants_log([y for _, ys in series.values() for y in ys])
    for label, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), label=label, **styles.get(label, {}))
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    if len(series) > 1:
        ax.legend()


def line_plots(out, panels: Sequence[dict], title: Optional[str] = None) -> Path:
    """Several line panels stacked vertically in one PNG; each panel is a dict of draw_lines' keyword arguments."""
    size = (FIGSIZE[0], FIGSIZE[1] * (1 + 0.6 * (len(panels) - 1)))
    with figure(out, len(panels), 1, figsize=size, squeeze=False) as (fig, axes):
        for ax, panel in zip(axes[:, 0], panels):
            draw_lines(ax, **panel)
        if title:
            fig.suptitle(title)
    return Path(out)


def line_plot(out, series: Mapping[str, tuple], xlabel: str, ylabel: str, title: str,
              logy: Optional[bool] = None, styles: Optional[Mapping[str, dict]] = None) -> Path:
    """One line chart: ``series`` maps a legend label to (xs, ys). Returns the PNG path.

    logy: True/False forces the y scale; None (default) uses log when positive values span more than
    a decade. styles: optional label -> matplotlib plot() kwargs (color, linewidth, alpha, ...).
    """
    return line_plots(out, [dict(series=series, xlabel=xlabel, ylabel=ylabel, title=title, logy=logy,
                                 styles=styles)])


def heatmap(out, matrix, xlabel: str, ylabel: str, title: str, colorbar_label: str,
            x: Optional[Sequence[float]] = None, y: Optional[Sequence[float]] = None,
            vmin: Optional[float] = None, vmax: Optional[float] = None, cmap: str = "viridis") -> Path:
    """A heatmap of ``matrix`` (rows along y, columns along x) with a labelled colour bar. Returns the PNG path.

    x / y: the coordinate of each column / row (default 0..n-1), e.g. the step of each column, so the
    axis shows real step numbers even when steps are not contiguous. NaN cells are left blank.
    """
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    data = np.asarray(matrix, dtype=float)
    if data.ndim != 2 or data.size == 0:
        raise ValueError(f"heatmap needs a non-empty 2-D matrix, got shape {data.shape}")
    xs = np.arange(data.shape[1]) if x is None else np.asarray(x, dtype=float)
    ys = np.arange(data.shape[0]) if y is None else np.asarray(y, dtype=float)
    with figure(out, figsize=FIGSIZE) as (fig, ax):
        # "nearest" centres each cell on its coordinate; a single column or row still gets a width.
        mesh = ax.pcolormesh(xs, ys, np.ma.masked_invalid(data), shading="nearest", cmap=cmap, vmin=vmin, vmax=vmax)
        fig.colorbar(mesh, ax=ax, label=colorbar_label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
    return Path(out)
