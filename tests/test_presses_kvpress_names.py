"""kvpress's registry names: present, same wrappers and defaults; ThinK's knob swept like the others."""

from __future__ import annotations

import pytest
import torch

from evaluation.cache import run_folder_name
from evaluation.config import ConfigError, resolve_config
from evaluation.runner import sweep_grid
from presses import PRESSES, AdaKVPress, ExpectedAttentionPress, build_press
from presses.registry import KVPRESS_NAMES

# kvpress 0.5.5 evaluate_registry.py names that come with DuoAttention, QFilter and FastKVzip (their own issue).
# All 54 names of kvpress's evaluation/evaluate_registry.py (0.5.5).
KVPRESS_REGISTRY = {
    "adakv_snapkv", "block_keydiff", "chunkkv", "critical_adakv_expected_attention", "critical_adakv_snapkv",
    "critical_expected_attention", "critical_snapkv", "cur", "duo_attention", "duo_attention_on_the_fly",
    "expected_attention", "fastkvzip", "finch", "keydiff", "kvcompose", "kvcompose_unstructured", "kvzip",
    "kvzip_plus", "kvzap_linear", "kvzap_mlp", "kvzap_mlp_head", "kvzap_mlp_layer", "lagkv", "lukv", "knorm",
    "observed_attention", "pyramidkv", "qfilter", "random", "RestoreKV", "RestoreKV_plus", "snap_think", "snapkv",
    "streaming_llm", "think", "tova", "compactor", "adakv_compactor", "no_press", "cam_streaming_llm", "cam_knorm",
    "cam_adakv_snapkv", "cam_tova", "decoding_knorm", "decoding_streaming_llm", "decoding_tova", "decoding_qfilter",
    "decoding_adakv_expected_attention_e2", "decoding_adakv_snapkv", "decoding_keydiff", "merging_knorm",
    "merging_snapkv", "merging_expected_attention", "merging_kvzap_mlp",
}
# Not built yet (issue 14 left them open): this set may only shrink.
NOT_YET: set[str] = set()


def test_every_kvpress_name_is_registered():
    assert len(KVPRESS_REGISTRY) == 54
    assert KVPRESS_NAMES == KVPRESS_REGISTRY - NOT_YET
    assert KVPRESS_NAMES <= set(PRESSES)
    assert not NOT_YET & set(PRESSES)


def test_expected_attention_is_kvpress_adakv_with_epsilon_and_plain_has_its_own_name():
    press = build_press("expected_attention", compression_ratio=0.5)
    assert isinstance(press, AdaKVPress) and isinstance(press.press, ExpectedAttentionPress)
    assert press.press.epsilon == 1e-2 and press.alpha_safeguard == 0.2
    plain = build_press("expected_attention_plain", compression_ratio=0.5)
    assert type(plain) is ExpectedAttentionPress and plain.epsilon == 0.0


@pytest.mark.parametrize("name, expected", [
    ("chunkkv", "ChunkKVPress(press=SnapKVPress(compression_ratio=0.5, window_size=64, kernel_size=5), "
                "chunk_length=20)"),
    ("block_keydiff", "BlockPress(press=KeyDiffPress(compression_ratio=0.5), block_size=128)"),
    ("critical_expected_attention", "CriticalKVPress(press=ExpectedAttentionPress(compression_ratio=0.5, "
                                    "n_future_positions=512, n_sink=4, use_covariance=True, use_vnorm=False, "
                                    "epsilon=0.0), epsilon=0.0001, first_stage_ratio=0.5)"),
    ("cur", "CURPress(compression_ratio=0.5, num_sinks=4, leverage_type='kv_product', use_random_leverage=False, "
            "use_local_approximation=True, local_window_size=16)"),
])
def test_kvpress_names_build_kvpress_constructors(name, expected):
    assert repr(build_press(name, compression_ratio=0.5)) == expected


def test_think_knob_is_swept_and_named_in_run_ids():
    config = resolve_config(press="think,knorm", key_channel_compression_ratio="0.25,0.5", compression_ratio="0.5",
                            max_samples=1)
    grid = sweep_grid(config)
    points = sorted((spec.press, spec.knob, spec.value) for spec in grid if spec.dataset == "ruler")
    assert points == [("knorm", "compression_ratio", 0.5), ("think", "key_channel_compression_ratio", 0.25),
                      ("think", "key_channel_compression_ratio", 0.5)]
    name = run_folder_name("m", "ruler", "think", "key_channel_compression_ratio", 0.25, {"a": 1})
    assert "key_channel_compression_ratio=0.25" in name


def test_key_channel_ratio_for_presses_without_it_and_out_of_range_are_one_line_errors():
    with pytest.raises(ConfigError, match="--key_channel_compression_ratio is not taken by knorm"):
        resolve_config(press="knorm", key_channel_compression_ratio="0.5")
    with pytest.raises(ConfigError, match=r"must be in \[0, 1\)"):
        resolve_config(press="think", key_channel_compression_ratio="1.5")


def test_presses_that_rewrite_the_cache_say_so_through_their_wrappers():
    assert build_press("think", key_channel_compression_ratio=0.5).rewrites_cache
    assert build_press("snap_think", compression_ratio=0.5).rewrites_cache
    assert not build_press("chunkkv", compression_ratio=0.5).rewrites_cache
    assert not build_press("expected_attention", compression_ratio=0.5).rewrites_cache


def test_merging_writes_merged_values_at_kept_positions_and_leaves_keys_alone():
    from conftest import make_model, random_ids
    from transformers import DynamicCache

    from presses.compat import model_cache_kwarg

    model = make_model("qwen3", "sdpa")
    caches = {}
    for name in ("knorm", "merging_knorm"):
        press = build_press(name, compression_ratio=0.5)
        caches[name] = DynamicCache(config=model.config)
        with press(model, kv_storage="mask"), torch.no_grad():  # both keep every pair, to compare them
            model(input_ids=random_ids(80), **{model_cache_kwarg(): caches[name]})
        assert press.rewrites_cache == (name == "merging_knorm")
    evicted = press.evicted_mask(0)[0]  # same selection as knorm: merging only changes values
    plain, merged = caches["knorm"].layers[0], caches["merging_knorm"].layers[0]
    assert torch.equal(plain.keys, merged.keys)
    assert torch.equal(plain.values[0][evicted], merged.values[0][evicted])
    changed = (plain.values[0] != merged.values[0]).any(-1)
    assert changed.any() and not (changed & evicted).any()


def test_cam_adds_merged_values_to_kept_tokens_only():
    from conftest import make_model, random_ids
    from transformers import DynamicCache

    from presses.compat import model_cache_kwarg

    model = make_model("qwen3", "sdpa")
    ids = random_ids(64)
    reference = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, **{model_cache_kwarg(): reference})
    torch.manual_seed(0)
    press = build_press("cam_knorm", compression_interval=4, target_size=32)
    assert press.rewrites_cache
    cache = DynamicCache(config=model.config)
    with press(model), torch.no_grad():
        model(input_ids=ids, **{model_cache_kwarg(): cache})
        for step in range(4):  # one compression, after the 4th step
            model(input_ids=random_ids(1, seed=step), **{model_cache_kwarg(): cache})
    evicted = press.evicted_mask(1)[0, :, :64]  # (kv_heads, 64): the same tokens in every head
    assert torch.equal(evicted[0], evicted[1]) and int((~press.evicted_mask(1)[0, 0]).sum()) == 32
    changed = (cache.layers[1].values[0, :, :64] != reference.layers[1].values[0]).any(-1)
    assert changed.any() and not (changed & evicted).any()


@pytest.mark.parametrize("architecture", ["llama", "llama_yarn"])
def test_key_rerotation_places_kept_keys_contiguously_before_the_question(architecture):
    """A kept key must equal the pre-RoPE key rotated to position k_len - n + rank, as kvpress's distances say (with
    YaRN, whose attention temperature on cos and sin the cached key already carries)."""
    from conftest import make_model, random_ids
    from transformers import DynamicCache

    from presses import KeyRerotationPress, KnormPress
    from presses.compat import hidden_states_from, model_cache_kwarg
    from presses.leverage_press import prerope_key_states

    model = make_model(architecture, "sdpa")
    assert model.model.rotary_emb.attention_scaling != 1.0 or architecture == "llama"
    attention = model.model.layers[0].self_attn
    seen = {}
    def capture(module, args, kwargs) -> None:
        seen.setdefault("hidden", hidden_states_from(args, kwargs))

    handle = attention.register_forward_pre_hook(capture, with_kwargs=True)
    press = KeyRerotationPress(KnormPress(compression_ratio=0.5))
    cache = DynamicCache(config=model.config)
    try:
        with press(model), torch.no_grad():
            model(input_ids=random_ids(40), **{model_cache_kwarg(): cache})
    finally:
        handle.remove()
    assert press.rewrites_cache
    kept = torch.nonzero(~press.evicted_mask(0)[0, 0]).flatten()  # ascending, 20 of 40
    with torch.no_grad():
        pre = prerope_key_states(attention, seen["hidden"])[0, 0]  # (40, head_dim)
        positions = torch.arange(20, 40)[None]
        cos, sin = model.model.rotary_emb(pre, positions)
        half = pre.shape[-1] // 2
        moved = pre[kept] * cos[0] + torch.cat([-pre[kept][:, half:], pre[kept][:, :half]], dim=-1) * sin[0]
    torch.testing.assert_close(cache.layers[0].keys[0, 0, kept], moved, atol=1e-5, rtol=1e-5)


def _prefill(press, n_tokens: int = 200, architecture: str = "qwen3"):
    from conftest import make_model, random_ids

    model = make_model(architecture, "sdpa")
    with press(model), torch.no_grad():
        model(random_ids(n_tokens))
    return model, [~press.evicted_mask(i) for i in range(model.config.num_hidden_layers)]


def test_chunk_press_keeps_its_share_of_every_chunk():
    from presses import ChunkPress, KnormPress

    _, kept = _prefill(ChunkPress(KnormPress(compression_ratio=0.5), chunk_length=50))
    for mask in kept:
        assert (mask.view(*mask.shape[:2], 4, 50).sum(-1) == 25).all()


def test_per_layer_compression_gives_each_layer_its_ratio():
    from presses import KnormPress, PerLayerCompressionPress
    from presses.base_press import n_kept_pairs
    from presses.errors import PressError

    ratios = [0.25, 0.75, 0.5, 0.1]
    model, kept = _prefill(PerLayerCompressionPress(KnormPress(), compression_ratios=ratios))
    for layer, mask in enumerate(kept):
        assert (mask.sum(-1) == n_kept_pairs(200, ratios[layer])).all()
    with pytest.raises(PressError, match="no ratio for layer"):
        _prefill(PerLayerCompressionPress(KnormPress(), compression_ratios=[0.5]))


def test_simlayerkv_lazy_layers_keep_sinks_and_recent_tokens_only():
    from presses import SimLayerKVPress

    _, kept = _prefill(SimLayerKVPress(lazy_threshold=0.0, n_recent=20))  # every layer is lazy at threshold 0
    expected = torch.zeros(200, dtype=torch.bool)
    expected[:4] = expected[-19:] = True
    assert all(torch.equal(mask[0, head], expected) for mask in kept for head in range(mask.shape[1]))
    _, kept = _prefill(SimLayerKVPress(lazy_threshold=1.0, n_recent=20))
    assert all(mask.all() for mask in kept)


def test_compression_ratio_decoding_keeps_a_share_of_every_token_seen():
    from conftest import make_model, random_ids
    from transformers import DynamicCache

    from presses import KnormPress
    from presses.compat import model_cache_kwarg
    from presses.compression_ratio_decoding_press import CompressionRatioDecodingPress

    model = make_model("qwen3", "sdpa")
    press = CompressionRatioDecodingPress(base_press=KnormPress(), compression_interval=4,
                                          target_compression_ratio=0.75)
    cache = DynamicCache(config=model.config)
    with press(model), torch.no_grad():
        model(input_ids=random_ids(60), **{model_cache_kwarg(): cache})
        for step in range(4):
            model(input_ids=random_ids(1, seed=step), **{model_cache_kwarg(): cache})
    assert all(((~press.evicted_mask(i)).sum(-1) == 16).all() for i in range(2))  # int(64 * 0.25)


def test_lukv_without_a_budget_curve_is_a_one_line_error_naming_the_fix():
    from conftest import make_model

    from presses.errors import PressError

    with pytest.raises(PressError, match="needs a budget curve: pass budget_curve=PATH"):
        with build_press("lukv", compression_ratio=0.5)(make_model("qwen3", "sdpa")):
            pass


def test_expected_attention_stats_from_the_context_itself_equal_expected_attention(tmp_path):
    """Statistics measured on the very context (unbiased covariance aside) give Expected Attention's choice."""
    from conftest import make_model, random_ids

    from presses import ExpectedAttentionPress
    from presses.errors import PressError
    from presses.expected_attention_stats_press import ExpectedAttentionStatsPress, save_query_statistics

    model = make_model("llama", "sdpa")
    ids = random_ids(120)
    save_query_statistics(model, [ids], tmp_path)
    kept = {}
    for press in (ExpectedAttentionPress(compression_ratio=0.5, use_covariance=False),
                  ExpectedAttentionStatsPress(compression_ratio=0.5, use_covariance=False, stats_folder=str(tmp_path))):
        with press(model), torch.no_grad():
            model(ids)
        kept[type(press).__name__] = [press.evicted_mask(i) for i in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*kept.values(), strict=True))
    with pytest.raises(PressError, match="needs query statistics"):
        with ExpectedAttentionStatsPress(compression_ratio=0.5)(model):
            pass


@pytest.mark.parametrize("press, settings, knob, value", [
    ("think", {"compression_ratio": 0.0, "key_channel_compression_ratio": 0.25}, "key_channel_compression_ratio", 0.25),
    ("expected_attention", {"compression_ratio": 0.5, "key_channel_compression_ratio": None}, "compression_ratio",
     0.5),
    ("critical_adakv_snapkv", {"compression_ratio": 0.75}, "compression_ratio", 0.75),
])
def test_kvpress_run_folders_are_read_by_their_registry_name(tmp_path, press, settings, knob, value):
    import yaml

    from evaluation.kvpress_format import load_kvpress_run

    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"dataset": "ruler", "press_name": press, **settings}))
    (tmp_path / "predictions.csv").write_text("predicted_answer,answer,task\nx,['x'],niah_single_1\n")
    run = load_kvpress_run(tmp_path)
    assert (run.press, run.knob, run.value) == (press, knob, value)


OUR_NAMES = {"expected_attention_plain", "simlayerkv", "leverage", "non_causal_attention", "cap", "kvgrad"}
NEW_NAMES = sorted((KVPRESS_NAMES | OUR_NAMES) - {"no_press", "random", "knorm", "snapkv", "streaming_llm", "tova",
                                                "observed_attention", "pyramidkv", "keydiff", "lagkv", "kvzip",
                                                "kvzip_plus", "kvzap_linear", "kvzap_mlp", "kvzap_mlp_head",
                                                "kvzap_mlp_layer", "adakv_snapkv", "decoding_knorm",
                                                "decoding_streaming_llm",
                                                # sink 128 + window 256 keep all of a 40-token input: covered in
                                                # test_artifact_presses on longer contexts
                                                "duo_attention_on_the_fly"})


@pytest.mark.parametrize("name", NEW_NAMES)
def test_new_presses_run_in_bfloat16_and_repeat_exactly_with_a_seed(name, tmp_path_factory):
    from conftest import make_model, make_tokenizer, random_ids
    from test_presses import artifact_dir, generate, make_press

    model = make_model("qwen3", "sdpa", dtype=torch.bfloat16)
    model.name_or_path = artifact_dir()  # presses with per-model artifacts find them beside the model
    spec = PRESSES[name]
    knob = {spec.knob: 0.5} if spec.knob else {"compression_interval": 2, "target_size": 16}
    if name == "simlayerkv":
        knob = {"lazy_threshold": 0.0, "n_recent": 8}
    root = str(tmp_path_factory.getbasetemp())
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        press = make_press(name, "qwen3", root, **knob)
        tokenizer = make_tokenizer()
        with press(model, tokenizer):
            out = generate(model, press, random_ids(40), tokenizer, 4)
        runs.append((out, [press.evicted_mask(i).clone() for i in range(2)]))
        assert press.achieved_compression_ratio > 0, name
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))


def test_key_rerotation_refuses_a_rope_whose_frequencies_change_with_length():
    from transformers import LlamaConfig, LlamaForCausalLM

    from presses import KeyRerotationPress, KnormPress
    from presses.errors import PressError

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(PressError, match="rope_type 'dynamic'"):
        KeyRerotationPress(KnormPress(compression_ratio=0.5)).post_init_from_model(LlamaForCausalLM(config))
