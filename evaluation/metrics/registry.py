"""The one registry of metrics, the one registry of dataset scorings, and :func:`score_dataset`.

Metric names are defined once, in the benchmark modules' tables (``ruler.RULER_METRICS``,
``longbench.LONGBENCH_METRICS``, ``loogle.QA_METRICS``, ...) or below (AIME, LongBench v2, MATH-500, needle), and
registered here; dataset scorings say which metrics each task uses and how a prediction is prepared, so
:func:`score_dataset` has no per-benchmark branches.

Scores in results are percentages rounded to 2 decimals, as RULER and LongBench report them (AIME too, for one
scale on the leaderboard), except ``needle_rouge1_kvpress``, kvpress's own 0-10 number; every metric here has
``higher_is_better=True``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

from evaluation.metrics import (
    aime,
    infinitebench,
    longbench,
    longbench_v2,
    loogle,
    math500,
    needle,
    ruler,
    zero_scrolls,
)
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


def _longbench_sample_fn(metric: Callable[..., float]) -> SampleFn:
    # LB's scorer loop over the references; record fields other than all_classes are ignored.
    def sample_fn(prediction: str, references: Any, all_classes: Any = None, **record_fields: object) -> float:
        return longbench.max_over_references(metric, prediction, references, all_classes)

    sample_fn.__name__ = sample_fn.__qualname__ = metric.__name__
    return sample_fn


for _name, _fn in longbench.LONGBENCH_METRICS.items():
    register_metric(Metric(_name, _longbench_sample_fn(_fn), ignore_groups(longbench.longbench_dataset_score)))
register_metric(Metric("aime_accuracy", _as_float(aime.is_correct), _percent(aime.mean_score)))
register_metric(Metric("aime_accuracy_kvpress", _as_float(aime.is_correct_kvpress), _percent(aime.mean_score)))
register_metric(Metric("aime_answered", _as_float(aime.is_answered), _percent(aime.mean_score)))
register_metric(Metric("aime_answered_kvpress", _as_float(aime.is_answered_kvpress), _percent(aime.mean_score)))
register_metric(Metric("aime_avg@k", _as_float(aime.is_correct), _percent(aime.avg_at_k)))
register_metric(Metric("aime_pass@k", _as_float(aime.is_correct), _percent(aime.pass_at_k)))
_PERCENT_MEAN = _percent(aime.mean_score)
register_metric(Metric("longbench_v2_accuracy", longbench_v2.is_correct, _PERCENT_MEAN))
register_metric(Metric("longbench_v2_accuracy_kvpress", longbench_v2.is_correct_kvpress, _PERCENT_MEAN))
register_metric(Metric("math500_accuracy", math500.is_correct, _PERCENT_MEAN))
register_metric(Metric("math500_accuracy_kvpress", math500.is_correct_kvpress, _PERCENT_MEAN))
register_metric(Metric("math500_answered", math500.is_answered, _PERCENT_MEAN))
register_metric(Metric("math500_answered_kvpress", math500.is_answered_kvpress, _PERCENT_MEAN))
register_metric(Metric("needle_rouge1", needle.rouge1_f, _PERCENT_MEAN))
register_metric(Metric("needle_rouge1_kvpress", needle.rouge1_kvpress, aime.mean_score))  # kvpress: plain mean, 0-10
register_metric(Metric("needle_exact", needle.exact_retrieval, _PERCENT_MEAN))
for _name, _fn in loogle.QA_METRICS.items():
    register_metric(Metric(_name, _fn, loogle.percent_mean))
for _name, _fn in loogle.CLOZE_METRICS.items():
    register_metric(Metric(_name, _fn, loogle.ratio_of_sums))
register_metric(Metric("infinitebench_score", infinitebench.sample_fn, _PERCENT_MEAN))
for _name, _fn in zero_scrolls.ZERO_SCROLLS_METRICS.items():
    register_metric(Metric(_name, _fn, _PERCENT_MEAN))

Breakdown = Callable[[Sequence[float], Sequence[Mapping[str, Any]]], Mapping[str, float]]
Report = Callable[[Sequence[Mapping[str, Any]], Mapping[str, Sequence[float]]], Mapping[str, Any]]


@dataclass(frozen=True)
class DatasetScoring:
    """How one benchmark's records become scores.

    ``metrics_for(task, style)`` names the task's metrics, the headline (averaged into ``overall``) first;
    ``prepare(task, prediction, style)`` is the text the metrics see; ``styles`` are the reference protocols
    offered, the default first; ``breakdown(headline sample scores, records)`` adds sub-scores (LongBench-E length
    buckets) reported as ``"<metric>/<key>"``; ``report(records, {metric: sample scores})`` adds top-level keys
    over the whole dataset (needle_in_haystack's ``by_length_depth`` grid), with the samples in record order.
    """

    name: str
    metrics_for: Callable[[str, str], tuple[str, ...]]
    prepare: Callable[[str, str, str], str]
    styles: tuple[str, ...]
    breakdown: Breakdown | None = None
    version: str = "1"
    report: Report | None = None


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
    # kvpress's calculate_metrics_e (LB's scorer_e) keeps LB's rule: first line after lstrip("\n") for trec /
    # triviaqa / samsum, the raw prediction elsewhere; only its LongBench v1 path lstrip()s. So both styles
    # prepare predictions alike here.
    prepare=lambda task, prediction, style: longbench.prepare_prediction(task, prediction, "longbench"),
    styles=("longbench", "kvpress"),
    breakdown=_length_buckets,
    version="2",
))
DATASETS.register("aime25", DatasetScoring(
    name="aime25",
    metrics_for=_aime_metrics_for,
    prepare=lambda task, prediction, style: prediction,
    styles=("robust", "kvpress"),
))


def _pair(own: str, kvpress: str, *others: str) -> Callable[[str, str], tuple[str, ...]]:
    # The benchmark's own rule heads the list by default, kvpress's with style "kvpress"; both are reported.
    def metrics_for(task: str, style: str) -> tuple[str, ...]:
        return (kvpress, own, *others) if style == "kvpress" else (own, kvpress, *others)

    return metrics_for


def _as_is(task: str, prediction: str, style: str) -> str:
    return prediction


def _needle_report(records: Sequence[Mapping[str, Any]], samples: Mapping[str, Sequence[float]]) -> dict[str, Any]:
    return {"by_length_depth": needle.by_length_depth(records, samples["needle_rouge1"], samples["needle_exact"])}


DATASETS.register("longbench-v2", DatasetScoring(
    name="longbench-v2",
    metrics_for=_pair("longbench_v2_accuracy", "longbench_v2_accuracy_kvpress"),
    prepare=_as_is,
    styles=("longbench", "kvpress"),
))
DATASETS.register("math500", DatasetScoring(
    name="math500",
    metrics_for=_pair("math500_accuracy", "math500_accuracy_kvpress", "math500_answered", "math500_answered_kvpress"),
    prepare=_as_is,
    styles=("robust", "kvpress"),
))
DATASETS.register("needle_in_haystack", DatasetScoring(
    name="needle_in_haystack",
    metrics_for=lambda task, style: ("needle_rouge1", "needle_exact", "needle_rouge1_kvpress"),
    prepare=_as_is,
    styles=("kvpress",),
    report=_needle_report,
))
DATASETS.register("loogle", DatasetScoring(
    name="loogle",
    metrics_for=lambda task, style: loogle.metrics_for(task),
    prepare=_as_is,
    styles=("kvpress",),
))
DATASETS.register("infinitebench", DatasetScoring(
    name="infinitebench",
    metrics_for=lambda task, style: ("infinitebench_score",),
    prepare=_as_is,
    styles=("kvpress",),
))
DATASETS.register("zero_scrolls", DatasetScoring(
    name="zero_scrolls",
    metrics_for=lambda task, style: (zero_scrolls.metric_name_for(task),),
    prepare=_as_is,
    styles=("zero_scrolls",),
))


class _DatasetReports(TypedDict, total=False):
    """Top-level keys only some datasets add (:attr:`DatasetScoring.report`)."""

    by_length_depth: list[needle.LengthDepthCell]  # needle_in_haystack: one cell per (length, depth), sorted


class DatasetScores(_DatasetReports):
    """What :func:`score_dataset` returns (JSON-serialisable; ``null`` marks an empty LongBench-E bucket)."""

    dataset: str  # the dataset scoring used ("ruler", "longbench", "longbench_e", "needle_in_haystack", ...)
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
                style: str) -> tuple[str, dict[str, float | None], dict[str, list[float]]]:
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
    all_samples: dict[str, list[float]] = {}
    for name in names:
        metric = METRICS.get(name)
        samples = [metric.sample_fn(text, refs, all_classes=cls, task=task, question=record.get("question"))
                   for text, refs, cls, record in zip(texts, references, classes, records, strict=True)]
        all_samples[name] = samples
        scores[name] = float(metric.aggregate_fn(samples, groups))
        if scoring.breakdown is not None and name == names[0]:
            for key, value in scoring.breakdown(samples, records).items():
                scores[f"{name}/{key}"] = None if math.isnan(value) else float(value)
    return names[0], scores, all_samples


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
    samples_by_index: dict[str, dict[int, float]] = {}
    for task in sorted(by_task):
        headline[task], per_task[task], samples = _score_task(scoring, task, by_task[task], style)
        for name, values in samples.items():
            samples_by_index.setdefault(name, {}).update(zip((i for i, _ in by_task[task]), values, strict=True))
    headline_scores = [per_task[task][headline[task]] for task in per_task]
    used = sorted({name for scores in per_task.values() for name in scores if name in METRICS})
    extra: dict[str, Any] = {}
    if scoring.report is not None:
        order = range(len(records))
        extra = dict(scoring.report(records, {name: [values[i] for i in order]
                                              for name, values in samples_by_index.items()}))
    return {
        "dataset": dataset_name,
        "per_task": per_task,
        "overall": sum(headline_scores) / len(headline_scores),
        "metric": headline,
        "n_samples": len(records),
        "style": style,
        "versions": {**{name: METRICS.get(name).version for name in used}, "dataset": scoring.version},
        **extra,
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
