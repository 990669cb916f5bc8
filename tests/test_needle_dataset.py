"""The needle-in-a-haystack grid generated offline, against kvpress's insert_needle_in_haystack
(NVIDIA/kvpress ``evaluation/benchmarks/needle_in_haystack/utils.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from evaluation.datasets.needle import (
    CONTEXT_WRAPPER,
    DEFAULT_NEEDLE,
    PROMPT_RESERVE,
    NeedleError,
    check_grid,
    generate_needle_grid,
    needle_from_rows,
)

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "evaluation" / "embedded" / "kvtiny"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def haystack_of(record: dict) -> str:
    prefix, suffix = CONTEXT_WRAPPER.split("{context}")
    assert record["context"].startswith(prefix) and record["context"].endswith(suffix)
    return record["context"][len(prefix):-len(suffix)]


def test_one_record_per_cell_with_the_grid_fields(tokenizer):
    records = generate_needle_grid(tokenizer, [300, 500], [0, 50, 100])
    assert [(r["needle_length"], r["needle_depth"]) for r in records] == [
        (300, 0.0), (300, 50.0), (300, 100.0), (500, 0.0), (500, 50.0), (500, 100.0)]
    assert all(isinstance(r["needle_length"], int) and isinstance(r["needle_depth"], float) for r in records)
    assert all(r["answer"] == [DEFAULT_NEEDLE] and DEFAULT_NEEDLE in r["context"] for r in records)
    assert len({r["sample_id"] for r in records}) == 6


def test_haystack_fits_length_minus_needle_minus_prompt_reserve(tokenizer):
    needle_tokens = len(tokenizer.encode(DEFAULT_NEEDLE, add_special_tokens=False))
    for record in generate_needle_grid(tokenizer, [300, 500], [50]):
        tokens = len(tokenizer.encode(haystack_of(record), add_special_tokens=False))
        # kvpress: haystack cut to L - needle - 150 tokens, then the needle's tokens inserted (decode may merge one)
        assert abs(tokens - (record["needle_length"] - PROMPT_RESERVE)) <= 2, (tokens, needle_tokens)


def test_depth_places_the_needle(tokenizer):
    first, middle, last = generate_needle_grid(tokenizer, [400], [0, 50, 100])
    assert haystack_of(first).startswith(DEFAULT_NEEDLE)
    assert haystack_of(last).rstrip().endswith(DEFAULT_NEEDLE)
    position = haystack_of(middle).index(DEFAULT_NEEDLE) / len(haystack_of(middle))
    assert 0.35 < position < 0.65


def test_a_length_shorter_than_the_needle_is_refused(tokenizer):
    needle_tokens = len(tokenizer.encode(DEFAULT_NEEDLE, add_special_tokens=False))
    with pytest.raises(NeedleError, match="shorter than the needle") as error:
        generate_needle_grid(tokenizer, [PROMPT_RESERVE + needle_tokens], [50])
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("lengths, depths, message", [
    ([], [50], "--needle_lengths is empty"),
    ([512], [], "--needle_depths is empty"),
    ([512], [0, 101], "[0, 100], got 101"),
    ([512], [-5], "got -5"),
    ([100], [50], "--needle_lengths 100 is too short"),
])
def test_bad_grids(lengths, depths, message):
    with pytest.raises(NeedleError) as error:
        check_grid(lengths, depths)
    assert message in str(error.value)


def test_essay_rows_give_haystack_needle_and_question(tokenizer):
    rows = [{"context": "Essays are long. " * 30, "needle": "The secret is 42.", "question": "What is the secret?"},
            {"context": "ignored second row"}]
    haystack, needle = needle_from_rows(rows)
    records = generate_needle_grid(tokenizer, [300], [0, 100], haystack, needle)
    assert all("The secret is 42." in r["context"] and "Essays are long." in r["context"] for r in records)
    assert {r["question"] for r in records} == {"What is the secret?"}
    assert records[0]["answer"] == ["The secret is 42."]
