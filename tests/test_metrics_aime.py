"""AIME extraction (kvpress-exact and robust) and the avg@k / pass@k aggregates."""

from __future__ import annotations

import pytest

from evaluation.metrics import aime

# kvpress-exact -------------------------------------------------------------------------------------------------------


def test_kvpress_takes_the_last_box():
    assert aime.extract_boxed_kvpress(r"first \boxed{12}, finally \boxed{34}.") == "34"


def test_kvpress_cuts_nested_braces():
    assert aime.extract_boxed_kvpress(r"\boxed{\frac{1}{2}}") == r"\frac{1"


def test_kvpress_without_box_compares_the_whole_text():
    # No "boxed{": split()[-1] is the whole text, so a bare "70" counts as correct (but not as answered).
    assert aime.is_correct_kvpress("70", "70")
    assert not aime.is_answered_kvpress("70")
    assert not aime.is_correct_kvpress("The answer is 70", "70")


def test_kvpress_is_an_exact_string_comparison():
    assert aime.is_correct_kvpress(r"\boxed{70}", 70)
    assert not aime.is_correct_kvpress(r"\boxed{070}", 70)
    assert not aime.is_correct_kvpress(r"\boxed{ 70 }", "70")
    assert not aime.is_correct_kvpress(r"\boxed{\text{70}}", "70")


# robust extraction ---------------------------------------------------------------------------------------------------


def test_robust_matches_nested_braces():
    assert aime.extract_boxed(r"so \boxed{\frac{1}{2}} holds") == r"\frac{1}{2}"


def test_robust_nested_fraction_is_not_an_integer():
    assert aime.extract_answer(r"\boxed{\frac{1}{2}}") is None
    assert not aime.is_correct(r"\boxed{\frac{1}{2}}", "1")
    assert aime.is_answered(r"\boxed{\frac{1}{2}}")


def test_robust_without_box():
    assert aime.extract_boxed("The answer is 70.") is None
    assert aime.extract_answer("70") is None
    assert not aime.is_correct("70", "70")
    assert not aime.is_answered("70")


def test_robust_takes_the_last_of_several_boxes():
    assert aime.extract_answer(r"maybe \boxed{12}; no: \boxed{34}") == 34


def test_robust_strips_dollars_and_spaces():
    assert aime.extract_answer(r"$\boxed{ 7 0 }$") == 70
    assert aime.extract_answer(r"\boxed{$70$}") == 70


def test_robust_compares_as_integers():
    assert aime.is_correct(r"\boxed{070}", "70")
    assert aime.is_correct(r"\boxed{70}", 70)
    assert aime.is_correct(r"\boxed{70}", " 70\n")


def test_robust_unwraps_text_and_mathrm():
    assert aime.extract_answer(r"\boxed{\text{70}}") == 70
    assert aime.extract_answer(r"\boxed{\mathrm{70}}") == 70
    assert aime.extract_answer(r"\boxed{\textbf{\text{70}}}") == 70


def test_robust_drops_degrees_percent_and_spacing():
    assert aime.extract_answer(r"\boxed{70^\circ}") == 70
    assert aime.extract_answer(r"\boxed{70^{\circ}}") == 70
    assert aime.extract_answer(r"\boxed{70\%}") == 70
    assert aime.extract_answer(r"\boxed{\,70\!}") == 70


def test_robust_thousands_commas():
    assert aime.normalize_integer("1,000") == 1000
    assert aime.normalize_integer("12,345,678") == 12345678
    assert aime.normalize_integer("1,2") is None  # a list, not a number
    assert not aime.is_correct(r"\boxed{1,000}", "1000")  # out of the 0..999 range


def test_robust_trailing_dot_and_zero_decimals():
    assert aime.extract_answer(r"\boxed{70.}") == 70
    assert aime.extract_answer(r"\boxed{70.00}") == 70
    assert aime.extract_answer(r"\boxed{70.5}") is None


def test_robust_signs_and_range():
    assert aime.is_correct(r"\boxed{+70}", "70")
    assert aime.extract_answer(r"\boxed{-5}") == -5
    assert not aime.is_correct(r"\boxed{-5}", "-5")  # AIME answers are 0..999


def test_robust_prefers_text_after_think():
    text = r"<think>try \boxed{12}</think> The answer is \boxed{34}."
    assert aime.extract_answer(text) == 34
    assert aime.extract_boxed_kvpress(text) == "34"


def test_robust_uses_the_last_think_block():
    text = r"<think>\boxed{1}</think> \boxed{2} <think>\boxed{3}</think> final \boxed{4}"
    assert aime.extract_answer(text) == 4


def test_robust_falls_back_to_the_thinking_when_no_box_follows():
    assert aime.extract_answer(r"<think>so \boxed{12}</think> The answer is twelve.") == 12


def test_robust_box_after_think_wins_over_a_later_box_inside():
    # The box after </think> is preferred even though the trace is longer.
    assert aime.extract_answer(r"<think>\boxed{5} \boxed{6}</think>\boxed{7}") == 7


def test_robust_boxed_without_braces():
    assert aime.extract_answer(r"\boxed 70") == 70
    assert aime.extract_answer(r"$\boxed 70$.") == 70
    assert aime.extract_answer(r"\boxed 70.") == 70


def test_robust_fbox():
    assert aime.extract_answer(r"\fbox{70}") == 70


def test_robust_unclosed_box_is_unanswered():
    assert aime.extract_boxed(r"\boxed{7") is None
    assert not aime.is_answered(r"\boxed{7")


def test_robust_escaped_braces_do_not_close_the_box():
    assert aime.extract_boxed(r"\boxed{\{1,2\}}") == r"\{1,2\}"


def test_robust_ignores_longer_command_names():
    assert aime.extract_boxed(r"\boxedtext{5}") is None


def test_several_accepted_answers():
    assert aime.is_correct(r"\boxed{70}", ["69", "70"])
    assert aime.is_correct_kvpress(r"\boxed{70}", ["69", "70"])


def test_non_integer_reference_is_an_error():
    with pytest.raises(ValueError, match="integers"):
        aime.is_correct(r"\boxed{1}", "one")


# aggregates ----------------------------------------------------------------------------------------------------------


def test_avg_and_pass_at_k_with_equal_samples_per_problem():
    scores = [1.0, 0.0, 0.0, 0.0]
    problems = ["p1", "p1", "p2", "p2"]
    assert aime.avg_at_k(scores, problems) == 0.25  # (1/2 + 0/2) / 2
    assert aime.pass_at_k(scores, problems) == 0.5  # p1 solved once, p2 never
    assert aime.mean_score(scores) == 0.25


def test_avg_at_k_weights_problems_equally():
    scores = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    problems = ["a", "a", "a", "b", "b", "b", "c"]
    assert aime.avg_at_k(scores, problems) == pytest.approx((1 / 3 + 0 + 1) / 3)
    assert aime.pass_at_k(scores, problems) == pytest.approx(2 / 3)
    assert aime.mean_score(scores) == pytest.approx(2 / 7)


def test_without_problem_ids_each_sample_is_a_problem():
    assert aime.avg_at_k([1.0, 0.0]) == 0.5
    assert aime.pass_at_k([1.0, 0.0]) == 0.5


def test_problem_ids_must_match_scores():
    with pytest.raises(ValueError):
        aime.avg_at_k([1.0], ["a", "b"])


def test_score_aime_report():
    predictions = [r"\boxed{70}", r"\boxed{070}", r"\boxed{5}", "no idea"]
    answers = ["70", "70", "6", "6"]
    report = aime.score_aime(predictions, answers, problem_ids=[1, 1, 2, 2])
    assert report == {
        "n_samples": 4,
        "n_problems": 2,
        "accuracy": 0.5,  # 70 and 070
        "accuracy_kvpress": 0.25,  # only "70"
        "answered": 0.75,
        "answered_kvpress": 0.75,
        "avg@k": 0.5,  # (2/2 + 0/2) / 2
        "pass@k": 0.5,
    }
