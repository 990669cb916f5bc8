"""Needle in a haystack, generated offline for the evaluated model's tokenizer over a length x depth grid.

Follows kvpress ``evaluation/benchmarks/needle_in_haystack/utils.py::insert_needle_in_haystack``: the haystack's
first row gives the text (and, when it has them, the needle, question and answer prefix); for a context length
``L`` the haystack is cut to ``L - len(needle tokens) - 150`` tokens (150 reserved for the prompt), the needle's
tokens are inserted at token ``int(len(haystack) * depth / 100)``, the result decoded (special tokens skipped) and
wrapped as ``This is a very long story book: <book> {context} </book>.``. One record per (length, depth) cell.

Departures from kvpress, both deliberate: a grid of lengths in one dataset (kvpress runs one
``max_context_length`` per run), and a haystack shorter than the budget is repeated until it fills it (kvpress
leaves the context short), so every cell really has its nominal length.

Haystacks: the built-in one (RULER's noise sentences, offline), a local essay file (``.txt``, or ``.jsonl`` /
``.parquet`` with a ``context`` column, e.g. a copy of ``alessiodevoto/paul_graham_essays``), or a hub dataset.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from evaluation.datasets.ruler_synthetic import NOISE, TokenizerLike

# The needle of gkamradt/LLMTest_NeedleInAHaystack, the test kvpress's benchmark follows.
DEFAULT_NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
DEFAULT_QUESTION = "What is the best thing to do in San Francisco?"
DEFAULT_ANSWER_PREFIX = "Answer: "
DEFAULT_MAX_NEW_TOKENS = 48
PROMPT_RESERVE = 150  # kvpress: tokens kept free for the chat template and the question
CONTEXT_WRAPPER = "This is a very long story book: <book> {context} </book>."
BUILTIN_HAYSTACK = " ".join([NOISE] * 8)


@dataclass(frozen=True)
class Needle:
    """The fact hidden in the haystack and how it is asked for."""

    text: str = DEFAULT_NEEDLE
    question: str = DEFAULT_QUESTION
    answer_prefix: str = DEFAULT_ANSWER_PREFIX
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS


class NeedleError(ValueError):
    """A grid the haystack or the needle cannot fill; the message is one line."""


def needle_from_rows(rows: Sequence[Mapping[str, Any]]) -> tuple[str, Needle]:
    """(haystack text, needle) of a haystack table, as kvpress reads its first row; missing fields take defaults."""
    if not rows:
        raise NeedleError("the needle haystack has no rows")
    first = rows[0]
    haystack = str(first.get("context") or "")
    if not haystack.strip():
        raise NeedleError("the needle haystack's first row has an empty 'context'")

    def field(name: str, default: Any) -> Any:
        value = first.get(name)
        return default if value is None or (isinstance(value, float) and value != value) or value == "" else value

    return haystack, Needle(str(field("needle", DEFAULT_NEEDLE)), str(field("question", DEFAULT_QUESTION)),
                            str(field("answer_prefix", DEFAULT_ANSWER_PREFIX)),
                            int(field("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)))


def check_grid(lengths: Sequence[int], depths: Sequence[float]) -> None:
    """The grid's rules that need no tokenizer: non-empty, depths in [0, 100], lengths above the prompt reserve."""
    if not lengths:
        raise NeedleError("--needle_lengths is empty: give context lengths in tokens (e.g. --needle_lengths 512,1024)")
    if not depths:
        raise NeedleError("--needle_depths is empty: give depths in percent (e.g. --needle_depths 0,50,100)")
    for depth in depths:
        if not 0 <= depth <= 100:
            raise NeedleError(f"--needle_depths must be percentages in [0, 100], got {depth:g}")
    for length in lengths:
        if length <= PROMPT_RESERVE:
            raise NeedleError(f"--needle_lengths {length} is too short: a length must exceed the needle plus the "
                              f"{PROMPT_RESERVE} tokens kept for the prompt")


def generate_needle_grid(tokenizer: TokenizerLike, lengths: Sequence[int], depths: Sequence[float],
                         haystack: str = BUILTIN_HAYSTACK, needle: Needle = Needle()) -> list[dict]:
    """One record per (length, depth): the needle inside ``haystack`` cut to fit ``length`` tokens.

    Records are in the common layout plus ``needle`` (the text), ``needle_length`` (int, tokens) and
    ``needle_depth`` (float, percent); ``answer`` is ``[needle]``.
    """
    check_grid(lengths, depths)
    needle_ids = list(tokenizer.encode(needle.text, add_special_tokens=False))
    haystack_ids = list(tokenizer.encode(haystack, add_special_tokens=False))
    if not needle_ids or not haystack_ids:
        raise NeedleError("the needle and the haystack must not be empty")
    records = []
    for length in lengths:
        budget = length - len(needle_ids) - PROMPT_RESERVE
        if budget <= 0:
            raise NeedleError(f"--needle_lengths {length} is shorter than the needle ({len(needle_ids)} tokens) plus "
                              f"the {PROMPT_RESERVE} tokens kept for the prompt: use at least "
                              f"{len(needle_ids) + PROMPT_RESERVE + 1}")
        repeats = -(-budget // len(haystack_ids))
        context_ids = (haystack_ids * repeats)[:budget]
        for depth in depths:
            index = int(len(context_ids) * depth / 100)
            ids = context_ids[:index] + needle_ids + context_ids[index:]
            text = tokenizer.decode(ids, skip_special_tokens=True)  # type: ignore[attr-defined]
            records.append({
                "sample_id": f"needle-{length}-{float(depth):g}", "context": CONTEXT_WRAPPER.format(context=text),
                "question": needle.question, "answer_prefix": needle.answer_prefix, "answer": [needle.text],
                "needle": needle.text, "task": "needle_in_haystack", "max_new_tokens": needle.max_new_tokens,
                "needle_length": int(length), "needle_depth": float(depth),
            })
    return records
