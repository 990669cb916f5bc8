"""Metrics for every dataset kvpress evaluates (RULER, LongBench v1 / LongBench-E / v2, LooGLE, ZeroSCROLLS,
InfiniteBench, needle in a haystack, AIME25, MATH-500), scored exactly as the reference implementations.

``score_dataset(dataset_name, records)`` is the entry point; :data:`METRICS` is the one metric registry.
The benchmark modules (``ruler``, ``longbench``, ``longbench_v2``, ``loogle``, ``zero_scrolls``, ``infinitebench``,
``needle``, ``aime``, ``math500``) hold the reference functions themselves.
"""

from evaluation.metrics.base import Metric, Registry
from evaluation.metrics.registry import (
    DATASETS,
    METRICS,
    DatasetScores,
    DatasetScoring,
    dataset_names,
    get_metric,
    register_metric,
    score_dataset,
)

__all__ = [
    "DATASETS",
    "METRICS",
    "DatasetScores",
    "DatasetScoring",
    "Metric",
    "Registry",
    "dataset_names",
    "get_metric",
    "register_metric",
    "score_dataset",
]
