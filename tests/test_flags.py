"""Every flag of every command is checked before anything heavy runs: bad input is one line, exit code 2, and
touches no folder. Provenance only grows when a cached run is resumed with other settings."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from evaluation.cache import CONFIG_FILE, METRICS_FILE
from evaluation.cli import main
from evaluation.config import default_num_threads, resolve_config
from evaluation.executors import run_sweep
from evaluation.runner import results_table

HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


def fails_cleanly(argv: list[str], message: str, capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["kvpress-eval", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    assert exit_info.value.code == 2, captured
    lines = captured.err.strip().splitlines()
    assert lines and lines[-1].startswith("kvpress-eval: error:") and message in lines[-1], captured.err
    assert "Traceback" not in captured.err


@pytest.fixture
def folders(tmp_path) -> dict[str, Path]:
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a folder")
    empty = tmp_path / "empty-model"
    empty.mkdir()
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text("{}")
    return {"file": a_file, "empty": empty, "no_tokenizer": no_tokenizer, "out": tmp_path / "out"}


SWEEP_CASES = [
    (["--max_samples", "abc"], "--max_samples takes a whole number"),
    (["--max_samples", "-3"], "--max_samples must be at least 1"),
    (["--max_samples", ""], "--max_samples takes a whole number"),
    (["--max_samples", "[1,2]"], "--max_samples takes one number"),
    (["--seed", "1.5"], "--seed takes a whole number"),
    (["--seed", "None"], "--seed needs a value"),
    (["--temperature", "hot"], "--temperature takes a number"),
    (["--temperature", "0"], "--temperature must be above 0"),
    (["--top_p", "2"], "--top_p must be in (0, 1]"),
    (["--max_new_tokens", "0"], "--max_new_tokens must be at least 1"),
    (["--max_context_length", "-5"], "--max_context_length must be at least 1"),
    (["--ruler_length", "long"], "--ruler_length takes whole numbers"),
    (["--compression_ratio", "half"], "--compression_ratio takes numbers"),
    (["--query_aware", "maybe"], "--query_aware is a switch"),
    (["--dtype", ""], "--dtype is empty"),
    (["--model", ""], "--model is empty"),
    (["--press", ""], "no press given"),
    (["--press", "knorm", "stray", "words"], "unexpected argument 'words'"),
    (["--executor", "dask"], "--executor must be local or ray"),
    (["--ray_address", "auto"], "--ray_address and --workers need --executor ray"),
    (["--shard", "2/2"], "--shard takes i/n"),
    (["--shard", "first"], "--shard takes i/n"),
    (["--num_threads", "0"], "--num_threads must be at least 1"),
    (["--executor", "ray", "--ray_address", "127.0.0.1:1"], "nothing answers there"),
    (["--executor", "ray", "--ray_address", "head-node"], "--ray_address takes auto, HOST:PORT"),
    (["--device", "gpu7"], "is not a device"),
    (["--attn_implementation", "flash"], "--attn_implementation must be sdpa, eager"),
]


@pytest.mark.parametrize("args, message", SWEEP_CASES)
def test_bad_sweep_flags(args, message, folders, capsys, monkeypatch):
    fails_cleanly([*args, "--output_dir", str(folders["out"])], message, capsys, monkeypatch)
    assert not folders["out"].exists()


def test_ray_executor_without_ray_installed(folders, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the [ray] extra were not installed
    fails_cleanly(["--executor", "ray", "--output_dir", str(folders["out"])], "pip install -e '.[ray]'", capsys,
                  monkeypatch)
    assert not folders["out"].exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu(folders, capsys, monkeypatch):
    fails_cleanly(["--device", "cuda", "--output_dir", str(folders["out"])], "has no CUDA GPU", capsys, monkeypatch)
    assert not folders["out"].exists()


@pytest.mark.skipif(HAS_FLASH_ATTN, reason="flash-attn is installed")
def test_flash_attention_not_installed(folders, capsys, monkeypatch):
    fails_cleanly(["--attn_implementation", "flash_attention_2", "--output_dir", str(folders["out"])],
                  "needs the 'flash_attn' package", capsys, monkeypatch)
    assert not folders["out"].exists()


@pytest.mark.parametrize("which, message", [("empty", "has no config.json"), ("no_tokenizer", "has no tokenizer")])
def test_model_folder_without_config_or_tokenizer(which, message, folders, capsys, monkeypatch):
    fails_cleanly(["--model", str(folders[which]), "--output_dir", str(folders["out"])], message, capsys, monkeypatch)
    assert not folders["out"].exists()


def test_output_folder_that_cannot_be_created(folders, capsys, monkeypatch):
    fails_cleanly(["--output_dir", str(folders["file"] / "runs")], "cannot be created", capsys, monkeypatch)
    fails_cleanly(["--output_dir", str(folders["file"])], "is a file", capsys, monkeypatch)
    assert folders["file"].read_text() == "not a folder"


@pytest.mark.parametrize("word", ["null", "None", "all", "ALL", "~"])
def test_max_samples_null_none_all_mean_every_sample(word, tmp_path):
    assert resolve_config(None, max_samples=word).max_samples is None
    (tmp_path / "sweep.yaml").write_text("max_samples: null\n")
    assert resolve_config(str(tmp_path / "sweep.yaml")).max_samples is None


COMMAND_CASES = [
    (["compare", "--baseline", "results/baseline", "--tolerance", "abc"], "--tolerance takes a number"),
    (["compare", "--baslin", "x"], "unknown flag --baslin: did you mean --baseline?"),
    (["compare", "--baseline", "results/baseline", "--results", "/no/such/runs"], "does not exist"),
    (["compare", "a", "b", "c", "d", "e"], "unexpected argument 'e'"),
    (["leaderboard", "--results", "/no/such/runs"], "is not a folder of results"),
    (["leaderboard", "--results", ""], "--results takes a folder"),
    (["leaderboard", "--out", "{file}/site"], "--out '{file}/site' cannot be created"),
    (["smoke", "--context_length", "abc"], "--context_length takes a whole number"),
    (["smoke", "--compression_ratio", "2"], "--compression_ratio must be in [0, 1)"),
    (["export", "--out", "{file}/x"], "cannot be created"),
    (["export", "--results", "/no/such/runs"], "is not a folder of results"),
    (["import", "--source", "/no/such/runs", "--output_dir", "{out}"], "is not a folder of results"),
    (["import", "--source", "results", "--output_dir", "{file}"], "is a file"),
    (["train-kvzap", "--output_dir", "{out}", "--epochs", "abc"], "--epochs takes a whole number"),
    (["train-kvzap", "--output_dir", "{out}", "--n_texts", "-1"], "must be positive"),
    (["train-kvzap", "--output_dir", "{out}", "--dtype", "int8"], "--dtype must be"),
    (["train-kvzap", "--output_dir", "{out}", "--model", "{empty}"], "has no config.json"),
    (["train-kvzap", "--output_dir", "{file}/x"], "cannot be created"),
    (["train-kvzap", "--output_dir", "{out}", "--device", "gpu7"], "is not a device"),
    (["presses", "--verbose"], "unknown flag --verbose"),
    (["presses", "extra"], "unexpected argument 'extra'"),
    (["frobnicate"], "unknown command 'frobnicate'"),
]


@pytest.mark.parametrize("argv, message", COMMAND_CASES)
def test_bad_flags_of_every_command(argv, message, folders, capsys, monkeypatch):
    names = {name: str(path) for name, path in folders.items()}
    fails_cleanly([arg.format(**names) for arg in argv], message.format(**names), capsys, monkeypatch)
    assert not folders["out"].exists()


def test_default_threads_avoid_oversubscription(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_num_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr("os.sched_getaffinity", lambda _: set(range(8)), raising=False)
    assert default_num_threads() == 4 and default_num_threads(workers_here=2) == 2
    monkeypatch.setattr("os.sched_getaffinity", lambda _: {0, 1}, raising=False)
    assert default_num_threads() == 1  # a shared 2-core machine: one thread (measured 2x faster than two)


def test_provenance_only_grows(tiny_model_dir, tmp_path):
    base = dict(model=tiny_model_dir, press="knorm", compression_ratio="0.5", ruler_length=320,
                ruler_tasks="niah_single_1", max_new_tokens=3, output_dir=str(tmp_path), num_threads=1)
    run_sweep(resolve_config(None, **base, max_samples=3))
    folder = next(tmp_path.iterdir())
    first = yaml.safe_load((folder / CONFIG_FILE).read_text())
    assert first["resumes"] == [] and first["config"]["max_samples"] == 3

    results = run_sweep(resolve_config(None, **base, max_samples=2, seed=0))
    resumed = yaml.safe_load((folder / CONFIG_FILE).read_text())
    assert resumed["started"] == first["started"] and resumed["config"] == first["config"]  # never rewritten
    assert len(resumed["resumes"]) == 1
    assert resumed["resumes"][0]["cached"] == 3 and resumed["resumes"][0]["flags"]["max_samples"] == 2
    metrics = json.loads((folder / METRICS_FILE).read_text())
    assert metrics["samples"]["n_scored"] == 3 and metrics["samples"]["n_asked"] == 2
    assert metrics["samples"]["n_beyond_asked"] == 1 and len(metrics["samples"]["ids"]) == 3
    table = results_table(results)
    assert "cache holds 3 samples, 2 asked: scored all 3" in table

    run_sweep(resolve_config(None, **base, max_samples=3))
    again = yaml.safe_load((folder / CONFIG_FILE).read_text())
    assert len(again["resumes"]) == 2 and again["started"] == first["started"]
    assert json.loads((folder / METRICS_FILE).read_text())["samples"]["n_beyond_asked"] == 0
