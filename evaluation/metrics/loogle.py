"""LooGLE (Li et al. 2024, ACL): long-dependency QA, short-dependency QA and cloze, scored as kvpress scores them.

References:
    * kvpress ``evaluation/benchmarks/loogle/calculate_metrics.py`` (adapted from bigai-nlco/LooGLE
      ``Evaluation/automatic_metrics.py``). Per task:
        - ``shortdep_cloze``: the answer and the prediction are Python dict literals (``{"<mask-0>": "Bob"}``);
          exact match counts masks whose predicted value equals the answer's, partial match masks whose values share
          a word; each task score is ``sum(matches) / sum(masks)`` (a prediction that is not a dict counts its masks
          as missed; an unreadable answer counts one missed mask).
        - every other task: BLEU-1 and BLEU-4 (``nltk`` ``sentence_bleu``, no smoothing, tokens from ``split()`` after
          newlines become spaces), ROUGE-1/2/L **recall** (``rouge==1.0.1``, ``metric="r"``), METEOR and
          BERTScore; any exception gives 0 for that metric family. Task score = mean over samples.
    * Not computed here: METEOR (needs NLTK's WordNet download) and BERTScore (needs ``roberta-large``): kvpress
      reports them, an offline harness cannot.

Scores are percentages (kvpress writes fractions; the cloze ones rounded to 4 decimals, so the same digits).
"""

from __future__ import annotations

import ast
import warnings
from collections.abc import Sequence

from rouge import Rouge


class Ratio(float):
    """A per-sample score that is a ratio of counts (matched masks / masks): its float value is the ratio, and
    :func:`ratio_of_sums` adds numerators and denominators as kvpress does, instead of averaging the ratios."""

    numerator: float
    denominator: float

    def __new__(cls, numerator: float, denominator: float) -> Ratio:
        value = super().__new__(cls, numerator / denominator if denominator else 0.0)
        value.numerator, value.denominator = numerator, denominator
        return value


def ratio_of_sums(sample_scores: Sequence[float], groups: object = None) -> float:
    """kvpress cloze aggregate: ``round(sum(match) / sum(count), 4)``, as a percent with 2 decimals."""
    numerator = sum(getattr(s, "numerator", s) for s in sample_scores)
    denominator = sum(getattr(s, "denominator", 1) for s in sample_scores)
    if not denominator:
        raise ValueError("a LooGLE cloze task needs at least one mask to be scored")
    return round(100 * numerator / denominator, 2)


def percent_mean(sample_scores: Sequence[float], groups: object = None) -> float:
    """kvpress QA aggregate: ``DataFrame.mean()`` of the samples, as a percent with 2 decimals."""
    if not sample_scores:
        raise ValueError("a LooGLE task needs at least one sample to be scored")
    return round(100 * sum(sample_scores) / len(sample_scores), 2)


def _reference(references: str | Sequence[str]) -> str:
    return references if isinstance(references, str) else str(list(references)[0])


def bleu(prediction: str, references: str | Sequence[str], order: int) -> float:
    """``sentence_bleu([ref], hyp, weights)`` with all weight on n-grams of ``order`` (1 or 4); 0 on any error."""
    from nltk.translate.bleu_score import sentence_bleu

    weights = tuple(1.0 if n == order else 0.0 for n in range(1, 5))
    reference = _reference(references).replace("\n", " ").split()
    hypothesis = prediction.replace("\n", " ").split()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nltk warns when an n-gram order has no overlap (the score is 0 then)
            return float(sentence_bleu([reference], hypothesis, weights=weights))
    except Exception:
        return 0.0


def rouge_recall(prediction: str, references: str | Sequence[str], key: str) -> float:
    """``Rouge().get_scores(hyps=[pred], refs=[ref])[0][key]["r"]`` (rouge 1.0.1); 0 on any error (empty text)."""
    try:
        return float(Rouge().get_scores(hyps=[prediction], refs=[_reference(references)])[0][key]["r"])
    except Exception:
        return 0.0


def _cloze_counts(prediction: str, references: str | Sequence[str], partial: bool) -> Ratio:
    try:
        reference = ast.literal_eval(_reference(references))
        count = len(reference)
    except Exception:
        return Ratio(0, 1)
    try:
        hypothesis = ast.literal_eval(prediction)
    except Exception:
        return Ratio(0, count or 1)
    if not isinstance(hypothesis, dict) or not isinstance(reference, dict):
        return Ratio(0, count or 1)
    if partial:
        matched = sum(1 for key in reference if key in hypothesis
                      and set(str(reference[key]).split()) & set(str(hypothesis[key]).split()))
    else:
        matched = sum(1 for key, value in reference.items() if hypothesis.get(key) == value)
    return Ratio(matched, count)


def exact_match(prediction: str, references: str | Sequence[str], **kwargs: object) -> float:
    """kvpress ``get_exact_match``: masks whose predicted value equals the answer's, over the answer's masks."""
    return _cloze_counts(prediction, references, partial=False)


def partial_match(prediction: str, references: str | Sequence[str], **kwargs: object) -> float:
    """kvpress ``get_partial_match``: masks whose predicted value shares a word with the answer's."""
    return _cloze_counts(prediction, references, partial=True)


QA_METRICS = {
    "loogle_rougeL": lambda p, r, **kw: rouge_recall(p, r, "rouge-l"),
    "loogle_rouge1": lambda p, r, **kw: rouge_recall(p, r, "rouge-1"),
    "loogle_rouge2": lambda p, r, **kw: rouge_recall(p, r, "rouge-2"),
    "loogle_bleu1": lambda p, r, **kw: bleu(p, r, 1),
    "loogle_bleu4": lambda p, r, **kw: bleu(p, r, 4),
}
CLOZE_METRICS = {"loogle_exact_match": exact_match, "loogle_partial_match": partial_match}


def metrics_for(task: str) -> tuple[str, ...]:
    """The task's metric names, headline first: exact match for the cloze task, ROUGE-L recall otherwise."""
    return tuple(CLOZE_METRICS) if task == "shortdep_cloze" else tuple(QA_METRICS)
