"""Scoring presses (SnapKV, TOVA, ObservedAttention, ExpectedAttention, PyramidKV, KeyDiff, LagKV).

Tiny random Llama and Qwen3 models are built here from their configs (no downloads). Each press is checked for what
its paper promises (which pairs it always keeps, how its scores are built) and for the contract of a scorer: scores
(batch, kv_heads, k_len), finite, any context length from 1 token, the requested compression reached.
"""

from __future__ import annotations

import functools
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from presses import (
    ExpectedAttentionPress,
    KeyDiffPress,
    LagKVPress,
    ObservedAttentionPress,
    PressError,
    PyramidKVPress,
    SnapKVPress,
    TOVAPress,
)
from presses.snapkv_press import window_attention

SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             bos_token_id=1, eos_token_id=2)
MODELS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {"head_dim": 16}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM,
               {"head_dim": 16, "sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"]}),
    # Phi3 rotates only half of each head (partial RoPE).
    "phi3": (Phi3Config, Phi3ForCausalLM, {"pad_token_id": 0, "partial_rotary_factor": 0.5}),
}
KV_HEADS = SHAPE["num_key_value_heads"]


@functools.cache
def model(architecture: str = "qwen3", attn_implementation: str = "sdpa", layers: int = 2,
          dtype: torch.dtype = torch.float32):
    config_class, model_class, extra = MODELS[architecture]
    config = config_class(num_hidden_layers=layers, **SHAPE, **extra)
    config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    return model_class(config).to(dtype).eval()


def ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(5, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def masks_after_prefill(press, lm, n_tokens: int, seed: int = 0) -> list[torch.Tensor]:
    """Eviction masks (batch, kv_heads, n_tokens) of the compressed layers after one prefill under ``press``."""
    with press(lm), torch.no_grad():
        lm(ids(n_tokens, seed))
    masks = [press.evicted_mask(i) for i in range(lm.config.num_hidden_layers)]
    return [mask for mask in masks if mask is not None]


def layer_inputs(lm, n_tokens: int, layer: int = 1) -> dict:
    """What a press's ``score`` receives for ``layer`` after a prefill of ``n_tokens`` (captured by a hook)."""
    captured = {}

    def capture(module, args, kwargs, output):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        captured.update(module=module, hidden_states=kwargs["hidden_states"], keys=cache.layers[layer].keys,
                        values=cache.layers[layer].values, attentions=output[1],
                        kwargs={"position_embeddings": kwargs["position_embeddings"]})

    handle = lm.model.layers[layer].self_attn.register_forward_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            lm(ids(n_tokens))
    finally:
        handle.remove()
    return captured


def score(press, lm, inputs: dict) -> torch.Tensor:
    press.post_init_from_model(lm)
    with torch.no_grad():
        return press.score(inputs["module"], inputs["hidden_states"], inputs["keys"], inputs["values"],
                           inputs["attentions"], inputs["kwargs"])


PRESSES = {
    "snapkv": SnapKVPress,
    "tova": TOVAPress,
    "observed_attention": ObservedAttentionPress,
    "expected_attention": ExpectedAttentionPress,
    "pyramidkv": PyramidKVPress,
    "keydiff": KeyDiffPress,
    "lagkv": LagKVPress,
}


def attn_for(name: str) -> str:
    return "eager" if name == "observed_attention" else "sdpa"


# ---------------------------------------------------------------------------------------------------------------
# The contract of every scorer.


@pytest.mark.parametrize("architecture", ["llama", "qwen3"])
@pytest.mark.parametrize("name", sorted(PRESSES))
@pytest.mark.parametrize("n_tokens", [1, 10, 200])
def test_generates_on_any_context_and_reaches_the_ratio(name, n_tokens, architecture):
    lm = model(architecture, attn_for(name))
    press = PRESSES[name](compression_ratio=0.5)
    with press(lm):
        out = lm.generate(ids(n_tokens), max_new_tokens=5, do_sample=False)
    assert n_tokens < out.shape[1] <= n_tokens + 5  # a random model may stop early on its end token
    masks = [press.evicted_mask(i) for i in range(lm.config.num_hidden_layers)]
    assert all(mask.shape == (1, KV_HEADS, n_tokens) for mask in masks)
    assert all(bool((~mask).any(-1).all()) for mask in masks)  # no head is ever emptied
    if n_tokens == 200:
        assert abs(press.achieved_compression_ratio - 0.5) <= 0.01, press.achieved_compression_ratio


@pytest.mark.parametrize("name", sorted(PRESSES))
@pytest.mark.parametrize("ratio", [0.25, 0.8])
def test_reaches_other_ratios(name, ratio):
    press = PRESSES[name](compression_ratio=ratio)
    masks_after_prefill(press, model("llama", attn_for(name)), 200)
    assert abs(press.achieved_compression_ratio - ratio) <= 0.01


@pytest.mark.parametrize("architecture", ["llama", "qwen3"])
@pytest.mark.parametrize("name", sorted(PRESSES))
@pytest.mark.parametrize("n_tokens", [1, 3, 10, 80])
def test_scores_have_one_finite_value_per_kv_head_and_position(name, n_tokens, architecture):
    lm = model(architecture, attn_for(name))
    scores = score(PRESSES[name](compression_ratio=0.5), lm, layer_inputs(lm, n_tokens))
    assert scores.shape == (1, KV_HEADS, n_tokens)
    assert torch.isfinite(scores).all()


@pytest.mark.parametrize("name", ["snapkv", "tova", "expected_attention", "keydiff"])
def test_bfloat16_models_give_finite_scores(name):
    lm = model("llama", "sdpa", dtype=torch.bfloat16)
    scores = score(PRESSES[name](compression_ratio=0.5), lm, layer_inputs(lm, 60))
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()


@pytest.mark.parametrize("name", ["snapkv", "expected_attention", "pyramidkv"])
@pytest.mark.parametrize("architecture", ["gemma3", "phi3"])
def test_runs_on_gemma3_full_layers_and_phi3_partial_rope(name, architecture):
    lm = model(architecture)
    press = PRESSES[name](compression_ratio=0.5, **({"n_future_positions": 64} if name == "expected_attention" else {}))
    with press(lm):
        lm.generate(ids(100), max_new_tokens=3, do_sample=False)
    assert abs(press.achieved_compression_ratio - 0.5) <= 0.01


@pytest.mark.parametrize("kwargs", [{"window_size": 0}, {"kernel_size": 0}, {"compression_ratio": 1.0}])
def test_snapkv_rejects_bad_settings(kwargs):
    with pytest.raises(PressError):
        SnapKVPress(**kwargs)


@pytest.mark.parametrize("press_class, kwargs", [(LagKVPress, {"lag_size": 0}), (LagKVPress, {"n_sink": -1}),
                                                 (PyramidKVPress, {"beta": 0}),
                                                 (ExpectedAttentionPress, {"n_future_positions": 0})])
def test_presses_reject_bad_settings(press_class, kwargs):
    with pytest.raises(PressError):
        press_class(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# SnapKV.


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_snapkv_always_keeps_its_observation_window(attn_implementation):
    press = SnapKVPress(compression_ratio=0.7, window_size=16)
    for mask in masks_after_prefill(press, model("qwen3", attn_implementation), 200):
        assert not mask[..., -16:].any()


def test_snapkv_recomputed_window_attention_equals_eager_weights():
    inputs = layer_inputs(model("llama", "eager"), 40)
    ours = window_attention(inputs["module"], inputs["hidden_states"], inputs["keys"], 8,
                            inputs["kwargs"]["position_embeddings"])
    torch.testing.assert_close(ours, inputs["attentions"][..., -8:, :32].float(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["snapkv", "tova"])
def test_sdpa_and_eager_paths_give_the_same_scores(name):
    """Under sdpa the window's attention is recomputed; under eager it is read from the weights: same scores."""
    eager, sdpa = model("qwen3", "eager"), model("qwen3", "sdpa")
    press = PRESSES[name](compression_ratio=0.5, **({"window_size": 8} if name == "snapkv" else {}))
    from_weights = score(press, eager, layer_inputs(eager, 50))
    recomputed = score(press, sdpa, {**layer_inputs(sdpa, 50), "attentions": None})
    torch.testing.assert_close(from_weights, recomputed, atol=1e-5, rtol=1e-4)


def test_snapkv_scores_follow_the_paper_recipe():
    """Window-mean of the attention, average-pooled, averaged over each KV head's query heads."""
    lm = model("llama", "eager")
    inputs = layer_inputs(lm, 30)
    scores = score(SnapKVPress(window_size=6, kernel_size=3), lm, inputs)
    weights = inputs["attentions"][..., -6:, :24].float().mean(dim=-2)  # (1, 4, 24)
    pooled = F.avg_pool1d(weights, kernel_size=3, padding=1, stride=1)
    expected = pooled.view(1, KV_HEADS, 2, 24).mean(dim=2)
    torch.testing.assert_close(scores[..., :24], expected)
    assert bool((scores[..., 24:] > scores[..., :24].max()).all())


def test_snapkv_on_a_context_shorter_than_its_window_keeps_the_most_recent_tokens():
    for mask in masks_after_prefill(SnapKVPress(compression_ratio=0.5, window_size=64), model("llama"), 10):
        assert torch.equal(mask[0], torch.tensor([True] * 5 + [False] * 5).expand(KV_HEADS, 10))


def test_snapkv_accepts_an_even_kernel():
    lm = model("llama")
    assert score(SnapKVPress(window_size=8, kernel_size=4), lm, layer_inputs(lm, 30)).shape == (1, KV_HEADS, 30)


# ---------------------------------------------------------------------------------------------------------------
# TOVA.


def test_tova_keeps_the_last_token_and_all_heads_evict_alike():
    for mask in masks_after_prefill(TOVAPress(compression_ratio=0.9), model("qwen3"), 200):
        assert not mask[..., -1].any()
        assert torch.equal(mask[:, 0], mask[:, 1])


def test_tova_scores_are_the_last_query_attention_averaged_over_heads():
    lm = model("llama", "eager")
    inputs = layer_inputs(lm, 20)
    scores = score(TOVAPress(), lm, inputs)
    expected = inputs["attentions"][0, :, -1, :-1].float().mean(dim=0)
    torch.testing.assert_close(scores[0, 0, :-1], expected)
    torch.testing.assert_close(scores[0, 1, :-1], expected)


# ---------------------------------------------------------------------------------------------------------------
# ObservedAttention.


def test_observed_attention_under_sdpa_says_to_load_eager():
    with pytest.raises(PressError, match="attn_implementation='eager'"):
        masks_after_prefill(ObservedAttentionPress(compression_ratio=0.5), model("qwen3", "sdpa"), 20)


def test_observed_attention_averages_attention_over_the_queries_that_saw_each_key():
    keys = torch.zeros(1, 1, 3, 4)  # one KV head shared by two query heads, causal attention over 3 tokens
    attentions = torch.tensor([[[[1.0, 0, 0], [0.5, 0.5, 0], [0.2, 0.2, 0.6]],
                                [[1.0, 0, 0], [0.9, 0.1, 0], [0.4, 0.4, 0.2]]]])
    scores = ObservedAttentionPress().score(None, None, keys, None, attentions, {})
    head0 = torch.tensor([1.7 / 3, 0.7 / 2, 0.6 / 1])
    head1 = torch.tensor([2.3 / 3, 0.5 / 2, 0.2 / 1])
    torch.testing.assert_close(scores[0, 0], (head0 + head1) / 2)
    # Two new queries over a 3-key cache: every key but the last was seen by both.
    later = ObservedAttentionPress().score(None, None, keys, None, attentions[:, :, 1:], {})
    torch.testing.assert_close(later[0, 0], attentions[0, :, 1:].sum(dim=1).mean(dim=0) / torch.tensor([2, 2, 1.0]))


# ---------------------------------------------------------------------------------------------------------------
# ExpectedAttention.


@pytest.mark.parametrize("architecture", ["llama", "qwen3"])
def test_expected_attention_keeps_sinks_and_scores_finitely(architecture):
    lm = model(architecture)
    press = ExpectedAttentionPress(compression_ratio=0.8, n_sink=4)
    for mask in masks_after_prefill(press, lm, 200):
        assert not mask[..., :4].any()
    scores = score(press, lm, layer_inputs(lm, 200))
    assert torch.isfinite(scores).all() and bool((scores[..., :4] > scores[..., 4:].max()).all())


@pytest.mark.parametrize("architecture", ["llama", "phi3"])
def test_expected_attention_average_rotation_is_the_mean_of_the_model_rope(architecture):
    """R applied to a query equals the model's RoPE at each future position, averaged (also with partial RoPE)."""
    lm = model(architecture)
    module = lm.model.layers[0].self_attn
    press = ExpectedAttentionPress(n_future_positions=32)
    press.post_init_from_model(lm)
    rotation = press.average_rotation(module, 100, torch.device("cpu"))
    query = torch.randn(1, 1, 1, rotation.shape[0]).expand(1, 1, 32, -1)
    cos, sin = lm.model.rotary_emb(query, torch.arange(100, 132)[None])
    apply_rope = sys.modules[type(module).__module__].apply_rotary_pos_emb
    rotated, _ = apply_rope(query, query, cos, sin)
    torch.testing.assert_close(query[0, 0, 0] @ rotation.T, rotated[0, 0].mean(dim=0), atol=1e-5, rtol=1e-5)


def test_expected_attention_without_covariance_or_vnorm_is_the_softmax_of_mean_query_logits():
    lm = model("llama")
    inputs = layer_inputs(lm, 40, layer=0)
    press = ExpectedAttentionPress(n_sink=4, use_covariance=False, use_vnorm=False, n_future_positions=16)
    scores = score(press, lm, inputs)
    module = inputs["module"]
    queries = module.q_proj(inputs["hidden_states"][:, 4:]).view(1, 36, 4, 16).transpose(1, 2)  # before RoPE
    mean = queries.mean(dim=2) @ press.average_rotation(module, 40, torch.device("cpu")).T
    keys = inputs["keys"][:, :, 4:].repeat_interleave(2, dim=1)
    expected = torch.softmax(torch.einsum("bhd,bhnd->bhn", mean, keys) / 4, dim=-1).view(1, 2, 2, 36).mean(dim=2)
    torch.testing.assert_close(scores[..., 4:], expected, atol=1e-6, rtol=1e-5)


def test_expected_attention_needs_the_model():
    lm = model("llama")
    inputs = layer_inputs(lm, 10)
    with pytest.raises(PressError, match="post_init_from_model"):
        ExpectedAttentionPress().score(inputs["module"], inputs["hidden_states"], inputs["keys"], inputs["values"],
                                       None, inputs["kwargs"])


# ---------------------------------------------------------------------------------------------------------------
# PyramidKV.


def test_pyramidkv_budgets_shrink_with_depth_and_average_to_the_ratio():
    lm = model("llama", layers=4)
    press = PyramidKVPress(compression_ratio=0.5, window_size=8, beta=4)
    press.post_init_from_model(lm)
    budgets = [press.n_kept(400, layer) for layer in range(4)]
    assert all(a > b for a, b in zip(budgets, budgets[1:], strict=False))
    assert abs(sum(budgets) / 4 - 200) <= 0.5
    # The kvpress formula: last = average / beta = 50, first = 2 * average - 50 = 350.
    assert budgets == [350, 250, 150, 50]


def test_pyramidkv_caps_the_first_layer_and_falls_back_when_the_pyramid_does_not_fit():
    lm = model("llama", layers=2)
    press = PyramidKVPress(compression_ratio=0.5)  # window 64, beta 20
    press.post_init_from_model(lm)
    # 200 tokens: the first layer would keep 195 > 200 - 64, so it is capped at 136 and the last raised to 64.
    assert [press.n_kept(200, layer) for layer in range(2)] == [136, 64]
    # 100 tokens: the last layer would keep less than the window: uniform SnapKV budget.
    assert [press.n_kept(100, layer) for layer in range(2)] == [50, 50]


def test_pyramidkv_keeps_its_budgets_per_layer_in_a_model():
    lm = model("qwen3", layers=4)
    press = PyramidKVPress(compression_ratio=0.6, window_size=8, beta=4)
    masks = masks_after_prefill(press, lm, 200)
    kept = [int((~mask[0, 0]).sum()) for mask in masks]
    assert kept == [press.n_kept(200, layer) for layer in range(4)] and kept[0] > kept[-1]
    assert abs(press.achieved_compression_ratio - 0.6) <= 0.01
    assert all(not mask[..., -8:].any() for mask in masks)  # SnapKV's window survives in every layer


def test_pyramidkv_needs_the_model():
    with pytest.raises(PressError, match="post_init_from_model"):
        PyramidKVPress(compression_ratio=0.5).n_kept(100, 0)


# ---------------------------------------------------------------------------------------------------------------
# KeyDiff.


def test_keydiff_keeps_the_keys_least_similar_to_the_mean_key():
    # Head 0: five keys close to e1 and one along e2; head 1: the same with e1 and e2 swapped, one key along -e2.
    crowd = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.9, -0.1], [1.1, 0.05], [1.0, -0.05]])
    head0 = torch.cat([crowd[:2], torch.tensor([[0.0, 1.0]]), crowd[2:]])
    head1 = torch.cat([crowd.flip(-1), torch.tensor([[-1.0, -1.0]])])
    keys = torch.stack([head0, head1])[None]  # (1, 2, 6, 2)
    scores = KeyDiffPress().score(None, None, keys, None, None, {})
    anchor = F.normalize(keys, dim=-1).mean(dim=2, keepdim=True)
    torch.testing.assert_close(scores, -F.cosine_similarity(keys, anchor, dim=-1))
    assert scores.argmax(dim=-1).tolist() == [[2, 5]]


def test_keydiff_in_a_model_evicts_the_keys_most_similar_to_the_mean_key():
    lm = model("llama")
    keys = layer_inputs(lm, 100)["keys"]
    evicted = masks_after_prefill(KeyDiffPress(compression_ratio=0.9), lm, 100)[1]
    similarity = F.cosine_similarity(keys, F.normalize(keys, dim=-1).mean(dim=2, keepdim=True), dim=-1)
    for head in range(KV_HEADS):
        kept, gone = similarity[0, head][~evicted[0, head]], similarity[0, head][evicted[0, head]]
        assert len(kept) == 10 and kept.max() <= gone.min()


# ---------------------------------------------------------------------------------------------------------------
# LagKV.


def test_lagkv_keeps_sinks_and_the_last_lag_and_an_equal_share_of_every_lag():
    press = LagKVPress(compression_ratio=0.5, n_sink=4, lag_size=32)
    # 300 = 4 sinks + 9 full lags + 8 tokens; the 9th lag and the 8 tokens have no reference.
    for mask in masks_after_prefill(press, model("llama"), 300):
        assert not mask[..., :4].any() and not mask[..., 4 + 8 * 32 :].any()
        kept_per_lag = (~mask[..., 4 : 4 + 8 * 32]).view(1, KV_HEADS, 8, 32).sum(-1)
        assert int(kept_per_lag.max() - kept_per_lag.min()) <= 1  # ranks, not raw scores, are compared across lags
    assert abs(press.achieved_compression_ratio - 0.5) <= 0.01


def test_lagkv_scores_a_token_by_its_spread_against_the_next_lag():
    press = LagKVPress(n_sink=0, lag_size=4)
    lag = torch.tensor([[0.5, 0.5, 0.5], [0.0, 1.0, 0.5], [0.5, 0.4, 0.6], [1.0, 0.0, 1.0]])
    reference = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.5, 0.5, 0.5], [0.2, 0.8, 0.3]])
    states = torch.cat([lag, reference, reference])[None, None]  # (1, 1, 12, 3): the last lag is the kept tail
    scores = press.score(None, None, states, states, None, {})
    # The reference spans [0, 1] in every channel, so the lag is its own normalisation; channel spreads:
    # std(.5, .5, .5) = 0 < std(.5, .4, .6) = .1 < std(0, 1, .5) = .5 < std(1, 0, 1) = .58.
    assert scores[0, 0, :4].argsort().tolist() == [0, 2, 1, 3]
    assert bool((scores[0, 0, 8:] >= 1).all())


def test_lagkv_on_a_short_context_keeps_sinks_then_recent_tokens():
    press = LagKVPress(compression_ratio=0.5, n_sink=2, lag_size=128)
    for mask in masks_after_prefill(press, model("qwen3"), 10):
        assert torch.equal(mask[0, 0], torch.tensor([False] * 2 + [True] * 5 + [False] * 3))
