"""Figures litplug logs to TensorBoard: pure functions from numbers to a matplotlib ``Figure``.

Every function builds a :class:`matplotlib.figure.Figure` directly (no ``pyplot``: no global
figure registry, no GUI backend, safe off-screen) and :func:`to_image` renders one to an RGB
array with the Agg canvas. Nothing here knows about Lightning or TensorBoard; the callbacks and
modules pass plain numbers (``litplug.board`` logs the picture).

Example:
    >>> from litplug.figures import bar_chart, to_image
    >>> fig = bar_chart({"fc1": 0.02, "fc2": 0.11}, title="per-layer sharpness", ylabel="L(w+e) - L(w)")
    >>> to_image(fig).shape[2]
    3
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = ["bar_chart", "greedy_chart", "histograms", "line_chart", "panels", "pareto_chart", "to_image"]

# Small pictures: TensorBoard shows images at their pixel size; 5.5 x 3.2 in at 80 dpi (440 x 256).
SIZE = (5.5, 3.2)
DPI = 80


def _figure() -> Figure:
    # Fixed margins: matplotlib's constrained/tight layout solvers more than double the render time.
    fig = Figure(figsize=SIZE, dpi=DPI)
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.3, top=0.86, wspace=0.3)
    FigureCanvasAgg(fig)
    return fig


def _xticks(ax: Axes, x: np.ndarray, labels: Sequence[str]) -> None:
    """Category labels, slanted and smaller when they would not fit side by side (more than about
    40 characters)."""
    if len(labels) > 4 or sum(len(label) for label in labels) > 40:
        ax.set_xticks(x, list(labels), rotation=20, ha="right", fontsize="small")
    else:
        ax.set_xticks(x, list(labels))


def _axes(ax: Axes, title: str, xlabel: str = "", ylabel: str = "") -> None:
    """Labels, a title at a fixed height (matplotlib otherwise measures every tick label to place
    it, a third of a small figure's draw) and at most five y ticks."""
    ax.set_title(title, y=1.0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.yaxis.set_major_locator(MaxNLocator(nbins=4))


def bar_chart(
    values: Mapping[str, float] | Mapping[str, Mapping[str, float]],
    title: str,
    ylabel: str,
) -> Figure:
    """One bar per key (``{"layer": value}``), or grouped bars per key for several series
    (``{"series": {"layer": value}}``, one colour per series). Non-finite values are drawn as
    missing bars."""
    series = _as_series(values)
    labels = list(dict.fromkeys(k for s in series.values() for k in s))
    fig = _figure()
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(series))
    x = np.arange(len(labels))
    for i, (name, s) in enumerate(series.items()):
        heights = [_finite(s.get(k, float("nan"))) for k in labels]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, heights, width, label=name or None)
    _xticks(ax, x, labels)
    _axes(ax, title, ylabel=ylabel)
    ax.axhline(0.0, color="black", linewidth=0.6)
    if len(series) > 1:
        ax.legend(fontsize="small")
    return fig


def line_chart(
    x: Sequence[float],
    series: Mapping[str, Sequence[float]],
    title: str,
    xlabel: str,
    ylabel: str,
    marks: Mapping[str, tuple[float, float]] | None = None,
) -> Figure:
    """One line per ``series`` entry over ``x`` (each as long as ``x``), with optional labelled
    points ``marks = {"label": (x, y)}``."""
    fig = _figure()
    ax = fig.add_subplot()
    for name, ys in series.items():
        if len(ys) != len(x):
            raise ValueError(f"series {name!r} has {len(ys)} values for {len(x)} x positions")
        ax.plot(list(x), [_finite(v) for v in ys], marker="o", markersize=3, label=name)
    for name, (px, py) in (marks or {}).items():
        ax.scatter([px], [py], marker="*", s=80, zorder=3, label=name)
    _axes(ax, title, xlabel, ylabel)
    ax.legend(fontsize="small")
    return fig


def panels(
    x: Sequence[float],
    series: Mapping[str, Mapping[str, Sequence[float]]],
    title: str,
    xlabel: str,
) -> Figure:
    """Side-by-side line panels sharing ``x``: ``series = {"line": {"panel": values}}`` (e.g. the
    loss and the accuracy along an interpolation path, one line per path)."""
    names = list(dict.fromkeys(p for lines in series.values() for p in lines))
    fig = _figure()
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, panel in zip(axes, names):
        for name, lines in series.items():
            if panel in lines:
                if len(lines[panel]) != len(x):
                    raise ValueError(f"series {name!r} has {len(lines[panel])} {panel} values for {len(x)} x positions")
                ax.plot(list(x), [_finite(v) for v in lines[panel]], marker="o", markersize=3, label=name)
        _axes(ax, panel, xlabel)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.subplots_adjust(top=0.8)  # room for the panel titles under the figure's
    return fig


def histograms(
    samples: Mapping[str, Sequence[float]],
    title: str,
    xlabel: str,
    bins: int = 30,
    lines: Mapping[str, float] | None = None,
) -> Figure:
    """Overlaid density histograms of several samples on shared bins (e.g. per-sample loss on
    forget vs test data); empty samples are left out of the plot but kept in the legend. ``lines =
    {"label": x}`` marks single values with labelled vertical lines (e.g. the best design found)."""
    arrays = {name: np.asarray(v, dtype=np.float64).ravel() for name, v in samples.items()}
    arrays = {name: a[np.isfinite(a)] for name, a in arrays.items()}
    pooled = np.concatenate([a for a in arrays.values()]) if arrays else np.zeros(0)
    edges = np.histogram_bin_edges(pooled, bins=bins) if pooled.size else np.linspace(0.0, 1.0, bins + 1)
    fig = _figure()
    ax = fig.add_subplot()
    for name, a in arrays.items():
        label = f"{name} (n={a.size})"
        if a.size:
            ax.hist(a, bins=edges, density=True, alpha=0.5, label=label)
        else:
            ax.plot([], [], label=label)
    for i, (name, x) in enumerate((lines or {}).items()):
        ax.axvline(_finite(x), color=f"C{len(arrays) + i}", linestyle="--", linewidth=1.2, label=f"{name} ({x:.3g})")
    _axes(ax, title, xlabel, "density")
    ax.legend(fontsize="small")
    return fig


def greedy_chart(trials: Sequence[tuple[str, float, float, bool]], title: str, ylabel: str) -> Figure:
    """A greedy soup's trials in the order tried, ``(ingredient, its own held-out score, the
    held-out score of the soup with it added, accepted)``: the own scores as bars (dark if the
    ingredient was accepted, light if not), the soups' scores as markers (dot accepted, cross
    rejected); the line joins the accepted soups, the soup as it grows."""
    names = [str(t[0]) for t in trials]
    own = [t[1] for t in trials]
    soup = [t[2] for t in trials]
    kept = [bool(t[3]) for t in trials]
    fig = _figure()
    ax = fig.add_subplot()
    x = np.arange(len(names))
    keep = np.asarray(kept, dtype=bool)
    own_v, soup_v = np.array([_finite(v) for v in own]), np.array([_finite(v) for v in soup])
    ax.bar(x[keep], own_v[keep], 0.6, color="C0", alpha=0.8, label="ingredient, accepted")
    ax.bar(x[~keep], own_v[~keep], 0.6, color="C0", alpha=0.25, label="ingredient, rejected")
    ax.plot(x[keep], soup_v[keep], color="C1", marker="o", markersize=5, label="soup")
    ax.scatter(x[~keep], soup_v[~keep], color="C3", marker="x", s=40, zorder=3, label="soup with it (rejected)")
    finite = np.concatenate([own_v, soup_v])
    finite = finite[np.isfinite(finite)]
    if finite.size:  # bars start at 0: zoom on the scores, as they are often close; room above for the legend
        low, high = float(finite.min()), float(finite.max())
        pad = 0.15 * (high - low) or 0.05 * abs(high) or 0.05
        ax.set_ylim(low - pad, high + 5 * pad)
    _xticks(ax, x, names)
    _axes(ax, title, ylabel=ylabel)
    ax.legend(fontsize="small", ncols=2, loc="upper center")
    return fig


def pareto_chart(
    evaluated: Sequence[Sequence[float]],
    front: Sequence[Sequence[float]],
    chosen: Sequence[float],
    title: str,
    labels: Sequence[str],
) -> Figure:
    """A Pareto front of two metrics: the ``evaluated`` points (rows ``(metric_1, metric_2, ...)``)
    as dots, the ``front`` as a line through its points sorted by the first metric, the ``chosen``
    point as a star. Rows with more than two metrics are drawn by their first two (a projection:
    the line is then not a front in the plane)."""
    ev = np.asarray(evaluated, dtype=np.float64).reshape(len(evaluated), -1)[:, :2]
    fr = np.asarray(front, dtype=np.float64).reshape(len(front), -1)[:, :2]
    fr = fr[np.argsort(fr[:, 0], kind="stable")]
    fig = _figure()
    ax = fig.add_subplot()
    ax.scatter(ev[:, 0], ev[:, 1], s=14, color="C0", label="evaluated")
    ax.plot(fr[:, 0], fr[:, 1], color="C1", linewidth=1.5, label="predicted front")
    ax.scatter([_finite(chosen[0])], [_finite(chosen[1])], marker="*", s=120, color="C3", zorder=3, label="chosen")
    _axes(ax, title, labels[0], labels[1])
    ax.legend(fontsize="small")
    return fig


def to_image(fig: Figure) -> np.ndarray:
    """Render ``fig`` off-screen to an ``(H, W, 3)`` uint8 array."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _as_series(values: Mapping[str, float] | Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    if values and all(isinstance(v, Mapping) for v in values.values()):
        return {str(k): {str(a): float(b) for a, b in v.items()} for k, v in values.items()}  # type: ignore[union-attr]
    return {"": {str(k): float(v) for k, v in values.items()}}  # type: ignore[arg-type]


def _finite(v: float) -> float:
    v = float(v)
    return v if np.isfinite(v) else float("nan")
