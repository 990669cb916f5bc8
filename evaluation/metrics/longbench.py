"""LongBench v1 and LongBench-E metrics (Bai et al. 2024, ACL), scored exactly as the reference code does.

References:
    * THUDM/LongBench ``LongBench/metrics.py`` (every per-answer metric below) and ``LongBench/eval.py``
      (``scorer``, ``scorer_e``, ``dataset2metric``, the first-line cut for trec / triviaqa / samsum / lsht).
    * kvpress ``evaluation/benchmarks/longbench/calculate_metrics.py``: a copy of both, except the first-line cut
      (``prediction.lstrip().split("\\n")[0]`` instead of ``prediction.lstrip("\\n").split("\\n")[0]``); the harness
      spec (``reference.md`` §2.3) also notes that kvpress ``lstrip()``s every prediction.

Every metric has the reference signature ``metric(prediction, ground_truth, all_classes=None) -> float`` in [0, 1];
a sample scores the max over its ground truths (:func:`score_sample`), a dataset ``round(100 * mean, 2)``.
Package behaviour that changes numbers (``reference.md`` §2.3): ``rouge==1.0.1`` (ROUGE-L F, summary-level union
LCS, sentences split on ``"."``, no lower-casing), ``jieba`` accurate mode, and ``fuzzywuzzy`` whose ``ratio`` uses
``difflib`` unless ``python-Levenshtein`` is installed (:data:`FUZZ_MATCHER` records which one is in use).
"""

from __future__ import annotations

import math
import re
import string
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
from rouge import Rouge

with warnings.catch_warnings():
    # fuzzywuzzy warns at import that it falls back to difflib; that fallback is the reference environment.
    warnings.filterwarnings("ignore", message="Using slow pure-python SequenceMatcher")
    from fuzzywuzzy import fuzz

PredictionStyle = Literal["longbench", "kvpress"]
MetricFn = Callable[..., float]

# The matcher behind fuzz.ratio: "difflib" (the reference environment) or "Levenshtein.StringMatcher".
FUZZ_MATCHER: str = fuzz.SequenceMatcher.__module__

# LB eval.py scores only the first line of the prediction for these few-shot datasets.
FIRST_LINE_DATASETS = frozenset({"trec", "triviaqa", "samsum", "lsht"})

# LB metrics.py: the CJK punctuation removed by normalize_zh_answer (on top of string.punctuation).
_CN_PUNCTUATION = (
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣"
    "､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
_EN_PUNCTUATION = frozenset(string.punctuation)
_ALL_PUNCTUATION = frozenset(string.punctuation + _CN_PUNCTUATION)


def normalize_answer(s: str) -> str:
    """LB ``normalize_answer``: lower, drop ASCII punctuation, replace articles a/an/the by a space, collapse spaces."""
    s = "".join(ch for ch in s.lower() if ch not in _EN_PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def normalize_zh_answer(s: str) -> str:
    """LB ``normalize_zh_answer``: lower, drop ASCII and CJK punctuation, remove every whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _ALL_PUNCTUATION)
    return "".join(s.split())


def _jieba_cut(text: str) -> list[str]:
    # Imported on first use: loading jieba's dictionary costs about a second that English-only runs never need.
    import jieba

    return list(jieba.cut(text, cut_all=False))


def f1_score(prediction_tokens: Sequence[str], ground_truth_tokens: Sequence[str]) -> float:
    """LB ``f1_score``: F1 of the multiset (bag-of-tokens) overlap; 0 when nothing overlaps."""
    num_same = sum((Counter(prediction_tokens) & Counter(ground_truth_tokens)).values())
    if num_same == 0:
        return 0.0  # LB returns the int 0; the value is the same and every caller takes a max with 0.0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **kwargs: object) -> float:
    """LB ``qa_f1_score``: token F1 between :func:`normalize_answer`-ed prediction and answer."""
    return f1_score(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh_score(prediction: str, ground_truth: str, **kwargs: object) -> float:
    """LB ``qa_f1_zh_score``: jieba tokens, each :func:`normalize_zh_answer`-ed, empty ones dropped, then F1."""
    prediction_tokens = [t for t in (normalize_zh_answer(t) for t in _jieba_cut(prediction)) if len(t) > 0]
    ground_truth_tokens = [t for t in (normalize_zh_answer(t) for t in _jieba_cut(ground_truth)) if len(t) > 0]
    return f1_score(prediction_tokens, ground_truth_tokens)


def rouge_score(prediction: str, ground_truth: str, **kwargs: object) -> float:
    """LB ``rouge_score``: ``Rouge().get_scores([pred], [gt], avg=True)["rouge-l"]["f"]`` of ``rouge==1.0.1``.

    Any exception gives 0.0, as in LB (bare ``except``) and kvpress (``except Exception``): an empty or
    ``"."``-only hypothesis raises ``ValueError``, and a very long "sentence" can exhaust the recursion of the
    package's LCS reconstruction (``RecursionError``). The default metric list (rouge-1, -2, -l) is kept so the
    same inputs raise the same way.
    """
    try:
        scores = Rouge().get_scores([prediction], [ground_truth], avg=True)
    except Exception:
        return 0.0
    return scores["rouge-l"]["f"]


def rouge_zh_score(prediction: str, ground_truth: str, **kwargs: object) -> float:
    """LB ``rouge_zh_score``: join jieba tokens with spaces on both sides, then :func:`rouge_score`."""
    return rouge_score(" ".join(_jieba_cut(prediction)), " ".join(_jieba_cut(ground_truth)))


def classification_score(prediction: str, ground_truth: str, **kwargs: object) -> float:
    """LB ``classification_score``: ``1 / #matched classes`` if the answer's class is matched, else 0.

    Classes are matched as substrings of the prediction; then matches that are strict substrings of the answer
    are dropped. LB removes them from the list it is iterating over, so the element right after each removal is
    never examined. That quirk changes scores (``all_classes=["a", "b", "ab"]``, prediction and answer ``"ab"``:
    ``"a"`` is removed, ``"b"`` is skipped, score ``1/2`` instead of ``1``) and is reproduced literally.
    """
    all_classes = kwargs.get("all_classes")
    if all_classes is None:
        raise ValueError("classification_score needs all_classes (the dataset's list of class names)")
    em_match_list = [class_name for class_name in all_classes if class_name in prediction]
    for match_term in em_match_list:  # noqa: B909 - mutation while iterating is the reference's behaviour
        if match_term in ground_truth and match_term != ground_truth:
            em_match_list.remove(match_term)
    return 1.0 / len(em_match_list) if ground_truth in em_match_list else 0.0


def _share_of_numbers(prediction: str, wanted: str) -> float:
    # LB retrieval/count: fraction of the numbers in the prediction that equal the expected one (0 if none).
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return float(sum(1 for number in numbers if number == wanted) / len(numbers))


def retrieval_score(prediction: str, ground_truth: str, **kwargs: object) -> float:
    """LB ``retrieval_score``: the paragraph id is ``re.findall(r"Paragraph (\\d+)", gt)[0]``; share of the numbers
    in the prediction equal to it (``"Paragraph 3, not 12"`` scores 1/2 for paragraph 3)."""
    return _share_of_numbers(prediction, re.findall(r"Paragraph (\d+)", ground_truth)[0])


def retrieval_zh_score(prediction: str, ground_truth: str, **kwargs: object) -> float:
    """LB ``retrieval_zh_score``: as :func:`retrieval_score` with the id taken from ``段落(\\d+)``."""
    return _share_of_numbers(prediction, re.findall(r"段落(\d+)", ground_truth)[0])


def count_score(prediction: str, ground_truth: str | int, **kwargs: object) -> float:
    """LB ``count_score``: share of the numbers in the prediction equal to ``str(ground_truth)``."""
    return _share_of_numbers(prediction, str(ground_truth))


def code_sim_score(prediction: str, ground_truth: str, **kwargs: object) -> float:
    """LB ``code_sim_score``: ``fuzz.ratio(line, gt) / 100`` on the prediction's first useful line.

    Lines come from ``prediction.lstrip("\\n").split("\\n")``; the first one containing none of `````, ``#``, ``//``
    is kept (its indentation too), or ``""`` if there is none. ``fuzz.ratio`` is an integer percentage
    (``round`` of ``100 * SequenceMatcher.ratio()``, so banker's rounding), 100 for equal strings, 0 if one is empty.
    """
    lines = prediction.lstrip("\n").split("\n")
    line = next((ln for ln in lines if "`" not in ln and "#" not in ln and "//" not in ln), "")
    return fuzz.ratio(line, ground_truth) / 100


# Metric names as the registry and results files spell them, each bound to its LB function.
LONGBENCH_METRICS: dict[str, MetricFn] = {
    "qa_f1": qa_f1_score,
    "qa_f1_zh": qa_f1_zh_score,
    "rouge": rouge_score,
    "rouge_zh": rouge_zh_score,
    "classification": classification_score,
    "retrieval": retrieval_score,
    "retrieval_zh": retrieval_zh_score,
    "count": count_score,
    "code_sim": code_sim_score,
}

# LB eval.py dataset2metric, with the metric names above.
DATASET_TO_METRIC: dict[str, str] = {
    "narrativeqa": "qa_f1",
    "qasper": "qa_f1",
    "multifieldqa_en": "qa_f1",
    "multifieldqa_zh": "qa_f1_zh",
    "hotpotqa": "qa_f1",
    "2wikimqa": "qa_f1",
    "musique": "qa_f1",
    "dureader": "rouge_zh",
    "gov_report": "rouge",
    "qmsum": "rouge",
    "multi_news": "rouge",
    "vcsum": "rouge_zh",
    "trec": "classification",
    "triviaqa": "qa_f1",
    "samsum": "rouge",
    "lsht": "classification",
    "passage_retrieval_en": "retrieval",
    "passage_count": "count",
    "passage_retrieval_zh": "retrieval_zh",
    "lcc": "code_sim",
    "repobench-p": "code_sim",
}

LENGTH_BUCKETS = ("0-4k", "4-8k", "8k+")


def base_dataset_name(dataset: str) -> str:
    """The LongBench dataset a (possibly LongBench-E) name refers to: ``"trec_e"`` -> ``"trec"``.

    The ``-e`` spelling is accepted as well, since kvpress's ``calculate_metrics_e`` strips that one.
    """
    for suffix in ("_e", "-e"):
        if dataset.endswith(suffix) and dataset[: -len(suffix)] in DATASET_TO_METRIC:
            return dataset[: -len(suffix)]
    return dataset


def metric_name_for(dataset: str) -> str:
    """The metric name of a LongBench (or LongBench-E) dataset; unknown names raise ``ValueError``."""
    base = base_dataset_name(dataset)
    if base not in DATASET_TO_METRIC:
        raise ValueError(f"unknown LongBench dataset {dataset!r}: choose from {', '.join(sorted(DATASET_TO_METRIC))}")
    return DATASET_TO_METRIC[base]


def prepare_prediction(dataset: str, prediction: str, style: PredictionStyle = "longbench") -> str:
    """The text a LongBench metric sees for ``prediction``.

    ``style="longbench"`` (default, LB ``eval.py``): the raw prediction, cut to
    ``prediction.lstrip("\\n").split("\\n")[0]`` for trec / triviaqa / samsum / lsht.
    ``style="kvpress"``: ``prediction.lstrip()`` for every dataset (``reference.md`` §2.3) and the first-line cut
    ``prediction.lstrip().split("\\n")[0]`` (kvpress ``scorer``). The two differ when a prediction starts with
    spaces: e.g. ``" \\nLocation"`` is ``" "`` for LB but ``"Location"`` for kvpress, and code_sim keeps or loses
    the first line's indentation.
    """
    if style == "longbench":
        if base_dataset_name(dataset) in FIRST_LINE_DATASETS:
            return prediction.lstrip("\n").split("\n")[0]
        return prediction
    if style == "kvpress":
        prediction = str(prediction).lstrip()
        if base_dataset_name(dataset) in FIRST_LINE_DATASETS:
            return prediction.split("\n")[0]
        return prediction
    raise ValueError(f"unknown LongBench prediction style {style!r}: choose from longbench, kvpress")


def max_over_references(metric: MetricFn, prediction: str, ground_truths: str | Sequence[str],
                        all_classes: Sequence[str] | None = None) -> float:
    """LB ``scorer`` inner loop: ``score = max(score, metric(pred, gt, all_classes=...))`` starting from 0.0.

    A bare string is taken as one ground truth (LB would iterate over its characters).
    """
    if isinstance(ground_truths, str):
        ground_truths = [ground_truths]
    score = 0.0
    for ground_truth in ground_truths:
        score = max(score, metric(prediction, ground_truth, all_classes=all_classes))
    return score


def score_sample(dataset: str, prediction: str, ground_truths: str | Sequence[str],
                 all_classes: Sequence[str] | None = None, style: PredictionStyle = "longbench") -> float:
    """One sample's score in [0, 1]: :func:`prepare_prediction`, then the dataset's metric, max over answers."""
    metric = LONGBENCH_METRICS[metric_name_for(dataset)]
    return max_over_references(metric, prepare_prediction(dataset, prediction, style), ground_truths, all_classes)


def longbench_dataset_score(sample_scores: Sequence[float]) -> float:
    """LB ``scorer``: ``round(100 * total_score / len(predictions), 2)``.

    The total is accumulated with ``+=`` in sample order like LB (the builtin ``sum`` compensates rounding on
    Python >= 3.12, which could move a tie at the second decimal).
    """
    if not sample_scores:
        raise ValueError("a LongBench dataset needs at least one sample to be scored")
    total_score = 0.0
    for score in sample_scores:
        total_score += score
    return round(100 * total_score / len(sample_scores), 2)


def length_bucket(length: float) -> str:
    """LB ``scorer_e`` bucket of a sample's ``length`` field: ``< 4000`` -> 0-4k, ``< 8000`` -> 4-8k, else 8k+."""
    if length < 4000:
        return "0-4k"
    if length < 8000:
        return "4-8k"
    return "8k+"


def longbench_e_bucket_scores(sample_scores: Sequence[float], lengths: Sequence[float]) -> dict[str, float]:
    """LB ``scorer_e``: ``round(100 * np.mean(bucket), 2)`` per length bucket; an empty bucket is ``nan``.

    ``np.mean`` (pairwise summation) is the reference's; the empty case returns ``nan`` without numpy's warning.
    """
    if len(sample_scores) != len(lengths):
        raise ValueError(f"got {len(sample_scores)} scores and {len(lengths)} lengths")
    buckets: dict[str, list[float]] = {name: [] for name in LENGTH_BUCKETS}
    for score, length in zip(sample_scores, lengths, strict=True):
        buckets[length_bucket(length)].append(score)
    return {name: float(round(100 * np.mean(scores), 2)) if scores else math.nan for name, scores in buckets.items()}


def score_longbench(dataset: str, predictions: Sequence[str], answers: Sequence[str | Sequence[str]],
                    all_classes: Sequence[str] | None = None, style: PredictionStyle = "longbench") -> float:
    """A LongBench dataset's score in percent (LB ``scorer``): :func:`score_sample` each, then
    :func:`longbench_dataset_score`. ``all_classes`` is shared by the whole dataset, as in LB and kvpress."""
    if len(predictions) != len(answers):
        raise ValueError(f"got {len(predictions)} predictions and {len(answers)} answers")
    return longbench_dataset_score(
        [score_sample(dataset, p, a, all_classes, style) for p, a in zip(predictions, answers, strict=True)])


def score_longbench_e(dataset: str, predictions: Sequence[str], answers: Sequence[str | Sequence[str]],
                      lengths: Sequence[float], all_classes: Sequence[str] | None = None,
                      style: PredictionStyle = "longbench") -> dict[str, float]:
    """A LongBench-E dataset's scores per length bucket (LB ``scorer_e``), ``nan`` for an empty bucket."""
    if len(predictions) != len(answers):
        raise ValueError(f"got {len(predictions)} predictions and {len(answers)} answers")
    scores = [score_sample(dataset, p, a, all_classes, style) for p, a in zip(predictions, answers, strict=True)]
    return longbench_e_bucket_scores(scores, lengths)
