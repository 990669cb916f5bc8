"""``kvpress-eval`` sweeps end to end on a tiny random model, as a user runs them: from the command line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import without_timings

from evaluation.cache import PREDICTIONS_FILE
from evaluation.cli import main
from evaluation.config import EvalConfig, help_text, resolve_config
from evaluation.kvpress_format import export_kvpress, import_kvpress

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["--ruler_length", "400", "--ruler_tasks", "niah_single_1,vt", "--max_samples", "2", "--max_new_tokens", "3"]


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "evaluation.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def predictions(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / PREDICTIONS_FILE).read_text().splitlines()]


def runs(output_dir: Path) -> dict[str, Path]:
    """Run folders by their readable prefix (model__dataset__press__point)."""
    return {folder.name.rsplit("__", 1)[0]: folder for folder in sorted(output_dir.iterdir())}


def find_run(output_dir: Path, dataset: str, press: str, point: str) -> Path:
    matches = [f for f in output_dir.iterdir() if f.name.split("__")[1:4] == [dataset, press, point]]
    assert len(matches) == 1, [f.name for f in output_dir.iterdir()]
    return matches[0]


@pytest.fixture(scope="module")
def longbench_file(tmp_path_factory) -> Path:
    """A local LongBench file in the common layout: two questions share the first context."""
    path = tmp_path_factory.mktemp("data") / "longbench.jsonl"
    story = "The grass is green. " * 40 + "Ada wrote the first program. " + "The sky is blue. " * 40
    rows = [
        {"context": story, "question": "Who wrote the first program?", "answer_prefix": "Answer:",
         "answers": ["Ada"], "task": "hotpotqa", "max_new_tokens": 8},
        {"context": story, "question": "What colour is the sky?", "answer_prefix": "Answer:", "answers": ["blue"],
         "task": "hotpotqa", "max_new_tokens": 8},
        {"context": "Question types. " * 50, "question": "What is the capital of France?", "answer_prefix": "Type:",
         "answers": ["Location"], "all_classes": ["Location", "Person"], "task": "trec", "max_new_tokens": 8},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def sweep(tiny_model_dir, longbench_file, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("sweep") / "results"
    result = cli("--model", tiny_model_dir, "--press", "knorm,random", "--compression_ratio", "0.25,0.75",
                 "--dataset", "ruler,longbench", "--data_files", f"longbench={longbench_file}", "--output_dir",
                 str(out), *QUICK)
    return result, out


def test_two_presses_two_points_two_datasets_from_the_cli(sweep):
    result, out = sweep
    assert result.returncode == 0, result.stderr
    folders = runs(out)
    assert len(folders) == 8
    for dataset in ("ruler", "longbench"):
        for press in ("knorm", "random"):
            for ratio in (0.25, 0.75):
                folder = find_run(out, dataset, press, f"compression_ratio={ratio}")
                metrics = json.loads((folder / "metrics.json").read_text())
                rows = predictions(folder)
                assert metrics["n_predictions"] == len(rows) == (4 if dataset == "ruler" else 3)
                assert set(metrics["per_task"]) == ({"niah_single_1", "vt"} if dataset == "ruler"
                                                    else {"hotpotqa", "trec"})
                assert abs(metrics["compression_ratio"] - ratio) < 0.02  # achieved, measured per sample
                config = yaml.safe_load((folder / "config.yaml").read_text())
                assert config["run"]["press"].startswith(("KnormPress", "RandomPress"))
                assert {"torch", "transformers", "kvpress_eval", "git_revision", "device", "dtype",
                        "attn_implementation"} <= set(config["environment"])
                for row in rows:
                    assert {"context_length", "question_length", "generated_length", "compression_ratio",
                            "prediction"} <= set(row)
    # One table row per run, and where the files are.
    table = [line for line in result.stdout.splitlines() if line.startswith(("ruler", "longbench"))]
    assert len(table) == 8
    assert str(out) in result.stdout


def test_questions_sharing_a_context_are_answered_from_one_prefill(sweep):
    _, out = sweep
    folder = find_run(out, "longbench", "knorm", "compression_ratio=0.75")
    shared = [row for row in predictions(folder) if row["task"] == "hotpotqa"]
    assert len(shared) == 2
    # Same compressed cache: same context length and the same achieved compression for both questions.
    assert shared[0]["context_length"] == shared[1]["context_length"]
    assert shared[0]["compression_ratio"] == shared[1]["compression_ratio"]


def test_a_rerun_resumes_instead_of_recomputing(sweep, tiny_model_dir, longbench_file):
    _, out = sweep
    before = {name: (folder / PREDICTIONS_FILE).read_bytes() for name, folder in runs(out).items()}
    result = cli("--model", tiny_model_dir, "--press", "knorm,random", "--compression_ratio", "0.25,0.75",
                 "--dataset", "ruler,longbench", "--data_files", f"longbench={longbench_file}", "--output_dir",
                 str(out), *QUICK)
    assert result.returncode == 0, result.stderr
    assert ", 0 to run" in result.stderr
    assert {name: (folder / PREDICTIONS_FILE).read_bytes() for name, folder in runs(out).items()} == before


def test_kvpress_layout_round_trip(sweep, tmp_path):
    _, out = sweep
    exported = export_kvpress(str(out), str(tmp_path / "kvpress"))
    assert len(exported) == 8
    sample = next(folder for folder in exported if folder.name.startswith("ruler__") and "__knorm__0.75" in
                  folder.name)
    assert {"predictions.csv", "metrics.json", "config.yaml"} <= {p.name for p in sample.iterdir()}
    kvpress_config = yaml.safe_load((sample / "config.yaml").read_text())
    assert kvpress_config["press_name"] == "knorm" and kvpress_config["compression_ratio"] == 0.75
    assert set(json.loads((sample / "metrics.json").read_text())) == {"niah_single_1", "vt"}

    imported = import_kvpress(str(tmp_path / "kvpress"), str(tmp_path / "imported"))
    assert len(imported) == 8
    originals = {(f.name.split("__")[1], f.name.split("__")[2], f.name.split("__")[3]): f for f in out.iterdir()}
    for folder in imported:
        key = tuple(folder.name.split("__")[1:4])
        ours = json.loads((originals[key] / "metrics.json").read_text())
        theirs = json.loads((folder / "metrics.json").read_text())
        assert theirs["per_task"] == ours["per_task"]
        assert theirs["compression_ratio"] == pytest.approx(ours["compression_ratio"])


def test_resume_after_kill_loses_and_duplicates_nothing(tiny_model_dir, tmp_path):
    args = ["--model", tiny_model_dir, "--press", "knorm", "--compression_ratio", "0.5", "--ruler_length", "320",
            "--ruler_tasks", "niah_single_1", "--max_samples", "12", "--max_new_tokens", "24",
            "--batch_size", "2"]  # answers land a few at a time, so the kill finds some but not all on disk
    reference = cli(*args, "--output_dir", str(tmp_path / "uninterrupted"))
    assert reference.returncode == 0, reference.stderr

    out = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "evaluation.cli", *args, "--output_dir", str(out)], cwd=ROOT,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:  # kill -9 once some, but not all, predictions are on disk
        files = list(out.glob(f"*/{PREDICTIONS_FILE}")) if out.exists() else []
        if files and 2 <= files[0].read_bytes().count(b"\n") < 12:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = predictions(next(out.iterdir()))
    assert 2 <= len(partial) < 12

    resumed = cli(*args, "--output_dir", str(out))
    assert resumed.returncode == 0, resumed.stderr
    rows = predictions(next(out.iterdir()))
    ids = [row["sample_id"] for row in rows]
    assert len(ids) == len(set(ids)) == 12  # nothing lost, nothing duplicated
    reference_folder = next((tmp_path / "uninterrupted").iterdir())
    assert next(out.iterdir()).name == reference_folder.name  # same run id
    expected = {row["sample_id"]: row["prediction"] for row in predictions(reference_folder)}
    assert {row["sample_id"]: row["prediction"] for row in rows} == expected
    metrics = json.loads((next(out.iterdir()) / "metrics.json").read_text())
    assert without_timings(metrics) == without_timings(json.loads((reference_folder / "metrics.json").read_text()))


def test_seeded_sampling_is_reproducible(tiny_model_dir, tmp_path):
    args = ["--model", tiny_model_dir, "--press", "no_press", "--ruler_length", "320", "--ruler_tasks",
            "niah_single_1", "--max_samples", "2", "--max_new_tokens", "6", "--do_sample", "--temperature", "1.5",
            "--num_samples", "2"]
    first = cli(*args, "--seed", "3", "--output_dir", str(tmp_path / "a"))
    second = cli(*args, "--seed", "3", "--output_dir", str(tmp_path / "b"))
    other = cli(*args, "--seed", "4", "--output_dir", str(tmp_path / "c"))
    assert first.returncode == second.returncode == other.returncode == 0, first.stderr
    texts = {name: [row["prediction"] for row in predictions(next((tmp_path / name).iterdir()))]
             for name in "abc"}
    assert len(texts["a"]) == 4  # 2 problems x 2 samples
    assert texts["a"] == texts["b"]
    assert texts["a"] != texts["c"]
    assert len(set(texts["a"])) > 1  # the two samples of one problem differ


def test_query_aware_puts_the_question_in_the_compressed_context(tiny_model_dir, tmp_path):
    base = ["--model", tiny_model_dir, "--press", "snapkv", "--compression_ratio", "0.5", *QUICK]
    agnostic = cli(*base, "--output_dir", str(tmp_path / "agnostic"))
    aware = cli(*base, "--query_aware", "--output_dir", str(tmp_path / "aware"))
    assert agnostic.returncode == aware.returncode == 0, aware.stderr
    plain = {r["sample_id"]: r for r in predictions(next((tmp_path / "agnostic").iterdir()))}
    inside = {r["sample_id"]: r for r in predictions(next((tmp_path / "aware").iterdir()))}
    assert plain.keys() == inside.keys()
    for sample_id, row in inside.items():
        assert row["context_length"] > plain[sample_id]["context_length"]  # the question moved into the context
        assert row["question_length"] < plain[sample_id]["question_length"]
    assert next((tmp_path / "agnostic").iterdir()).name != next((tmp_path / "aware").iterdir()).name


# --------------------------------------------------------------------------------------------------------------------
# Configuration and bad input
# --------------------------------------------------------------------------------------------------------------------


def test_precedence_defaults_then_yaml_then_cli(tmp_path):
    config_file = tmp_path / "sweep.yaml"
    config_file.write_text("press: [knorm, snapkv]\ncompression_ratio: [0.25, 0.5]\nmax_samples: 7\nseed: 1\n")
    config = resolve_config(str(config_file), seed=5, compression_ratio="0.75")
    assert config.press == ["knorm", "snapkv"]  # YAML over defaults
    assert config.max_samples == 7
    assert config.compression_ratio == [0.75] and config.seed == 5  # CLI over YAML
    assert config.dataset == EvalConfig().dataset  # untouched default


def test_help_explains_every_flag():
    text = help_text()
    for name in EvalConfig.__dataclass_fields__:
        assert f"--{name}" in text


@pytest.mark.parametrize("args, message", [
    (["--press", "knrom"], "did you mean knorm"),
    (["--dataset", "rulr"], "did you mean ruler"),
    (["--ruler_tasks", "niah_singel_1"], "Did you mean 'niah_single_1'"),
    (["--press", "knorm", "--threshold", "-4"], "--threshold is not taken by knorm"),
    (["--press", "kvzap_mlp", "--compression_ratio", "0.5"], "--compression_ratio is not taken by kvzap_mlp"),
    (["--compression_ratio", "1.5"], "[0, 1)"),
    (["--data_files", "ruler=/no/such/file.jsonl"], "does not exist"),
    (["--model", "/no/such/model"], "model path '/no/such/model' does not exist"),
    (["--pres", "knorm"], "did you mean --press"),
    (["--ruler_tasks", "qa_1"], "--squad_path"),
    (["--engine", "fast"], "--engine must be batched or sequential"),
    (["--batch_size", "0"], "--batch_size must be a positive integer"),
    (["--batch_size", "many"], "--batch_size takes a whole number"),
])
def test_bad_input_is_one_line_exit_2_and_creates_nothing(args, message, tmp_path, monkeypatch, capsys):
    out = tmp_path / "results"
    monkeypatch.setattr(sys, "argv", ["kvpress-eval", *args, "--output_dir", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("kvpress-eval: error:") and message in error, error
    assert not out.exists()


def test_unreadable_yaml_and_malformed_local_file(tiny_model_dir, tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("press: [knorm\n")
    result = cli("--config", str(bad_yaml), "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 2 and "not valid YAML" in result.stderr and "Traceback" not in result.stderr

    no_question = tmp_path / "data.jsonl"
    no_question.write_text(json.dumps({"context": "text", "answer": ["x"]}) + "\n")
    result = cli("--model", tiny_model_dir, "--press", "no_press", "--dataset", "longbench", "--data_files",
                 str(no_question), "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    assert "no 'question' column" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_finished_run_is_never_overwritten_by_bad_input(sweep, tmp_path):
    _, out = sweep
    before = {name: (folder / PREDICTIONS_FILE).read_bytes() for name, folder in runs(out).items()}
    result = cli("--press", "knorm,random", "--compression_ratio", "0.25,1.0", "--output_dir", str(out))
    assert result.returncode == 2
    assert {name: (folder / PREDICTIONS_FILE).read_bytes() for name, folder in runs(out).items()} == before


def test_random_press_predictions_do_not_depend_on_what_ran_before(tmp_path):
    base = ["--model", "kvtiny", "--press", "random", "--compression_ratio", "0.5", "--ruler_length", "600",
            "--max_samples", "4"]
    alone = cli(*base, "--ruler_tasks", "vt", "--output_dir", str(tmp_path / "alone"))
    after = cli(*base, "--ruler_tasks", "niah_single_1,vt", "--output_dir", str(tmp_path / "after"))
    assert alone.returncode == after.returncode == 0, after.stderr
    first = {r["sample_id"]: r["prediction"] for r in predictions(next((tmp_path / "alone").iterdir()))}
    second = {r["sample_id"]: r["prediction"] for r in predictions(next((tmp_path / "after").iterdir()))}
    assert first == {key: value for key, value in second.items() if key.startswith("vt")}


def test_run_ids_follow_the_weights_and_surrogates_of_a_local_model(tiny_model_dir, tmp_path):
    from evaluation.models import model_fingerprint

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    before = model_fingerprint(str(folder))
    assert model_fingerprint(str(folder)) == before
    (folder / "kvzap-mlp").mkdir()
    (folder / "kvzap-mlp" / "config.json").write_text('{"model_type": "kvzap"}')
    with_surrogate = model_fingerprint(str(folder))
    assert with_surrogate != before  # a retrained surrogate never resumes runs made with the old one
    assert model_fingerprint("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"
