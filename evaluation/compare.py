"""``kvpress-eval compare``: compare results with a baseline, cell by cell; fail on a drop or a missing run.

A cell is (model, dataset, press, point, task), plus an ``overall`` task per run. Both sides are read from run
folders (``config.yaml`` + ``metrics.json``) or from a baseline file written by ``--save`` (the same cells as JSON),
so a committed baseline can be a few kilobytes. A cell fails when its score drops by more than ``tolerance`` points
or when a baseline run has no counterpart; cells only in the results are reported as new and do not fail.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from evaluation.cache import CONFIG_FILE, METRICS_FILE, write_json_atomically
from evaluation.config import ConfigError
from presses.registry import KNOBS

DEFAULT_TOLERANCE = 5.0  # points; see the README's "Regression sweeps" for the measured run-to-run noise
BASELINE_FORMAT = "kvpress-eval-baseline-1"


@dataclass(frozen=True)
class Cell:
    """One score of one run: ``task`` is a task name or ``overall``; scores and compression are percentages."""

    model: str
    dataset: str
    press: str
    point: str
    task: str
    score: float
    compression: float | None

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        return self.model, self.dataset, self.press, self.point, self.task


def run_cells(folder: Path) -> list[Cell]:
    """The cells of one finished run folder."""
    resolved = yaml.safe_load((folder / CONFIG_FILE).read_text())
    metrics = json.loads((folder / METRICS_FILE).read_text())
    run, press = resolved["run"], resolved["press"]
    knob = next((k for k in KNOBS if k in resolved), None)
    point = f"{knob}={resolved[knob]}" if knob else "default"
    model = Path(str(run["model"])).name
    compression = metrics.get("compression_ratio")
    compression = None if compression is None else 100 * compression
    cells = [Cell(model, run["dataset"], press, point, "overall", float(metrics["overall"]), compression)]
    for task, scores in sorted(metrics["per_task"].items()):
        cells.append(Cell(model, run["dataset"], press, point, task, float(scores[metrics["metric"][task]]),
                          compression))
    return cells


def read_cells(source: str | Path | list) -> dict[tuple, Cell]:
    """Cells of a folder of runs or of a baseline file, or of several folders read as one (a sweep's shards); two runs
    with the same (model, dataset, press, point) are an error, since the comparison would be ambiguous."""
    if isinstance(source, (list, tuple)):
        merged: dict[tuple, Cell] = {}
        for one in source:
            for key, cell in read_cells(one).items():
                if key in merged:
                    raise ConfigError(f"'{one}' and another results folder both hold {'/'.join(key[:4])}: keep one "
                                      "run per press and point across the folders you compare")
                merged[key] = cell
        return merged
    path = Path(source)
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            cells = [Cell(**cell) for cell in data["cells"]]
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"'{source}' is not a baseline file written by kvpress-eval compare --save") from None
    elif path.is_dir():
        cells = [cell for metrics in sorted(path.rglob(METRICS_FILE)) if (metrics.parent / CONFIG_FILE).is_file()
                 for cell in run_cells(metrics.parent)]
    else:
        raise ConfigError(f"'{source}' does not exist: give a results folder or a baseline file")
    by_key: dict[tuple, Cell] = {}
    for cell in cells:
        if cell.key in by_key:
            raise ConfigError(f"'{source}' holds two runs for {'/'.join(cell.key[:4])}: keep one run per press "
                              "and point in a folder you compare")
        by_key[cell.key] = cell
    return by_key


def save_baseline(results: str | Path | list, path: str | Path) -> int:
    """Write the cells of ``results`` as a baseline file; returns the number of cells."""
    cells = read_cells(results)
    if not cells:
        raise ConfigError(f"no finished runs under '{results}': nothing to save as a baseline")
    write_json_atomically(path, {"format": BASELINE_FORMAT, "cells": [asdict(c) for c in sorted(
        cells.values(), key=lambda c: c.key)]})
    return len(cells)


@dataclass(frozen=True)
class Row:
    key: tuple[str, str, str, str, str]
    baseline: float | None
    now: float | None
    compression_delta: float | None
    status: str  # ok, DROP, MISSING, NEW

    @property
    def delta(self) -> float | None:
        return None if self.baseline is None or self.now is None else self.now - self.baseline


def compare_cells(baseline: dict[tuple, Cell], results: dict[tuple, Cell], tolerance: float) -> list[Row]:
    rows = []
    for key in sorted(set(baseline) | set(results)):
        old, new = baseline.get(key), results.get(key)
        if new is None:
            rows.append(Row(key, old.score, None, None, "MISSING"))
        elif old is None:
            rows.append(Row(key, None, new.score, None, "NEW"))
        else:
            compression = (None if old.compression is None or new.compression is None
                           else new.compression - old.compression)
            status = "DROP" if new.score < old.score - tolerance else "ok"
            rows.append(Row(key, old.score, new.score, compression, status))
    return rows


def format_table(rows: list[Row]) -> str:
    def number(value: float | None, signed: bool = False) -> str:
        return "-" if value is None else f"{value:+.2f}" if signed else f"{value:.2f}"

    header = (f"{'model':<12} {'dataset':<11} {'press':<20} {'point':<24} {'task':<16} {'baseline':>8} {'now':>7} "
              f"{'delta':>7} {'d(compr)':>8}  status")
    lines = [header]
    for row in rows:
        model, dataset, press, point, task = row.key
        lines.append(f"{model:<12} {dataset:<11} {press:<20} {point:<24} {task:<16} {number(row.baseline):>8} "
                     f"{number(row.now):>7} {number(row.delta, True):>7} {number(row.compression_delta, True):>8}  "
                     f"{row.status}")
    return "\n".join(lines)


def compare(baseline: str | Path, results: str | Path | list, tolerance: float = DEFAULT_TOLERANCE) -> tuple[str, bool]:
    """(table, passed): passed is False when a cell dropped by more than ``tolerance`` or a baseline run is missing."""
    if tolerance < 0:
        raise ConfigError(f"--tolerance must be >= 0 points, got {tolerance}")
    old = read_cells(baseline)
    if not old:
        raise ConfigError(f"no finished runs in baseline '{baseline}'")
    rows = compare_cells(old, read_cells(results), tolerance)
    failures = [row for row in rows if row.status in ("DROP", "MISSING")]
    summary = (f"\n{len(rows)} cells, {sum(r.status == 'ok' for r in rows)} ok, "
               f"{sum(r.status == 'DROP' for r in rows)} dropped by more than {tolerance} points, "
               f"{sum(r.status == 'MISSING' for r in rows)} missing, {sum(r.status == 'NEW' for r in rows)} new")
    return format_table(rows) + summary, not failures
