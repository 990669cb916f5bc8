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

from leaderboard.ranking import Point, percent_span

MAX_LABEL = 40
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")
RC = {"svg.hashsalt": "kvpress-eval-leaderboard", "svg.fonttype": "path", "text.parse_math": False,
      "text.usetex": False, "font.family": "DejaVu Sans"}


def short(label: str) -> str:
    return label if len(label) <= MAX_LABEL else label[: MAX_LABEL - 1] + "…"


def accuracy_compression_svg(lines: Sequence[tuple[str, Sequence[Point]]], reference: float | None,
                             band: tuple[float, float] | None = None) -> str:
    """One line per press (label, points sorted by compression), the reference as a dashed horizontal line.

    A dotted stretch joins the reference at 0 to each press's first point: the part of the curve its AUC counts
    before its first measurement. ``band``, the common compression range (fractions) the AUC averages over, is
    shaded.
    """
    with matplotlib.rc_context(RC):
        figure = Figure(figsize=(7.5, 4.5))
        axes = figure.add_subplot()
        handles, labels = [], []
        if reference is not None:
            handles.append(axes.axhline(reference, color="0.35", linestyle="--", linewidth=1.2))
            axes.plot([0], [reference], marker="o", color="0.35")
            labels.append("no_press (reference)")
        colors = matplotlib.colormaps["tab10"]
        for index, (label, points) in enumerate(lines):
            xs = [100 * compression for compression, _ in points]
            ys = [accuracy for _, accuracy in points]
            color = colors(index % 10)
            (handle,) = axes.plot(xs, ys, marker=MARKERS[index % len(MARKERS)], color=color, linewidth=1.5,
                                  markersize=5)
            if reference is not None and xs[0] > 0:  # the first stretch of the AUC: from the reference at 0
                axes.plot([0, xs[0]], [reference, ys[0]], color=color, linestyle=":", linewidth=1)
            handles.append(handle)
            labels.append(short(label))
        if band is not None:  # listed last, drawn behind everything
            handles.append(axes.axvspan(100 * band[0], 100 * band[1], color="0.95", linewidth=0, zorder=0))
            labels.append(f"AUC range {percent_span(*band)}")
        axes.set_xlim(-2, 102)
        axes.set_xlabel("achieved compression (% of KV pairs removed)")
        axes.set_ylabel("accuracy (%)")
        axes.grid(True, color="0.9")
        if handles:
            axes.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
        buffer = io.StringIO()
        figure.savefig(buffer, format="svg", metadata={"Date": None}, bbox_inches="tight")
    return buffer.getvalue()
