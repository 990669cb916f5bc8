"""RULER's string-match metrics (Hsieh et al. 2024, arXiv 2404.06654), scored exactly as the reference code does.

References:
    * RULER ``scripts/eval/synthetic/constants.py`` (``string_match_all``, ``string_match_part``) and
      ``scripts/eval/evaluate.py`` (``postprocess_pred``: control characters become newlines).
    * kvpress ``evaluation/benchmarks/ruler/calculate_metrics.py`` (same metrics; control characters are deleted).

The per-sample functions return a fraction in [0, 1]; :func:`ruler_task_score` turns a task's samples into the
percentage RULER reports, and :func:`score_ruler` groups samples by task and averages the task scores.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal, TypedDict

PostprocessStyle = Literal["ruler", "kvpress"]

# Every C0 control character (tab and newline included), as in both references.
_CONTROL_CHARS = re.compile(r"[\x00-\x1f]")
# What each reference writes in place of a control character.
_REPLACEMENT: dict[str, str] = {"ruler": "\n", "kvpress": ""}


class RulerScores(TypedDict):
    per_task: dict[str, float]  # task -> percent in [0, 100], rounded to 2 decimals
    overall: float  # unrounded mean of the task scores


def postprocess_prediction(prediction: str, style: PostprocessStyle = "ruler") -> str:
    """Clean a generated answer before matching: ``strip()``, rewrite control characters, ``strip()`` again.

    ``style="ruler"`` replaces each character in ``[\\x00-\\x1f]`` by ``"\\n"`` (RULER
    ``evaluate.py::postprocess_pred``); ``style="kvpress"`` deletes them (kvpress ``ruler/calculate_metrics.py``),
    which joins the text on both sides of a line break, so ``"12\\n34"`` then contains ``"1234"``. Matching is a
    substring test, so the two rarely differ.
    """
    if style not in _REPLACEMENT:
        raise ValueError(f"unknown RULER postprocess style {style!r}: choose from {', '.join(_REPLACEMENT)}")
    return _CONTROL_CHARS.sub(_REPLACEMENT[style], prediction.strip()).strip()


def _as_references(references: str | Sequence[str]) -> list[str]:
    # A bare string is one reference; iterating it would match single characters.
    return [references] if isinstance(references, str) else list(references)


def string_match_all(prediction: str, references: str | Sequence[str], **kwargs: object) -> float:
    """Fraction of the references found (case-insensitive substring) in the prediction.

    RULER ``constants.py``: ``sum([1.0 if r.lower() in pred.lower() else 0.0 for r in ref]) / len(ref)``.
    Other keyword arguments (record fields such as ``all_classes``) are ignored, so every registered metric
    takes the same call.
    """
    refs = _as_references(references)
    pred = prediction.lower()
    return sum([1.0 if r.lower() in pred else 0.0 for r in refs]) / len(refs)


def string_match_part(prediction: str, references: str | Sequence[str], **kwargs: object) -> float:
    """1.0 if any reference is found (case-insensitive substring) in the prediction, else 0.0.

    RULER ``constants.py``: ``max([1.0 if r.lower() in pred.lower() else 0.0 for r in ref])``.
    """
    refs = _as_references(references)
    pred = prediction.lower()
    return max([1.0 if r.lower() in pred else 0.0 for r in refs])


RULER_METRICS = {"string_match_all": string_match_all, "string_match_part": string_match_part}


def task_metric_name(task: str) -> str:
    """The metric RULER uses for a task: ``string_match_part`` for ``qa_*``, ``string_match_all`` otherwise.

    Same rule as kvpress (``task.split("_")[0] == "qa"``) and RULER's ``TASKS`` table.
    """
    return "string_match_part" if task.split("_")[0] == "qa" else "string_match_all"


def ruler_task_score(sample_scores: Sequence[float]) -> float:
    """A task's score in percent, rounded to 2 decimals: ``round(sum(scores) / len(scores) * 100, 2)``.

    The operation order (divide, then multiply by 100) and the builtin ``sum`` are the reference's, so the rounding
    ties fall the same way on the same Python.
    """
    if not sample_scores:
        raise ValueError("a RULER task needs at least one sample to be scored")
    return round(sum(sample_scores) / len(sample_scores) * 100, 2)


def score_ruler(predictions: Sequence[str], references: Sequence[str | Sequence[str]], tasks: Sequence[str],
                style: PostprocessStyle = "ruler") -> RulerScores:
    """Score a RULER run: ``{"per_task": {task: score}, "overall": mean of the task scores}``.

    Predictions are post-processed with :func:`postprocess_prediction` (``style``), each sample gets its task's
    metric, and each task score is :func:`ruler_task_score` (percent, 2 decimals). ``overall`` is the plain,
    unrounded mean of the (rounded) task scores, the "RULER score" of the paper and of kvpress's leaderboard.
    Tasks are reported in sorted order, as ``DataFrame.groupby`` does in kvpress.
    """
    if not len(predictions) == len(references) == len(tasks):
        raise ValueError(f"got {len(predictions)} predictions, {len(references)} references and {len(tasks)} tasks")
    if not predictions:
        raise ValueError("no RULER samples to score")
    by_task: dict[str, list[float]] = {}
    for prediction, refs, task in zip(predictions, references, tasks, strict=True):
        metric = RULER_METRICS[task_metric_name(task)]
        by_task.setdefault(task, []).append(metric(postprocess_prediction(prediction, style), refs))
    per_task = {task: ruler_task_score(by_task[task]) for task in sorted(by_task)}
    return {"per_task": per_task, "overall": sum(per_task.values()) / len(per_task)}
