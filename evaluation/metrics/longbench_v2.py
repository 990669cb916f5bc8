"""LongBench v2 (Bai et al. 2024, arXiv 2412.15204): four-option multiple choice, scored by the letter answered.

References:
    * THUDM/LongBench ``pred.py`` ``extract_answer``: drop ``*``, then the first match of
      ``The correct answer is \\(([A-D])\\)``, else of ``The correct answer is ([A-D])``; correct iff that letter is the
      answer. The match may sit anywhere in the text (after a chain of thought too).
    * kvpress ``evaluation/benchmarks/longbenchv2/calculate_metrics.py``: drop ``*``, ``strip()``, and the *whole*
      prediction must equal ``The correct answer is (X)`` or ``The correct answer is X``; any other word fails.

Both are reported (``longbench_v2_accuracy``, ``longbench_v2_accuracy_kvpress``); each is a per-sample 0/1 and the
dataset score is the mean in percent.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_PARENTHESISED = re.compile(r"The correct answer is \(([A-D])\)")
_BARE = re.compile(r"The correct answer is ([A-D])")


def _answer(references: str | Sequence[str]) -> str:
    return references if isinstance(references, str) else str(list(references)[0])


def extract_choice(prediction: str) -> str | None:
    """LongBench v2's ``extract_answer``: the letter after "The correct answer is", or None."""
    text = prediction.replace("*", "")
    match = _PARENTHESISED.search(text) or _BARE.search(text)
    return match.group(1) if match else None


def is_correct(prediction: str, references: str | Sequence[str], **kwargs: object) -> float:
    """1.0 when :func:`extract_choice` gives the reference letter (LongBench v2 ``pred.py``)."""
    return float(extract_choice(prediction) == _answer(references).strip())


def is_correct_kvpress(prediction: str, references: str | Sequence[str], **kwargs: object) -> float:
    """kvpress ``score``: the starless, stripped prediction is exactly one of the two answer sentences."""
    text = prediction.replace("*", "").strip()
    answer = _answer(references)
    return float(text in (f"The correct answer is ({answer})", f"The correct answer is {answer}"))
