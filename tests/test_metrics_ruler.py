"""RULER string-match metrics, with expected values worked out by hand from RULER's formulas."""

from __future__ import annotations

import pytest

from evaluation.metrics.ruler import (
    postprocess_prediction,
    ruler_task_score,
    score_ruler,
    string_match_all,
    string_match_part,
    task_metric_name,
)


def test_match_all_counts_the_share_of_references_found():
    prediction = "The numbers are 1234567 and 7654321."
    assert string_match_all(prediction, ["1234567", "7654321", "1111111"]) == 2 / 3


def test_match_all_every_reference_found():
    assert string_match_all("apple, banana, cherry", ["banana", "apple", "cherry"]) == 1.0


def test_match_all_ignores_case_on_both_sides():
    assert string_match_all("the key is ABC-def", ["abc-DEF"]) == 1.0


def test_match_all_is_a_substring_test():
    # "123" is inside "1234567": RULER counts it, a token match would not.
    assert string_match_all("1234567", ["123"]) == 1.0
    assert string_match_all("123", ["1234567"]) == 0.0


def test_match_all_bare_string_is_one_reference():
    assert string_match_all("answer: 42", "42") == 1.0
    assert string_match_all("answer: 4", "42") == 0.0


def test_match_all_empty_prediction_scores_zero():
    assert string_match_all("", ["a", "b"]) == 0.0


def test_match_part_is_one_when_any_reference_is_found():
    assert string_match_part("It was Paris.", ["London", "paris"]) == 1.0


def test_match_part_is_zero_when_none_is_found():
    assert string_match_part("It was Rome.", ["London", "Paris"]) == 0.0


def test_match_part_gives_no_partial_credit():
    assert string_match_part("Paris and London", ["Paris", "London", "Rome"]) == 1.0
    assert string_match_all("Paris and London", ["Paris", "London", "Rome"]) == 2 / 3


def test_postprocess_ruler_turns_control_characters_into_newlines():
    # strip() keeps "\x00" (not whitespace); it then becomes "\n" and the final strip() removes it.
    assert postprocess_prediction("\x00 12\n34 \t") == "12\n34"
    assert postprocess_prediction("12\t34") == "12\n34"


def test_postprocess_kvpress_deletes_control_characters():
    assert postprocess_prediction("\x00 12\n34 \t", style="kvpress") == "1234"
    assert postprocess_prediction("12\t34", style="kvpress") == "1234"


def test_postprocess_styles_can_change_a_match():
    ruler_text = postprocess_prediction("12\n34", style="ruler")
    kvpress_text = postprocess_prediction("12\n34", style="kvpress")
    assert string_match_all(ruler_text, ["1234"]) == 0.0
    assert string_match_all(kvpress_text, ["1234"]) == 1.0


def test_postprocess_rejects_an_unknown_style():
    with pytest.raises(ValueError, match="ruler, kvpress"):
        postprocess_prediction("x", style="delete")


@pytest.mark.parametrize("task", ["qa_1", "qa_2"])
def test_qa_tasks_use_match_part(task):
    assert task_metric_name(task) == "string_match_part"


@pytest.mark.parametrize("task", ["niah_single_1", "niah_multikey_3", "niah_multivalue", "niah_multiquery",
                                  "vt", "cwe", "fwe"])
def test_other_tasks_use_match_all(task):
    assert task_metric_name(task) == "string_match_all"


def test_task_score_is_percent_rounded_to_two_decimals():
    assert ruler_task_score([1.0, 1.0, 0.0]) == 66.67  # 2/3 * 100 = 66.666...
    assert ruler_task_score([1 / 3, 1.0]) == 66.67
    assert ruler_task_score([0.5, 0.25]) == 37.5


def test_task_score_needs_samples():
    with pytest.raises(ValueError):
        ruler_task_score([])


def test_score_ruler_averages_the_task_scores():
    predictions = ["1234567", "1234567 9999999", "nothing", "Paris", "Rome"]
    references = [["1234567"], ["1234567", "9999999"], ["7777777"], ["London", "Paris"], ["Paris"]]
    tasks = ["niah_single_1"] * 3 + ["qa_1"] * 2
    scores = score_ruler(predictions, references, tasks)
    assert scores["per_task"] == {"niah_single_1": 66.67, "qa_1": 50.0}
    assert scores["overall"] == pytest.approx((66.67 + 50.0) / 2)


def test_score_ruler_uses_all_for_multivalue_and_part_for_qa():
    predictions = ["11 22", "11 22"]
    references = [["11", "22", "33", "44"], ["11", "22", "33", "44"]]
    scores = score_ruler(predictions, references, ["niah_multivalue", "qa_2"])
    assert scores["per_task"] == {"niah_multivalue": 50.0, "qa_2": 100.0}
    assert scores["overall"] == 75.0


def test_score_ruler_style_is_applied():
    assert score_ruler(["12\n34"], [["1234"]], ["vt"])["per_task"] == {"vt": 0.0}
    assert score_ruler(["12\n34"], [["1234"]], ["vt"], style="kvpress")["per_task"] == {"vt": 100.0}


def test_score_ruler_reports_tasks_sorted():
    scores = score_ruler(["a", "a"], [["a"], ["a"]], ["vt", "cwe"])
    assert list(scores["per_task"]) == ["cwe", "vt"]


def test_score_ruler_checks_lengths():
    with pytest.raises(ValueError):
        score_ruler(["a"], [["a"], ["b"]], ["vt"])
