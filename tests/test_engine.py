"""The sweep engine (one prefill per context, batched decoding) against the one-at-a-time path, on the embedded model.

Each test runs the same cells both ways and requires the same predictions: greedy answers token for token, sampled
answers draw for draw (seeded per row), and the same achieved compression.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import without_timings
from tqdm import tqdm

from evaluation.cache import PREDICTIONS_FILE, PredictionCache
from evaluation.config import EvalConfig
from evaluation.datasets.registry import load_records
from evaluation.engine import PreparedRun, engine_refusal, execute, execute_sequentially
from evaluation.models import load_model
from evaluation.runner import memory_and_speed
from presses import (
    PRESSES,
    AdaKVPress,
    DecodingPress,
    DMSPress,
    KnormPress,
    KVzapPress,
    KVzipPress,
    RandomPress,
    SnapKVPress,
    StreamingLLMPress,
    build_press,
    generation,
)

ROOT = Path(__file__).resolve().parent.parent
BASE = EvalConfig(ruler_length=512, ruler_tasks=["niah_single_1", "vt"], max_samples=2, max_new_tokens=24)


@pytest.fixture(scope="module")
def kvtiny():
    return load_model("kvtiny", "cpu", "float32", "sdpa")


def answers(kvtiny, tmp_path: Path, factories: dict, config: EvalConfig, engine: str,
            fields: tuple[str, ...] = ("prediction", "compression_ratio", "answer_compression_ratio")) -> dict:
    """{cell: {sample_id: (prediction, compression_ratio, answer_compression_ratio)}} for one engine (or the
    ``fields`` asked for)."""
    model, tokenizer = kvtiny
    records = load_records("ruler", config, tokenizer)
    runs = [PreparedRun(name, name, "ruler", factory(), tmp_path / engine / name,
                        PredictionCache(tmp_path / engine / name), {}, factory)
            for name, factory in factories.items()]
    for run in runs:
        with run.press(model, tokenizer):  # as the runner does: fail early, load what the press loads once
            pass
    with tqdm(disable=True) as progress:
        shared = [run for run in runs
                  if engine == "batched" and engine_refusal(model, run.press, config.kv_storage) is None]
        if shared:
            execute(model, tokenizer, records, shared, config, progress)
        for run in runs:
            if run not in shared:  # as the runner does: one context at a time
                execute_sequentially(model, tokenizer, records, run, config, progress)
    return {run.label: {key: tuple(round(p[f], 6) if isinstance(p[f], float) else p[f] for f in fields)
                        for key, p in run.done.items()}
            for run in runs}


def assert_same(kvtiny, tmp_path, factories, config=BASE):
    batched = answers(kvtiny, tmp_path, factories, config, "batched")
    sequential = answers(kvtiny, tmp_path, factories, config, "sequential")
    assert batched == sequential
    # the engine's rows read each press's compact copy of the context by default; masked storage answers the same
    masked = answers(kvtiny, tmp_path / "mask", factories, replace(config, kv_storage="mask"), "batched")
    assert masked == batched
    n = len(load_records("ruler", config, kvtiny[1])) * config.num_samples
    assert all(len(cell) == n for cell in batched.values())
    return batched


def test_ratio_headwise_and_random_presses(kvtiny, tmp_path):
    result = assert_same(kvtiny, tmp_path, {
        "knorm": lambda: KnormPress(0.5),
        "streaming_llm": lambda: StreamingLLMPress(0.75),
        "adakv_snapkv": lambda: AdaKVPress(SnapKVPress(0.5)),
        "random": lambda: RandomPress(0.5),
    })
    ratios = {cell: {r for _, r, _ in values.values()} for cell, values in result.items()}
    assert all(abs(r - 0.5) < 0.01 for r in ratios["knorm"]) and all(abs(r - 0.75) < 0.01
                                                                         for r in ratios["streaming_llm"])


def test_kvzip_at_two_ratios_shares_its_reconstruction(kvtiny, tmp_path, monkeypatch):
    calls = []
    original = KVzipPress._score_context
    monkeypatch.setattr(KVzipPress, "_score_context", lambda self, *a: calls.append(1) or original(self, *a))
    factories = {"kvzip_0.5": lambda: KVzipPress(0.5), "kvzip_0.75": lambda: KVzipPress(0.75)}
    batched = answers(kvtiny, tmp_path, factories, BASE, "batched")
    contexts = len(load_records("ruler", BASE, kvtiny[1]))
    assert len(calls) == contexts  # once per context, not once per ratio
    assert batched == answers(kvtiny, tmp_path, factories, BASE, "sequential")


def test_a_cell_with_nothing_left_to_answer_stays_out_of_the_prefill(kvtiny, tmp_path, monkeypatch):
    model, tokenizer = kvtiny
    records = load_records("ruler", BASE, tokenizer)
    first = answers(kvtiny, tmp_path, {"kvzip": lambda: KVzipPress(0.5)}, BASE, "batched")["kvzip"]
    calls = []
    original = KVzipPress._score_context
    monkeypatch.setattr(KVzipPress, "_score_context", lambda self, *a: calls.append(1) or original(self, *a))
    done = {key: {"sample_id": key} for key in first}  # kvzip's cell is complete, knorm's is not
    runs = [PreparedRun("kvzip", "kvzip", "ruler", KVzipPress(0.5), tmp_path / "kvzip", PredictionCache(tmp_path / "a"),
                        done, KVzipPress),
            PreparedRun("knorm", "knorm", "ruler", KnormPress(0.5), tmp_path / "knorm", PredictionCache(tmp_path / "b"),
                        {}, KnormPress)]
    with tqdm(disable=True) as progress:
        execute(model, tokenizer, records, runs, BASE, progress)
    assert calls == [] and len(runs[1].done) == len(records) and runs[0].done == done


def test_the_engine_reports_the_bytes_a_compact_cache_holds(kvtiny, tmp_path):
    """The engine reads one dense context through masks; what it reports held is what the one-at-a-time path's
    compact cache measured, byte for byte (same count per head, AdaKV budgets, KVzap thresholds, KVzip)."""
    factories = {"knorm": lambda: KnormPress(0.5), "adakv": lambda: AdaKVPress(KnormPress(0.6)),
                 "kvzap": lambda: build_press("kvzap_mlp", threshold=-4.0),
                 "kvzip": lambda: build_press("kvzip", compression_ratio=0.5)}
    fields = ("kv_bytes_dense", "kv_bytes_held_after_prefill", "kv_bytes_held_end")
    batched = answers(kvtiny, tmp_path, factories, BASE, "batched", fields)
    sequential = answers(kvtiny, tmp_path, factories, BASE, "sequential", fields)
    assert batched == sequential
    for cell in batched.values():
        for dense, held, end in cell.values():
            assert held < 0.6 * dense and end > held


def test_on_a_gpu_each_answer_records_the_allocators_peak(kvtiny, tmp_path, monkeypatch):
    """One context at a time on a GPU, each prediction carries the CUDA allocator's peak over its context, and
    metrics.json reports the largest as peak_memory_bytes, its source named, the cache's own peak beside it. CI has no
    GPU: the allocator is faked where the one-at-a-time path asks it."""
    readings = iter([3000, 9000, 5000, 7000])
    resets = []
    monkeypatch.setattr(generation, "reset_device_peak", resets.append)
    monkeypatch.setattr(generation, "device_peak", lambda device: next(readings))
    cells = answers(kvtiny, tmp_path, {"knorm": lambda: KnormPress(0.5)}, BASE, "sequential",
                    ("device_peak_bytes", "kv_bytes_peak"))
    recorded = list(cells["knorm"].values())
    assert len(resets) == len(recorded) == 4  # one reading per context, reset before its prefill
    assert sorted(device for device, _ in recorded) == [3000, 5000, 7000, 9000]
    predictions = [{"kv_bytes_dense": 1, "kv_bytes_held_after_prefill": 1, "kv_bytes_held_end": 1,
                    "prefill_seconds": 1.0, "decode_seconds": 1.0, "context_length": 1, "generated_length": 1,
                    "kv_storage": "compact", "throughput_scope": "run", "kv_bytes_peak": kv,
                    "device_peak_bytes": device} for device, kv in recorded]
    metrics = memory_and_speed(predictions)
    assert metrics["peak_memory_bytes"] == 9000 and metrics["peak_memory_source"] == "cuda_allocator"
    assert metrics["kv_bytes_peak"] == max(kv for _, kv in recorded) > 0
    # resumed on a machine without one: the cache's peak, which every answer has
    del predictions[0]["device_peak_bytes"]
    mixed = memory_and_speed(predictions)
    assert mixed["peak_memory_source"] == "kv_cache_tensors" and "kv_bytes_peak" not in mixed
    assert mixed["peak_memory_bytes"] == metrics["kv_bytes_peak"]


def test_presses_that_compress_while_decoding(kvtiny, tmp_path):
    result = assert_same(kvtiny, tmp_path, {
        "kvzap_mlp_decoding": lambda: DMSPress(KVzapPress(model_type="mlp"), threshold=-4, sliding_window_size=16,
                                               decoding=True),
        "decoding_knorm": lambda: DecodingPress(base_press=KnormPress(), compression_interval=4, target_size=300,
                                                hidden_states_buffer_size=4),
    })
    for values in result.values():  # evictions went on after the prefill
        assert any(answer > context for _, context, answer in values.values())


NEEDS_FILES = {"lukv": "a LU-KV budget curve", "observed_attention": "eager attention",
               # trained by the RestoreKV authors for published models only (tests/test_restorekv.py builds one)
               "RestoreKV": "a RestoreKV adapter", "RestoreKV_plus": "a RestoreKV adapter",
               "finch": "query-aware prompts (test_query_aware)"}


def test_every_registered_press_answers_the_same_in_both_engines(kvtiny, tmp_path):
    """One needle question per press; presses that rewrite the cache run one context at a time in both."""
    config = dataclasses.replace(BASE, ruler_tasks=["niah_single_1"], max_samples=1, max_new_tokens=8)

    def factory(name):
        knob = PRESSES[name].knob
        return lambda: build_press(name, **({knob: -4.0 if knob == "threshold" else 0.5} if knob else {}))

    names = [name for name in PRESSES if name not in NEEDS_FILES]
    batched = answers(kvtiny, tmp_path, {name: factory(name) for name in names}, config, "batched")
    sequential = answers(kvtiny, tmp_path, {name: factory(name) for name in names}, config, "sequential")
    assert [name for name in names if batched[name] != sequential[name]] == []


def test_batch_size_does_not_change_answers(kvtiny, tmp_path):
    factories = {"snapkv": lambda: SnapKVPress(0.5), "knorm": lambda: KnormPress(0.25)}
    one = answers(kvtiny, tmp_path / "one", factories, dataclasses.replace(BASE, batch_size=1), "batched")
    many = answers(kvtiny, tmp_path / "many", factories, dataclasses.replace(BASE, batch_size=5), "batched")
    assert one == many


def test_seeded_sampling_with_two_samples(kvtiny, tmp_path):
    config = dataclasses.replace(BASE, do_sample=True, temperature=1.5, top_k=20, num_samples=2, batch_size=3)
    result = assert_same(kvtiny, tmp_path, {"knorm": lambda: KnormPress(0.25), "random": lambda: RandomPress(0.5)},
                         config)
    texts = [text for text, _, _ in result["knorm"].values()]
    assert len(set(texts)) > len(texts) // 2  # samples differ from each other


def test_query_aware(kvtiny, tmp_path):
    config = dataclasses.replace(BASE, query_aware=True)
    assert_same(kvtiny, tmp_path, {"snapkv": lambda: SnapKVPress(0.5), "kvzip": lambda: KVzipPress(0.5),
                                   "finch": lambda: build_press("finch", compression_ratio=0.5)}, config)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evaluation.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)


def lines(folder: Path) -> int:
    return sum(path.read_bytes().count(b"\n") for path in folder.glob(f"*/{PREDICTIONS_FILE}"))


def test_kill_in_the_middle_of_a_batch_then_resume(tiny_model_dir, tmp_path):
    args = ["--model", tiny_model_dir, "--press", "knorm,snapkv", "--compression_ratio", "0.25,0.5",
            "--ruler_length", "320", "--ruler_tasks", "niah_single_1", "--max_samples", "8",
            "--max_new_tokens", "24", "--batch_size", "6"]
    reference = cli(*args, "--output_dir", str(tmp_path / "uninterrupted"))
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "evaluation.cli", *args, "--output_dir", str(out)], cwd=ROOT,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (out.exists() and 3 <= lines(out) < 32):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 3 <= lines(out) < 32  # killed with some, not all, of the 4 cells x 8 answers written
    resumed = cli(*args, "--output_dir", str(out))
    assert resumed.returncode == 0, resumed.stderr
    for folder in (tmp_path / "uninterrupted").iterdir():
        expected = {json.loads(line)["sample_id"]: json.loads(line)["prediction"]
                    for line in (folder / PREDICTIONS_FILE).read_text().splitlines()}
        rows = [json.loads(line) for line in (out / folder.name / PREDICTIONS_FILE).read_text().splitlines()]
        assert len(rows) == len({r["sample_id"] for r in rows}) == 8  # nothing lost, nothing duplicated
        assert {r["sample_id"]: r["prediction"] for r in rows} == expected
        assert without_timings(json.loads((out / folder.name / "metrics.json").read_text())) == \
            without_timings(json.loads((folder / "metrics.json").read_text()))
