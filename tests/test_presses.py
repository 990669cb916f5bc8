"""Every registered press on tiny random Llama and Qwen3 models: runs, compresses as asked, never empties a head."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile

import pytest
import torch
from conftest import make_model, random_ids
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

from evaluation.cli import write_random_artifacts
from presses import (
    PRESSES,
    AdaKVPress,
    DMSPress,
    GenerationSettings,
    KnormPress,
    KVzapConfig,
    KVzapModel,
    NoPress,
    PressError,
    answer_questions,
    build_press,
)
from presses.compat import model_cache_kwarg
from presses.generation import decode, eos_token_ids
from presses.registry import KNOBS

RATIO_PRESSES = [name for name, spec in sorted(PRESSES.items()) if spec.knob == "compression_ratio"]
THRESHOLD_PRESSES = [name for name, spec in sorted(PRESSES.items()) if spec.knob == "threshold"]
NO_KNOB_PRESSES = [name for name, spec in sorted(PRESSES.items()) if spec.knob is None]
CHANNEL_PRESSES = [name for name, spec in sorted(PRESSES.items()) if spec.knob == "key_channel_compression_ratio"]
# Presses that keep whole chunks reach the ratio to within one chunk (tokens) of the 200-token context.
CHUNK_TOKENS = {"chunkkv": 20}


@functools.cache
def artifact_dir() -> str:
    """Random DuoAttention patterns, Q-Filters and Fast KVzip gates for the test models (all share one shape)."""
    folder = tempfile.mkdtemp(prefix="press-artifacts-")
    atexit.register(shutil.rmtree, folder, True)
    write_random_artifacts(make_model("qwen3"), folder)
    return folder


@functools.cache
def cached_model(architecture: str, attn_implementation: str = "sdpa"):
    model = make_model(architecture, attn_implementation)
    model.name_or_path = artifact_dir()  # presses with per-model artifacts find them beside the model
    return model


@functools.cache
def surrogate_dir(architecture: str, model_type: str, root: str) -> str:
    config = cached_model(architecture).config
    hidden_dim = None if model_type == "linear" else config.hidden_size // 8
    torch.manual_seed(1)
    surrogate = KVzapModel(KVzapConfig(input_dim=config.hidden_size, output_dim=config.num_key_value_heads,
                                       n_modules=config.num_hidden_layers, hidden_dim=hidden_dim))
    path = f"{root}/kvzap-{architecture}-{model_type}"
    surrogate.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def surrogate_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("surrogates"))


@functools.cache
def budget_curve(architecture: str, root: str) -> str:
    """A LU-KV curve for the tiny model: per ratio, per-head prune ratios spread around the ratio."""
    import numpy as np

    config = cached_model(architecture).config
    rng = np.random.default_rng(0)
    spread = rng.uniform(-0.1, 0.1, (99, config.num_hidden_layers, config.num_key_value_heads))
    spread -= spread.mean(axis=-1, keepdims=True)
    curve = (np.arange(1, 100) / 100)[:, None, None] + spread
    path = f"{root}/lukv-{architecture}.npy"
    np.save(path, np.clip(curve, 0, 0.995))
    return path


def make_press(name: str, architecture: str, root: str, **knob):
    extra = {}
    if name == "lukv":
        extra["budget_curve"] = budget_curve(architecture, root)
    if "kvzap" in name:
        extra["checkpoint"] = surrogate_dir(architecture, "linear" if name == "kvzap_linear" else "mlp", root)
    return build_press(name, **knob, **extra)


def generate(model, press, ids: torch.Tensor, tokenizer, max_new_tokens: int) -> torch.Tensor:
    """Greedy ``model.generate`` on ``ids`` inside ``press``. A press that compresses the context with its question
    (FINCH) gets ``prompt_for`` and our decoding loop (generate's position ids would count the delimiter); the
    output is ``ids`` followed by the new tokens either way."""
    if not press.needs_question:
        return model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    tokens = decode(model, DynamicCache(config=model.config), prompt_for(press, ids, tokenizer),
                    GenerationSettings(max_new_tokens=max_new_tokens), eos_token_ids(model, tokenizer))
    return torch.cat([ids, torch.tensor([tokens])], dim=1)


def prompt_for(press, ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """The prompt a press is run on: ``ids`` itself, or for a press that compresses the context with its question
    (FINCH) the ids split by its delimiter token, the last min(20, n) tokens being the question."""
    if not press.needs_question:
        return ids
    press.prompt_delimiter(tokenizer)
    split = ids.shape[1] - min(20, ids.shape[1])
    return torch.cat([ids[:, :split], torch.tensor([[press.delimiter_token_id]]), ids[:, split:]], dim=1)


def model_for(name: str, architecture: str):
    return cached_model(architecture, "eager" if name == "observed_attention" else "sdpa")


def kept_per_head(press, model) -> list[torch.Tensor]:
    masks = [press.evicted_mask(i) for i in range(model.config.num_hidden_layers)]
    return [(~mask).sum(-1) for mask in masks if mask is not None]


@pytest.mark.parametrize("architecture", ["llama", "qwen3"])
@pytest.mark.parametrize("name", RATIO_PRESSES)
def test_ratio_press_achieves_requested_ratio_and_generates(name, architecture, tokenizer, surrogate_root):
    model = model_for(name, architecture)
    ids = random_ids(200)
    for ratio in (0.25, 0.75):
        press = make_press(name, architecture, surrogate_root, compression_ratio=ratio)
        with press(model, tokenizer):
            out = generate(model, press, ids, tokenizer, 4)
        assert 200 < out.shape[1] <= 204  # a random model may hit its end-of-sequence token early
        tolerance = max(0.01, CHUNK_TOKENS.get(name, 0) / 200)
        assert abs(press.achieved_compression_ratio - ratio) <= tolerance, (name, ratio,
                                                                             press.achieved_compression_ratio)


@pytest.mark.parametrize("architecture", ["llama", "qwen3"])
@pytest.mark.parametrize("name", THRESHOLD_PRESSES)
def test_threshold_press_compression_grows_with_threshold(name, architecture, tokenizer, surrogate_root):
    model = model_for(name, architecture)
    ids = random_ids(400)
    achieved = []
    for threshold in (-50.0, -0.2, 0.0, 0.2, 50.0):
        press = make_press(name, architecture, surrogate_root, threshold=threshold)
        with press(model, tokenizer):
            model.generate(ids, max_new_tokens=3, do_sample=False)
        achieved.append(press.achieved_compression_ratio)
    assert achieved == sorted(achieved), achieved
    assert achieved[0] == 0.0
    # Everything outside the 128-token window goes at a huge threshold.
    assert achieved[-1] == pytest.approx((400 - 128) / 400)


@pytest.mark.parametrize("architecture", ["llama", "qwen3"])
@pytest.mark.parametrize("name", CHANNEL_PRESSES)
def test_key_channel_press_zeroes_more_channels_as_its_knob_grows(name, architecture, tokenizer, surrogate_root):
    model = cached_model(architecture)
    ids = random_ids(120)
    zeroed = []
    for ratio in (0.0, 0.25, 0.5, 0.75):
        press = make_press(name, architecture, surrogate_root, key_channel_compression_ratio=ratio)
        cache = DynamicCache(config=model.config)
        with press(model, tokenizer), torch.no_grad():
            model(input_ids=ids, **{model_cache_kwarg(): cache})
        keys = cache.layers[0].keys  # (batch, kv_heads, 120, head_dim)
        zeroed.append(int((keys == 0).all(dim=2).sum(-1).min()))
        assert press.achieved_compression_ratio == pytest.approx(ratio / 2)
        assert press.rewrites_cache
    head_dim = model.config.head_dim
    assert zeroed == [int(head_dim * r) for r in (0.0, 0.25, 0.5, 0.75)], zeroed


@pytest.mark.parametrize("name", NO_KNOB_PRESSES)
def test_presses_without_knob_run(name, tokenizer, surrogate_root):
    model = cached_model("qwen3")
    decoding = name.startswith(("decoding", "cam_"))
    kwargs = {"compression_interval": 4, "target_size": 32} if decoding else {}
    press = make_press(name, "qwen3", surrogate_root, **kwargs)
    answers, _ = answer_questions(model, tokenizer, random_ids(64), [random_ids(5, seed=1)], press,
                                  GenerationSettings(max_new_tokens=12))
    assert len(answers[0].token_ids) == 12
    if decoding:
        # Compressed every 4 steps down to 32 pairs per head; at most 3 steps since the last compression.
        assert all(int(k.max()) <= 32 + 3 for k in kept_per_head(press, model))
        assert press.achieved_compression_ratio > 0.4
    else:
        assert press.achieved_compression_ratio == 0.0


def test_knob_is_declared_by_every_press():
    for name, spec in PRESSES.items():
        assert spec.knob in (*KNOBS, None), name
    assert {"kvzap_mlp", "kvzap_linear"} <= set(THRESHOLD_PRESSES)
    assert {"knorm", "snapkv", "kvzap_mlp_head", "kvzap_mlp_layer", "adakv_snapkv"} <= set(RATIO_PRESSES)


@pytest.mark.parametrize("context_length", [1, 10, 200])
@pytest.mark.parametrize("name", RATIO_PRESSES + THRESHOLD_PRESSES)
def test_short_contexts_never_empty_a_head(name, context_length, tokenizer, surrogate_root):
    model = model_for(name, "qwen3")
    knob = {"threshold": 1e6} if name in THRESHOLD_PRESSES else {"compression_ratio": 0.95}
    press = make_press(name, "qwen3", surrogate_root, **knob)
    with press(model, tokenizer):
        generate(model, press, random_ids(context_length), tokenizer, 2)
    kept = kept_per_head(press, model)
    assert kept and all(int(k.min()) >= 1 for k in kept)


def test_no_press_output_equals_plain_model():
    model = cached_model("llama")
    ids = random_ids(50)
    plain = model.generate(ids, max_new_tokens=10, do_sample=False)
    with NoPress()(model):
        pressed = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(plain, pressed)
    with torch.no_grad():
        reference = model(ids).logits
        with NoPress()(model):
            logits = model(ids).logits
    assert torch.equal(reference, logits)


def test_press_changes_generation_and_hooks_are_removed():
    model = cached_model("qwen3")
    ids = random_ids(100)
    plain = model.generate(ids, max_new_tokens=10, do_sample=False)
    press = KnormPress(compression_ratio=0.9)
    with press(model):
        pressed = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert not torch.equal(plain, pressed)
    attention = model.model.layers[0].self_attn
    assert not attention._forward_hooks and not attention._forward_pre_hooks
    with pytest.raises(RuntimeError, match="boom"):
        with press(model):
            raise RuntimeError("boom")
    assert not attention._forward_hooks and not attention._forward_pre_hooks
    assert torch.equal(model.generate(ids, max_new_tokens=10, do_sample=False), plain)


def test_evicted_pairs_get_zero_attention_while_decoding():
    """AdaKV evicts different pairs in each head; those pairs must receive exactly zero weight afterwards."""
    model = cached_model("qwen3", "eager")
    ids = random_ids(120)
    press = AdaKVPress(KnormPress(compression_ratio=0.6))
    cache = DynamicCache(config=model.config)
    with press(model, kv_storage="mask"), torch.no_grad():  # masked storage: evicted pairs are still there to weigh
        model(input_ids=ids, **{model_cache_kwarg(): cache})
        out = model(input_ids=random_ids(3, seed=5), **{model_cache_kwarg(): cache}, output_attentions=True)
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    ragged = False
    for layer_idx, weights in enumerate(out.attentions):  # (batch, heads, 3, 123)
        evicted = press.evicted_mask(layer_idx)  # (batch, kv_heads, 120)
        kept = (~evicted).sum(-1)
        ragged |= bool((kept != kept[:, :1]).any())
        per_query_head = evicted.repeat_interleave(groups, dim=1)[:, :, None, :].expand(-1, -1, 3, -1)
        assert torch.all(weights[..., :120][per_query_head] == 0)
        assert torch.all(weights[..., :120][~per_query_head] > 0)
    assert ragged, "AdaKV should give heads different budgets"


def test_sdpa_and_eager_agree_under_head_wise_eviction():
    ids = random_ids(90)
    outputs = []
    for implementation in ("sdpa", "eager"):
        model = cached_model("llama", implementation)
        press = AdaKVPress(KnormPress(compression_ratio=0.5))
        cache = DynamicCache(config=model.config)
        with press(model), torch.no_grad():
            model(input_ids=ids, **{model_cache_kwarg(): cache})
            outputs.append(model(input_ids=random_ids(4, seed=2), **{model_cache_kwarg(): cache}).logits)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-4, rtol=1e-4)


def test_streaming_llm_keeps_sinks_and_recent_tokens():
    model = cached_model("qwen3")
    press = build_press("streaming_llm", compression_ratio=0.5)
    with press(model), torch.no_grad():
        model(random_ids(100))
    expected = torch.zeros(100, dtype=torch.bool)
    expected[4:54] = True
    for layer_idx in range(2):
        mask = press.evicted_mask(layer_idx)
        assert torch.equal(mask[0, 0], expected) and torch.equal(mask[0, 1], expected)


def test_dms_sliding_window_is_never_evicted_in_prefill_or_decoding():
    model = cached_model("qwen3")
    ids = random_ids(100)
    window = 16
    press = DMSPress(KnormPress(), threshold=1e9, sliding_window_size=window, decoding=True)
    cache = DynamicCache(config=model.config)
    with press(model), torch.no_grad():
        model(input_ids=ids, **{model_cache_kwarg(): cache})
        for layer_idx in range(2):
            mask = press.evicted_mask(layer_idx)
            assert mask[..., : 100 - window].all() and not mask[..., 100 - window :].any()
        token = random_ids(1, seed=3)
        for step in range(1, 11):
            model(input_ids=token, **{model_cache_kwarg(): cache})
            for layer_idx in range(2):
                mask = press.evicted_mask(layer_idx)
                assert mask.shape[-1] == 100 + step
                # Tokens leaving the window are evicted one by one; the window itself never is.
                assert mask[..., : 100 + step - window].all() and not mask[..., 100 + step - window :].any()


def test_dms_without_decoding_only_prunes_the_context():
    model = cached_model("qwen3")
    press = DMSPress(KnormPress(), threshold=1e9, sliding_window_size=16, decoding=False)
    with press(model):
        model.generate(random_ids(100), max_new_tokens=30, do_sample=False)
    assert press.evicted_mask(0).shape[-1] == 100
    assert press.achieved_compression_ratio == pytest.approx(84 / 100)


def test_random_press_and_sampling_are_reproducible_with_a_seed(tokenizer):
    model = cached_model("llama")
    settings = GenerationSettings(max_new_tokens=15, do_sample=True, temperature=0.8, top_p=0.9, top_k=20, seed=7)
    runs = []
    for _ in range(2):
        press = build_press("random", compression_ratio=0.5, seed=3)
        answers, ratio = answer_questions(model, tokenizer, random_ids(80), [random_ids(4, seed=9)], press, settings)
        runs.append((answers[0].token_ids, ratio, press.evicted_mask(1).clone()))
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]
    assert torch.equal(runs[0][2], runs[1][2])
    other = GenerationSettings(max_new_tokens=15, do_sample=True, temperature=0.8, top_p=0.9, top_k=20, seed=8)
    answers, _ = answer_questions(model, tokenizer, random_ids(80), [random_ids(4, seed=9)],
                                  build_press("random", compression_ratio=0.5, seed=3), other)
    assert answers[0].token_ids != runs[0][0]


def test_questions_sharing_a_context_see_the_same_compressed_cache(tokenizer):
    """Answering [q1, q2] must give the same answer to q2 as answering [q2] alone, even with decoding DMS."""
    model = cached_model("qwen3")
    context, q1, q2 = random_ids(150), random_ids(6, seed=1), random_ids(6, seed=2)
    settings = GenerationSettings(max_new_tokens=20)

    def press():
        return DMSPress(KnormPress(), threshold=-3.0, sliding_window_size=8, decoding=True)

    both, ratio_both = answer_questions(model, tokenizer, context, [q1, q2], press(), settings)
    alone, ratio_alone = answer_questions(model, tokenizer, context, [q2], press(), settings)
    assert both[1].token_ids == alone[0].token_ids
    assert ratio_both == ratio_alone


def test_cam_merges_of_one_answer_do_not_reach_the_next_question(tokenizer, monkeypatch):
    """CAM adds evicted values to kept context values while decoding: the next question must start again from the
    post-prefill cache, so answering [q2, q1, q2] gives q2 the answer [q2] alone gets."""
    # CAM draws each merge; drawn here as p >= 0.5 so that the answers depend on the cache only, not on how many
    # draws earlier questions consumed.
    monkeypatch.setattr(torch, "bernoulli", lambda p: (p >= 0.5).to(p.dtype))
    model = cached_model("qwen3")
    context, q1, q2 = random_ids(150), random_ids(6, seed=1), random_ids(6, seed=2)
    settings = GenerationSettings(max_new_tokens=20)

    def press():
        return build_press("cam_knorm", compression_interval=4, target_size=64, merge_budget=8)

    both, _ = answer_questions(model, tokenizer, context, [q2, q1, q2], press(), settings)
    alone, _ = answer_questions(model, tokenizer, context, [q2], press(), settings)
    assert both[0].token_ids == alone[0].token_ids
    assert both[2].token_ids == alone[0].token_ids


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_on_cpu(dtype, surrogate_root, tokenizer):
    model = make_model("qwen3", dtype=dtype)
    for press in (KnormPress(compression_ratio=0.5), AdaKVPress(KnormPress(compression_ratio=0.5)),
                  make_press("kvzap_mlp", "qwen3", surrogate_root, threshold=0.0)):
        with press(model, tokenizer):
            out = model.generate(random_ids(200), max_new_tokens=5, do_sample=False)
        assert 200 < out.shape[1] <= 205
        assert press.achieved_compression_ratio > 0


@pytest.mark.parametrize("architecture", ["mistral", "qwen2", "phi3", "gemma3"])
def test_other_supported_architectures(architecture):
    model = make_model(architecture)
    for press in (AdaKVPress(KnormPress(compression_ratio=0.5)), build_press("snapkv", compression_ratio=0.5),
                  DMSPress(KnormPress(), threshold=0.0, sliding_window_size=8, decoding=True)):
        with press(model):
            out = model.generate(random_ids(100), max_new_tokens=5, do_sample=False)
        assert 100 < out.shape[1] <= 105 and press.achieved_compression_ratio > 0


# ------------------------------------------------------------------------------------------------------------------
# Bad input: one-line errors that say what to do.


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_unknown_press_lists_close_matches():
    with pytest.raises(PressError) as error:
        build_press("knrom", compression_ratio=0.5)
    message = one_line(error)
    assert "unknown press 'knrom'" in message and "did you mean knorm" in message and "snapkv" in message


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_ratio_out_of_range(ratio):
    with pytest.raises(PressError) as error:
        build_press("knorm", compression_ratio=ratio)
    assert "[0, 1)" in one_line(error)
    with pytest.raises(PressError):
        AdaKVPress(KnormPress()).compression_ratio = ratio


def test_knob_given_to_the_wrong_kind_of_press():
    with pytest.raises(PressError) as error:
        build_press("knorm", threshold=-4)
    assert "takes --compression_ratio, not --threshold" in one_line(error)
    with pytest.raises(PressError) as error:
        build_press("kvzap_mlp", compression_ratio=0.5)
    assert "takes --threshold, not --compression_ratio" in one_line(error)
    with pytest.raises(PressError) as error:
        build_press("decoding_knorm", compression_ratio=0.5)
    assert "takes neither" in one_line(error)


def test_unsupported_architecture():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(PressError) as error:
        with KnormPress(compression_ratio=0.5)(model):
            pass
    assert "unsupported architecture 'gpt2'" in one_line(error)


def test_observed_attention_needs_eager():
    model = cached_model("qwen3", "sdpa")
    with pytest.raises(PressError) as error:
        with build_press("observed_attention", compression_ratio=0.5)(model):
            model(random_ids(20))
    assert "eager" in one_line(error)


def test_missing_kvzap_surrogate_says_how_to_get_one(tmp_path):
    model = cached_model("qwen3")
    with pytest.raises(PressError) as error:
        with build_press("kvzap_mlp", threshold=-4, checkpoint=str(tmp_path / "missing"))(model):
            pass
    message = one_line(error)
    assert "no KVzap surrogate" in message and "checkpoint=" in message and "train" in message


def test_kvzap_surrogate_of_another_model_is_rejected(surrogate_root):
    other = KVzapModel(KVzapConfig(input_dim=32, output_dim=2, n_modules=2, hidden_dim=None))
    path = f"{surrogate_root}/wrong-shape"
    other.save_pretrained(path)
    with pytest.raises(PressError) as error:
        with build_press("kvzap_linear", threshold=-4, checkpoint=path)(cached_model("qwen3")):
            pass
    assert "(layers, hidden size, kv heads) = (2, 32, 2)" in one_line(error)


@pytest.mark.parametrize("k_len", [1, 10, 15, 199, 200, 201])
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.7, 0.75, 0.8, 0.9])
def test_kept_count_per_head_is_kvpress_count_without_float_error(k_len, ratio):
    from fractions import Fraction

    from presses.base_press import n_kept_pairs

    exact = int(k_len * (1 - Fraction(str(ratio))))  # kvpress's int(k * (1 - r)), in exact arithmetic
    assert n_kept_pairs(k_len, ratio) == max(1, exact)


@pytest.mark.parametrize("name", ["knorm", "snapkv", "adakv_snapkv", "expected_attention"])
def test_presses_keep_int_k_times_one_minus_ratio_pairs_per_head(name):
    model = cached_model("qwen3")
    press = build_press(name, compression_ratio=0.8)
    with press(model), torch.no_grad():
        model(random_ids(199))
    kept = torch.stack(kept_per_head(press, model))
    # 199 * 0.2 = 39.8: 39 pairs per head on average (AdaKV: per layer); ``k - int(k * r)`` would give 40.
    assert float(kept.float().mean()) == 39.0


def test_knorm_in_bfloat16_keeps_what_float32_norms_of_the_same_keys_choose():
    model = make_model("qwen3", "sdpa").to(torch.bfloat16)
    press = KnormPress(compression_ratio=0.5)
    cache = DynamicCache(config=model.config)
    with press(model, kv_storage="mask"), torch.no_grad():  # every key stays in the cache, to recompute norms
        model(input_ids=random_ids(150), **{model_cache_kwarg(): cache})
    for layer_idx in range(model.config.num_hidden_layers):
        keys = cache.layers[layer_idx].keys
        assert keys.dtype == torch.bfloat16
        chosen = (-keys.float().norm(dim=-1)).topk(75, dim=-1).indices
        expected = torch.ones_like(press.evicted_mask(layer_idx)).scatter_(-1, chosen, False)
        assert torch.equal(press.evicted_mask(layer_idx), expected)
