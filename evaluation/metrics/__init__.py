"""Metrics for RULER, LongBench v1 / LongBench-E and AIME25, scored exactly as the reference implementations.

``score_dataset(dataset_name, records)`` is the entry point; :data:`METRICS` is the one metric registry.
The benchmark modules (``ruler``, ``longbench``, ``aime``) hold the reference functions themselves.
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
