"""InfiniteBench (Zhang et al. 2024, ACL): per-task scorers, as kvpress runs them on its hub copy.

References:
    * kvpress ``evaluation/benchmarks/infinite_bench/calculate_metrics.py`` (adapted from OpenBMB/InfiniteBench
      ``src/compute_scores.py``): ``to_upstream_label`` turns the hub's string answers back into what the upstream
      scorers expect (numbers for code_run / math_find / math_calc; ``[option text, letter]`` for code_debug and
      longbook_choice_eng, the option read from the ``A. ... D.`` lines that end the question), then one scorer per
      task; the task score is the mean of the samples.
    * ``longbook_sum_eng``: kvpress refuses it (a conflict with its rouge package); InfiniteBench scores it with
      ROUGE-Lsum F (HF ``evaluate`` rouge = ``rouge-score``, no stemmer), which is what is reported here.

Scores are percentages (kvpress reports the mean as a fraction).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import lru_cache

from evaluation.metrics.longbench import f1_score, normalize_answer, normalize_zh_answer

_OPTIONS = re.compile(r"\nA\. (.*)\nB\. (.*)\nC\. (.*)\nD\. (.*)\Z")
_RETRIEVAL_PUNCTUATION = ("\n", ":", '"', "'", ".", ",", "?", "!", "{", "}")
NUMERIC_TASKS = ("code_run", "math_find", "math_calc")
CHOICE_TASKS = ("code_debug", "longbook_choice_eng")


def _as_list(references: str | Sequence[str]) -> list[str]:
    return [references] if isinstance(references, str) else [str(r) for r in references]


def to_number(value: str) -> int | float:
    """kvpress ``to_number``: int if it parses, else float (a ValueError if neither)."""
    try:
        return int(value)
    except ValueError:
        return float(value)


def choice_label(task: str, references: str | Sequence[str], question: str = "", context: str = "") -> list[str]:
    """kvpress ``to_upstream_label`` for choice tasks: ``[text of the answer's option, letter]``."""
    match = _OPTIONS.search(question or context)
    if match is None:
        raise ValueError(f"could not find the A-D options of the {task} question")
    letter = _as_list(references)[0]
    return [match.group("ABCD".index(letter) + 1), letter]


def first_int_match(prediction: str) -> str:
    """The first run of digits in the prediction, or ``""``."""
    return next((item for item in re.split("[^0-9]", prediction) if item != ""), "")


def kv_retrieval(pred: str, label: list, question: str = "") -> float:
    for c in _RETRIEVAL_PUNCTUATION:
        pred = pred.replace(c, " ")
    return float(label[0] in pred.split())


def passkey(pred: str, label: list, question: str = "") -> float:
    """passkey and number_string: the first integer in the prediction is the answer."""
    return float(label[0] == first_int_match(pred))


def code_run(pred: str, label: list, question: str = "") -> float:
    pred = pred.strip()
    for c in ("\n", ".", "`", "'", '"', ":"):
        pred = pred.replace(c, " ")
    words = pred.split()
    if not words:
        return 0.0
    try:
        return float(int(words[-1]) == label[0])
    except ValueError:
        return 0.0


def code_debug(pred: str, label: list, question: str = "") -> float:
    pred = pred.strip()
    fn_name, letter = label[0], label[1]
    match = re.search(r"\b[A-J]\b(?!.*\b[A-J]\b)", pred)
    if match and match.group(0) == letter:
        return 1.0
    for c in ("\n", "`", "'", '"', "-", "*", "Option", "option"):
        pred = pred.replace(c, " ")
    while "  " in pred:
        pred = pred.replace("  ", " ")
    if pred.startswith(letter) or pred.startswith(fn_name):
        return 1.0
    for prefix in ("answer is:", "is:", "answer:", "correct option is:"):
        idx = pred.find(prefix)
        if idx == -1:
            continue
        if len(pred) < idx + len(prefix) + 1:
            return 0.0
        rest = pred[idx + len(prefix) + 1:]
        return float(rest.startswith(letter) or rest.startswith(fn_name))
    return 0.0


def math_find(pred: str, label: list, question: str = "") -> float:
    first = re.search(r"\d+\.\d+|\d+", pred)
    if first is None:
        return 0.0
    value = label[0]
    if isinstance(value, int):
        # The reference raises on a decimal first number for an integer answer; here that answer is wrong.
        found = first.group(0).strip()
        return float("." not in found and int(found) == value)
    return float(float(first.group(0).strip()) == value)


def longdialogue_qa_eng(pred: str, label: list, question: str = "") -> float:
    pred = pred.strip().upper()
    return float(any(item.upper() in pred for item in label))


def longbook_choice_eng(pred: str, label: list, question: str = "") -> float:
    pred = pred.strip()
    match = re.search(r"\b[A-D]\b(?!.*\b[A-D]\b)", pred)
    if match and match.group(0) in label:
        return 1.0
    if pred == "":
        return 0.0
    if pred[0] in "ABCD":
        return float(pred[0] in label)
    if pred in label:
        return 1.0
    for c in ("\n", '"', "'", ".", ",", "?", "!", "{", "}"):
        pred = pred.replace(c, " ")
    while "  " in pred:
        pred = pred.replace("  ", " ")
    for prefix in ("answer is:", "answer:", "answer is", "option is"):
        idx = pred.find(prefix)
        if idx == -1:
            continue
        if len(pred) < idx + len(prefix) + 1:
            return 0.0
        rest = pred[idx + len(prefix) + 1:]
        return float(any(rest.startswith(s) for s in label))
    for word in pred.split():
        if word in "ABCD":  # a substring test in the reference: "" never occurs after split, "AB" does match
            return float(word in label)
    return 0.0


def longbook_qa_eng(pred: str, label: list, question: str = "") -> float:
    return max([f1_score(normalize_answer(pred).split(), normalize_answer(gt).split()) for gt in label] + [0.0])


def longbook_qa_chn(pred: str, label: list, question: str = "") -> float:
    return max([f1_score(list(normalize_zh_answer(pred)), list(normalize_zh_answer(gt))) for gt in label] + [0.0])


def math_calc(pred: str, label: list, question: str = "") -> float:
    numbers = [int(item) for item in re.split("[^0-9]", pred) if item != ""]
    count = 0
    for i, expected in enumerate(label):
        if i >= len(numbers) or numbers[i] != expected:
            break
        count += 1
    return count / len(label)


@lru_cache(maxsize=1)
def _rouge_lsum():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeLsum"])


def longbook_sum_eng(pred: str, label: list, question: str = "") -> float:
    """InfiniteBench's rule (kvpress refuses the task): ROUGE-Lsum F, the best over the references."""
    return max(_rouge_lsum().score(str(gt), pred)["rougeLsum"].fmeasure for gt in label)


SCORERS: dict[str, Callable[[str, list, str], float]] = {
    "kv_retrieval": kv_retrieval, "kv_retrieval_prefix": kv_retrieval, "kv_retrieval_both": kv_retrieval,
    "passkey": passkey, "number_string": passkey, "code_run": code_run, "code_debug": code_debug,
    "longdialogue_qa_eng": longdialogue_qa_eng, "longbook_qa_eng": longbook_qa_eng,
    "longbook_choice_eng": longbook_choice_eng, "longbook_qa_chn": longbook_qa_chn, "math_find": math_find,
    "math_calc": math_calc, "longbook_sum_eng": longbook_sum_eng,
}


def score_sample(task: str, prediction: str, references: str | Sequence[str], question: str = "",
                 context: str = "") -> float:
    """One sample's score in [0, 1] under the task's scorer, the label converted as kvpress converts it."""
    if task not in SCORERS:
        raise ValueError(f"unknown InfiniteBench task {task!r}: choose from {', '.join(sorted(SCORERS))}")
    label: list = _as_list(references)
    if task in NUMERIC_TASKS:
        label = [to_number(value) for value in label]
    elif task in CHOICE_TASKS:
        label = choice_label(task, label, question, context)
    return float(SCORERS[task](prediction, label, question))


def sample_fn(prediction: str, references: str | Sequence[str], task: str = "", question: str | None = None,
              **kwargs: object) -> float:
    """The registry's per-sample call: the record's ``task`` and ``question`` pick the scorer and the options."""
    return score_sample(task, prediction, references, question or "")
