"""``--plot PATH`` for the benchmarks: a figure of one or more panels, written as PNG (or any format
matplotlib knows from PATH's suffix). matplotlib is optional (``pip install matplotlib``, or the
package's ``plot`` extra); :func:`check` tells before a long run whether a plot can be made.

The interface is two panel types and :func:`save`::

    from jax_garden.bench import _plot
    _plot.check(args.plot)                      # before measuring: PlotUnavailable if it cannot plot
    _plot.save(args.plot, [
        _plot.Lines("latency", "bytes", "µs", {"engine": (sizes, p50s), "raw": (sizes, raw_p50s)},
                    logx=True, xticks=_plot.size_ticks(sizes)),
        _plot.StackedBars("TTFT", "ms", ["layer-wise", "bulk"], {"prefill": [...], "tail": [...]}),
    ], title="...", note="command, machine, date")

Series and stacks keep their order; a ``None`` value is a gap (a line skips it, a bar segment is 0).
"""

from __future__ import annotations

import dataclasses
import os
import textwrap
from pathlib import Path
from typing import Mapping, Sequence


class PlotUnavailable(RuntimeError):
    """A plot was asked for but cannot be made (matplotlib missing, or an unusable path)."""


@dataclasses.dataclass(frozen=True)
class Lines:
    """One line per series: ``series[name] = (xs, ys)``."""
    title: str
    xlabel: str
    ylabel: str
    series: Mapping[str, tuple[Sequence[float], Sequence[float | None]]]
    logx: bool = False
    logy: bool = False
    xticks: Sequence[tuple[float, str]] | None = None  # (value, label): e.g. sizes as "4 KiB"
    styles: Mapping[str, str] | None = None             # name -> matplotlib format, e.g. "--" for a baseline


@dataclasses.dataclass(frozen=True)
class StackedBars:
    """One bar per category, stacked from the first segment up: ``stacks[segment][i]`` is category i's
    part. ``markers`` (name -> one value per category) are drawn as points on the bars, e.g. a measured
    total to compare with the sum of the parts."""
    title: str
    ylabel: str
    categories: Sequence[str]
    stacks: Mapping[str, Sequence[float | None]]
    markers: Mapping[str, Sequence[float | None]] | None = None


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a window
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("--plot needs matplotlib, which is not installed: pip install matplotlib "
                              "(or pip install 'jax_garden[plot]')") from None
    return plt


def check(path: str | os.PathLike | None) -> None:
    """Raises :class:`PlotUnavailable` now if ``save(path, ...)`` could not work later (no matplotlib,
    or no folder to write into); nothing when ``path`` is None."""
    if path is None:
        return
    _pyplot()
    folder = Path(path).expanduser().resolve().parent
    if folder.exists() and not folder.is_dir():
        raise PlotUnavailable(f"--plot {path}: {folder} is not a folder")


def size_ticks(sizes: Sequence[int]) -> list[tuple[float, str]]:
    """Tick labels for byte sizes: 4096 -> '4 KiB'."""
    def name(n: int) -> str:
        for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
            if n >= scale and n % scale == 0:
                return f"{n // scale} {unit}"
        return f"{n} B"

    return [(float(s), name(int(s))) for s in sizes]


def _draw_lines(ax, p: Lines) -> None:
    for name, (xs, ys) in p.series.items():
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if not pts:
            continue
        fmt = (p.styles or {}).get(name, "-")
        ax.plot([x for x, _ in pts], [y for _, y in pts], fmt, marker="o", markersize=3, label=name)
    if p.logx:
        ax.set_xscale("log")
    if p.logy:
        ax.set_yscale("log")
    if p.xticks:
        ax.set_xticks([v for v, _ in p.xticks], [label for _, label in p.xticks], rotation=30)
        ax.minorticks_off()
    ax.set_xlabel(p.xlabel)
    ax.set_ylabel(p.ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


def _draw_bars(ax, p: StackedBars) -> None:
    xs = list(range(len(p.categories)))
    bottom = [0.0] * len(xs)
    for name, values in p.stacks.items():
        vals = [float(v or 0.0) for v in values]
        ax.bar(xs, vals, bottom=bottom, label=name, width=0.6)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for name, values in (p.markers or {}).items():
        pts = [(x, v) for x, v in zip(xs, values) if v is not None]
        ax.plot([x for x, _ in pts], [v for _, v in pts], "kD", markersize=5, label=name)
    ax.set_xticks(xs, list(p.categories), fontsize="small")
    ax.set_ylabel(p.ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="small")


def save(path: str | os.PathLike, panels: Sequence[Lines | StackedBars], *, title: str | None = None,
         note: str | None = None) -> Path:
    """Draws ``panels`` side by side and writes the figure to ``path`` (folders created). Returns the path."""
    if not panels:
        raise ValueError("save: no panels to draw")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, p in zip(axes[0], panels):
        if isinstance(p, Lines):
            _draw_lines(ax, p)
        elif isinstance(p, StackedBars):
            _draw_bars(ax, p)
        else:
            raise TypeError(f"save: a panel must be Lines or StackedBars, got {type(p).__name__}")
        ax.set_title(p.title, fontsize="medium")
    if title:
        fig.suptitle(title)
    lines = textwrap.wrap(note, width=int(16 * 5.2 * len(panels))) if note else []
    if lines:
        fig.text(0.01, 0.01, "\n".join(lines), fontsize="x-small", color="0.35")
    fig.tight_layout(rect=(0, 0.035 * len(lines), 1, 1))
    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
