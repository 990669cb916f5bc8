"""Accuracy-versus-compression curves, their area, accuracy at matched compression, and the ranking of presses.

Definitions (also printed on every page):

- a press's curve: its runs' (achieved compression, accuracy) points, sorted by compression, points at the same
  compression averaged;
- **AUC**: the area under accuracy (percent) against achieved compression (a fraction in [0, 1]), by the trapezoid
  rule, through the ``no_press`` reference placed at compression 0 and then the press's points. The curve is not
  extended past the press's largest achieved compression ("measured to"), so the most a press can score is 100 times
  that compression: compare presses measured over similar ranges. Without a reference run the curve starts at the
  press's first point;
- **accuracy at a level** (25/50/75%): linear interpolation between the press's own points on achieved
  compression; None (shown "-") where its points do not reach the level. A level within :data:`TOLERANCE` outside
  the outermost point counts as reached and takes that point's accuracy, because achieved ratios land a hair off the
  requested ones (a 0.5 request may achieve 0.499).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from leaderboard.results import Run

LEVELS = (0.25, 0.5, 0.75)
TOLERANCE = 0.01

Point = tuple[float, float]  # (achieved compression as a fraction, accuracy in percent)


def curve(points: Iterable[Point]) -> list[Point]:
    """``points`` sorted by compression, points at equal compression replaced by their mean accuracy."""
    by_compression: dict[float, list[float]] = {}
    for compression, accuracy in points:
        by_compression.setdefault(compression, []).append(accuracy)
    return [(c, sum(a) / len(a)) for c, a in sorted(by_compression.items())]


def area_under_curve(points: Sequence[Point], reference: float | None) -> float | None:
    """Trapezoid area of the curve through the reference at 0 and ``points``, within compression [0, 1].

    None when fewer than two points make the curve (no area to speak of).
    """
    line = curve((min(max(c, 0.0), 1.0), a) for c, a in points)
    if reference is not None:  # a press point at 0 too makes a zero-width step: no area, no double counting
        line = [(0.0, reference), *line]
    if len(line) < 2:
        return None
    return sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(line, line[1:], strict=False))


def accuracy_at(points: Sequence[Point], level: float) -> float | None:
    """Accuracy at compression ``level`` interpolated on the press's own points; None where they do not reach it."""
    line = curve(points)
    if not line or level < line[0][0] - TOLERANCE or level > line[-1][0] + TOLERANCE:
        return None
    if level <= line[0][0]:
        return line[0][1]
    for (x0, y0), (x1, y1) in zip(line, line[1:], strict=False):
        if x0 <= level <= x1:
            return y0 + (y1 - y0) * (level - x0) / (x1 - x0)
    return line[-1][1]


@dataclass(frozen=True)
class PressSummary:
    """One press (one line of the plot) on one (model, dataset): its points and scores; rank 0 means unranked."""

    label: str
    points: tuple[Point, ...]
    auc: float | None
    measured_to: float
    at_levels: tuple[float | None, ...]
    rank: int


def reference_accuracy(runs: Iterable[Run]) -> float | None:
    """Mean accuracy of the finished ``no_press`` runs (usually one), or None when there is none."""
    accuracies = [run.accuracy for run in runs if run.is_reference and run.accuracy is not None]
    return sum(accuracies) / len(accuracies) if accuracies else None


def plotted_runs(runs: Iterable[Run]) -> list[Run]:
    """Finished runs of a press (not the reference) with an achieved compression: the points of the curves."""
    return [run for run in runs if not run.is_reference and run.accuracy is not None and run.compression is not None]


def rank_presses(runs: Sequence[Run]) -> list[PressSummary]:
    """Every press with a plotted point, best AUC first (no AUC last, then by label); ranks count from 1."""
    reference = reference_accuracy(runs)
    by_label: dict[str, list[Point]] = {}
    for run in plotted_runs(runs):
        by_label.setdefault(run.label, []).append((run.compression, run.accuracy))
    summaries = []
    for label, points in by_label.items():
        line = curve(points)
        summaries.append((label, tuple(line), area_under_curve(line, reference), line[-1][0],
                          tuple(accuracy_at(line, level) for level in LEVELS)))
    summaries.sort(key=lambda s: (s[2] is None, -(s[2] or 0.0), s[0]))
    return [PressSummary(label, points, auc, measured_to, at_levels, rank=index + 1 if auc is not None else 0)
            for index, (label, points, auc, measured_to, at_levels) in enumerate(summaries)]
