"""KVgrad: KVzip's reconstruction attention x |W_o v| x the gradient norm of each attention output."""

from __future__ import annotations

import torch
from conftest import make_model, make_tokenizer, random_ids
from transformers import DynamicCache

from presses import KVgradPress, build_press
from presses.compat import model_cache_kwarg
from presses.kvzip_press import REPEAT_FIRST_CHUNK, chat_template_pieces


def expected_scores(model, tokenizer, context: torch.Tensor) -> list[torch.Tensor]:
    """The score from its definition, computed apart from the press: eager attention of the repeat prompt over the
    plain cache, autograd of sum ||h_last||^2 to each attention output, per layer (1, kv_heads, n)."""
    _, suffix = chat_template_pieces(tokenizer)
    repeat = torch.tensor([tokenizer.encode(REPEAT_FIRST_CHUNK, add_special_tokens=False) + suffix
                           + context[0].tolist()])
    n, heads, kv_heads = context.shape[1], model.config.num_attention_heads, model.config.num_key_value_heads
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(context, **{model_cache_kwarg(): cache})
    outputs, last = {}, {}

    def keep_output(module, args, output):
        output[0].retain_grad()
        outputs[module.layer_idx] = output[0]

    handles = [layer.self_attn.register_forward_hook(keep_output) for layer in model.model.layers]
    handles.append(model.model.layers[-1].register_forward_hook(
        lambda module, args, output: last.update(h=output[0] if isinstance(output, tuple) else output)))
    embeds = model.model.embed_tokens(repeat).detach().requires_grad_(True)
    out = model.model(inputs_embeds=embeds, **{model_cache_kwarg(): cache}, output_attentions=True)
    last["h"].float().square().sum().backward()
    for handle in handles:
        handle.remove()
    model.zero_grad(set_to_none=True)
    scores = []
    for layer_idx, weights in enumerate(out.attentions):
        attention = model.model.layers[layer_idx].self_attn
        values = cache.layers[layer_idx].values[0, :, :n].detach().repeat_interleave(heads // kv_heads, dim=0)
        w_o = attention.o_proj.weight.detach().T.reshape(heads, values.shape[-1], -1)
        value_norms = torch.stack([(values[h] @ w_o[h]).norm(dim=-1) for h in range(heads)])  # (heads, n)
        gradient_norms = outputs[layer_idx].grad[0].norm(dim=-1)  # (R,)
        score = weights[0, :, :, :n].detach() * value_norms[:, None, :] * gradient_norms[None, :, None]
        scores.append(score.amax(dim=1).view(kv_heads, -1, n).amax(dim=1)[None])
    return scores


def test_scores_equal_attention_times_value_norm_times_gradient_norm():
    """No chat template, one chunk, no sinks: the reduced key set is the whole sequence, as eager attention sees it."""
    model, tokenizer = make_model("qwen3", "eager", vocab_size=64), make_tokenizer(chat_template=False)
    context = random_ids(30, vocab_size=64)
    press = KVgradPress(compression_ratio=0.5, n_sink=0)
    press.post_init_from_model(model, tokenizer)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(context, **{model_cache_kwarg(): cache})
        scores = press._score_context(context, cache, 30)
        assert cache.get_seq_length() == 30  # the replay read the cache without growing it
    for layer_idx, expected in enumerate(expected_scores(model, tokenizer, context)):
        torch.testing.assert_close(scores[layer_idx], expected.float(), atol=1e-6, rtol=1e-4)


def test_kvgrad_differs_from_kvzip_leaves_no_gradients_and_keeps_parameters_trainable():
    model, tokenizer = make_model("llama"), make_tokenizer()
    masks = {}
    for name in ("kvzip", "kvgrad"):
        press = build_press(name, compression_ratio=0.5)
        with press(model, tokenizer), torch.no_grad():
            model(random_ids(120))
        assert abs(press.achieved_compression_ratio - 0.5) <= 0.01
        masks[name] = press.evicted_mask(0)
    assert not torch.equal(masks["kvzip"], masks["kvgrad"])
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert repr(build_press("kvgrad", compression_ratio=0.5)) == \
        "KVgradPress(compression_ratio=0.5, layerwise=False, n_sink=4, chunk_size=512)"


def test_kvgrad_runs_under_inference_mode_with_chunks():
    """Prefill tensors made under inference mode cannot enter a graph: the press copies them first."""
    model, tokenizer = make_model("qwen3"), make_tokenizer()
    press = KVgradPress(compression_ratio=0.3, chunk_size=32)
    with press(model, tokenizer), torch.inference_mode():
        model(random_ids(100))
    assert abs(press.achieved_compression_ratio - 0.3) <= 0.01
    assert not press.evicted_mask(1)[..., :4].any()
