"""MATH-500 (Lightman et al. 2023, the MATH test subset): the boxed final answer against the reference string.

References:
    * kvpress ``evaluation/benchmarks/math500/calculate_metrics.py``: ``pred.split("boxed{")[1].split("}")[0]`` (the
      *first* ``boxed{``, cut at the first ``}``; None without a box), correct iff it equals ``str(answer)``;
      answered iff ``"boxed{"`` is in the prediction; ``accuracy = correct / total``.
    * kvpress ``evaluation/benchmarks/utils.py`` ``extract_boxed``: the brace-matched box content, the rule a robust
      scorer needs (``\\boxed{\\frac{1}{2}}`` is ``\\frac{1`` for the split rule).

The robust rule here reads the *last* ``\\boxed`` / ``\\fbox`` with braces matched (after the last ``</think>`` first,
as for AIME) and compares both sides after :func:`normalize_math`; kvpress's rule is reported beside it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from evaluation.metrics.aime import extract_boxed

_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\{([^{}]*)\}")
_REMOVED = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "$", "\\displaystyle")
_DEGREES = ("^{\\circ}", "^\\circ")


def _references(references: str | Sequence[str]) -> list[str]:
    return [references] if isinstance(references, str) else [str(r) for r in references]


def extract_boxed_kvpress(prediction: str) -> str | None:
    """kvpress: the text between the first ``boxed{`` and the next ``}``; None when there is no ``boxed{``."""
    parts = prediction.split("boxed{")
    return parts[1].split("}")[0] if len(parts) > 1 else None


def normalize_math(answer: str) -> str:
    """A canonical spelling of a MATH answer: no spaces, ``$``, ``\\left``/``\\right``, spacing commands, text
    wrappers or degree marks; ``dfrac``/``tfrac`` as ``frac``; no trailing ``.``; ``0.5`` and ``.5`` kept apart."""
    text = answer.strip()
    previous = None
    while previous != text:
        previous, text = text, _WRAPPERS.sub(r"\1", text)
    for piece in _REMOVED + _DEGREES:
        text = text.replace(piece, "")
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = "".join(text.split()).rstrip(".")
    return text


def is_correct(prediction: str, references: str | Sequence[str], **kwargs: object) -> float:
    """1.0 when the last box's content equals a reference after :func:`normalize_math`."""
    boxed = extract_boxed(prediction)
    if boxed is None:
        return 0.0
    return float(any(normalize_math(boxed) == normalize_math(ref) for ref in _references(references)))


def is_correct_kvpress(prediction: str, references: str | Sequence[str], **kwargs: object) -> float:
    """kvpress ``score_aime`` of math500: the first-box split rule equals ``str(answer)`` exactly."""
    extracted = extract_boxed_kvpress(prediction)
    return float(extracted is not None and any(extracted == ref for ref in _references(references)))


def is_answered(prediction: str, *args: object, **kwargs: object) -> float:
    """1.0 when a box is readable by the robust rule."""
    return float(extract_boxed(prediction) is not None)


def is_answered_kvpress(prediction: str, *args: object, **kwargs: object) -> float:
    """kvpress: ``"boxed{" in prediction``."""
    return float("boxed{" in prediction)
