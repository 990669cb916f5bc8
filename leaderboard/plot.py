"""The accuracy-versus-compression plot as SVG text, byte-identical for identical input.

Matplotlib's SVG carries a date and random ids unless told otherwise: ``svg.hashsalt`` fixes the ids and
``metadata={"Date": None}`` drops the date. Text is drawn as paths (no font files to ship), mathtext is off so a
press called ``$x$`` is shown as typed, and labels are passed to the legend explicitly so one starting with ``_``
still appears. The site embeds the file with ``<img>``, where an SVG cannot run scripts whatever it contains.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib
from matplotlib.figure import Figure

from leaderboard.bootstrap import Estimate
from leaderboard.ranking import Point, percent_span

MAX_LABEL = 40
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")
RC = {"svg.hashsalt": "kvpress-eval-leaderboard", "svg.fonttype": "path", "text.parse_math": False,
      "text.usetex": False, "font.family": "DejaVu Sans", "font.size": 11}


def short(label: str) -> str:
    return label if len(label) <= MAX_LABEL else label[: MAX_LABEL - 1] + "…"


Interval = tuple[float, float] | None


def accuracy_compression_svg(lines: Sequence[tuple[str, Sequence[Point], Sequence[Interval]]],
                             reference: Estimate | None, band: tuple[float, float] | None = None) -> str:
    """One line per press (label, points sorted by compression, each point's 95% interval or None), the reference
    as a dashed horizontal line with its interval shaded.

    Each point carries an error bar and the press a light band through its intervals. A dotted stretch joins the
    reference at 0 to each press's first point: the part of the curve its AUC counts before its first measurement.
    ``band``, the common compression range (fractions) the AUC averages over, is shaded.
    """
    with matplotlib.rc_context(RC):
        figure, axes = _figure()
        handles, labels = [], []
        value = None if reference is None else reference.value
        if reference is not None:
            handles.append(axes.axhline(value, color="0.35", linestyle="--", linewidth=1.2))
            axes.plot([0], [value], marker="o", color="0.35")
            if reference.has_interval:
                axes.axhspan(reference.low, reference.high, color="0.5", alpha=0.12, linewidth=0)
            labels.append("no_press (reference, 95% interval shaded)")
        colors = matplotlib.colormaps["tab10"]
        for index, (label, points, intervals) in enumerate(lines):
            xs = [100 * compression for compression, _ in points]
            ys = [accuracy for _, accuracy in points]
            color = colors(index % 10)
            (handle,) = axes.plot(xs, ys, marker=MARKERS[index % len(MARKERS)], color=color, linewidth=1.8,
                                  markersize=6)
            _intervals(axes, xs, ys, intervals, color)
            if value is not None and xs[0] > 0:  # the first stretch of the AUC: from the reference at 0
                axes.plot([0, xs[0]], [value, ys[0]], color=color, linestyle=":", linewidth=1)
            handles.append(handle)
            labels.append(short(label))
        if band is not None:  # listed last, drawn behind everything
            handles.append(axes.axvspan(100 * band[0], 100 * band[1], color="0.95", linewidth=0, zorder=0))
            labels.append(f"AUC range {percent_span(*band)}")
        axes.set_xlim(-2, 102)
        axes.set_xlabel("achieved compression (% of KV pairs removed)")
        axes.set_ylabel("accuracy (%), 95% intervals")
        return _finish(figure, axes, handles, labels)


def accuracy_memory_svg(lines: Sequence[tuple[str, Sequence[tuple[float, float, Interval]]]]) -> str:
    """Accuracy against the KV-cache bytes held (MiB), one line per press (points sorted by bytes), with 95% error
    bars; ``no_press`` holds the dense cache."""
    with matplotlib.rc_context(RC):
        figure, axes = _figure()
        handles, labels = [], []
        colors = matplotlib.colormaps["tab10"]
        for index, (label, points) in enumerate(lines):
            xs = [held / 2**20 for held, _, _ in points]
            ys = [accuracy for _, accuracy, _ in points]
            color = "0.35" if label == "no_press" else colors(index % 10)
            (handle,) = axes.plot(xs, ys, marker=MARKERS[index % len(MARKERS)], color=color, linewidth=1.8,
                                  markersize=6)
            _intervals(axes, xs, ys, [interval for _, _, interval in points], color, band=False)
            handles.append(handle)
            labels.append(short(label))
        axes.set_xlabel("KV cache held (MiB, mean over contexts)")
        axes.set_ylabel("accuracy (%), 95% intervals")
        return _finish(figure, axes, handles, labels)


def _figure():
    # wide and short: the image spans the page's content width, the legend sits below it in columns
    figure = Figure(figsize=(10, 5.2))
    return figure, figure.add_subplot()


def _intervals(axes, xs: Sequence[float], ys: Sequence[float], intervals: Sequence[Interval], color,
               band: bool = True) -> None:
    known = [(x, y, i) for x, y, i in zip(xs, ys, intervals, strict=True) if i is not None]
    if not known:
        return
    lows = [y - i[0] for _, y, i in known]
    highs = [i[1] - y for _, y, i in known]
    axes.errorbar([x for x, _, _ in known], [y for _, y, _ in known], yerr=[[max(v, 0) for v in lows],
                  [max(v, 0) for v in highs]], fmt="none", ecolor=color, elinewidth=1, capsize=3)
    if band and len(known) > 1:
        axes.fill_between([x for x, _, _ in known], [i[0] for _, _, i in known], [i[1] for _, _, i in known],
                          color=color, alpha=0.10, linewidth=0)


def _finish(figure, axes, handles, labels) -> str:
    axes.grid(True, color="0.9")
    if handles:
        axes.legend(handles, labels, fontsize=11, loc="upper center", bbox_to_anchor=(0.5, -0.14),
                    ncol=min(3, len(handles)), frameon=False)
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", metadata={"Date": None}, bbox_inches="tight")
    return buffer.getvalue()
