"""Latency-vs-request-rate plots (NanoFlow's Figure 8: normalized latency against request rate).

Uses matplotlib's object API with the Agg canvas directly, so plotting never touches pyplot's global
state or needs a display.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path


def plot_latency_vs_rate(series: Mapping[str, Sequence[tuple[float, float]]], path: str | Path, *,
                         title: str | None = None, ylabel: str = "Normalized latency (ms/token)",
                         dashed: Sequence[str] = (), groups: Mapping[str, str] | None = None) -> Path:
    """Writes a PNG with one line per series of (request rate, latency) points.

    Points with an infinite or NaN rate or latency are left out (a rate of inf has no place on the axis).
    Series named in `dashed` are drawn dashed (e.g. the p99 beside the mean); series mapped to the same
    group by `groups` share a color (e.g. one system's mean and p99). Raises ValueError when no series
    has a finite point.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors: dict[str, str] = {}
    palette = [f"C{i}" for i in range(10)]
    drawn = 0
    for label, points in series.items():
        finite = sorted((r, v) for r, v in points if math.isfinite(r) and math.isfinite(v))
        if not finite:
            continue
        group = (groups or {}).get(label, label)
        color = colors.setdefault(group, palette[len(colors) % len(palette)])
        rates, values = zip(*finite)
        ax.plot(rates, values, marker="o", linestyle="--" if label in dashed else "-", color=color, label=label)
        drawn += 1
    if not drawn:
        raise ValueError("nothing to plot: every point has an infinite or missing rate or latency")
    ax.set_xlabel("Request rate (req/s)")
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
