"""Properties of individual scoring presses, checked on tiny random models and hand-made tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import make_model, random_ids

from presses import (
    ExpectedAttentionPress,
    KeyDiffPress,
    LagKVPress,
    ObservedAttentionPress,
    PyramidKVPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
)
from presses.snapkv_press import window_attention


def evicted_after_prefill(press, model, n_tokens: int = 200) -> list[torch.Tensor]:
    with press(model), torch.no_grad():
        model(random_ids(n_tokens))
    return [press.evicted_mask(i) for i in range(model.config.num_hidden_layers)]


def test_snapkv_keeps_its_observation_window():
    model = make_model("qwen3")
    for mask in evicted_after_prefill(SnapKVPress(compression_ratio=0.7, window_size=16), model):
        assert not mask[..., -16:].any()


def test_snapkv_window_attention_matches_eager_attention_weights():
    """Recomputing the window's attention from hidden states must equal what eager attention computed."""
    model = make_model("llama", "eager")
    captured = {}

    def capture(module, args, kwargs, output):
        if module.layer_idx == 1:
            captured.update(hidden=kwargs["hidden_states"], rope=kwargs["position_embeddings"], weights=output[1],
                            keys=kwargs["cache"].layers[1].keys, module=module)

    attention = model.model.layers[1].self_attn
    handle = attention.register_forward_hook(capture, with_kwargs=True)
    with torch.no_grad():
        model(random_ids(40), use_cache=True)
    handle.remove()
    ours = window_attention(captured["module"], captured["hidden"], captured["keys"], 8, captured["rope"])
    torch.testing.assert_close(ours, captured["weights"][..., -8:, :32].float(), atol=1e-5, rtol=1e-4)


def test_tova_keeps_the_last_token_and_scores_all_heads_alike():
    model = make_model("qwen3")
    masks = evicted_after_prefill(TOVAPress(compression_ratio=0.8), model)
    for mask in masks:
        assert not mask[..., -1].any()
        assert torch.equal(mask[:, 0], mask[:, 1])  # one score shared by every head


def test_observed_attention_averages_received_attention():
    keys = torch.zeros(1, 1, 3, 4)
    # One KV head, two query heads; causal attention over 3 tokens.
    attentions = torch.tensor([[[[1.0, 0, 0], [0.5, 0.5, 0], [0.2, 0.2, 0.6]],
                                [[1.0, 0, 0], [0.9, 0.1, 0], [0.4, 0.4, 0.2]]]])
    scores = ObservedAttentionPress().score(None, None, keys, None, attentions, {})
    head0 = torch.tensor([1.7 / 3, 0.7 / 2, 0.6 / 1])
    head1 = torch.tensor([2.3 / 3, 0.5 / 2, 0.2 / 1])
    torch.testing.assert_close(scores[0, 0], (head0 + head1) / 2)


def test_keydiff_keeps_the_most_distinctive_keys():
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.9, 0.0], [0.0, 1.0]])[None, None]
    scores = KeyDiffPress().score(None, None, keys, None, None, {})
    anchor = F.normalize(keys, dim=-1).mean(dim=2, keepdim=True)
    torch.testing.assert_close(scores, -F.cosine_similarity(keys, anchor, dim=-1))
    assert int(scores.argmax()) == 3


def test_pyramidkv_budgets_shrink_with_depth_and_average_to_the_ratio():
    model = make_model("qwen3")
    model.config.num_hidden_layers = 4  # only the budget arithmetic reads it
    press = PyramidKVPress(compression_ratio=0.5, window_size=4, beta=4)
    press.post_init_from_model(model)
    budgets = [press.n_kept(400, layer) for layer in range(4)]
    model.config.num_hidden_layers = 2
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > budgets[-1]
    assert abs(sum(budgets) / 4 - 200) <= 1
    # Short context: kvpress caps the first layer at k_len - window_size and raises the last to keep the average.
    assert [press.n_kept(20, layer) for layer in range(4)] == [16, 12, 8, 4]


def test_lagkv_keeps_sinks_and_the_last_lag():
    model = make_model("llama")
    for mask in evicted_after_prefill(LagKVPress(compression_ratio=0.5, n_sink=4, lag_size=32), model, 150):
        assert not mask[..., :4].any()
        # 150 = 4 sinks + 4 full lags (+ 18 tokens); the last full lag and the partial tail are kept.
        assert not mask[..., 4 + 3 * 32 :].any()


def test_expected_attention_keeps_sinks_and_gives_finite_scores():
    model = make_model("qwen3")
    press = ExpectedAttentionPress(compression_ratio=0.5, n_future_positions=64)
    captured = {}

    def capture(module, args, kwargs, output):
        captured.update(module=module, hidden=kwargs["hidden_states"], cache=kwargs["cache"])

    handle = model.model.layers[0].self_attn.register_forward_hook(capture, with_kwargs=True)
    masks = evicted_after_prefill(press, model, 120)
    handle.remove()
    for mask in masks:
        assert not mask[..., :4].any()
    layer = captured["cache"].layers[0]
    with torch.no_grad():
        scores = press.score(captured["module"], captured["hidden"], layer.keys, layer.values, None, {})
    assert scores.shape == (1, 2, 120) and torch.isfinite(scores).all()


def test_streaming_llm_keeps_sinks_and_recent_tokens():
    model = make_model("qwen3")
    for mask in evicted_after_prefill(StreamingLLMPress(compression_ratio=0.5, n_sink=4), model, 100):
        expected = torch.zeros(100, dtype=torch.bool)
        expected[4:54] = True
        assert torch.equal(mask[0, 0], expected) and torch.equal(mask[0, 1], expected)
