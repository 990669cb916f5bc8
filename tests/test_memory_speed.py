"""The memory and speed benchmark's measurements on a tiny random model: fields consistent, references pooled."""

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from evaluation.benchmarks import memory_speed
from presses.kvzap_press import KVzapConfig, KVzapModel


def test_measure_shape_rows_are_consistent():
    torch.manual_seed(0)
    config = Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=128, attn_implementation="sdpa")
    model = Qwen3ForCausalLM(config).eval()
    surrogate = KVzapModel(KVzapConfig(input_dim=64, output_dim=2, n_modules=2, hidden_dim=32)).eval()
    with torch.no_grad():
        rows = memory_speed.measure_shape(model, surrogate, batch=2, n=1024, repeats=1)
        # steps of milliseconds: more rounds, until half a second of them
        longer = memory_speed.measure_shape(model, surrogate, batch=2, n=1024, repeats=1, min_seconds=0.5)
    assert {row["rounds"] for row in rows} == {1} and longer[0]["rounds"] > 2
    by_press = {row["press"]: row for row in rows}
    assert set(by_press) == set(memory_speed.PRESSES)
    for row in rows:
        assert 0.4 <= row["achieved"] <= 0.6  # kvzap_mlp: half of what its 128-token window leaves
        assert 1 - row["achieved"] - 1e-6 <= row["kv_bytes_ratio"] <= 1
        assert row["kv_bytes_ratio"] <= row["floor_bound"] <= 1
        assert row["bound"] <= 1 and row["compact_step_ratio"] > 0 and row["same_kernel_ratio"] > 0
    # same count per head: exactly half the bytes
    assert by_press["knorm"]["kv_bytes_ratio"] == 0.5
    # the dense references are pooled over the shape's rounds: one value for every press
    assert len({row["kernel_vs_sdpa"] for row in rows}) == 1
    assert len({row["dense_step_ms"] for row in rows}) == 1


def test_floor_bound_reads_a_noisy_floor_above_the_dense_step_as_nothing_to_save():
    assert memory_speed.floor_bound(0.2, 0.5) == pytest.approx(0.6)
    assert memory_speed.floor_bound(0.0, 0.5) == 0.5
    # timing noise on a tiny model: the 16-pair step measured slower than the dense one
    assert memory_speed.floor_bound(1.009, 0.5) == 1.0


def test_random_model_prefill_peaks_in_bfloat16():
    """The GPU run's prefill measurement (random weights, a calibrated kvzap threshold), here on a tiny model in
    bfloat16 on CPU: chunks bound the peak below an unchunked prefill's, and no allocator peak is claimed off CUDA."""
    torch.manual_seed(0)
    config = Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=128, attn_implementation="sdpa")
    model = Qwen3ForCausalLM(config).to(torch.bfloat16).eval()
    surrogate = KVzapModel(KVzapConfig(input_dim=64, output_dim=2, n_modules=2, hidden_dim=32)).eval()
    with torch.no_grad():
        peaks = memory_speed.random_prefill_peaks(model, surrogate, tokens=1024, chunk_size=256)
    assert peaks["dense"]["peak_ratio"] == 1 and peaks["dense"]["achieved"] == 0
    for label in ("kvzap_mlp", "kvzap_mlp chunked"):
        assert 0.3 <= peaks[label]["achieved"] <= 0.55  # the median threshold, less the 128-token window
        assert peaks[label]["held_ratio"] < 0.75
    assert peaks["kvzap_mlp chunked"]["peak_ratio"] < peaks["kvzap_mlp"]["peak_ratio"]
    assert all(row["device_peak_bytes"] is None for row in peaks.values())


def test_shapes_are_read_from_the_command_line():
    assert memory_speed.parse_shapes("1x4096, 12x16384") == [(1, 4096), (12, 16384)]
    assert memory_speed.parse_shapes(("1x32768", "6x32768")) == [(1, 32768), (6, 32768)]
    with pytest.raises(SystemExit, match="batch x tokens"):
        memory_speed.parse_shapes("4096")
