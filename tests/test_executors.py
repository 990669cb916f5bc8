"""Where cells run: ``--shard i/n`` slices and ``--executor ray`` on a local 2-worker CPU cluster give exactly the
files of one local run, and a Ray worker killed in the middle of a cell is retried as a resume."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import without_timings

from evaluation.cache import METRICS_FILE, PREDICTIONS_FILE
from evaluation.compare import compare
from evaluation.config import resolve_config
from evaluation.executors import run_sweep, shard_cells
from evaluation.runner import sweep_grid
from leaderboard.results import read_results

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = 6


def settings(model: str, out: Path, **extra):
    return resolve_config(None, model=model, press="knorm,random", compression_ratio="0.25,0.75",
                          ruler_length=320, ruler_tasks="niah_single_1", max_samples=SAMPLES, max_new_tokens=12,
                          output_dir=str(out), num_threads=1,
                          # one answer at a time: a cell fills its file gradually (so a kill can land mid-cell) and in
                          # the same order whichever cells share a worker (so files compare byte for byte)
                          batch_size=1, **extra)


def files(out: Path) -> dict[str, tuple[list, dict]]:
    """Every run folder's predictions (in file order) and metrics, by folder name, less the wall-clock times
    that no two runs share."""
    def untimed(line: str) -> dict:
        return {k: v for k, v in json.loads(line).items() if k not in ("prefill_seconds", "decode_seconds")}

    return {folder.name: ([untimed(line) for line in (folder / PREDICTIONS_FILE).read_text().splitlines()],
                          without_timings(json.loads((folder / METRICS_FILE).read_text())))
            for folder in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "runs"
    run_sweep(settings(tiny_model_dir, out))
    return out


def test_shards_together_are_the_whole_sweep(tiny_model_dir, reference, tmp_path):
    grid = sweep_grid(settings(tiny_model_dir, tmp_path))
    shards = [shard_cells(grid, i, 3) for i in range(3)]
    assert sorted(map(repr, sum(shards, []))) == sorted(map(repr, grid))  # disjoint, complete, deterministic
    for i in range(2):
        run_sweep(settings(tiny_model_dir, tmp_path / f"shard{i}", shard=f"{i}/2"))
    first, second = files(tmp_path / "shard0"), files(tmp_path / "shard1")
    assert len(first) == len(second) == 2 and not first.keys() & second.keys()
    assert {**first, **second} == files(reference)
    table, passed = compare(reference, [tmp_path / "shard0", tmp_path / "shard1"], tolerance=0)
    assert passed and table.splitlines()[-1].startswith("8 cells, 8 ok")  # overall + 1 task per run
    assert len(read_results([tmp_path / "shard0", tmp_path / "shard1"]).runs) == 4


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, object_store_memory=80 * 2**20, include_dashboard=False, logging_level=logging.WARNING,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}})
    yield ray
    ray.shutdown()


def busy_workers() -> list[int]:
    """Ray worker processes of this test run (descendants of this process) in the middle of a chunk of cells."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" (", 1)
            children.setdefault(int(rest.rsplit(") ", 1)[1].split()[1]), []).append(int(pid))
        except (OSError, IndexError, ValueError):
            continue
    found, stack = [], [os.getpid()]
    while stack:
        for child in children.get(stack.pop(), []):
            stack.append(child)
            try:
                title = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if title.startswith(b"ray::CellWorker.run_chunk"):
                found.append(child)
    return found


def test_ray_writes_what_a_local_run_writes_even_when_a_worker_is_killed_mid_cell(ray_cluster, tiny_model_dir,
                                                                                  reference, tmp_path, caplog):
    """Two CPU workers on a local cluster; one is killed (SIGKILL) while a cell is half done. (One Ray run serves
    both claims: worker start-up dominates the time on a small CI machine.)"""
    out = tmp_path / "ray"
    killed: list[int] = []

    def kill_one_mid_cell():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            for path in out.glob(f"*/{PREDICTIONS_FILE}") if out.exists() else []:
                lines = path.read_bytes().count(b"\n")
                busy = busy_workers()
                if 1 <= lines < SAMPLES and busy:  # a cell half done: kill every busy worker, its writer included
                    for pid in busy:
                        os.kill(pid, signal.SIGKILL)
                    killed.append(lines)
                    return
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_one_mid_cell)
    watcher.start()
    with caplog.at_level(logging.WARNING, logger="kvpress-eval"):
        results = run_sweep(settings(tiny_model_dir, out, executor="ray", workers=2))
    watcher.join()
    assert [r.spec for r in results] == sweep_grid(settings(tiny_model_dir, tmp_path))  # in sweep order
    assert killed, "no worker was caught in the middle of a cell"
    assert "retrying on a new worker" in caplog.text
    assert files(out) == files(reference)  # line for line: nothing lost, nothing duplicated, same numbers
    for folder in out.iterdir():
        assert len({json.loads(line)["sample_id"] for line in (folder / PREDICTIONS_FILE).read_text().splitlines()}) \
            == SAMPLES
