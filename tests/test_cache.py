"""The predictions cache survives kills: at most the sample in flight is lost, none is duplicated or trusted wrong."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from evaluation.cache import CacheError, PredictionCache, run_folder_name, run_id, write_json_atomically


def test_append_and_load_round_trip(tmp_path):
    cache = PredictionCache(tmp_path / "run")
    assert cache.load() == {}
    for i in range(3):
        cache.append({"sample_id": f"s{i}", "prediction": f"answer {i} ü", "score": None})
    loaded = cache.load()
    assert list(loaded) == ["s0", "s1", "s2"] and loaded["s1"]["prediction"] == "answer 1 ü"


def test_interrupted_last_line_is_cut_off_and_the_sample_redone(tmp_path):
    cache = PredictionCache(tmp_path)
    cache.append({"sample_id": "a", "prediction": "x"})
    cache.append({"sample_id": "b", "prediction": "y"})
    good_size = cache.path.stat().st_size
    with cache.path.open("ab") as handle:
        handle.write(b'{"sample_id": "c", "predic')  # killed mid-write
    assert list(cache.load()) == ["a", "b"]
    assert cache.path.stat().st_size == good_size  # repaired on disk
    cache.append({"sample_id": "c", "prediction": "z"})
    assert list(cache.load()) == ["a", "b", "c"]


def test_complete_but_unterminated_last_line_is_not_trusted(tmp_path):
    cache = PredictionCache(tmp_path)
    cache.append({"sample_id": "a", "prediction": "x"})
    with cache.path.open("ab") as handle:
        handle.write(b'{"sample_id": "b", "prediction": "y"}')
    assert list(cache.load()) == ["a"]


def test_garbage_last_line_is_cut_off(tmp_path):
    cache = PredictionCache(tmp_path)
    cache.append({"sample_id": "a", "prediction": "x"})
    with cache.path.open("ab") as handle:
        handle.write(b"\x00\x00garbage\n")
    assert list(cache.load()) == ["a"]
    assert cache.path.read_bytes().endswith(b"}\n")


def test_corrupt_line_in_the_middle_is_an_error_that_names_the_fix(tmp_path):
    cache = PredictionCache(tmp_path)
    cache.append({"sample_id": "a", "prediction": "x"})
    with cache.path.open("ab") as handle:
        handle.write(b"not json\n")
    cache.append({"sample_id": "b", "prediction": "y"})
    before = cache.path.read_bytes()
    with pytest.raises(CacheError) as error:
        cache.load()
    message = str(error.value)
    assert "line 2" in message and "--overwrite" in message and "\n" not in message
    assert cache.path.read_bytes() == before  # nothing repaired behind the user's back


def test_duplicate_sample_keeps_the_first_record(tmp_path):
    cache = PredictionCache(tmp_path)
    cache.append({"sample_id": "a", "prediction": "first"})
    cache.append({"sample_id": "a", "prediction": "second"})
    assert cache.load()["a"]["prediction"] == "first"


WRITER = """
import sys, time
from evaluation.cache import PredictionCache
cache = PredictionCache(sys.argv[1])
done = cache.load()
for i in range(100000):
    if f"s{i}" in done:
        continue
    cache.append({"sample_id": f"s{i}", "prediction": "x" * (i % 5000)})
"""


def test_kill_minus_nine_at_random_moments_loses_at_most_the_sample_in_flight(tmp_path):
    folder = tmp_path / "run"
    path = PredictionCache(folder).path
    for delay in (0.05, 0.2, 0.01, 0.1):
        before = path.stat().st_size if path.exists() else 0
        process = subprocess.Popen([sys.executable, "-c", WRITER, str(folder)])
        deadline = time.time() + 60
        while (not path.exists() or path.stat().st_size <= before) and time.time() < deadline:
            time.sleep(0.01)  # the writer is running and appending (start-up time varies with machine load)
        time.sleep(delay)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        records = PredictionCache(folder).load()
        ids = [int(sample_id[1:]) for sample_id in records]
        assert ids == list(range(len(ids)))  # no gap, no duplicate, in order
        lines = PredictionCache(folder).path.read_bytes().split(b"\n")
        assert lines[-1] == b"" and all(json.loads(line) for line in lines[:-1])
    assert len(ids) > 0


def test_run_id_is_a_pure_function_of_the_identity():
    identity = {"model": "m", "press": {"name": "knorm", "compression_ratio": 0.5}, "seed": 0}
    same = {"seed": 0, "press": {"compression_ratio": 0.5, "name": "knorm"}, "model": "m"}
    assert run_id(identity) == run_id(same)
    assert run_id(identity) != run_id({**identity, "seed": 1})
    name = run_folder_name("Qwen/Qwen3-8B", "ruler", "knorm", "compression_ratio", 0.5, identity)
    assert name == f"Qwen--Qwen3-8B__ruler__knorm__compression_ratio=0.5__{run_id(identity)}"


def test_json_written_atomically(tmp_path):
    write_json_atomically(tmp_path / "a" / "metrics.json", {"b": 1, "a": 2})
    assert json.loads((tmp_path / "a" / "metrics.json").read_text()) == {"a": 2, "b": 1}
    assert not list((tmp_path / "a").glob("*.tmp"))
