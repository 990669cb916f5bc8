"""A run's metrics.json, derived from its predictions (so it can always be recomputed)."""

from __future__ import annotations

from evaluation.datasets.registry import get_dataset
from evaluation.metrics import score_dataset


def score_run(dataset: str, predictions: list[dict]) -> dict:
    """The dataset's own metric per task and overall, plus the mean compression the press actually achieved."""
    metrics = dict(score_dataset(get_dataset(dataset).metric, predictions))
    ratios = [p["compression_ratio"] for p in predictions if p.get("compression_ratio") is not None]
    metrics["compression_ratio"] = sum(ratios) / len(ratios) if ratios else None
    metrics["n_predictions"] = len(predictions)
    return metrics
