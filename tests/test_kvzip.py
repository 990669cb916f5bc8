"""KVzip and KVzip+: scores read from a context-reconstruction pass."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, make_tokenizer, random_ids
from transformers import DynamicCache

from presses import KVzipPress, PressError
from presses.compat import cache_from_kwargs, model_cache_kwarg
from presses.kvzip_press import REPEAT_FIRST_CHUNK, chat_template_pieces


def repeat_attention(model, tokenizer, context: torch.Tensor):
    """Eager attention weights of the first repeat prompt run on top of the context's cache, per layer."""
    _, suffix = chat_template_pieces(tokenizer)
    instruction = tokenizer.encode(REPEAT_FIRST_CHUNK, add_special_tokens=False)
    repeat = torch.tensor([instruction + suffix + context[0].tolist()])
    cache = DynamicCache(config=model.config)
    captured = {}

    def capture(module, args, kwargs, output):
        values = cache_from_kwargs(kwargs).layers[module.layer_idx].values
        captured[module.layer_idx] = (kwargs["hidden_states"], values)

    handles = [layer.self_attn.register_forward_hook(capture, with_kwargs=True) for layer in model.model.layers]
    with torch.no_grad():
        model(context, **{model_cache_kwarg(): cache})
        out = model(repeat, **{model_cache_kwarg(): cache}, output_attentions=True)
    for handle in handles:
        handle.remove()
    return out.attentions, captured


@pytest.mark.parametrize("plus", [False, True])
def test_scores_equal_max_attention_of_the_repeat_pass(plus):
    """With no chat template and one chunk, KVzip's reduced key set is the whole sequence: eager attention."""
    model, tokenizer = make_model("qwen3", "eager", vocab_size=64), make_tokenizer(chat_template=False)
    context = random_ids(30, vocab_size=64)
    press = KVzipPress(compression_ratio=0.5, kvzip_plus_normalization=plus, n_sink=0)
    press.post_init_from_model(model, tokenizer)
    press._scoring = True
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(context, **{model_cache_kwarg(): cache})
        scores = press._score_context(context, cache, 30)
    assert cache.get_seq_length() == 30  # cut back after scoring
    attentions, captured = repeat_attention(model, tokenizer, context)
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    for layer_idx, weights in enumerate(attentions):
        weights = weights[..., :30].float()  # (1, heads, R, 30)
        if plus:
            hidden, values = captured[layer_idx]
            attention = model.model.layers[layer_idx].self_attn
            w_o = attention.o_proj.weight.T.reshape(model.config.num_attention_heads, 16, -1)
            v = values[:, :, :30].repeat_interleave(groups, dim=1)  # (1, heads, 30, 16)
            value_norms = torch.stack([(v[0, h] @ w_o[h]).norm(dim=-1) for h in range(w_o.shape[0])])[None]
            weights = weights * value_norms[:, :, None, :] / hidden.norm(dim=-1)[:, None, :, None]
        expected = weights.amax(dim=2).view(1, 2, groups, 30).amax(dim=2)
        torch.testing.assert_close(scores[layer_idx], expected, atol=1e-5, rtol=1e-4)


def test_kvzip_plus_ranks_differently_from_kvzip(tokenizer):
    model = make_model("llama")
    masks = []
    for plus in (False, True):
        press = KVzipPress(compression_ratio=0.5, kvzip_plus_normalization=plus)
        with press(model, tokenizer), torch.no_grad():
            model(random_ids(120))
        masks.append(press.evicted_mask(0))
    assert not torch.equal(masks[0], masks[1])


def test_chunked_scoring_is_finite_keeps_sinks_and_prunes_the_template_prefix_first():
    model, tokenizer = make_model("qwen3"), make_tokenizer()
    tokenizer.chat_template = "<|im_start|> system you are here . <|im_end|> " + tokenizer.chat_template
    prefix_length, _ = chat_template_pieces(tokenizer)
    assert prefix_length == 9
    prefix = tokenizer.encode("<|im_start|> system you are here . <|im_end|> <|im_start|> user",
                              add_special_tokens=False)
    context = torch.cat([torch.tensor([prefix]), random_ids(150)], dim=1)
    press = KVzipPress(compression_ratio=0.3, chunk_size=16)
    with press(model, tokenizer), torch.no_grad():
        model(context)
    for layer_idx in range(2):
        mask = press.evicted_mask(layer_idx)
        assert not mask[..., :4].any()
        assert mask[..., 4:prefix_length].all()
    assert abs(press.achieved_compression_ratio - 0.3) <= 0.01
    small, whole = KVzipPress(compression_ratio=0.3, chunk_size=16), KVzipPress(compression_ratio=0.3)
    for press in (small, whole):
        press.post_init_from_model(model, tokenizer)
        press._scoring = True
    scores = []
    for press in (small, whole):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(context, **{model_cache_kwarg(): cache})
            scores.append(press._score_context(context, cache, context.shape[1]))
    assert all(torch.isfinite(s).all() for s in scores[0].values())
    assert not torch.equal(scores[0][0], scores[1][0])  # chunks see a different key set


def test_layerwise_selection_removes_the_ratio_in_every_layer(tokenizer):
    model = make_model("qwen3")
    press = KVzipPress(compression_ratio=0.4, layerwise=True)
    with press(model, tokenizer), torch.no_grad():
        model(random_ids(100))
    for layer_idx in range(2):
        assert press.evicted_mask(layer_idx).float().mean().item() == pytest.approx(0.4, abs=0.01)


def test_kvzip_without_a_tokenizer_is_a_clear_error():
    model = make_model("qwen3")
    with pytest.raises(PressError, match="needs the model's tokenizer"):
        with KVzipPress(compression_ratio=0.5)(model):
            pass


def test_kvzip_needs_batch_size_one(tokenizer):
    model = make_model("qwen3")
    with pytest.raises(PressError, match="batch size 1"):
        with KVzipPress(compression_ratio=0.5)(model, tokenizer), torch.no_grad():
            model(torch.cat([random_ids(20), random_ids(20, seed=1)]))
