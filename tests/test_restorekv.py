"""RestoreKV: KVzip plus restore tokens encoded once with a LoRA adapter in the published (PEFT) layout."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_model, make_tokenizer, random_ids
from transformers import DynamicCache

from presses import KVzipPress, PressError, RestoreKVPress, build_press
from presses.compat import model_cache_kwarg
from presses.restorekv_press import load_adapter, random_adapter, save_adapter


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> str:
    torch.manual_seed(3)
    folder = tmp_path_factory.mktemp("restorekv") / "RestoreKV-tiny"
    save_adapter(folder, random_adapter(make_model("qwen3")), rank=8, alpha=16)
    return str(folder)


def prefill(press, model, ids: torch.Tensor) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    with press(model, make_tokenizer()), torch.no_grad():
        model(input_ids=ids, **{model_cache_kwarg(): cache})
    return cache


def test_published_layout_round_trips_and_lora_factors_are_found(adapter_dir):
    config = json.loads(open(f"{adapter_dir}/adapter_config.json").read())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"}
    adapter = load_adapter(adapter_dir)
    assert adapter.scale == 2.0 and adapter.embeddings.shape == (8, 64)
    assert len(adapter.lora) == 2 * 7  # two layers, seven projections
    a, b = adapter.lora["model.layers.1.mlp.down_proj"]
    assert a.shape == (8, 128) and b.shape == (64, 8)


def test_restore_tokens_are_encoded_with_the_adapter_merged_into_the_weights(adapter_dir):
    """The restore tokens' cached keys and values equal those of a model whose weights have W + scale * B A."""
    model, ids = make_model("qwen3"), random_ids(100)
    cache = prefill(RestoreKVPress(compression_ratio=0.5, adapter=adapter_dir), model, ids)
    assert cache.get_seq_length() == 108
    adapter = load_adapter(adapter_dir)
    merged = copy.deepcopy(model)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for name, (a, b) in adapter.lora.items():
            modules[name].weight += adapter.scale * b @ a
        reference = DynamicCache(config=model.config)
        model(input_ids=ids, **{model_cache_kwarg(): reference})  # the context: base weights
        merged.model(inputs_embeds=adapter.embeddings[None], **{model_cache_kwarg(): reference})
        plain = DynamicCache(config=model.config)
        model(input_ids=ids, **{model_cache_kwarg(): plain})
        model.model(inputs_embeds=adapter.embeddings[None], **{model_cache_kwarg(): plain})
    for layer in range(2):
        torch.testing.assert_close(cache.layers[layer].keys, reference.layers[layer].keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(cache.layers[layer].values, reference.layers[layer].values, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(cache.layers[1].keys[..., 100:, :], plain.layers[1].keys[..., 100:, :], atol=1e-3)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_budget_matched_restore_tokens_kept_and_total_equal_to_kvzip(adapter_dir, ratio):
    model, ids = make_model("llama"), random_ids(120)
    restore = RestoreKVPress(compression_ratio=ratio, adapter=adapter_dir)
    prefill(restore, model, ids)
    kvzip = KVzipPress(compression_ratio=ratio)
    prefill(kvzip, model, ids)
    kept_restore = sum(int((~restore.evicted_mask(i)).sum()) for i in range(2))
    kept_kvzip = sum(int((~kvzip.evicted_mask(i)).sum()) for i in range(2))
    assert kept_restore == kept_kvzip  # the 8 restore tokens per head are paid for with context pairs
    assert all(not restore.evicted_mask(i)[..., 120:].any() for i in range(2))
    assert restore.achieved_compression_ratio == pytest.approx(kvzip.achieved_compression_ratio)
    # The same scores (KVzip's): RestoreKV evicts a superset of what KVzip evicts.
    assert all((restore.evicted_mask(i)[..., :120] >= kvzip.evicted_mask(i)).all() for i in range(2))


def test_registry_names_use_kvzip_or_kvzip_plus_scores_and_the_matching_adapter_folder(tmp_path):
    assert build_press("RestoreKV", compression_ratio=0.5).kvzip_plus_normalization is False
    assert build_press("RestoreKV_plus", compression_ratio=0.5).kvzip_plus_normalization is True
    model = make_model("qwen3")
    model.name_or_path = str(tmp_path)
    torch.manual_seed(0)
    save_adapter(tmp_path / "restorekv_plus", random_adapter(model), rank=8, alpha=16)
    press = build_press("RestoreKV_plus", compression_ratio=0.5)
    prefill(press, model, random_ids(60))  # found beside the model
    assert press.evicted_mask(0).shape[-1] == 68
    with pytest.raises(PressError) as error:
        prefill(build_press("RestoreKV", compression_ratio=0.5), model, random_ids(60))
    message = str(error.value)
    assert "\n" not in message and f"no RestoreKV adapter at 'higokri/RestoreKV-{tmp_path.name}'" in message
    assert "pass adapter=" in message and "huggingface-cli download" in message


def test_adapters_that_are_not_plain_lora_or_do_not_fit_are_one_line_errors(adapter_dir, tmp_path):
    import shutil

    shutil.copytree(adapter_dir, tmp_path / "dora")
    config = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(PressError, match=r"is not a plain LoRA .*use_dora"):
        load_adapter(str(tmp_path / "dora"))
    other = make_model("qwen3")
    other.model.layers = other.model.layers[:1]  # no layer 1: the adapter names modules this model lacks
    other.config.num_hidden_layers = 1
    with pytest.raises(PressError, match="does not fit this model"):
        prefill(RestoreKVPress(compression_ratio=0.5, adapter=adapter_dir), other, random_ids(30))
