"""Golden cases for the metrics of longbench-v2, math500, needle_in_haystack, loogle, infinitebench and zero_scrolls.

Each expected value was worked out by hand from the reference code named in the test's section header (read with
the code-search tool), not by running this package:
    * NVIDIA/kvpress ``evaluation/benchmarks/<name>/calculate_metrics.py`` for kvpress's rules;
    * THUDM/LongBench ``pred.py`` (``extract_answer``) for LongBench v2's own rule;
    * OpenBMB/InfiniteBench ``src/compute_scores.py`` (as adapted by kvpress) for InfiniteBench.
"""

from __future__ import annotations

import pytest

from evaluation.metrics import get_metric, loogle, math500, needle, score_dataset, zero_scrolls
from evaluation.metrics import infinitebench as ib
from evaluation.metrics import longbench_v2 as lb2

NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."


# LongBench v2 -- THUDM/LongBench pred.py extract_answer; NVIDIA/kvpress benchmarks/longbenchv2/calculate_metrics.py

@pytest.mark.parametrize("prediction, own, kvpress", [
    ("The correct answer is (A)", 1.0, 1.0),
    ("**The correct answer is (A)**", 1.0, 1.0),  # both drop '*'
    ("  The correct answer is A  ", 1.0, 1.0),  # kvpress strips; LB's second pattern
    ("The correct answer is A.", 1.0, 0.0),  # kvpress needs the whole text to be the sentence
    ("Reasoning first. The correct answer is (A)", 1.0, 0.0),
    ("The correct answer is (B) and not (A)", 0.0, 0.0),  # LB takes the first match: B
    ("the correct answer is (a)", 0.0, 0.0),  # both are case-sensitive
    ("The correct answer is (E)", 0.0, 0.0),  # only A-D
    ("", 0.0, 0.0),
])
def test_longbench_v2_letter_extraction(prediction, own, kvpress):
    assert lb2.is_correct(prediction, ["A"]) == own
    assert lb2.is_correct_kvpress(prediction, ["A"]) == kvpress


def test_longbench_v2_dataset_reports_both_and_style_picks_the_headline():
    records = [{"task": "single", "prediction": p, "answer": ["A"]}
               for p in ("The correct answer is (A)", "I think The correct answer is A")]
    own = score_dataset("longbench-v2", records)
    assert own["per_task"]["single"] == {"longbench_v2_accuracy": 100.0, "longbench_v2_accuracy_kvpress": 50.0}
    assert own["overall"] == 100.0
    assert score_dataset("longbench-v2", records, style="kvpress")["overall"] == 50.0


# MATH-500 -- NVIDIA/kvpress benchmarks/math500/calculate_metrics.py (first "boxed{", cut at the first "}")

@pytest.mark.parametrize("prediction, answer, robust, kvpress", [
    ("so \\boxed{5}", "5", 1.0, 1.0),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0, 0.0),  # kvpress reads "\frac{1"
    ("first \\boxed{3}, finally \\boxed{5}", "5", 1.0, 0.0),  # kvpress reads the first box, robust the last
    ("first \\boxed{5}, finally \\boxed{3}", "5", 0.0, 1.0),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", 1.0, 0.0),
    ("\\boxed{ 5 }", "5", 1.0, 0.0),  # kvpress compares " 5 " with "5"
    ("\\boxed{\\text{(C)}}", "(C)", 1.0, 0.0),
    ("\\boxed{90^\\circ}", "90", 1.0, 0.0),
    ("the answer is 5", "5", 0.0, 0.0),  # no box: kvpress's split gives None
    ("", "5", 0.0, 0.0),
])
def test_math500_boxed_answers(prediction, answer, robust, kvpress):
    assert math500.is_correct(prediction, [answer]) == robust
    assert math500.is_correct_kvpress(prediction, [answer]) == kvpress


def test_math500_several_references():
    assert math500.is_correct("\\boxed{0.5}", ["\\frac{1}{2}", "0.5"]) == 1.0
    assert math500.is_correct_kvpress("\\boxed{0.5}", ["\\frac{1}{2}", "0.5"]) == 1.0
    assert math500.is_correct("\\boxed{.5}", ["0.5"]) == 0.0  # no numeric equivalence: strings after normalising


def test_math500_answered_and_headline():
    records = [{"task": "algebra", "prediction": p, "answer": ["\\frac{1}{2}"]}
               for p in ("\\boxed{\\frac{1}{2}}", "no box", "\\boxed{\\frac{1}{2}")]  # the last box is unclosed
    scores = score_dataset("math500", records)["per_task"]["algebra"]
    assert scores["math500_accuracy"] == 33.33 and scores["math500_accuracy_kvpress"] == 0.0
    assert scores["math500_answered"] == 33.33 and scores["math500_answered_kvpress"] == 66.67
    assert score_dataset("math500", records, style="kvpress")["metric"] == {"algebra": "math500_accuracy_kvpress"}


# Needle in a haystack -- NVIDIA/kvpress benchmarks/needle_in_haystack/calculate_metrics.py:
# RougeScorer(["rouge1", "rougeL"], use_stemmer=True).score(needle, prediction)["rouge1"].fmeasure * 10

def test_needle_rouge1_of_a_partial_answer():
    # Needle: 21 tokens; prediction: 6 tokens, all in the needle. P = 1, R = 6/21, F = 12/27.
    assert needle.rouge1_f("Eat a sandwich in Dolores Park.", [NEEDLE]) == pytest.approx(12 / 27)
    assert needle.rouge1_kvpress("Eat a sandwich in Dolores Park.", [NEEDLE]) == pytest.approx(120 / 27)


def test_needle_rouge1_stems_and_ignores_case_and_punctuation():
    # "Sandwiches!" stems to "sandwich": P = 1, R = 1/21, F = 2/22.
    assert needle.rouge1_f("Sandwiches!", [NEEDLE]) == pytest.approx(2 / 22)
    assert needle.rouge1_f(NEEDLE.upper(), [NEEDLE]) == 1.0


def test_needle_empty_prediction_scores_zero():
    assert needle.rouge1_f("", [NEEDLE]) == 0.0 and needle.exact_retrieval("", [NEEDLE]) == 0.0


def test_needle_exact_retrieval_needs_the_whole_needle():
    assert needle.exact_retrieval(f"Sure.  {NEEDLE.lower()}\nDone", [NEEDLE]) == 1.0
    assert needle.exact_retrieval(NEEDLE.rstrip("."), [NEEDLE]) == 1.0  # the final full stop is optional
    assert needle.exact_retrieval("eat a sandwich and sit in Dolores Park", [NEEDLE]) == 0.0


def test_needle_metrics_json_has_the_length_depth_grid():
    half = "eat a sandwich"  # P = 1, R = 3/21, F = 0.25
    records = [{"task": "needle_in_haystack", "prediction": p, "answer": [NEEDLE], "needle_length": length,
                "needle_depth": depth}
               for p, length, depth in ((NEEDLE, 1024, 0.0), (half, 1024, 50.0), (NEEDLE, 512, 50.0), ("", 512, 50.0))]
    result = score_dataset("needle_in_haystack", records)
    assert result["by_length_depth"] == [
        {"length": 512, "depth": 50.0, "score": 50.0, "exact": 50.0, "n": 2},
        {"length": 1024, "depth": 0.0, "score": 100.0, "exact": 100.0, "n": 1},
        {"length": 1024, "depth": 50.0, "score": 25.0, "exact": 0.0, "n": 1},
    ]
    assert result["per_task"]["needle_in_haystack"] == {"needle_rouge1": 56.25, "needle_exact": 50.0,
                                                        "needle_rouge1_kvpress": pytest.approx(5.625)}
    assert result["overall"] == 56.25


def test_needle_records_without_the_grid_fields_are_refused():
    with pytest.raises(ValueError, match="needle_length"):
        score_dataset("needle_in_haystack", [{"task": "needle_in_haystack", "prediction": "x", "answer": [NEEDLE]}])


# LooGLE -- NVIDIA/kvpress benchmarks/loogle/calculate_metrics.py (from bigai-nlco/LooGLE automatic_metrics.py)

def test_loogle_bleu_and_rouge_recall():
    # BLEU-1: unigram precision 3/3, brevity penalty exp(1 - 6/3). BLEU-4: no 4-gram, which nltk turns into the
    # smallest float rather than 0 (kvpress's number is that too).
    assert loogle.bleu("the cat sat", ["the cat sat on the mat"], 1) == pytest.approx(0.36787944, abs=1e-6)
    assert loogle.bleu("the cat sat", ["the cat sat on the mat"], 4) == pytest.approx(0.0, abs=1e-300)
    # rouge 1.0.1 ROUGE-N recall over distinct n-grams: unigrams 3/5, bigrams 2/5; ROUGE-L recall 3/5.
    assert loogle.rouge_recall("the cat sat", ["the cat sat on the mat"], "rouge-1") == pytest.approx(0.6)
    assert loogle.rouge_recall("the cat sat", ["the cat sat on the mat"], "rouge-2") == pytest.approx(0.4)
    assert loogle.rouge_recall("the cat sat", ["the cat sat on the mat"], "rouge-l") == pytest.approx(0.6)


def test_loogle_empty_prediction_scores_zero_everywhere():
    for name in loogle.QA_METRICS:
        assert get_metric(name).sample_fn("", ["the cat sat"]) == 0.0


def test_loogle_cloze_counts_masks_across_samples():
    answer = "{'<mask-0>': 'Bob', '<mask-1>': 'Ann Lee'}"
    records = [
        {"task": "shortdep_cloze", "prediction": "{'<mask-0>': 'Bob', '<mask-1>': 'Lee'}", "answer": [answer]},
        {"task": "shortdep_cloze", "prediction": "Bob and Ann Lee", "answer": [answer]},  # not a dict: 0 of 2
        {"task": "shortdep_cloze", "prediction": "{'<mask-0>': 'Bob'}", "answer": ["{'<mask-0>': 'Bob'}"]},
    ]
    scores = score_dataset("loogle", records)["per_task"]["shortdep_cloze"]
    # exact: (1 + 0 + 1) / (2 + 2 + 1) masks; partial: "Lee" shares a word with "Ann Lee" -> (2 + 0 + 1) / 5.
    assert scores == {"loogle_exact_match": 40.0, "loogle_partial_match": 60.0}


def test_loogle_unreadable_answer_counts_one_missed_mask():
    assert loogle.exact_match("{'a': 1}", ["not a dict literal ("]) == 0.0
    assert (loogle.exact_match("{}", ["not a dict literal ("]).denominator) == 1


# InfiniteBench -- NVIDIA/kvpress benchmarks/infinite_bench/calculate_metrics.py (from OpenBMB/InfiniteBench)

CHOICE_QUESTION = "Which one?\nA. the river\nB. the mountain\nC. the sea\nD. the sky"


@pytest.mark.parametrize("task, prediction, answer, expected", [
    ("passkey", "The pass key is 71432.", "71432", 1.0),
    ("passkey", "71432", "71433", 0.0),
    ("number_string", "It is 2200012222, I think 5", "2200012222", 1.0),
    ("kv_retrieval", 'The value is "5e6b7b90-710d-4953".', "5e6b7b90-710d-4953", 1.0),
    ("kv_retrieval", "5e6b7b90-710d-49", "5e6b7b90-710d-4953", 0.0),
    ("code_run", "The return value is -14.", "-14", 1.0),  # the last word, as an int
    ("code_run", "-14 is wrong, it is 3", "-14", 0.0),
    ("code_run", "", "-14", 0.0),
    ("math_find", "The largest number is 88.", "88", 1.0),
    ("math_find", "3.5 comes before 88", "88", 0.0),  # the reference crashes on int("3.5"); counted wrong here
    ("math_calc", "79, 5, 73", ["79", "5", "73"], 1.0),
    ("math_calc", "79, 6, 73", ["79", "5", "73"], 1 / 3),  # counts the leading run of correct values
    ("longdialogue_qa_eng", "It was ace.", ["ACE", "ACE ROTHSTEIN"], 1.0),
    ("longbook_qa_eng", "Peyton", ['"Peyton"'], 1.0),
    ("longbook_qa_chn", "素素", ["素素"], 1.0),
    ("longbook_qa_chn", "素", ["素素"], 2 / 3),  # characters: P = 1, R = 1/2
    ("longbook_choice_eng", "B", "B", 1.0),
    ("longbook_choice_eng", "The answer is C", "B", 0.0),
    ("longbook_choice_eng", "the mountain", "B", 1.0),  # the option's text is a label too
    ("longbook_choice_eng", "", "B", 0.0),
    ("code_debug", "Option B", "B", 1.0),
    # InfiniteBench's own rule (kvpress refuses the task): HF evaluate's rougeLsum, no stemmer: LCS 3, P 1, R 3/6.
    ("longbook_sum_eng", "the cat sat", ["the cat sat on the mat"], 2 / 3),
])
def test_infinitebench_scorers(task, prediction, answer, expected):
    question = CHOICE_QUESTION if task in ib.CHOICE_TASKS else ""
    references = answer if isinstance(answer, list) else [answer]
    assert ib.score_sample(task, prediction, references, question) == pytest.approx(expected)


def test_infinitebench_dataset_reads_options_from_the_question():
    records = [{"task": "longbook_choice_eng", "prediction": "B", "answer": ["B"], "question": CHOICE_QUESTION},
               {"task": "longbook_choice_eng", "prediction": "A", "answer": ["B"], "question": CHOICE_QUESTION},
               {"task": "passkey", "prediction": "123", "answer": ["123"]}]
    result = score_dataset("infinitebench", records)
    assert result["per_task"] == {"longbook_choice_eng": {"infinitebench_score": 50.0},
                                  "passkey": {"infinitebench_score": 100.0}}
    with pytest.raises(ValueError, match="A-D options"):
        score_dataset("infinitebench", [{"task": "code_debug", "prediction": "A", "answer": ["A"], "question": "?"}])


# ZeroSCROLLS -- NVIDIA/kvpress benchmarks/zero_scrolls/calculate_metrics.py returns {} (no gold answers);
# the metrics here are the ZeroSCROLLS paper's per-task choices.

def test_zero_scrolls_metrics_per_task():
    assert zero_scrolls.metric_name_for("qasper") == "zero_scrolls_f1"
    assert zero_scrolls.metric_name_for("gov_report") == "zero_scrolls_rouge"
    assert zero_scrolls.metric_name_for("quality") == "zero_scrolls_accuracy"
    assert zero_scrolls.f1("The Eiffel Tower", ["eiffel tower", "paris"]) == 1.0
    assert zero_scrolls.exact("(B) the sea.", ["(b) The sea"]) == 1.0
    # rouge-score counts tokens (the reference has "the" twice): ROUGE-1 F 2/3 (P 1, R 3/6), ROUGE-2 F 4/7
    # (P 1, R 2/5), ROUGE-L F 2/3 (LCS 3): their geometric mean.
    expected = (2 / 3 * 4 / 7 * 2 / 3) ** (1 / 3)
    assert zero_scrolls.rouge_geometric_mean("the cat sat", ["the cat sat on the mat"]) == pytest.approx(expected)


def test_zero_scrolls_empty_prediction_scores_zero():
    assert zero_scrolls.f1("", ["Ada"]) == 0.0 and zero_scrolls.exact("", ["Ada"]) == 0.0
    assert zero_scrolls.rouge_geometric_mean("", ["the cat sat"]) == 0.0


def test_zero_scrolls_without_references_scores_zero():
    assert zero_scrolls.f1("anything", [""]) == 0.0
    assert zero_scrolls.rouge_geometric_mean("anything", [""]) == 0.0


# LongBench-E in kvpress's style -- NVIDIA/kvpress benchmarks/longbench/calculate_metrics.py calculate_metrics_e
# keeps LongBench's scorer_e rule (pred.lstrip("\n").split("\n")[0]; no lstrip() elsewhere).

def test_longbench_e_kvpress_style_keeps_longbench_first_line_rule():
    trec = [{"task": "trec_e", "prediction": " \nLocation", "answer": ["Location"], "all_classes": ["Location"],
             "length": 100}]
    assert score_dataset("longbench_e", trec, style="kvpress")["per_task"]["trec_e"]["classification"] == 0.0
    v1 = [{**trec[0], "task": "trec"}]
    assert score_dataset("longbench", v1, style="kvpress")["per_task"]["trec"]["classification"] == 100.0


def test_longbench_e_kvpress_style_keeps_code_indentation():
    lcc = [{"task": "lcc_e", "prediction": "    x = foo(1)", "answer": ["x = foo(1)"], "length": 100}]
    by_style = {style: score_dataset("longbench_e", lcc, style=style)["per_task"]["lcc_e"]["code_sim"]
                for style in ("longbench", "kvpress")}
    assert by_style["longbench"] == by_style["kvpress"] < 100.0
