"""AIME answer extraction and scoring: kvpress's exact rule and a robust one, plus avg@k and pass@k.

References:
    * kvpress ``evaluation/benchmarks/aime25/calculate_metrics.py`` (and ``kvzap/evaluate_aime.py``):
      ``pred = text.split("boxed{")[-1].split("}")[0]``, correct iff ``pred == str(answer)``, answered iff
      ``"boxed{" in text``, ``accuracy = correct / total``. :func:`extract_boxed_kvpress` reproduces it, the rule
      ``reference.md`` §3 pins. kvpress has changed it over time: an earlier ``calculate_metrics.py`` read the
      *first* ``boxed{`` after the last ``</think>``, and a later ``benchmarks/utils.py::extract_boxed(last=True)``
      matches braces and returns None without a box; rerun with the same rule before comparing to old numbers.
    * ``reference.md`` §3 "robust extraction": the text after the last ``</think>`` first, the last ``\\boxed`` /
      ``\\fbox`` read with brace matching (or ``\\boxed 70``), LaTeX wrappers stripped, integers 0-999 only.

The kvpress rule fails on nested braces (``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1``), on ``\\boxed{070}``,
``\\boxed{ 70 }``, ``\\text{70}``, ``70^\\circ`` and ``1,000``, and with no ``boxed{`` compares the text up to its
first ``}``; the robust rule handles those. Every per-sample function takes ``(prediction, answer)`` where
``answer`` is the reference (str or int, or a list of accepted ones); the aggregates take the per-sample scores and
optional problem ids, so several samples of one problem give avg@k and pass@k.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterable, Sequence
from typing import TypedDict

AnswerLike = str | int | Sequence[str | int]

# \boxed or \fbox as a whole command name (not \boxedfoo).
_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# Text-style wrappers whose argument is the answer itself; applied innermost first until nothing changes.
_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}")
# Spacing commands, percent signs and math delimiters that never change an integer answer.
_NOISE = ("\\!", "\\,", "\\;", "\\%", "%", "$")
_DEGREES = ("^{\\circ}", "^\\circ")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.0+)?")
_INTEGER = re.compile(r"([+-]?\d+)(?:\.0+)?")
AIME_MIN, AIME_MAX = 0, 999

AimeReport = TypedDict("AimeReport", {
    "n_samples": int,  # predictions scored
    "n_problems": int,  # distinct problem ids (each sample is its own problem when none are given)
    "accuracy": float,  # robust rule, fraction of samples correct
    "accuracy_kvpress": float,  # kvpress rule, fraction of samples correct
    "answered": float,  # fraction of samples with a readable \boxed / \fbox
    "answered_kvpress": float,  # fraction of samples containing "boxed{"
    "avg@k": float,  # robust rule, mean over problems of the fraction of its samples correct
    "pass@k": float,  # robust rule, fraction of problems with at least one correct sample
})


def extract_boxed_kvpress(text: str) -> str:
    """kvpress: ``text.split("boxed{")[-1].split("}")[0]`` (last ``boxed{``, cut at the first ``}``).

    Never fails: without ``boxed{`` it returns the text up to its first ``}`` (often the whole text).
    """
    return text.split("boxed{")[-1].split("}")[0]


def _as_answers(answer: AnswerLike) -> list[str | int]:
    # One reference (str, int, numpy integer) or several accepted ones (list, tuple, numpy array).
    return list(answer) if isinstance(answer, Iterable) and not isinstance(answer, str) else [answer]


def is_correct_kvpress(prediction: str, answer: AnswerLike, **kwargs: object) -> bool:
    """kvpress ``score_aime``: the extracted string equals ``str(answer)`` exactly (``"070" != "70"``)."""
    extracted = extract_boxed_kvpress(prediction)
    return any(extracted == str(a) for a in _as_answers(answer))


def is_answered_kvpress(prediction: str, *args: object, **kwargs: object) -> bool:
    """kvpress ``calculate_metrics``: ``"boxed{" in prediction``."""
    return "boxed{" in prediction


def _box_argument(text: str, start: int) -> str | None:
    """The argument of a box command whose name ends at ``start``: braces matched, or the next bare token."""
    i = start
    while i < len(text) and text[i] in " \t":
        i += 1
    if i < len(text) and text[i] == "{":
        depth, j = 0, i
        while j < len(text):
            if text[j] == "\\":  # an escaped brace (\{ or \}) does not open or close the argument
                j += 2
                continue
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1 : j]
            j += 1
        return None  # unclosed: the output was cut before the box ended
    if i > start:  # "\boxed 70": TeX takes the next token; models mean the next word
        word = re.match(r"[^\s$]+", text[i:])
        return word.group(0) if word else None
    return None


def _last_box(text: str) -> str | None:
    matches = list(_BOX_COMMAND.finditer(text))
    return _box_argument(text, matches[-1].end()) if matches else None


def extract_boxed(text: str) -> str | None:
    """Robust extraction: the argument of the last ``\\boxed`` / ``\\fbox``, or None.

    The text after the last ``</think>`` is searched first (a thinking trace may box intermediate values), then
    the whole text. Braces are matched, so ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``; ``\\boxed 70`` gives
    ``70``; an unclosed last box (truncated output) gives None.
    """
    if "</think>" in text:
        found = _last_box(text.rsplit("</think>", 1)[1])
        if found is not None:
            return found
    return _last_box(text)


def normalize_integer(content: str) -> int | None:
    """The integer written in a box's content, or None if it is not one.

    Unwraps ``\\text{}`` / ``\\textbf{}`` / ``\\mathrm{}`` / ``\\mathbf{}``, drops ``\\!``, ``\\,``, ``\\;``,
    ``\\%``, ``%``, ``$``, whitespace, ``^\\circ`` and ``^{\\circ}``, thousands commas (``1,000``; ``1,2`` stays a
    list) and trailing dots, then accepts ``^[+-]?\\d+(\\.0+)?$``.
    """
    s, previous = content, None
    while s != previous:
        previous, s = s, _WRAPPER.sub(r"\1", s)
    for noise in _NOISE:
        s = s.replace(noise, "")
    s = "".join(s.split())
    for degrees in _DEGREES:
        s = s.replace(degrees, "")
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    s = s.rstrip(".")
    match = _INTEGER.fullmatch(s)
    return int(match.group(1)) if match else None


def extract_answer(text: str) -> int | None:
    """:func:`extract_boxed` then :func:`normalize_integer`: the integer answer of a generation, or None."""
    content = extract_boxed(text)
    return None if content is None else normalize_integer(content)


def _reference_int(answer: str | int) -> int:
    try:
        return int(str(answer).strip())
    except ValueError:
        raise ValueError(f"AIME reference answers are integers, got {answer!r}") from None


def is_correct(prediction: str, answer: AnswerLike, **kwargs: object) -> bool:
    """Robust rule: the extracted integer is in 0..999 and equals ``int(answer)`` (``\\boxed{070}`` matches 70)."""
    value = extract_answer(prediction)
    if value is None or not AIME_MIN <= value <= AIME_MAX:
        return False
    return any(value == _reference_int(a) for a in _as_answers(answer))


def is_answered(prediction: str, *args: object, **kwargs: object) -> bool:
    """Robust rule: a readable ``\\boxed`` / ``\\fbox`` exists (its content need not be an integer)."""
    return extract_boxed(prediction) is not None


def _groups(n: int, problem_ids: Sequence[Hashable] | None) -> dict[Hashable, list[int]]:
    # Sample indices per problem, in first-appearance order; without ids each sample is its own problem.
    if problem_ids is None:
        return {i: [i] for i in range(n)}
    if len(problem_ids) != n:
        raise ValueError(f"got {n} scores and {len(problem_ids)} problem ids")
    groups: dict[Hashable, list[int]] = {}
    for i, problem_id in enumerate(problem_ids):
        groups.setdefault(problem_id, []).append(i)
    return groups


def mean_score(scores: Sequence[float], problem_ids: Sequence[Hashable] | None = None) -> float:
    """Mean over samples (kvpress's ``correct / total``); problem ids are ignored."""
    if not scores:
        raise ValueError("no AIME samples to score")
    return sum(scores) / len(scores)


def avg_at_k(scores: Sequence[float], problem_ids: Sequence[Hashable] | None = None) -> float:
    """avg@k: mean over problems of the mean score of that problem's samples (equals :func:`mean_score` when
    every problem has the same number of samples)."""
    if not scores:
        raise ValueError("no AIME samples to score")
    groups = _groups(len(scores), problem_ids).values()
    return sum(sum(scores[i] for i in idx) / len(idx) for idx in groups) / len(groups)


def pass_at_k(scores: Sequence[float], problem_ids: Sequence[Hashable] | None = None) -> float:
    """pass@k: fraction of problems with at least one correct sample (the empirical rate over the k samples
    drawn, not the unbiased estimator of Chen et al. 2021 for k smaller than the samples drawn)."""
    if not scores:
        raise ValueError("no AIME samples to score")
    groups = _groups(len(scores), problem_ids).values()
    return sum(1.0 if any(scores[i] > 0 for i in idx) else 0.0 for idx in groups) / len(groups)


def score_aime(predictions: Sequence[str], answers: Sequence[AnswerLike],
               problem_ids: Sequence[Hashable] | None = None) -> AimeReport:
    """Every AIME number for a run, as fractions in [0, 1] (see :data:`AimeReport` for the keys)."""
    if len(predictions) != len(answers):
        raise ValueError(f"got {len(predictions)} predictions and {len(answers)} answers")
    pairs = list(zip(predictions, answers, strict=True))
    robust = [float(is_correct(p, a)) for p, a in pairs]
    return {
        "n_samples": len(predictions),
        "n_problems": len(_groups(len(predictions), problem_ids)),
        "accuracy": mean_score(robust),
        "accuracy_kvpress": mean_score([float(is_correct_kvpress(p, a)) for p, a in pairs]),
        "answered": mean_score([float(is_answered(p)) for p in predictions]),
        "answered_kvpress": mean_score([float(is_answered_kvpress(p)) for p in predictions]),
        "avg@k": avg_at_k(robust, problem_ids),
        "pass@k": pass_at_k(robust, problem_ids),
    }
