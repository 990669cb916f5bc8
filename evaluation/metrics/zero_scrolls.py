"""ZeroSCROLLS (Shaham et al. 2023, Findings of EMNLP): ten long-text tasks with private test answers.

References:
    * kvpress ``evaluation/benchmarks/zero_scrolls/calculate_metrics.py``: ``return {}`` -- kvpress scores nothing,
      since its hub copy (``simonjegou/zero_scrolls``, the test split) has no gold answers; predictions are meant for
      the ZeroSCROLLS leaderboard.
    * ZeroSCROLLS paper, section 3 (metrics per task): ROUGE (geometric mean of ROUGE-1/2/L F) for gov_report,
      summ_screen_fd, qmsum and squality; unigram F1 for qasper, narrative_qa and musique; accuracy for quality.
      The F1 here is LongBench's (SQuAD's) normalised token F1, ROUGE is ``rouge-score`` with the Porter stemmer;
      neither was checked against ZeroSCROLLS's private evaluator.
    * space_digest (exponential similarity) and book_sum_sort (concordance index) are scored by normalised exact
      match here, a stand-in named ``zero_scrolls_exact``, not the benchmark's metric.

Scores need references: run it on a local file holding the validation split (``--data_files``); a record without
a reference scores 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

from evaluation.metrics.longbench import normalize_answer, qa_f1_score

ROUGE_TASKS = frozenset({"gov_report", "summ_screen_fd", "qmsum", "squality"})
F1_TASKS = frozenset({"qasper", "narrative_qa", "musique"})
ACCURACY_TASKS = frozenset({"quality"})


def _references(references: str | Sequence[str]) -> list[str]:
    refs = [references] if isinstance(references, str) else [str(r) for r in references]
    return [ref for ref in refs if ref.strip()]


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def rouge_geometric_mean(prediction: str, references: str | Sequence[str], **kwargs: object) -> float:
    """Geometric mean of ROUGE-1, ROUGE-2 and ROUGE-L F, the best over the references."""
    best = 0.0
    for ref in _references(references):
        scores = _scorer().score(ref, prediction)
        values = [scores[key].fmeasure for key in ("rouge1", "rouge2", "rougeL")]
        best = max(best, math.prod(values) ** (1 / 3))
    return best


def f1(prediction: str, references: str | Sequence[str], **kwargs: object) -> float:
    """Normalised unigram F1, the best over the references."""
    return max([qa_f1_score(prediction, ref) for ref in _references(references)] + [0.0])


def exact(prediction: str, references: str | Sequence[str], **kwargs: object) -> float:
    """1.0 when the normalised prediction equals a normalised reference."""
    return float(any(normalize_answer(prediction) == normalize_answer(ref) for ref in _references(references)))


ZERO_SCROLLS_METRICS = {"zero_scrolls_rouge": rouge_geometric_mean, "zero_scrolls_f1": f1,
                        "zero_scrolls_accuracy": exact, "zero_scrolls_exact": exact}


def metric_name_for(task: str) -> str:
    """The task's metric: ROUGE for summaries, F1 for QA, accuracy for quality, the exact-match stand-in else."""
    if task in ROUGE_TASKS:
        return "zero_scrolls_rouge"
    if task in F1_TASKS:
        return "zero_scrolls_f1"
    if task in ACCURACY_TASKS:
        return "zero_scrolls_accuracy"
    return "zero_scrolls_exact"
