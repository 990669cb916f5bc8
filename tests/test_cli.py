"""The kvpress-eval command as a user runs it."""

from __future__ import annotations

import subprocess
import sys

from presses import PRESSES


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evaluation.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_presses_lists_the_registry():
    result = run_cli("presses")
    assert result.returncode == 0, result.stderr
    for name, spec in PRESSES.items():
        assert any(line.split()[:2] == [name, spec.knob or "-"] for line in result.stdout.splitlines()), name


def test_smoke_run_reports_every_press():
    result = run_cli("smoke", "--context_length", "160", "--compression_ratio", "0.5", "--threshold", "0")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:]}
    assert float(rows["knorm"][2]) == 0.5
    assert float(rows["no_press"][2]) == 0.0
    assert 0 < float(rows["kvzap_mlp"][2]) < 1


def test_bad_ratio_is_a_one_line_error():
    result = run_cli("smoke", "--context_length", "50", "--compression_ratio", "1.5")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "[0, 1)" in result.stderr
    assert "Traceback" not in result.stderr
