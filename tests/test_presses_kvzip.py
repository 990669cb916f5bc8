"""KVzipPress and kvzip_scores on tiny random Llama and Qwen3 models with an offline word-level tokenizer."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from conftest import make_model, make_tokenizer, random_ids
from transformers import DynamicCache, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention

from presses.compat import model_cache_kwarg
from presses.errors import PressError
from presses.kvzip_press import (
    REPEAT_FIRST_CHUNK,
    REPEAT_NEXT_CHUNK,
    KVzipPress,
    chat_template_pieces,
    kvzip_scores,
)


def tiny(architecture: str = "qwen3", attn_implementation: str = "sdpa"):
    return _tiny(architecture, attn_implementation)  # positional, so tiny() and tiny("qwen3") share one model


@functools.cache
def _tiny(architecture: str, attn_implementation: str):
    return make_model(architecture, attn_implementation)


@functools.cache
def word_tokenizer(chat_template: bool = True):
    return make_tokenizer(chat_template=chat_template)


def run(press: KVzipPress, context: torch.Tensor, architecture: str = "qwen3", chat_template: bool = True):
    model = tiny(architecture)
    with press(model, word_tokenizer(chat_template)), torch.no_grad():
        model(context)
    return [press.evicted_mask(i) for i in range(model.config.num_hidden_layers)]


def direct_scores(press: KVzipPress, context: torch.Tensor, architecture: str = "qwen3"):
    """Scores of ``press`` for ``context`` without selection; also returns the cache length after scoring."""
    model = tiny(architecture)
    press.post_init_from_model(model, word_tokenizer())
    press._scoring = True
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(context, **{model_cache_kwarg(): cache})
        scores = press._score_context(context, cache, context.shape[1])
    return scores, cache.get_seq_length()


# ------------------------------------------------------------------------------------------------------------------
# The scoring function.


def one_head_attention(o_weight: list[list[float]]) -> LlamaAttention:
    config = LlamaConfig(hidden_size=2, num_attention_heads=1, num_key_value_heads=1, head_dim=2,
                         intermediate_size=4, num_hidden_layers=1, vocab_size=8)
    module = LlamaAttention(config, layer_idx=0)
    with torch.no_grad():
        module.q_proj.weight.copy_(torch.eye(2))  # queries = hidden states
        module.o_proj.weight.copy_(torch.tensor(o_weight))
    return module


def softmax(logits: list[float]) -> list[float]:
    total = sum(math.exp(x) for x in logits)
    return [math.exp(x) / total for x in logits]


@pytest.mark.parametrize("plus", [False, True])
def test_kvzip_scores_by_hand_on_one_head(plus):
    """Keys: 0 sink, 1-2 scored, 3 outside the reduced set, 4-5 the two queries' own keys (causal)."""
    module = one_head_attention([[3.0, 0.0], [0.0, 1.0]])  # ||W_o v|| = ||(3 v0, v1)||
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # x0, x1: norms 1 and 2
    no_rotation = (torch.ones(1, 2, 2), torch.zeros(1, 2, 2))
    keys = torch.tensor([[1, 1], [2, 0], [0, 1], [5, 5], [1, 0], [0, 1]], dtype=torch.float32)[None, None]
    values = torch.tensor([[0, 0], [1, 0], [0, 2], [9, 9], [0, 0], [0, 0]], dtype=torch.float32)[None, None]
    got = kvzip_scores(module, hidden, no_rotation, keys, values, slice(1, 3), plus, n_sink=1)

    s = 1 / math.sqrt(2)
    a0 = softmax([s * 1, s * 2, s * 0, s * 1])  # x0 . k over keys 0, 1, 2, 4 (key 5 is in its future)
    a1 = softmax([s * 2, s * 0, s * 2, s * 0, s * 2])  # x1 . k over keys 0, 1, 2, 4, 5
    if plus:
        expected = [max(a0[1] * 3 / 1, a1[1] * 3 / 2), max(a0[2] * 2 / 1, a1[2] * 2 / 2)]
    else:
        expected = [max(a0[1], a1[1]), max(a0[2], a1[2])]
    torch.testing.assert_close(got, torch.tensor([[expected]]), rtol=1e-5, atol=1e-7)


def test_kvzip_scores_reject_a_slice_overlapping_the_queries():
    module = one_head_attention([[1.0, 0.0], [0.0, 1.0]])
    keys = torch.zeros(1, 1, 4, 2)
    with pytest.raises(ValueError, match="before the 2 query positions"):
        kvzip_scores(module, torch.ones(1, 2, 2), (torch.ones(1, 2, 2), torch.zeros(1, 2, 2)), keys, keys,
                     slice(0, 3))


@pytest.mark.parametrize("architecture", ["llama", "qwen3"])
@pytest.mark.parametrize("plus", [False, True])
def test_full_key_slice_equals_eager_attention(architecture, plus):
    """With the whole causal prefix as key set, the score is the max of eager attention over queries and group."""
    model = tiny(architecture, "eager")
    ids, n_queries = random_ids(40), 12
    inputs = {}

    def capture(module, args, kwargs, output):
        cos, sin = kwargs["position_embeddings"]
        inputs[module.layer_idx] = (kwargs["hidden_states"][:, -n_queries:], (cos[:, -n_queries:], sin[:, -n_queries:]))

    handles = [layer.self_attn.register_forward_hook(capture, with_kwargs=True) for layer in model.model.layers]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(ids, **{model_cache_kwarg(): cache}, output_attentions=True)
    for handle in handles:
        handle.remove()
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    for layer, attention in enumerate(out.attentions):
        module = model.model.layers[layer].self_attn
        keys, values = cache.layers[layer].keys, cache.layers[layer].values
        hidden, position_embeddings = inputs[layer]
        with torch.no_grad():
            got = kvzip_scores(module, hidden, position_embeddings, keys, values, slice(0, 28), plus)
        weights = attention[:, :, -n_queries:, :28]  # (1, heads, queries, keys)
        if plus:
            w_o = module.o_proj.weight.T.reshape(model.config.num_attention_heads, 16, -1)
            v = values[:, :, :28].repeat_interleave(groups, dim=1)[0]  # (heads, 28, head_dim)
            weights = weights * (v @ w_o).norm(dim=-1)[None, :, None, :] / hidden.norm(dim=-1)[:, None, :, None]
        expected = weights.amax(dim=2).view(1, -1, groups, 28).amax(dim=2)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# The press.


@pytest.mark.parametrize("architecture", ["llama", "qwen3"])
@pytest.mark.parametrize("layerwise", [False, True])
def test_achieved_compression_matches_the_ratio_under_generate(architecture, layerwise):
    model, ids = tiny(architecture), random_ids(200)
    for ratio in (0.25, 0.75):
        press = KVzipPress(compression_ratio=ratio, layerwise=layerwise)
        with press(model, word_tokenizer()):
            out = model.generate(ids, max_new_tokens=4, do_sample=False)
        assert 200 < out.shape[1] <= 204
        assert abs(press.achieved_compression_ratio - ratio) <= 0.01
        masks = [press.evicted_mask(i) for i in range(2)]
        assert all(mask.shape == (1, 2, 200) for mask in masks)
        if layerwise:
            assert all(abs(mask.float().mean().item() - ratio) <= 0.01 for mask in masks)


@pytest.mark.parametrize("n_sink", [0, 4])
@pytest.mark.parametrize("context_length", [1, 10])
@pytest.mark.parametrize("layerwise", [False, True])
def test_short_contexts_never_empty_a_head(context_length, n_sink, layerwise):
    press = KVzipPress(compression_ratio=0.95, n_sink=n_sink, layerwise=layerwise)
    with press(tiny(), word_tokenizer()), torch.no_grad():
        tiny().generate(random_ids(context_length), max_new_tokens=2, do_sample=False)
    for layer in range(2):
        assert int((~press.evicted_mask(layer)).sum(-1).min()) >= 1


@pytest.mark.parametrize("n_sink", [4, 7])
def test_sinks_are_kept_even_inside_the_first_chunk(n_sink):
    """No chat template: the first chunk starts at position 0, so the sinks are scored too, yet kept."""
    masks = run(KVzipPress(compression_ratio=0.9, n_sink=n_sink), random_ids(120), chat_template=False)
    for mask in masks:
        assert not mask[..., :n_sink].any()
        assert mask[..., n_sink:].float().mean() > 0.85


def test_chat_template_prefix_is_pruned_first():
    tokenizer = make_tokenizer()
    tokenizer.chat_template = "<|im_start|> system you are here . <|im_end|> " + tokenizer.chat_template
    prefix_length, suffix_ids = chat_template_pieces(tokenizer)
    assert prefix_length == 9
    assert suffix_ids == tokenizer.encode("<|im_end|> <|im_start|> assistant", add_special_tokens=False)
    prefix = tokenizer.encode("<|im_start|> system you are here . <|im_end|> <|im_start|> user",
                              add_special_tokens=False)
    context = torch.cat([torch.tensor([prefix]), random_ids(100)], dim=1)
    press = KVzipPress(compression_ratio=0.1)
    with press(tiny(), tokenizer), torch.no_grad():
        tiny()(context)
    for layer in range(2):
        mask = press.evicted_mask(layer)
        assert not mask[..., :4].any() and mask[..., 4:9].all()
    assert abs(press.achieved_compression_ratio - 0.1) <= 0.01


def test_template_pieces_without_a_chat_template():
    tokenizer = word_tokenizer(chat_template=False)
    assert chat_template_pieces(tokenizer) == (0, tokenizer.encode("\n", add_special_tokens=False))
    assert chat_template_pieces(word_tokenizer()) == (2, tokenizer.encode("<|im_end|> <|im_start|> assistant",
                                                                          add_special_tokens=False))


@pytest.mark.parametrize("chunk_size", [16, 5])
def test_repeat_prompts_chunk_the_context_and_quote_the_previous_chunk(chunk_size):
    tokenizer = word_tokenizer()
    press = KVzipPress(compression_ratio=0.5, chunk_size=chunk_size)
    press.post_init_from_model(tiny(), tokenizer)
    context = list(range(100, 140))  # 2 template-prefix positions, then 38 context tokens
    prompts = list(press._repeat_prompts(context))
    first = tokenizer.encode(REPEAT_FIRST_CHUNK, add_special_tokens=False)
    following = tokenizer.encode(REPEAT_NEXT_CHUNK, add_special_tokens=False)
    suffix = chat_template_pieces(tokenizer)[1]
    assert [s.start for s, _ in prompts] == list(range(2, 40, chunk_size))
    assert prompts[-1][0].stop == 40
    assert prompts[0][1] == first + suffix + context[2 : 2 + chunk_size]
    for (previous, _), (scored, ids) in zip(prompts, prompts[1:], strict=False):
        quoted = context[previous.stop - min(8, chunk_size) : previous.stop]
        assert ids == following + quoted + suffix + context[scored]


@pytest.mark.parametrize("plus", [False, True])
def test_chunked_scoring_is_finite_and_cuts_the_cache_back(plus):
    context = random_ids(150)
    repeat_lengths = []
    hook = tiny().model.register_forward_hook(lambda module, args, kwargs, out: repeat_lengths.append(
        kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        small, length = direct_scores(KVzipPress(compression_ratio=0.5, chunk_size=16, kvzip_plus_normalization=plus),
                                      context)
    finally:
        hook.remove()
    whole, _ = direct_scores(KVzipPress(compression_ratio=0.5, kvzip_plus_normalization=plus), context)
    assert length == 150
    assert len(repeat_lengths) == 1 + math.ceil(148 / 16)  # the prefill, then one forward per chunk
    assert max(repeat_lengths[1:]) <= 16 + 25  # a chunk plus instruction, quote and template: O(chunk)
    for layer in range(2):
        assert torch.isfinite(small[layer]).all() and (small[layer][..., 2:] > 0).all()
        assert not torch.equal(small[layer], whole[layer])  # each chunk sees its own reduced key set
    masks = run(KVzipPress(compression_ratio=0.5, chunk_size=16, kvzip_plus_normalization=plus), context)
    assert abs(torch.stack(masks).float().mean().item() - 0.5) <= 0.01


def test_kvzip_plus_ranks_differently_from_kvzip():
    context = random_ids(120)
    plain, _ = direct_scores(KVzipPress(compression_ratio=0.5), context)
    plus, _ = direct_scores(KVzipPress(compression_ratio=0.5, kvzip_plus_normalization=True), context)
    assert not torch.allclose(plain[0], plus[0])
    masks = [run(KVzipPress(compression_ratio=0.5, kvzip_plus_normalization=flag), context) for flag in (False, True)]
    assert not torch.equal(torch.stack(masks[0]), torch.stack(masks[1]))


def test_zero_ratio_skips_scoring_and_evicts_nothing():
    calls = []
    hook = tiny().model.register_forward_hook(lambda *args: calls.append(1))
    try:
        masks = run(KVzipPress(compression_ratio=0.0), random_ids(50))
    finally:
        hook.remove()
    assert len(calls) == 1 and not torch.stack(masks).any()


def test_decoding_under_the_press_ignores_evicted_pairs():
    """The cache after the press holds only the context; the next forward sees the evictions."""
    model, context = tiny(), random_ids(60)
    press = KVzipPress(compression_ratio=0.5)
    cache = DynamicCache(config=model.config)
    with press(model, word_tokenizer()), torch.no_grad():
        model(context, **{model_cache_kwarg(): cache})
        assert cache.get_seq_length() == 60
        pressed = model(random_ids(3, seed=1), **{model_cache_kwarg(): cache}).logits
    dense_cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(context, **{model_cache_kwarg(): dense_cache})
        dense = model(random_ids(3, seed=1), **{model_cache_kwarg(): dense_cache}).logits
    assert not torch.allclose(pressed, dense)


# ------------------------------------------------------------------------------------------------------------------
# Errors.


def test_missing_tokenizer_is_a_press_error():
    with pytest.raises(PressError, match=r"kvzip needs the model's tokenizer: call press\(model, tokenizer\)"):
        with KVzipPress(compression_ratio=0.5)(tiny()):
            pass


def test_batch_size_above_one_is_a_press_error():
    with pytest.raises(PressError, match="batch size 1"):
        run(KVzipPress(compression_ratio=0.5), torch.cat([random_ids(20), random_ids(20, seed=1)]))


def test_sliding_window_models_are_refused():
    with pytest.raises(PressError, match="sliding-window"):
        with KVzipPress(compression_ratio=0.5)(make_model("gemma3"), word_tokenizer()):
            pass


@pytest.mark.parametrize("kwargs", [{"compression_ratio": 1.0}, {"compression_ratio": -0.1}, {"chunk_size": 0},
                                    {"n_sink": -1}])
def test_bad_settings_are_press_errors(kwargs):
    with pytest.raises(PressError):
        KVzipPress(**kwargs)
