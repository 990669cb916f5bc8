"""Presses that load per-model artifacts: DuoAttention patterns, Q-Filters, Fast KVzip gates.

Hand-written artifacts in the published layouts load and score; each builder runs end to end on a tiny random model;
missing artifacts fail in one line naming the build command; on kvtiny the shipped DuoAttention patterns and Fast
KVzip gates beat random eviction on needle retrieval at 50%. The shipped Q-Filters do not (README, "Presses with
per-model artifacts"): their score is a first-order estimate of the attention a key receives, which on kvtiny ranks
needle digits low; they are checked instead for being the paper's filter, in kvpress's orientation, and for ranking
keys by the attention they receive.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import make_model, random_ids
from safetensors.torch import save_file

from evaluation.config import resolve_config
from evaluation.runner import sweep_grid
from presses import DuoAttentionPress, FastKVzipPress, PressError, QFilterPress, build_press, get_spec
from presses.compat import keys_values, model_cache_kwarg
from presses.fastkvzip_press import load_gates


def prefill(model, press, n: int = 120):
    """Run one prefill under ``press``; return the cache, every pair still in it (masked storage: the tests read
    the keys the press scored)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with press(model, kv_storage="mask"), torch.no_grad():
        model(input_ids=random_ids(n), **{model_cache_kwarg(): cache}, use_cache=True)
    return cache


# ---------------------------------------------------------------------------------------------------------------------
# Published layouts, written by hand


def test_duo_patterns_in_the_published_layout_load_and_score(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"sink_size": 8, "recent_size": 16, "lr": 0.02}))
    (tmp_path / "full_attention_heads.tsv").write_text("0.9\t0.1\n1.7\t-0.3\n")  # clipped to [0, 1] on load
    model = make_model("qwen3")
    press = DuoAttentionPress(head_compression_ratio=0.5, patterns=str(tmp_path))
    prefill(model, press, n=120)
    # The two lowest scores (layer 1 head 1 at -0.3 -> 0, layer 0 head 1 at 0.1) are streaming heads.
    for layer, streaming in ((0, [False, True]), (1, [False, True])):
        evicted = press.evicted_mask(layer)[0]
        for head, is_streaming in enumerate(streaming):
            expected = torch.zeros(120, dtype=torch.bool)
            if is_streaming:
                expected[8 : 120 - 16] = True
            assert torch.equal(evicted[head], expected), (layer, head)
    assert press.achieved_compression_ratio == pytest.approx(0.5 * (1 - 24 / 120))


def test_qfilters_in_the_published_layout_load_and_score(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"num_layers": 2, "num_kv_heads": 2, "kv_head_dim": 16}))
    filters = torch.randn(2, 2, 16, generator=torch.Generator().manual_seed(0))
    save_file({"q_filters": filters}, str(tmp_path / "model.safetensors"))
    model = make_model("qwen3")
    press = QFilterPress(compression_ratio=0.5, q_filters_path=str(tmp_path))
    cache = prefill(model, press)
    for layer in range(2):
        keys, _ = keys_values(cache, layer)
        scores = -(keys[0] * filters[layer][:, None]).sum(-1)  # kvpress: -(q_filter * keys).sum(-1)
        kept = ~press.evicted_mask(layer)[0]
        for head in range(2):
            expected = set(scores[head].topk(60).indices.tolist())
            assert set(kept[head].nonzero().flatten().tolist()) == expected


def reference_gate(weights: dict, hidden: torch.Tensor, sink: int) -> torch.Tensor:
    """kvpress's gate written out with loops: (n, hidden) -> (kv_heads, n)."""
    def rms(x, w):
        return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    dim = weights["q_norm.weight"].shape[0]
    heads, _, group = weights["b"].shape
    q = (hidden @ weights["q_proj.weight"].T + weights["q_proj.bias"]).view(-1, heads, group, dim)
    k = (hidden @ weights["k_proj.weight"].T).view(-1, heads, 1, dim)
    q, k = rms(q, weights["q_norm.weight"]), rms(k, weights["k_norm.weight"])
    out = torch.zeros(heads, hidden.shape[0])
    for h in range(heads):
        for t in range(hidden.shape[0]):
            values = []
            for g in range(group):
                logit = (k[t, h, 0] @ q[t, h, g]) / math.sqrt(dim) + weights["b"][h, 0, g]
                base = torch.stack([weights["k_base"][h, 0, s] @ q[t, h, g] / math.sqrt(dim) for s in range(sink)])
                values.append(1 / (1 + torch.exp(base - logit).sum()))
            out[h, t] = torch.stack(values).mean()
    return out


def published_gates(hidden: int, heads: int, group: int, dim: int, sink: int, layers: int) -> list[dict]:
    generator = torch.Generator().manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    return [{"q_proj.weight": randn(heads * group * dim, hidden), "q_proj.bias": randn(heads * group * dim),
             "k_proj.weight": randn(heads * dim, hidden), "q_norm.weight": 1 + 0.1 * randn(dim),
             "k_norm.weight": 1 + 0.1 * randn(dim), "k_base": randn(heads, 1, sink, dim), "b": randn(heads, 1, group)}
            for _ in range(layers)]


def test_fastkvzip_gates_in_the_published_layout_load_and_score(tmp_path):
    model = make_model("qwen3")
    state_dicts = published_gates(hidden=64, heads=2, group=2, dim=4, sink=3, layers=2)
    torch.save({"module": state_dicts, "loss": np.array([[0.5, 0.1]])}, tmp_path / "q2_dim4_sink3.pt")  # as published
    gates = load_gates(str(tmp_path / "q2_dim4_sink3.pt"), model)
    hidden = torch.randn(7, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for layer in range(2):
            assert torch.allclose(gates[layer](hidden[None])[0], reference_gate(state_dicts[layer], hidden, 3),
                                  atol=1e-5)
    press = FastKVzipPress(compression_ratio=0.5, gates_path=str(tmp_path / "q2_dim4_sink3.pt"))
    prefill(model, press, n=120)
    removed = sum(int(press.evicted_mask(layer).sum()) for layer in range(2))
    assert removed == int(2 * 2 * 120 * 0.5)  # over all layers and heads at once
    for layer in range(2):
        assert not press.evicted_mask(layer)[..., :4].any()  # sinks and the 2% window score 1
        assert not press.evicted_mask(layer)[..., -2:].any()


# ---------------------------------------------------------------------------------------------------------------------
# Missing artifacts, registry, knob


@pytest.mark.parametrize("name, knob, command", [
    ("duo_attention", "head_compression_ratio", "build-duo-patterns"),
    ("qfilter", "compression_ratio", "build-qfilters"),
    ("fastkvzip", "compression_ratio", "train-fastkvzip"),
])
def test_a_missing_artifact_is_a_one_line_error_naming_the_build_command(tmp_path, name, knob, command):
    model = make_model("qwen3")
    model.name_or_path = str(tmp_path)  # a local model folder with no artifact beside it
    with pytest.raises(PressError) as error:
        prefill(model, build_press(name, **{knob: 0.5}))
    message = str(error.value)
    assert "\n" not in message and f"kvpress-eval {command}" in message


def test_registry_names_and_the_head_compression_ratio_knob():
    assert get_spec("duo_attention").knob == get_spec("duo_attention_on_the_fly").knob == "head_compression_ratio"
    assert get_spec("qfilter").knob == get_spec("fastkvzip").knob == "compression_ratio"
    assert get_spec("decoding_qfilter").knob is None
    assert build_press("duo_attention_on_the_fly", head_compression_ratio=0.25).on_the_fly_scoring
    with pytest.raises(PressError, match="takes --head_compression_ratio"):
        build_press("duo_attention", compression_ratio=0.5)
    config = resolve_config(press="duo_attention,qfilter", head_compression_ratio="0.25,0.75",
                            compression_ratio="0.5", ruler_tasks="niah_single_1")
    points = [(spec.press, spec.knob, spec.value) for spec in sweep_grid(config)]
    assert points == [("duo_attention", "head_compression_ratio", 0.25),
                      ("duo_attention", "head_compression_ratio", 0.75), ("qfilter", "compression_ratio", 0.5)]


# ---------------------------------------------------------------------------------------------------------------------
# Builders end to end on a tiny random model, then the presses find the artifacts beside it


def test_builders_run_end_to_end_and_presses_find_their_artifacts(tiny_model_dir):
    from evaluation.cli import build_duo_patterns, build_qfilters, train_fastkvzip
    from evaluation.models import load_model

    texts = dict(n_texts=4, min_text_tokens=100, max_text_tokens=200)
    assert "duo-attention" in build_duo_patterns(tiny_model_dir, model=tiny_model_dir, sink_size=4, recent_size=16,
                                                 **texts)
    assert "qfilters" in build_qfilters(tiny_model_dir, model=tiny_model_dir, **texts)
    assert "gates in" in train_fastkvzip(tiny_model_dir, model=tiny_model_dir, positions_per_text=50, steps=20,
                                         **texts)
    model, tokenizer = load_model(tiny_model_dir, "cpu", "float32")
    ids = random_ids(600, vocab_size=200)  # longer than the on-the-fly window (128 sinks + 256 recent)
    for name, knob in (("duo_attention", "head_compression_ratio"), ("duo_attention_on_the_fly",
                                                                      "head_compression_ratio"),
                       ("qfilter", "compression_ratio"), ("fastkvzip", "compression_ratio")):
        press = build_press(name, **{knob: 0.5})
        if name == "duo_attention_on_the_fly":
            press.calibration_texts = 2
        with press(model, tokenizer), torch.no_grad():
            model(input_ids=ids, use_cache=True)
        assert 0 < press.achieved_compression_ratio < 0.75, name


# ---------------------------------------------------------------------------------------------------------------------
# kvtiny: the shipped artifacts beat random eviction on needle retrieval at 50%


@pytest.fixture(scope="module")
def needles():
    from evaluation.benchmarks.needle_presses import needle_accuracy
    from evaluation.datasets.ruler_synthetic import generate_task
    from evaluation.models import load_model

    model, tokenizer = load_model("kvtiny", "cpu", "float32")
    records = generate_task("niah_single_1", tokenizer, 1024, 8, seed=2025)
    random_accuracy, _ = needle_accuracy(model, tokenizer, "random", {"compression_ratio": 0.5, "seed": 0}, records)
    return model, tokenizer, records, random_accuracy


@pytest.mark.parametrize("name, knob", [("duo_attention", "head_compression_ratio"),
                                        ("fastkvzip", "compression_ratio")])
def test_shipped_artifacts_beat_random_on_kvtiny_needles(needles, name, knob):
    from evaluation.benchmarks.needle_presses import needle_accuracy

    model, tokenizer, records, random_accuracy = needles
    accuracy, achieved = needle_accuracy(model, tokenizer, name, {knob: 0.5}, records)
    assert achieved > 0.4 and accuracy >= random_accuracy + 40, (accuracy, random_accuracy, achieved)


# ---------------------------------------------------------------------------------------------------------------------
# Q-Filters: the builder computes the paper's filter, in the orientation kvpress's score expects


def test_qfilter_directions_recover_a_planted_query_drift_with_its_sign():
    from evaluation.artifacts.qfilters import principal_directions

    generator = torch.Generator().manual_seed(0)
    drift = torch.nn.functional.normalize(torch.randn(16, generator=generator), dim=0)
    for sign in (1.0, -1.0):
        # Queries drift along sign * drift (Observation 3.1), with isotropic noise around it.
        queries = sign * 3.0 * drift + torch.randn(4000, 16, generator=generator)
        direction = principal_directions((queries.T @ queries)[None], queries.sum(0)[None])[0]
        assert torch.dot(direction, sign * drift) > 0.99  # v+, not -v+: the queries project positively on it


def test_qfilter_builder_takes_one_svd_per_query_head_averaged_per_kv_head():
    from evaluation.artifacts.qfilters import query_filters
    from presses import compat

    model = make_model("qwen3")  # 4 query heads on 2 KV heads
    contexts = [random_ids(90, seed=1), random_ids(130, seed=2)]
    queries: dict[int, list[torch.Tensor]] = {}

    def hook(module, args, kwargs):
        states = compat.query_states(module, compat.hidden_states_from(args, kwargs), kwargs["position_embeddings"])
        queries.setdefault(module.layer_idx, []).append(states[0])

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in compat.attention_modules(model)]
    with torch.no_grad():
        for ids in contexts:
            model(input_ids=ids, use_cache=False)
    for handle in handles:
        handle.remove()
    filters = query_filters(model, contexts)
    assert filters.shape == (2, 2, 16)
    for layer, states in queries.items():
        stacked = torch.cat(states, 1).double()  # (query heads, tokens, head_dim)
        directions = []
        for head in stacked:
            v = torch.linalg.svd(head, full_matrices=False).Vh[0]
            directions.append(v if (head @ v).mean() > 0 else -v)
        expected = -torch.stack(directions).view(2, 2, -1).mean(1)  # kvpress keeps the highest -(filter . key)
        assert torch.allclose(filters[layer].double(), expected, atol=1e-4), layer


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.argsort(-1).argsort(-1).double(), b.argsort(-1).argsort(-1).double()
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def test_shipped_qfilters_rank_keys_by_the_attention_they_receive_on_kvtiny():
    """The paper's claim, with the score kvpress uses: -(filter . key) rises with the attention a key gets.

    Mean attention a key receives from the queries after it, against the shipped filter's score, Spearman per KV head
    on two RULER contexts. An inverted filter (the sign error this guards against) gives the opposite correlation.
    """
    from transformers import DynamicCache

    from evaluation.datasets.ruler_synthetic import generate_task
    from evaluation.models import load_model
    from presses import compat
    from presses.pipeline import encode_prompt
    from presses.qfilter_press import default_qfilters, load_qfilters

    model, tokenizer = load_model("kvtiny", "cpu", "float32")
    filters = load_qfilters(default_qfilters(model.name_or_path), model)
    queries: dict[int, torch.Tensor] = {}

    def hook(module, args, kwargs):
        queries[module.layer_idx] = compat.query_states(module, compat.hidden_states_from(args, kwargs),
                                                        kwargs["position_embeddings"])[0]

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in compat.attention_modules(model)]
    correlations = []
    try:
        for record in generate_task("niah_single_1", tokenizer, 1024, 2, seed=7):
            ids = encode_prompt(tokenizer, record["context"], [record["question"]], record["answer_prefix"]).context_ids
            cache = DynamicCache(config=model.config)
            with torch.no_grad():
                model(input_ids=ids, **{compat.model_cache_kwarg(): cache}, use_cache=True)
            for layer, query in queries.items():
                keys = compat.keys_values(cache, layer)[0][0]  # (kv heads, n, d), with RoPE
                heads, n, dim = query.shape
                groups = heads // keys.shape[0]
                logits = query @ keys.repeat_interleave(groups, 0).transpose(1, 2) / dim**0.5
                causal = torch.ones(n, n, dtype=torch.bool).tril()
                attention = logits.masked_fill(~causal, float("-inf")).softmax(-1)
                received = (attention.sum(1) / torch.arange(n, 0, -1)).view(-1, groups, n).mean(1)
                score = -(keys * filters[layer][:, None]).sum(-1)
                correlations.append(spearman(score[:, 1:], received[:, 1:]))  # the template's first token aside
    finally:
        for handle in handles:
            handle.remove()
    mean = torch.stack(correlations).mean()
    assert mean > 0.1, mean
