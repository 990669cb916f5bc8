"""Seeded, paired bootstrap of the runs of one (model, dataset) page: 95% percentile intervals for every score.

Method. The unit resampled is the sample (a question, named by its ``sample_id``), stratified by task: for each task,
its sample ids (the union over the page's runs) are drawn with replacement as many times as there are ids, and the
draw is the same for every run on the page. A run's accuracy in one replicate is the mean over its tasks of the mean
per-sample score (percent) of the drawn ids it has, so runs that answered the same questions are resampled together:
that is the pairing. Anything computed from run accuracies (a delta against ``no_press``, an interpolated accuracy,
an AUC, the difference of two AUCs) is computed replicate by replicate from the same draws, and its interval is the
2.5th and 97.5th percentiles of those replicates. :data:`RESAMPLES` replicates from ``numpy.random.default_rng(SEED)``:
identical input gives identical intervals, so rebuilds stay byte-identical.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
SEED = 20250601
CONFIDENCE = 0.95

Sample = tuple[str, str, float]  # (sample_id, task, score in percent)


@dataclass(frozen=True)
class Estimate:
    """A score and its 95% bootstrap interval (``low``/``high`` None when it could not be resampled)."""

    value: float
    low: float | None = None
    high: float | None = None

    @property
    def has_interval(self) -> bool:
        return self.low is not None and self.high is not None


def resample_task_scores(samples: Mapping[str, Sequence[Sample]], resamples: int = RESAMPLES,
                         seed: int = SEED) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict[str, float]]]:
    """(run name -> task -> the task's score in each of ``resamples`` paired replicates, run name -> task -> the
    score of its samples as they are). Runs with no samples are left out.

    A replicate in which a run drew none of its ids of a task is NaN there (only possible when runs answered
    different questions of that task); intervals skip NaN replicates.
    """
    runs = sorted(name for name, rows in samples.items() if rows)
    tasks = sorted({task for name in runs for _, task, _ in samples[name]})
    rng = np.random.default_rng(seed)
    replicates: dict[str, dict[str, np.ndarray]] = {name: {} for name in runs}
    observed: dict[str, dict[str, float]] = {name: {} for name in runs}
    for task in tasks:
        ids = sorted({sample_id for name in runs for sample_id, t, _ in samples[name] if t == task})
        position = {sample_id: i for i, sample_id in enumerate(ids)}
        # how often each id is drawn in each replicate: n draws with replacement from the task's n ids, shared by
        # every run (the pairing)
        weights = rng.multinomial(len(ids), np.full(len(ids), 1 / len(ids)), size=resamples).astype(float)
        for name in runs:
            scores, present = np.zeros(len(ids)), np.zeros(len(ids))
            for sample_id, t, score in samples[name]:
                if t == task:
                    scores[position[sample_id]] += score
                    present[position[sample_id]] += 1
            if present.any():
                with np.errstate(invalid="ignore", divide="ignore"):
                    replicates[name][task] = (weights @ scores) / (weights @ present)
                observed[name][task] = float(scores.sum() / present.sum())
    return replicates, observed


def resample_accuracies(samples: Mapping[str, Sequence[Sample]], resamples: int = RESAMPLES, seed: int = SEED,
                        centre_on: Mapping[str, float] | None = None) -> dict[str, np.ndarray]:
    """Run name -> its accuracy (mean over its tasks) in each of ``resamples`` paired, task-stratified replicates.

    ``centre_on`` (run name -> the accuracy its metrics.json reports) shifts a run's replicates by the reported
    accuracy minus the accuracy of its samples as they are, so intervals sit around the number shown even where the
    metric rounds per task (to 2 decimals) or a hand-edited metrics.json disagrees with the predictions.
    """
    by_task, observed = resample_task_scores(samples, resamples, seed)
    result = {}
    for name, tasks in by_task.items():
        values = sum(tasks.values()) / len(tasks)
        if centre_on is not None and centre_on.get(name) is not None:
            values = values + centre_on[name] - sum(observed[name].values()) / len(tasks)
        result[name] = values
    return result


def interval(replicates: np.ndarray | None) -> tuple[float, float] | None:
    """The central 95% percentile interval of the finite replicates; None when there are none."""
    if replicates is None:
        return None
    finite = np.asarray(replicates, dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return None
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def estimate(value: float, replicates: np.ndarray | None) -> Estimate:
    """``value`` with the interval of ``replicates`` (none when there are no replicates)."""
    bounds = interval(replicates)
    return Estimate(value) if bounds is None else Estimate(value, *bounds)


def clearly_better(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    """Whether ``a`` beats ``b`` beyond the noise: the 95% interval of the paired difference ``a - b`` lies above 0."""
    if a is None or b is None:
        return False
    bounds = interval(np.asarray(a) - np.asarray(b))
    return bounds is not None and bounds[0] > 0
