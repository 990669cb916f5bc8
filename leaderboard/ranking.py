"""Accuracy-versus-compression curves, their mean over a common range (AUC), accuracy at matched compression, and
the ranking of presses.

Definitions (also printed on every page), per (model, dataset) page:

- a press's points: its runs' (achieved compression, accuracy) pairs, sorted by compression, points at the same
  compression averaged; "measured to" is its largest achieved compression;
- a press's **curve**: the ``no_press`` reference placed at compression 0 (when there is one) and then its points,
  compression clipped to [0, 1], joined by straight lines. A press has a curve when it has at least one point and,
  without a reference, points at two compressions at least;
- the **common range** [c0, c*]: c* is the smallest "measured to" among the presses that have a curve; c0 is 0 with
  a reference, and without one the largest first-point compression among those presses, so every curve covers the
  whole range;
- **AUC**: the trapezoid area under a press's curve, accuracy (percent) against compression (a fraction), from c0 to
  c* (the curve interpolated linearly at both ends), divided by the range's width c* - c0: the mean accuracy over the
  common range, in percent like accuracy. Every press is scored over the same range, so one measured further gains
  nothing from its points past c*. None (unranked) for a press without a curve, and for every press when the range
  is empty (c* <= c0, e.g. a press measured only at compression 0, so c* = 0);
- **accuracy at a level** (25/50/75/87.5%): linear interpolation between the press's own points on achieved
  compression; None (shown "-") where its points do not reach the level. A level within :data:`TOLERANCE` outside
  the outermost point counts as reached and takes that point's accuracy, because achieved ratios land a hair off the
  requested ones (a 0.5 request may achieve 0.499). Threshold presses enter the same way: each threshold is a point
  at the compression it achieved, so their threshold-to-compression curve places them;
- **no-loss compression**: the highest achieved compression among a press's points whose accuracy is within
  :data:`NO_LOSS_POINTS` points of ``no_press`` (0 when none is); needs a reference;
- **intervals and tie bands**: every score above is also computed in each bootstrap replicate of the page
  (:mod:`leaderboard.bootstrap`: the same resampled questions for every run), giving its 95% interval. A press's
  **band** is 1 + the number of presses whose AUC beats its own beyond the noise (the 95% interval of the paired
  difference lies above 0); presses neither clearly better nor clearly worse than each other are tied.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np

from leaderboard.bootstrap import Estimate, clearly_better, estimate
from leaderboard.results import Run

LEVELS = (0.25, 0.5, 0.75, 0.875)
TOLERANCE = 0.01
NO_LOSS_POINTS = 1.0

Point = tuple[float, float]  # (achieved compression as a fraction, accuracy in percent)


def curve(points: Iterable[Point]) -> list[Point]:
    """``points`` sorted by compression, points at equal compression replaced by their mean accuracy."""
    by_compression: dict[float, list[float]] = {}
    for compression, accuracy in points:
        by_compression.setdefault(compression, []).append(accuracy)
    return [(c, sum(a) / len(a)) for c, a in sorted(by_compression.items())]


def scored_curve(points: Iterable[Point], reference: float | None) -> list[Point]:
    """The curve the AUC averages: the reference at 0 (when there is one), then ``points`` clipped to [0, 1].

    A press point at 0 beside the reference makes a zero-width step: it adds no area.
    """
    line = curve((min(max(c, 0.0), 1.0), a) for c, a in points)
    return [(0.0, reference), *line] if reference is not None and line else line


def has_curve(points: Sequence[Point], reference: float | None) -> bool:
    """A curve needs two points: the reference and one of the press's, or (without reference) two of the press's."""
    return len(scored_curve(points, reference)) >= 2


def common_range(presses: Iterable[Sequence[Point]], reference: float | None) -> tuple[float, float] | None:
    """(c0, c*) for the presses' points: c* the smallest "measured to" among the presses that have a curve, c0 zero
    with a reference, else the largest first-point compression among them. None when no press has a curve; an empty
    range (c* <= c0) is returned as is: :func:`mean_accuracy` gives None on it."""
    lines = [scored_curve(points, reference) for points in presses if has_curve(points, reference)]
    if not lines:
        return None
    end = min(line[-1][0] for line in lines)
    start = 0.0 if reference is not None else max(line[0][0] for line in lines)
    return start, end


def mean_accuracy(points: Sequence[Point], reference: float | None, start: float, end: float) -> float | None:
    """The AUC: the trapezoid area under :func:`scored_curve` from ``start`` to ``end``, divided by ``end - start``.

    The curve is interpolated linearly at both ends. None when the range is empty (``end <= start``) or the curve
    does not cover it.
    """
    line = scored_curve(points, reference)
    if end <= start or len(line) < 2 or line[0][0] > start or line[-1][0] < end:
        return None
    area = 0.0
    for (x0, y0), (x1, y1) in pairwise(line):
        lo, hi = max(x0, start), min(x1, end)
        if hi > lo:  # so x1 > x0: the segment can be interpolated
            y_lo, y_hi = (y0 + (y1 - y0) * (x - x0) / (x1 - x0) for x in (lo, hi))
            area += (hi - lo) * (y_lo + y_hi) / 2
    return area / (end - start)


def accuracy_at(points: Sequence[Point], level: float) -> float | None:
    """Accuracy at compression ``level`` interpolated on the press's own points; None where they do not reach it."""
    line = curve(points)
    if not line or level < line[0][0] - TOLERANCE or level > line[-1][0] + TOLERANCE:
        return None
    if level <= line[0][0]:
        return line[0][1]
    for (x0, y0), (x1, y1) in pairwise(line):
        if x0 <= level <= x1:
            return y0 + (y1 - y0) * (level - x0) / (x1 - x0)
    return line[-1][1]


def percent_span(start: float, end: float) -> str:
    """A compression range for headers and legends: ``0–62.5%``, whole percents without ``.0``."""
    def short(fraction: float) -> str:
        text = f"{100 * fraction:.1f}"
        return text[:-2] if text.endswith(".0") else text

    return f"{short(start)}–{short(end)}%"


@dataclass(frozen=True)
class PressSummary:
    """One press (one line of the plot) on one (model, dataset): its points and scores; rank 0 means unranked.

    ``auc`` is the mean accuracy over the page's common range (see the module's definitions).
    """

    label: str
    points: tuple[Point, ...]
    auc: float | None
    measured_to: float
    at_levels: tuple[float | None, ...]
    rank: int
    auc_estimate: Estimate | None = None
    level_estimates: tuple[Estimate | None, ...] = ()
    no_loss: Estimate | None = None  # highest achieved compression within NO_LOSS_POINTS of no_press
    band: int = 0  # tie-band rank: 1 + presses clearly better; 0 unranked
    tied_with: tuple[str, ...] = ()
    point_intervals: tuple[tuple[float, float] | None, ...] = ()  # 95% interval of each point's accuracy
    auc_replicates: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Ranking:
    """The presses of one (model, dataset), best AUC first, and the common range [start, end] = [c0, c*] their AUC
    averages over: both None when no press has a curve; ``end <= start`` when the range is empty (no AUC)."""

    presses: tuple[PressSummary, ...]
    start: float | None
    end: float | None
    set_by: tuple[str, ...]  # the presses measured only to c*, which end the range

    @property
    def scored(self) -> bool:
        """Whether the common range has width, so presses with a curve have an AUC."""
        return self.start is not None and self.end is not None and self.end > self.start


def reference_accuracy(runs: Iterable[Run]) -> float | None:
    """Mean accuracy of the finished ``no_press`` runs (usually one), or None when there is none."""
    accuracies = [run.accuracy for run in runs if run.is_reference and run.accuracy is not None]
    return sum(accuracies) / len(accuracies) if accuracies else None


def plotted_runs(runs: Iterable[Run]) -> list[Run]:
    """Finished runs of a press (not the reference) with an achieved compression: the points of the curves."""
    return [run for run in runs if not run.is_reference and run.accuracy is not None and run.compression is not None]


def rank_presses(runs: Sequence[Run], replicates: Mapping[str, np.ndarray] | None = None) -> Ranking:
    """Every press with a plotted point, best AUC first (no AUC last, then by label); ranks count from 1.

    ``replicates`` (run name -> bootstrap replicates of its accuracy, :func:`leaderboard.bootstrap
    .resample_accuracies`) adds intervals and tie bands; without them every press is its own band.
    """
    replicates = replicates or {}
    reference = reference_accuracy(runs)
    reference_rep = reference_replicates(runs, replicates)
    by_label: dict[str, list[Run]] = {}
    for run in plotted_runs(runs):
        by_label.setdefault(run.label, []).append(run)
    lines = {label: curve((run.compression, run.accuracy) for run in members) for label, members in by_label.items()}
    span = common_range(lines.values(), reference)
    start, end = span if span is not None else (None, None)
    rep_lines = {label: _replicate_curve(members, replicates) for label, members in by_label.items()}
    summaries = []
    for label, line in lines.items():
        auc = None if span is None else mean_accuracy(line, reference, start, end)
        rep_line = rep_lines[label] if reference is None or reference_rep is not None else None
        auc_rep = None if auc is None or rep_line is None else mean_accuracy(rep_line, reference_rep, start, end)
        levels = tuple(accuracy_at(line, level) for level in LEVELS)
        level_estimates = tuple(None if value is None else estimate(
            value, None if rep_lines[label] is None else accuracy_at(rep_lines[label], level))
            for value, level in zip(levels, LEVELS, strict=True))
        intervals = tuple(estimate(y, None if rep_lines[label] is None else rep_lines[label][i][1]) for i, (_, y)
                          in enumerate(line))
        summaries.append(dict(label=label, points=tuple(line), auc=auc, measured_to=line[-1][0], at_levels=levels,
                              auc_estimate=None if auc is None else estimate(auc, auc_rep), auc_rep=auc_rep,
                              level_estimates=level_estimates, no_loss=_no_loss(line, reference, rep_lines[label],
                                                                                  reference_rep),
                              point_intervals=tuple((e.low, e.high) if e.has_interval else None for e in intervals)))
    summaries.sort(key=lambda s: (s["auc"] is None, -(s["auc"] or 0.0), s["label"]))
    set_by = tuple(sorted(label for label, line in lines.items()
                          if has_curve(line, reference) and scored_curve(line, reference)[-1][0] == end))
    ranked = [s for s in summaries if s["auc"] is not None]
    presses = []
    for index, s in enumerate(summaries):
        band, tied = 0, ()
        if s["auc"] is not None:
            better = [o for o in ranked if o is not s and _beats(o, s)]
            band = 1 + len(better)
            tied = tuple(o["label"] for o in ranked if o is not s and not _beats(o, s) and not _beats(s, o))
        fields = {key: value for key, value in s.items() if key != "auc_rep"}
        presses.append(PressSummary(**fields, rank=index + 1 if s["auc"] is not None else 0, band=band,
                                    tied_with=tied, auc_replicates=s["auc_rep"]))
    return Ranking(tuple(presses), start, end, set_by)


def _beats(a: dict, b: dict) -> bool:
    """``a``'s AUC beats ``b``'s beyond the noise; without replicates, any higher AUC does (no interval to tie)."""
    if a["auc_rep"] is None or b["auc_rep"] is None:
        return a["auc"] > b["auc"]
    return clearly_better(a["auc_rep"], b["auc_rep"])


def reference_replicates(runs: Sequence[Run], replicates: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """Replicates of :func:`reference_accuracy` (None unless every reference run has them)."""
    names = [run.name for run in runs if run.is_reference and run.accuracy is not None]
    if not names or any(name not in replicates for name in names):
        return None
    return sum(replicates[name] for name in names) / len(names)


def _replicate_curve(members: Sequence[Run], replicates: Mapping[str, np.ndarray]) -> list | None:
    """The press's curve with each point's accuracy replaced by its replicates (arrays): the curve functions above
    only add, scale and compare compressions, so they take arrays as accuracies and work replicate-wise."""
    if any(run.name not in replicates for run in members):
        return None
    return curve((run.compression, replicates[run.name]) for run in members)


def _no_loss(line: Sequence[Point], reference: float | None, rep_line: Sequence | None,
             reference_rep: np.ndarray | None) -> Estimate | None:
    """Highest achieved compression whose accuracy is within NO_LOSS_POINTS of the reference (0 when none)."""
    if reference is None:
        return None
    value = max((c for c, a in line if a >= reference - NO_LOSS_POINTS), default=0.0)
    if rep_line is None or reference_rep is None:
        return Estimate(value)
    kept = np.array([np.where(a >= reference_rep - NO_LOSS_POINTS, c, 0.0) for c, a in rep_line])
    return estimate(value, kept.max(axis=0))
