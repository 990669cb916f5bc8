"""LongBench v1 / LongBench-E metrics, with expected values worked out by hand from LongBench's metrics.py.

ROUGE-L F of ``rouge==1.0.1`` is ``2 * P * R / (P + R + 1e-8)`` over distinct words, so the expected values below
carry that epsilon.
"""

from __future__ import annotations

import math

import pytest

from evaluation.metrics import longbench as lb


def rouge_f(p: float, r: float) -> float:
    """The F of rouge 1.0.1 (rouge_score.rouge_l_summary_level) for hand-computed precision and recall."""
    return 2.0 * ((p * r) / (p + r + 1e-8))


# qa_f1 ---------------------------------------------------------------------------------------------------------------

def test_qa_f1_exact_match():
    assert lb.qa_f1_score("Eiffel Tower", "Eiffel Tower") == 1.0


def test_qa_f1_partial_overlap_removes_punctuation_and_articles():
    # "the eiffel tower in paris" -> ["eiffel", "tower", "in", "paris"]; P = 2/4, R = 2/2, F1 = 2/3.
    assert lb.qa_f1_score("The Eiffel Tower, in Paris.", "Eiffel Tower") == pytest.approx(2 / 3)


def test_qa_f1_removes_a_an_the():
    assert lb.qa_f1_score("an apple a day", "Apple day") == 1.0


def test_qa_f1_keeps_words_that_start_with_an_article():
    # "theatre" is one word; "the atre" normalises to "atre": no overlap.
    assert lb.qa_f1_score("theatre", "the atre") == 0.0


def test_qa_f1_punctuation_is_removed_before_articles():
    # "the-end" loses its hyphen first and becomes the single token "theend".
    assert lb.normalize_answer("The-end of A story") == "theend of story"


def test_qa_f1_counts_repeated_tokens_once_per_match():
    # bag overlap: Counter(paris: 2) & Counter(paris: 1) = 1; P = 1/2, R = 1, F1 = 2/3.
    assert lb.qa_f1_score("Paris Paris", "Paris") == pytest.approx(2 / 3)


def test_qa_f1_empty_prediction_scores_zero():
    assert lb.qa_f1_score("", "Paris") == 0.0
    assert lb.qa_f1_score("the", "a") == 0.0  # both normalise to nothing


def test_qa_f1_zh_tokenises_with_jieba():
    # jieba: 我 / 爱 / 北京 against 北京: P = 1/3, R = 1, F1 = 0.5.
    assert lb.qa_f1_zh_score("我爱北京", "北京") == pytest.approx(0.5)


def test_qa_f1_zh_drops_chinese_punctuation_tokens():
    assert lb.qa_f1_zh_score("北京。", "北京") == 1.0
    assert lb.qa_f1_zh_score("北京！", "北京") == 1.0


def test_normalize_zh_answer_removes_all_whitespace_and_lowercases():
    assert lb.normalize_zh_answer("A B，c。") == "abc"


# rouge ---------------------------------------------------------------------------------------------------------------

def test_rouge_identical_text():
    assert lb.rouge_score("a b c", "a b c") == pytest.approx(rouge_f(1.0, 1.0), abs=1e-15)


def test_rouge_multi_sentence_union_lcs():
    # Sentences split on ".": hyp ["the cat sat", "the dog ran"], ref ["the cat sat on the mat"].
    # Distinct words: ref {the, cat, sat, on, mat} = 5, hyp {the, cat, sat, dog, ran} = 5.
    # Union LCS over hyp sentences = {the, cat, sat} = 3: P = R = 3/5.
    assert lb.rouge_score("the cat sat. the dog ran.", "the cat sat on the mat.") == pytest.approx(
        rouge_f(0.6, 0.6), abs=1e-15)


def test_rouge_keeps_punctuation_other_than_dots():
    # "cat," differs from "cat": LCS = {dog}, P = R = 1/2.
    assert lb.rouge_score("cat, dog", "cat dog") == pytest.approx(rouge_f(0.5, 0.5), abs=1e-15)


def test_rouge_is_case_sensitive():
    # "The" differs from "the": LCS = {cat}, P = R = 1/2.
    assert lb.rouge_score("The cat", "the cat") == pytest.approx(rouge_f(0.5, 0.5), abs=1e-15)


def test_rouge_counts_distinct_words():
    # hyp "a a b" has 2 distinct words; LCS with "a b" = {a, b}: P = 2/2, R = 2/2.
    assert lb.rouge_score("a a b", "a b") == pytest.approx(rouge_f(1.0, 1.0), abs=1e-15)


@pytest.mark.parametrize("prediction", ["", "...", " "])
def test_rouge_empty_prediction_scores_zero(prediction):
    # "" and "..." make the package raise (caught, 0.0); " " gives the word "" that matches nothing.
    assert lb.rouge_score(prediction, "the cat") == 0.0


def test_rouge_zh_joins_jieba_tokens():
    # 我 / 爱 / 北京 / 天安门 against 我 / 爱 / 北京: P = 3/4, R = 1.
    assert lb.rouge_zh_score("我爱北京天安门", "我爱北京") == pytest.approx(rouge_f(0.75, 1.0), abs=1e-15)


# classification ------------------------------------------------------------------------------------------------------

def test_classification_single_match():
    classes = ["Location", "Human", "Animal"]
    assert lb.classification_score("Location", "Location", all_classes=classes) == 1.0


def test_classification_several_matches_share_the_credit():
    classes = ["Location", "Human", "Animal"]
    assert lb.classification_score("Location or Human", "Location", all_classes=classes) == 0.5


def test_classification_wrong_class_scores_zero():
    classes = ["Location", "Human", "Animal"]
    assert lb.classification_score("Animal", "Location", all_classes=classes) == 0.0


def test_classification_drops_strict_substrings_of_the_answer():
    # matches [a, ab]: "a" is removed, then the iterator reaches the end; 1 / len([ab]) = 1.
    assert lb.classification_score("ab", "ab", all_classes=["a", "ab"]) == 1.0


def test_classification_reproduces_the_list_mutation_quirk():
    # matches [a, b, ab]: "a" is removed at index 0, the iterator moves to index 1 = "ab", so "b" is never checked
    # and survives: 1 / len([b, ab]) = 0.5 (without the quirk it would be 1.0).
    assert lb.classification_score("ab", "ab", all_classes=["a", "b", "ab"]) == 0.5


def test_classification_needs_the_classes():
    with pytest.raises(ValueError, match="all_classes"):
        lb.classification_score("x", "x")


# retrieval and count -------------------------------------------------------------------------------------------------

def test_retrieval_exact():
    assert lb.retrieval_score("Paragraph 3", "Paragraph 3") == 1.0


def test_retrieval_counts_every_number_in_the_prediction():
    # numbers 3, 12, 3: two of three are the answer's id.
    assert lb.retrieval_score("Paragraph 3, not Paragraph 12 or 3", "Paragraph 3") == pytest.approx(2 / 3)


def test_retrieval_compares_whole_numbers():
    assert lb.retrieval_score("Paragraph 30", "Paragraph 3") == 0.0


def test_retrieval_without_numbers_scores_zero():
    assert lb.retrieval_score("", "Paragraph 3") == 0.0
    assert lb.retrieval_score("I do not know", "Paragraph 3") == 0.0


def test_retrieval_zh():
    assert lb.retrieval_zh_score("答案是：段落5", "段落5") == 1.0
    assert lb.retrieval_zh_score("段落15和段落5", "段落5") == 0.5


def test_count_score():
    assert lb.count_score("3", 3) == 1.0
    assert lb.count_score("There are 12 unique paragraphs out of 20", "12") == 0.5
    assert lb.count_score("13", 3) == 0.0
    assert lb.count_score("", 3) == 0.0


# code_sim ------------------------------------------------------------------------------------------------------------

def test_code_sim_equal_line():
    assert lb.code_sim_score("x = foo(1)", "x = foo(1)") == 1.0


def test_code_sim_skips_fences_comments_and_slashes():
    prediction = "```python\n# comment\n// note\n    x = foo(1)\n```"
    # kept line "    x = foo(1)" (14 chars) vs "x = foo(1)" (10): ratio 2*10/24 = 0.833 -> 83.
    assert lb.code_sim_score(prediction, "x = foo(1)") == 0.83


def test_code_sim_skips_a_line_with_hash_anywhere():
    assert lb.code_sim_score('print("#")\nx = 1', "x = 1") == 1.0


def test_code_sim_strips_leading_newlines_only():
    assert lb.code_sim_score("\n\nx = 1", "x = 1") == 1.0


def test_code_sim_no_usable_line_scores_zero():
    assert lb.code_sim_score("# only a comment\n```", "x = 1") == 0.0
    assert lb.code_sim_score("", "x = 1") == 0.0


def test_code_sim_uses_fuzz_integer_percent_with_bankers_rounding():
    # one matching char of 8 + 8: ratio 2/16 = 0.125 -> round(12.5) = 12 (to even).
    assert lb.code_sim_score("abcdefgh", "azzzzzzz") == 0.12


def test_fuzz_matcher_is_recorded():
    assert lb.FUZZ_MATCHER in {"difflib", "Levenshtein.StringMatcher"}


# first-line cut, dataset table, aggregates ---------------------------------------------------------------------------

def test_first_line_cut_longbench():
    assert lb.prepare_prediction("trec", "\n\nLocation\nHuman") == "Location"
    assert lb.prepare_prediction("trec", " \nLocation") == " "  # LB strips newlines only


def test_first_line_cut_kvpress():
    assert lb.prepare_prediction("trec", " \nLocation", style="kvpress") == "Location"
    assert lb.prepare_prediction("samsum", "\n A.\n B.", style="kvpress") == "A."


def test_first_line_cut_only_for_four_datasets():
    assert lb.prepare_prediction("qasper", "a\nb") == "a\nb"
    assert lb.prepare_prediction("trec_e", "a\nb") == "a"


def test_kvpress_style_lstrips_every_prediction():
    assert lb.score_sample("lcc", "    x = foo(1)", ["x = foo(1)"]) == 0.83
    assert lb.score_sample("lcc", "    x = foo(1)", ["x = foo(1)"], style="kvpress") == 1.0


def test_first_line_style_changes_triviaqa():
    assert lb.score_sample("triviaqa", " \nParis", ["Paris"]) == 0.0
    assert lb.score_sample("triviaqa", " \nParis", ["Paris"], style="kvpress") == 1.0


def test_sample_score_is_max_over_answers():
    assert lb.score_sample("hotpotqa", "Eiffel Tower", ["Louvre", "the Eiffel Tower"]) == 1.0
    assert lb.score_sample("hotpotqa", "", ["Louvre"]) == 0.0


def test_sample_score_treats_a_string_answer_as_one_answer():
    assert lb.score_sample("hotpotqa", "Paris", "Paris") == 1.0


def test_dataset_table_matches_longbench():
    assert len(lb.DATASET_TO_METRIC) == 21
    assert lb.DATASET_TO_METRIC["multifieldqa_zh"] == "qa_f1_zh"
    assert lb.DATASET_TO_METRIC["dureader"] == "rouge_zh"
    assert lb.DATASET_TO_METRIC["samsum"] == "rouge"
    assert lb.DATASET_TO_METRIC["lsht"] == "classification"
    assert lb.DATASET_TO_METRIC["passage_count"] == "count"
    assert lb.DATASET_TO_METRIC["repobench-p"] == "code_sim"
    assert set(lb.DATASET_TO_METRIC.values()) == set(lb.LONGBENCH_METRICS)


@pytest.mark.parametrize("name,base", [("trec_e", "trec"), ("repobench-p_e", "repobench-p"), ("lcc-e", "lcc"),
                                       ("qasper", "qasper")])
def test_base_dataset_name(name, base):
    assert lb.base_dataset_name(name) == base


def test_unknown_dataset_is_rejected():
    with pytest.raises(ValueError, match="unknown LongBench dataset"):
        lb.metric_name_for("trek")


def test_dataset_score_rounds_percent_to_two_decimals():
    assert lb.longbench_dataset_score([1.0, 0.0, 0.0]) == 33.33
    assert lb.longbench_dataset_score([2 / 3]) == 66.67
    assert lb.longbench_dataset_score([0.5, 0.25, 0.0]) == 25.0


def test_score_longbench_mean_of_sample_scores():
    predictions = ["Paris", "Eiffel Tower in Paris", "no idea"]
    answers = [["Paris"], ["Eiffel Tower"], ["Louvre"]]
    # 1, 2/3 (P = 2/4, R = 1), 0 -> 100 * (5/3) / 3 = 55.555...
    assert lb.score_longbench("hotpotqa", predictions, answers) == 55.56


def test_score_longbench_classification_uses_all_classes():
    classes = ["Location", "Human"]
    predictions = ["Location\nHuman", "Human"]
    assert lb.score_longbench("trec", predictions, [["Location"], ["Location"]], all_classes=classes) == 50.0


@pytest.mark.parametrize("length,bucket", [(0, "0-4k"), (3999, "0-4k"), (4000, "4-8k"), (7999, "4-8k"),
                                           (8000, "8k+"), (120000, "8k+")])
def test_length_buckets(length, bucket):
    assert lb.length_bucket(length) == bucket


def test_longbench_e_bucket_means():
    scores = [1.0, 0.0, 1.0, 1.0, 0.5]
    lengths = [100, 3999, 4000, 7999, 8000]
    assert lb.longbench_e_bucket_scores(scores, lengths) == {"0-4k": 50.0, "4-8k": 100.0, "8k+": 50.0}


def test_longbench_e_empty_bucket_is_nan():
    buckets = lb.longbench_e_bucket_scores([1.0, 0.0, 0.0], [10, 20, 30])
    assert buckets["0-4k"] == 33.33
    assert math.isnan(buckets["4-8k"]) and math.isnan(buckets["8k+"])


def test_score_longbench_e_end_to_end():
    buckets = lb.score_longbench_e("passage_count_e", ["3", "3 or 4", "5"], [["3"], ["3"], ["3"]],
                                   lengths=[1000, 5000, 9000])
    assert buckets == {"0-4k": 100.0, "4-8k": 50.0, "8k+": 0.0}
