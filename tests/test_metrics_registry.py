"""The metric registry and score_dataset: names, errors, JSON output, and agreement with the benchmark modules."""

from __future__ import annotations

import dataclasses
import json

import pytest

from evaluation.metrics import METRICS, Metric, Registry, dataset_names, get_metric, register_metric, score_dataset
from evaluation.metrics import longbench as lb
from evaluation.metrics.ruler import score_ruler


def test_dataset_names():
    assert dataset_names() == ["aime25", "infinitebench", "longbench", "longbench-v2", "longbench_e", "loogle",
                               "math500", "needle_in_haystack", "ruler", "zero_scrolls"]


def test_unknown_dataset_suggests_a_close_name_on_one_line():
    with pytest.raises(ValueError) as error:
        score_dataset("longbench_f", [])
    message = str(error.value)
    assert "\n" not in message
    assert "did you mean 'longbench_e'" in message
    assert "aime25, infinitebench, longbench, longbench-v2, longbench_e, loogle" in message


def test_unknown_metric_suggests_a_close_name():
    with pytest.raises(ValueError, match="did you mean 'qa_f1'"):
        get_metric("qa-f1")


def test_unknown_style_is_rejected():
    with pytest.raises(ValueError, match="choose from kvpress, ruler"):
        score_dataset("ruler", [{"task": "vt", "prediction": "a", "answer": ["a"]}], style="delete")


def test_duplicate_names_are_rejected():
    with pytest.raises(ValueError, match="already registered"):
        register_metric(get_metric("qa_f1"))
    registry: Registry[Metric] = Registry("metric", Metric)
    registry.register("m", get_metric("count"))
    with pytest.raises(ValueError, match="already registered"):
        registry.register("m", get_metric("count"))


def test_registry_checks_entry_types():
    with pytest.raises(TypeError):
        Registry("metric", Metric).register("f", len)


def test_metrics_are_frozen_and_carry_direction_and_version():
    metric = get_metric("rouge")
    assert metric.higher_is_better and metric.version == "1"
    with pytest.raises(dataclasses.FrozenInstanceError):
        metric.name = "other"  # type: ignore[misc]


def test_every_benchmark_metric_is_registered():
    for name in [*lb.LONGBENCH_METRICS, "string_match_all", "string_match_part", "aime_accuracy", "aime_avg@k",
                 "aime_pass@k"]:
        assert name in METRICS


def test_registered_longbench_metric_takes_the_max_over_answers():
    metric = get_metric("qa_f1")
    scores = [metric.sample_fn("Paris", ["London", "Paris"]), metric.sample_fn("x", ["y"])]
    assert scores == [1.0, 0.0]
    assert metric.aggregate_fn(scores) == 50.0


def test_ruler_result():
    records = [
        {"task": "niah_single_1", "prediction": "1234567", "answer": ["1234567"]},
        {"task": "niah_single_1", "prediction": "none", "answer": ["1234567"]},
        {"task": "qa_1", "prediction": "Paris", "answer": ["London", "paris"]},
    ]
    result = score_dataset("ruler", records)
    assert result["per_task"] == {"niah_single_1": {"string_match_all": 50.0}, "qa_1": {"string_match_part": 100.0}}
    assert result["overall"] == 75.0
    assert result["metric"] == {"niah_single_1": "string_match_all", "qa_1": "string_match_part"}
    assert result["n_samples"] == 3
    assert result["style"] == "ruler"
    json.dumps(result, allow_nan=False)


def test_ruler_result_agrees_with_score_ruler():
    predictions = ["a\nb", "ab", "x", "A", "12\x0034"]
    references = [["ab"], ["ab", "c"], ["x"], ["a"], ["1234"]]
    tasks = ["vt", "cwe", "cwe", "qa_2", "fwe"]
    records = [{"task": t, "prediction": p, "answer": r}
               for p, r, t in zip(predictions, references, tasks, strict=True)]
    for style in ("ruler", "kvpress"):
        result = score_dataset("ruler", records, style=style)
        expected = score_ruler(predictions, references, tasks, style=style)
        assert {task: next(iter(scores.values())) for task, scores in result["per_task"].items()} == expected[
            "per_task"]
        assert result["overall"] == expected["overall"]


def test_longbench_result():
    records = [
        {"task": "trec", "prediction": "Location\nHuman", "answer": ["Location"],
         "all_classes": ["Location", "Human"]},
        {"task": "trec", "prediction": "Human", "answer": ["Location"], "all_classes": ["Location", "Human"]},
        {"task": "passage_count", "prediction": "3 or 4", "answer": ["3"]},
    ]
    result = score_dataset("longbench", records)
    assert result["per_task"] == {"passage_count": {"count": 50.0}, "trec": {"classification": 50.0}}
    assert result["overall"] == 50.0
    assert result["metric"] == {"passage_count": "count", "trec": "classification"}


def test_longbench_records_borrow_the_task_class_list():
    records = [
        {"task": "trec", "prediction": "Location", "answer": ["Location"], "all_classes": ["Location", "Human"]},
        {"task": "trec", "prediction": "Location", "answer": ["Location"]},
    ]
    assert score_dataset("longbench", records)["per_task"]["trec"]["classification"] == 100.0


def test_longbench_accepts_the_answers_column():
    result = score_dataset("longbench", [{"task": "hotpotqa", "prediction": "Paris", "answers": ["Paris"]}])
    assert result["overall"] == 100.0


def test_longbench_kvpress_style():
    records = [{"task": "lcc", "prediction": "    x = foo(1)", "answer": ["x = foo(1)"]}]
    assert score_dataset("longbench", records)["overall"] == 83.0
    assert score_dataset("longbench", records, style="kvpress")["overall"] == 100.0


def test_longbench_e_result_has_length_buckets_and_null_for_empty():
    records = [
        {"task": "passage_count_e", "prediction": "3", "answer": ["3"], "length": 1000},
        {"task": "passage_count_e", "prediction": "3 or 4", "answer": ["3"], "length": 5000},
        {"task": "passage_count_e", "prediction": "4", "answer": ["3"], "length": 6000},
    ]
    result = score_dataset("longbench_e", records)
    assert result["per_task"] == {"passage_count_e": {
        "count": 50.0, "count/0-4k": 100.0, "count/4-8k": 25.0, "count/8k+": None}}
    assert result["overall"] == 50.0
    json.dumps(result, allow_nan=False)


def test_longbench_e_needs_lengths():
    with pytest.raises(ValueError, match="length"):
        score_dataset("longbench_e", [{"task": "trec_e", "prediction": "a", "answer": ["a"], "all_classes": ["a"]}])


def test_aime_result_in_percent_with_avg_and_pass_at_k():
    records = [
        {"task": "aime25", "prediction": r"\boxed{70}", "answer": "70", "problem_id": 1},
        {"task": "aime25", "prediction": r"\boxed{070}", "answer": "70", "problem_id": 1},
        {"task": "aime25", "prediction": r"\boxed{5}", "answer": "6", "problem_id": 2},
        {"task": "aime25", "prediction": "no idea", "answer": "6", "problem_id": 2},
    ]
    result = score_dataset("aime25", records)
    assert result["per_task"] == {"aime25": {
        "aime_accuracy": 50.0, "aime_accuracy_kvpress": 25.0, "aime_answered": 75.0, "aime_answered_kvpress": 75.0,
        "aime_avg@k": 50.0, "aime_pass@k": 50.0}}
    assert result["overall"] == 50.0
    assert result["metric"] == {"aime25": "aime_accuracy"}
    kvpress = score_dataset("aime25", records, style="kvpress")
    assert kvpress["overall"] == 25.0 and kvpress["metric"] == {"aime25": "aime_accuracy_kvpress"}
    json.dumps(result, allow_nan=False)


def test_aime_pass_at_k_groups_by_problem_id():
    records = [
        {"task": "aime25", "prediction": r"\boxed{1}", "answer": "1", "problem_id": "a"},
        {"task": "aime25", "prediction": r"\boxed{2}", "answer": "1", "problem_id": "a"},
        {"task": "aime25", "prediction": r"\boxed{2}", "answer": "1", "problem_id": "a"},
        {"task": "aime25", "prediction": r"\boxed{3}", "answer": "3", "problem_id": "b"},
    ]
    scores = score_dataset("aime25", records)["per_task"]["aime25"]
    assert scores["aime_accuracy"] == 50.0  # 2 of 4 samples
    assert scores["aime_avg@k"] == 66.67  # (1/3 + 1) / 2
    assert scores["aime_pass@k"] == 100.0


def test_records_need_a_task():
    with pytest.raises(ValueError, match="record 0 has no 'task'"):
        score_dataset("ruler", [{"prediction": "a", "answer": ["a"]}])


def test_empty_records_are_rejected():
    with pytest.raises(ValueError, match="no records"):
        score_dataset("aime25", [])
