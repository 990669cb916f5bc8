"""Needle in a haystack: how much of the needle sentence the answer gives back, by context length and needle depth.

References:
    * kvpress ``evaluation/benchmarks/needle_in_haystack/calculate_metrics.py``:
      ``RougeScorer(["rouge1", "rougeL"], use_stemmer=True).score(needle, predicted_answer)["rouge1"].fmeasure * 10``
      per sample (package ``rouge-score``), averaged: ``{"rouge1": mean}``. The ``* 10`` puts kvpress's number on a
      0-10 scale.
    * gkamradt/LLMTest_NeedleInAHaystack (the test kvpress follows) scores with a judge model, which an offline
      harness cannot run; exact retrieval (:func:`exact_retrieval`) is the deterministic check reported beside ROUGE.

Registered metrics: ``needle_rouge1`` (ROUGE-1 F in percent, 0-100: kvpress's number times 10),
``needle_rouge1_kvpress`` (kvpress's number itself, 0-10) and ``needle_exact`` (percent of answers containing the
whole needle). ``by_length_depth`` groups the first and last by the records' ``needle_length`` / ``needle_depth``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any, TypedDict


class LengthDepthCell(TypedDict):
    """One cell of the depth x length grid in metrics.json's ``by_length_depth``."""

    length: int  # the grid's context length in tokens (--needle_lengths)
    depth: float  # where the needle sits, percent of the haystack (--needle_depths)
    score: float  # kvpress's ROUGE-1 F in percent (0-100), mean over the cell's samples, 2 decimals
    exact: float  # exact retrieval in percent (0-100), 2 decimals
    n: int  # samples in the cell


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)


def _needle(references: str | Sequence[str]) -> str:
    return references if isinstance(references, str) else str(list(references)[0])


def rouge1_f(prediction: str, references: str | Sequence[str], **kwargs: object) -> float:
    """ROUGE-1 F of the prediction against the needle (rouge-score, Porter stemmer), in [0, 1]."""
    return float(_scorer().score(_needle(references), prediction)["rouge1"].fmeasure)


def rouge1_kvpress(prediction: str, references: str | Sequence[str], **kwargs: object) -> float:
    """kvpress's per-sample number: ROUGE-1 F times 10."""
    return rouge1_f(prediction, references) * 10


def _collapse(text: str) -> str:
    return " ".join(text.lower().split())


def exact_retrieval(prediction: str, references: str | Sequence[str], **kwargs: object) -> float:
    """1.0 when the whole needle appears in the prediction (case and runs of whitespace ignored)."""
    needle = _collapse(_needle(references)).rstrip(".")
    return float(bool(needle) and needle in _collapse(prediction))


def by_length_depth(records: Sequence[Mapping[str, Any]], rouge: Sequence[float],
                    exact: Sequence[float]) -> list[LengthDepthCell]:
    """The grid cells, sorted by length then depth; ``rouge`` / ``exact`` are per-sample fractions in [0, 1]."""
    cells: dict[tuple[int, float], list[tuple[float, float]]] = {}
    for record, r, e in zip(records, rouge, exact, strict=True):
        if record.get("needle_length") is None or record.get("needle_depth") is None:
            raise ValueError("needle_in_haystack records need 'needle_length' and 'needle_depth'")
        key = (int(record["needle_length"]), float(record["needle_depth"]))
        cells.setdefault(key, []).append((r, e))
    return [{"length": length, "depth": depth, "score": round(100 * sum(r for r, _ in v) / len(v), 2),
             "exact": round(100 * sum(e for _, e in v) / len(v), 2), "n": len(v)}
            for (length, depth), v in sorted(cells.items())]
