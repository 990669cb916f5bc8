"""``kvpress-eval compare``: passes on identical results, fails on a drop beyond tolerance and on a missing run."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from evaluation.cli import main
from evaluation.compare import compare, read_cells, save_baseline


def write_run(root: Path, press: str, knob: str | None, value: float | None, scores: dict[str, float],
              compression: float) -> Path:
    """A finished run folder as kvpress-eval writes it (config.yaml + metrics.json)."""
    point = f"{knob}={value}" if knob else "default"
    folder = root / f"kvtiny__ruler__{press}__{point}__0123456789ab"
    folder.mkdir(parents=True)
    config = {"run": {"model": "kvtiny", "dataset": "ruler"}, "press": press, (knob or "knob"): value}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    metrics = {"per_task": {task: {"string_match_all": score} for task, score in scores.items()},
               "metric": {task: "string_match_all" for task in scores},
               "overall": sum(scores.values()) / len(scores), "compression_ratio": compression}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


@pytest.fixture
def baseline(tmp_path) -> Path:
    root = tmp_path / "baseline"
    write_run(root, "no_press", None, None, {"niah_single_1": 100.0, "vt": 80.0}, 0.0)
    write_run(root, "knorm", "compression_ratio", 0.5, {"niah_single_1": 90.0, "vt": 60.0}, 0.5)
    write_run(root, "kvzap_mlp", "threshold", -4.0, {"niah_single_1": 95.0, "vt": 70.0}, 0.62)
    return root


def run_compare(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["kvpress-eval", "compare", *args])
    code = 0
    try:
        main()
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_identical_results_pass(baseline, monkeypatch, capsys):
    code, out, _ = run_compare(monkeypatch, capsys, "--baseline", str(baseline), "--results", str(baseline))
    assert code == 0
    assert "9 cells, 9 ok, 0 dropped" in out


def test_a_drop_beyond_tolerance_fails_and_names_the_cell(baseline, tmp_path, monkeypatch, capsys):
    results = tmp_path / "now"
    shutil.copytree(baseline, results)
    shutil.rmtree(next(results.glob("*knorm*")))
    write_run(results, "knorm", "compression_ratio", 0.5, {"niah_single_1": 70.0, "vt": 58.0}, 0.5)
    code, out, err = run_compare(monkeypatch, capsys, "--baseline", str(baseline), "--results", str(results),
                                 "--tolerance", "5")
    assert code == 1 and "regression" in err
    failing = [line for line in out.splitlines() if line.endswith("DROP")]
    assert len(failing) == 2  # niah_single_1 (-20) and overall (-11); vt (-2) is within tolerance
    assert any("knorm" in line and "compression_ratio=0.5" in line and "niah_single_1" in line
               and "-20.00" in line for line in failing)
    assert any(line.split()[4] == "vt" and line.endswith("ok") and "knorm" in line for line in out.splitlines())
    # A looser tolerance lets the same results pass.
    code, _, _ = run_compare(monkeypatch, capsys, "--baseline", str(baseline), "--results", str(results),
                             "--tolerance", "25")
    assert code == 0


def test_a_missing_run_fails(baseline, tmp_path, monkeypatch, capsys):
    results = tmp_path / "now"
    shutil.copytree(baseline, results)
    shutil.rmtree(next(results.glob("*kvzap_mlp*")))
    code, out, _ = run_compare(monkeypatch, capsys, "--baseline", str(baseline), "--results", str(results))
    assert code == 1
    missing = [line for line in out.splitlines() if line.endswith("MISSING")]
    assert len(missing) == 3 and all("kvzap_mlp" in line and "threshold=-4.0" in line for line in missing)


def test_new_runs_are_reported_but_do_not_fail(baseline, tmp_path):
    results = tmp_path / "now"
    shutil.copytree(baseline, results)
    write_run(results, "snapkv", "compression_ratio", 0.5, {"niah_single_1": 99.0, "vt": 70.0}, 0.5)
    table, passed = compare(baseline, results)
    assert passed and "NEW" in table


def test_baseline_file_round_trip(baseline, tmp_path):
    path = tmp_path / "baseline.json"
    assert save_baseline(baseline, path) == 9
    assert read_cells(path) == read_cells(baseline)
    table, passed = compare(path, baseline, tolerance=0)
    assert passed


def test_compression_delta_is_shown(baseline, tmp_path):
    results = tmp_path / "now"
    results.mkdir()
    write_run(results, "kvzap_mlp", "threshold", -4.0, {"niah_single_1": 95.0, "vt": 70.0}, 0.52)
    table, _ = compare(baseline, results)
    row = next(line for line in table.splitlines() if "kvzap_mlp" in line and "overall" in line)
    assert "-10.00" in row  # achieved compression fell from 62% to 52%


@pytest.mark.parametrize("args, message", [
    (["--baseline", "/no/such/baseline"], "does not exist"),
    (["--results", "/tmp"], "needs --baseline"),
    (["--baseline", "BASE", "--tolerance", "-1"], "--tolerance must be >= 0"),
])
def test_bad_input(args, message, baseline, monkeypatch, capsys):
    args = [str(baseline) if arg == "BASE" else arg for arg in args]
    code, _, err = run_compare(monkeypatch, capsys, *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
