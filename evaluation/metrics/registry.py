"""The one registry of metrics, the one registry of dataset scorings, and :func:`score_dataset`.

Metric names are defined once, in the benchmark modules' tables (``ruler.RULER_METRICS``,
``longbench.LONGBENCH_METRICS``) or below for AIME, and registered here; dataset scorings say which metrics
each task uses and how a prediction is prepared, so :func:`score_dataset` has no per-benchmark branches.

Scores in results are percentages rounded to 2 decimals, as RULER and LongBench report them (AIME too, for one
scale on the leaderboard); every metric here has ``higher_is_better=True``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypedDict

from evaluation.metrics import aime, longbench, ruler
from evaluation.metrics.base import AggregateFn, Metric, Registry, SampleFn, ignore_groups, unknown_name_error

METRICS: Registry[Metric] = Registry("metric", Metric)


def register_metric(metric: Metric) -> Metric:
    """Add ``metric`` to :data:`METRICS` under ``metric.name`` (unique) and return it."""
    if not isinstance(metric, Metric):
        raise TypeError(f"register_metric takes a Metric, got {metric!r}")
    if not callable(metric.sample_fn) or not callable(metric.aggregate_fn):
        raise TypeError(f"metric {metric.name!r}: sample_fn and aggregate_fn must be callable")
    return METRICS.register(metric.name, metric)


def get_metric(name: str) -> Metric:
    """The registered metric called ``name``; a miss raises ``ValueError`` with close names and the list."""
    return METRICS.get(name)


def _as_float(predicate: Callable[..., bool]) -> SampleFn:
    # AIME's per-sample rules answer yes/no; the registry's sample scores are floats.
    def sample_fn(prediction: str, references: Any, **record_fields: object) -> float:
        return float(predicate(prediction, references))

    sample_fn.__name__ = sample_fn.__qualname__ = predicate.__name__
    return sample_fn


def _percent(aggregate: AggregateFn) -> AggregateFn:
    # AIME's aggregates are fractions; results hold percentages with 2 decimals like RULER and LongBench.
    def aggregate_fn(sample_scores: Sequence[float], groups: Sequence[Hashable] | None = None) -> float:
        return round(100 * aggregate(sample_scores, groups), 2)

    aggregate_fn.__name__ = aggregate_fn.__qualname__ = f"percent_{aggregate.__name__}"
    return aggregate_fn


for _name, _fn in ruler.RULER_METRICS.items():
    register_metric(Metric(_name, _fn, ignore_groups(ruler.ruler_task_score)))
for _name, _fn in longbench.LONGBENCH_METRICS.items():
    register_metric(Metric(_name, partial(longbench.max_over_references, _fn),
                           ignore_groups(longbench.longbench_dataset_score)))
register_metric(Metric("aime_accuracy", _as_float(aime.is_correct), _percent(aime.mean_score)))
register_metric(Metric("aime_accuracy_kvpress", _as_float(aime.is_correct_kvpress), _percent(aime.mean_score)))
register_metric(Metric("aime_answered", _as_float(aime.is_answered), _percent(aime.mean_score)))
register_metric(Metric("aime_answered_kvpress", _as_float(aime.is_answered_kvpress), _percent(aime.mean_score)))
register_metric(Metric("aime_avg@k", _as_float(aime.is_correct), _percent(aime.avg_at_k)))
register_metric(Metric("aime_pass@k", _as_float(aime.is_correct), _percent(aime.pass_at_k)))

Breakdown = Callable[[Sequence[float], Sequence[Mapping[str, Any]]], Mapping[str, float]]


@dataclass(frozen=True)
class DatasetScoring:
    """How one benchmark's records become scores.

    ``metrics_for(task, style)`` names the task's metrics, the headline (averaged into ``overall``) first;
    ``prepare(task, prediction, style)`` is the text the metrics see; ``styles`` are the reference protocols
    offered, the default first; ``breakdown(headline sample scores, records)`` adds sub-scores (LongBench-E length
    buckets) reported as ``"<metric>/<key>"``.
    """

    name: str
    metrics_for: Callable[[str, str], tuple[str, ...]]
    prepare: Callable[[str, str, str], str]
    styles: tuple[str, ...]
    breakdown: Breakdown | None = None
    version: str = "1"


DATASETS: Registry[DatasetScoring] = Registry("dataset", DatasetScoring)

_AIME_METRICS = ("aime_accuracy", "aime_accuracy_kvpress", "aime_answered", "aime_answered_kvpress", "aime_avg@k",
                 "aime_pass@k")


def _aime_metrics_for(task: str, style: str) -> tuple[str, ...]:
    # style "kvpress" makes kvpress's exact rule the headline; every number is reported either way.
    headline = "aime_accuracy_kvpress" if style == "kvpress" else "aime_accuracy"
    return (headline, *(name for name in _AIME_METRICS if name != headline))


def _length_buckets(sample_scores: Sequence[float], records: Sequence[Mapping[str, Any]]) -> Mapping[str, float]:
    missing = [i for i, record in enumerate(records) if record.get("length") is None]
    if missing:
        raise ValueError(f"LongBench-E needs a 'length' on every record; record {missing[0]} of its task has none")
    return longbench.longbench_e_bucket_scores(sample_scores, [record["length"] for record in records])


DATASETS.register("ruler", DatasetScoring(
    name="ruler",
    metrics_for=lambda task, style: (ruler.task_metric_name(task),),
    prepare=lambda task, prediction, style: ruler.postprocess_prediction(prediction, style),
    styles=("ruler", "kvpress"),
))
DATASETS.register("longbench", DatasetScoring(
    name="longbench",
    metrics_for=lambda task, style: (longbench.metric_name_for(task),),
    prepare=longbench.prepare_prediction,
    styles=("longbench", "kvpress"),
))
DATASETS.register("longbench_e", DatasetScoring(
    name="longbench_e",
    metrics_for=lambda task, style: (longbench.metric_name_for(task),),
    prepare=longbench.prepare_prediction,
    styles=("longbench", "kvpress"),
    breakdown=_length_buckets,
))
DATASETS.register("aime25", DatasetScoring(
    name="aime25",
    metrics_for=_aime_metrics_for,
    prepare=lambda task, prediction, style: prediction,
    styles=("robust", "kvpress"),
))


class DatasetScores(TypedDict):
    """What :func:`score_dataset` returns (JSON-serialisable; ``null`` marks an empty LongBench-E bucket)."""

    dataset: str  # the dataset scoring used ("ruler", "longbench", "longbench_e", "aime25")
    per_task: dict[str, dict[str, float | None]]  # task -> metric name (or "<metric>/<bucket>") -> percent
    overall: float  # unrounded mean over tasks of each task's headline score
    metric: dict[str, str]  # task -> its headline metric name (the key of per_task[task] averaged into overall)
    n_samples: int  # records scored
    style: str  # reference protocol used to prepare predictions ("ruler"/"kvpress", "longbench"/"kvpress", ...)
    versions: dict[str, str]  # metric name -> Metric.version, plus "dataset" -> DatasetScoring.version


def _references(record: Mapping[str, Any], index: int) -> Any:
    # kvpress's LongBench frames call the column "answers"; accept it rather than fail on a rename.
    for key in ("answer", "answers"):
        if key in record:
            return record[key]
    raise ValueError(f"record {index} has no 'answer'")


def _prediction(record: Mapping[str, Any], index: int) -> str:
    if "prediction" not in record:
        raise ValueError(f"record {index} has no 'prediction'")
    prediction = record["prediction"]
    return "" if prediction is None else str(prediction)  # None: nothing was generated


def _score_task(scoring: DatasetScoring, task: str, rows: Sequence[tuple[int, Mapping[str, Any]]],
                style: str) -> tuple[str, dict[str, float | None]]:
    names = scoring.metrics_for(task, style)
    records = [record for _, record in rows]
    texts = [scoring.prepare(task, _prediction(record, i), style) for i, record in rows]
    references = [_references(record, i) for i, record in rows]
    # LB and kvpress use one class list for a whole dataset; records that lack one borrow the task's first.
    task_classes = next((r.get("all_classes") for r in records if r.get("all_classes") is not None), None)
    classes = [task_classes if r.get("all_classes") is None else r["all_classes"] for r in records]
    # Samples without a problem id count as problems of their own (avg@k = pass@k = accuracy then).
    groups = [record.get("problem_id", ("sample", i)) for i, record in rows]
    scores: dict[str, float | None] = {}
    for name in names:
        metric = METRICS.get(name)
        samples = [metric.sample_fn(text, refs, all_classes=cls)
                   for text, refs, cls in zip(texts, references, classes, strict=True)]
        scores[name] = float(metric.aggregate_fn(samples, groups))
        if scoring.breakdown is not None and name == names[0]:
            for key, value in scoring.breakdown(samples, records).items():
                scores[f"{name}/{key}"] = None if math.isnan(value) else float(value)
    return names[0], scores


def score_dataset(dataset_name: str, records: Sequence[Mapping[str, Any]], style: str | None = None) -> DatasetScores:
    """Score a run's records with the registered scoring of ``dataset_name``.

    Each record needs ``task``, ``prediction`` and ``answer`` (str or list of str); ``all_classes`` (LongBench
    trec / lsht), ``length`` (LongBench-E) and ``problem_id`` (AIME, several samples per problem) are read when
    present. ``style`` picks the reference protocol (default: the benchmark's own; ``"kvpress"`` everywhere for
    kvpress's variants). Tasks are reported in sorted order.
    """
    scoring = DATASETS.get(dataset_name)
    style = scoring.styles[0] if style is None else style
    if style not in scoring.styles:
        raise unknown_name_error(f"{dataset_name} style", style, scoring.styles)
    if not records:
        raise ValueError(f"no records to score for {dataset_name}")
    by_task: dict[str, list[tuple[int, Mapping[str, Any]]]] = {}
    for i, record in enumerate(records):
        if "task" not in record:
            raise ValueError(f"record {i} has no 'task'")
        by_task.setdefault(str(record["task"]), []).append((i, record))
    per_task: dict[str, dict[str, float | None]] = {}
    headline: dict[str, str] = {}
    for task in sorted(by_task):
        headline[task], per_task[task] = _score_task(scoring, task, by_task[task], style)
    headline_scores = [per_task[task][headline[task]] for task in per_task]
    used = sorted({name for scores in per_task.values() for name in scores if name in METRICS})
    return {
        "dataset": dataset_name,
        "per_task": per_task,
        "overall": sum(headline_scores) / len(headline_scores),
        "metric": headline,
        "n_samples": len(records),
        "style": style,
        "versions": {**{name: METRICS.get(name).version for name in used}, "dataset": scoring.version},
    }


def dataset_names() -> list[str]:
    """The names :func:`score_dataset` accepts."""
    return DATASETS.names()


def headline_sample_scores(dataset_name: str, records: Sequence[Mapping[str, Any]],
                           style: str | None = None) -> list[float]:
    """Each record's score (in [0, 1]) under its task's headline metric, in record order: what the leaderboard's
    bootstrap resamples. Prepared exactly as :func:`score_dataset` prepares them, so for mean-based metrics the
    mean of a task's scores, in percent, is that task's score (up to its rounding)."""
    scoring = DATASETS.get(dataset_name)
    style = scoring.styles[0] if style is None else style
    if style not in scoring.styles:
        raise unknown_name_error(f"{dataset_name} style", style, scoring.styles)
    by_task: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        if "task" not in record:
            raise ValueError(f"record {i} has no 'task'")
        by_task.setdefault(str(record["task"]), []).append(i)
    scores = [0.0] * len(records)
    for task, indices in by_task.items():
        metric = METRICS.get(scoring.metrics_for(task, style)[0])
        task_records = [records[i] for i in indices]
        # as _score_task: records without a class list borrow the task's first
        task_classes = next((r.get("all_classes") for r in task_records if r.get("all_classes") is not None), None)
        for i, record in zip(indices, task_records, strict=True):
            text = scoring.prepare(task, _prediction(record, i), style)
            classes = task_classes if record.get("all_classes") is None else record["all_classes"]
            scores[i] = float(metric.sample_fn(text, _references(record, i), all_classes=classes))
    return scores
