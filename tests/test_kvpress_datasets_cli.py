"""kvpress's other datasets end to end from the command line, offline: local files for the hub datasets, the needle
grid and multi-length RULER generated for the model's tokenizer; and their flags' bad-input rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

from evaluation.cache import CONFIG_FILE, METRICS_FILE, PREDICTIONS_FILE
from evaluation.cli import main
from evaluation.config import resolve_config
from evaluation.datasets.registry import load_records
from evaluation.kvpress_format import export_kvpress, import_kvpress

ROOT = Path(__file__).resolve().parent.parent
STORY = "The grass is green. " * 20 + "Ada wrote the first program. " + "The sky is blue. " * 20
CHOICES = "Who wrote it?\nA. Ada\nB. Bob\nC. Cy\nD. Di"
ROWS = {
    "longbench-v2": [{"context": STORY, "question": CHOICES, "answer_prefix": "", "answer": ["A"], "task": "single"}],
    "loogle": [{"context": STORY, "question": "Who wrote it?", "answer": ["Ada"], "task": "shortdep_qa"},
               {"context": STORY, "question": "Fill the mask.", "answer": ["{'<mask-0>': 'Ada'}"],
                "task": "shortdep_cloze"}],
    "zero_scrolls": [{"context": STORY, "question": "Who wrote it?", "answer": ["Ada"], "task": "qasper"}],
    "infinitebench": [{"context": STORY, "question": "What is the pass key?", "answer": ["71432"], "task": "passkey"},
                      {"context": STORY, "question": CHOICES, "answer": ["A"], "task": "longbook_choice_eng"}],
    "math500": [{"context": " ", "question": "What is 2 + 3?", "answer": ["5"], "task": "algebra"}],
}
SCORING = {"longbench-v2": "longbench-v2", "loogle": "loogle", "zero_scrolls": "zero_scrolls",
           "infinitebench": "infinitebench", "math500": "math500", "needle_in_haystack": "needle_in_haystack",
           "ruler-300": "ruler", "ruler-400": "ruler"}


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "evaluation.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def sweep(tiny_model_dir, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    data = tmp_path_factory.mktemp("data")
    files = ",".join(f"{name}={write_jsonl(data / f'{name}.jsonl', rows)}" for name, rows in ROWS.items())
    out = tmp_path_factory.mktemp("sweep") / "results"
    result = cli("--model", tiny_model_dir, "--press", "knorm", "--compression_ratio", "0.5",
                 "--dataset", ",".join([*ROWS, "needle_in_haystack", "ruler"]), "--data_files", files,
                 "--needle_lengths", "300,400", "--needle_depths", "0,100", "--ruler_length", "300,400",
                 "--ruler_tasks", "niah_single_1", "--max_samples", "1", "--max_new_tokens", "3",
                 "--output_dir", str(out))
    return result, out


def run_folders(out: Path) -> dict[str, Path]:
    return {folder.name.split("__")[1]: folder for folder in out.iterdir()}


def test_every_new_dataset_runs_offline(sweep):
    result, out = sweep
    assert result.returncode == 0, result.stderr
    folders = run_folders(out)
    assert sorted(folders) == sorted(SCORING)
    for dataset, folder in folders.items():
        metrics = json.loads((folder / METRICS_FILE).read_text())
        assert metrics["dataset"] == SCORING[dataset]
        assert yaml.safe_load((folder / CONFIG_FILE).read_text())["run"]["dataset"] == dataset
        expected = {"ruler-300": 1, "ruler-400": 1, "needle_in_haystack": 4}.get(dataset, len(ROWS.get(dataset, [])))
        assert metrics["n_predictions"] == expected, dataset


def test_needle_predictions_and_metrics_carry_the_grid(sweep):
    _, out = sweep
    folder = run_folders(out)["needle_in_haystack"]
    predictions = [json.loads(line) for line in (folder / PREDICTIONS_FILE).read_text().splitlines()]
    assert sorted((p["needle_length"], p["needle_depth"]) for p in predictions) == [
        (300, 0.0), (300, 100.0), (400, 0.0), (400, 100.0)]
    assert all(type(p["needle_length"]) is int and type(p["needle_depth"]) is float for p in predictions)
    cells = json.loads((folder / METRICS_FILE).read_text())["by_length_depth"]
    assert [(c["length"], c["depth"], c["n"]) for c in cells] == [(300, 0.0, 1), (300, 100.0, 1), (400, 0.0, 1),
                                                                  (400, 100.0, 1)]
    assert all(set(c) == {"length", "depth", "score", "exact", "n"} and 0 <= c["score"] <= 100 for c in cells)


def test_kvpress_layout_round_trip_of_needle_and_ruler_lengths(sweep, tmp_path):
    _, out = sweep
    folders = {path.name: path for path in export_kvpress(str(out), str(tmp_path / "kvpress"))}
    assert {"ruler__300__tiny", "ruler__400__tiny"} <= {name.split("-qwen3")[0] for name in folders}
    ruler = next(path for name, path in folders.items() if name.startswith("ruler__400__"))
    assert set(json.loads((ruler / METRICS_FILE).read_text())) == {"niah_single_1"}
    needle_folder = next(path for name, path in folders.items() if name.startswith("needle_in_haystack__"))
    ours = json.loads((run_folders(out)["needle_in_haystack"] / METRICS_FILE).read_text())
    kvpress = json.loads((needle_folder / METRICS_FILE).read_text())
    assert kvpress == {"rouge1": ours["per_task"]["needle_in_haystack"]["needle_rouge1_kvpress"]}
    imported = import_kvpress(str(tmp_path / "kvpress"), str(tmp_path / "back"))
    back = next(path for path in imported if "__needle_in_haystack__" in path.name)
    assert json.loads((back / METRICS_FILE).read_text())["by_length_depth"] == ours["by_length_depth"]


def test_needle_haystack_file_and_kvpress_spellings(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(ROOT / "evaluation" / "embedded" / "kvtiny"))
    essays = write_jsonl(tmp_path / "essays.jsonl", [{"context": "An essay about painting. " * 40,
                                                      "needle": "The secret colour is teal."}])
    config = resolve_config(dataset="needle_in_haystack", data_files=str(essays), needle_lengths="300",
                            needle_depths="50")
    records = load_records("needle_in_haystack", config, tokenizer)
    assert len(records) == 1 and "The secret colour is teal." in records[0]["context"]
    assert records[0]["answer"] == ["The secret colour is teal."] and "essay about painting" in records[0]["context"]
    text = tmp_path / "essay.txt"
    text.write_text("A plain text essay. " * 40)
    config = resolve_config(dataset="needle_in_haystack", needle_haystack=str(text), needle_lengths="300,400")
    assert len(load_records("needle_in_haystack", config, tokenizer)) == 2 * 11  # default depths 0, 10, ..., 100
    assert resolve_config(dataset="longbench-e,ruler").dataset == ["longbench_e", "ruler"]


@pytest.mark.parametrize("args, message", [
    (["--dataset", "needle_in_haystack", "--needle_depths", ""], "--needle_depths is empty"),
    (["--dataset", "needle_in_haystack", "--needle_lengths", ""], "--needle_lengths is empty"),
    (["--dataset", "needle_in_haystack", "--needle_depths", "0,150"], "[0, 100], got 150"),
    (["--dataset", "needle_in_haystack", "--needle_lengths", "120"], "--needle_lengths 120 is too short"),
    (["--dataset", "needle_in_haystack", "--needle_lengths", "5e2x"], "takes whole numbers"),
    (["--needle_lengths", "512"], "only used by --dataset needle_in_haystack"),
    (["--ruler_length", "1024,32"], "--ruler_length must be at least 64"),
    (["--dataset", "ruler-32"], "--ruler_length must be at least 64"),
    (["--dataset", "needle_in_haystack", "--needle_haystack", "/no/essays.txt"], "does not exist"),
])
def test_bad_needle_and_ruler_flags(args, message, tmp_path, monkeypatch, capsys):
    out = tmp_path / "results"
    monkeypatch.setattr(sys, "argv", ["kvpress-eval", "--press", "knorm", *args, "--output_dir", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("kvpress-eval: error:") and message in error, error
    assert not out.exists()


def test_a_length_shorter_than_the_needle_fails_before_any_folder(tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "results"
    monkeypatch.setattr(sys, "argv", ["kvpress-eval", "--model", tiny_model_dir, "--press", "knorm", "--dataset",
                                      "needle_in_haystack", "--needle_lengths", "160", "--output_dir", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "shorter than the needle" in error and error.startswith("kvpress-eval: error:"), error
    assert not out.exists()
