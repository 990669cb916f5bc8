"""KVzap surrogates in the published nvidia/KVzap-* checkpoint layout."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_model, random_ids
from safetensors.torch import save_file

from presses import DMSPress, KVzapConfig, KVzapModel, KVzapPress
from presses.kvzap_press import default_checkpoint


def write_published_layout(path, model_type: str, input_dim=64, output_dim=2, n_modules=2, hidden_dim=8):
    """Write config.json + model.safetensors by hand, with the tensor names the published checkpoints use."""
    path.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "kvzap", "architectures": ["KVzapModel"], "input_dim": input_dim,
              "output_dim": output_dim, "n_modules": n_modules,
              "hidden_dim": hidden_dim if model_type == "mlp" else None}
    (path / "config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(n_modules):
        if model_type == "linear":
            tensors[f"layers.{i}.weight"] = torch.randn(output_dim, input_dim, generator=generator)
            tensors[f"layers.{i}.bias"] = torch.randn(output_dim, generator=generator)
        else:
            tensors[f"layers.{i}.0.weight"] = torch.randn(hidden_dim, input_dim, generator=generator)
            tensors[f"layers.{i}.0.bias"] = torch.randn(hidden_dim, generator=generator)
            tensors[f"layers.{i}.2.weight"] = torch.randn(output_dim, hidden_dim, generator=generator)
            tensors[f"layers.{i}.2.bias"] = torch.randn(output_dim, generator=generator)
    save_file(tensors, str(path / "model.safetensors"))
    return tensors


@pytest.mark.parametrize("model_type", ["linear", "mlp"])
def test_published_layout_loads_and_scores(tmp_path, model_type):
    tensors = write_published_layout(tmp_path / model_type, model_type)
    surrogate = KVzapModel.from_pretrained(str(tmp_path / model_type))
    x = torch.randn(5, 2, 64)
    out = surrogate(x)
    assert out.shape == (5, 2, 2)
    layer = 1
    if model_type == "linear":
        expected = x[:, layer] @ tensors["layers.1.weight"].T + tensors["layers.1.bias"]
    else:
        hidden = torch.nn.functional.gelu(x[:, layer] @ tensors["layers.1.0.weight"].T + tensors["layers.1.0.bias"])
        expected = hidden @ tensors["layers.1.2.weight"].T + tensors["layers.1.2.bias"]
    torch.testing.assert_close(out[:, layer], expected)

    # The press feeds the attention input of each layer to that layer's surrogate.
    model = make_model("qwen3")
    press = KVzapPress(compression_ratio=0.5, model_type=model_type, checkpoint=str(tmp_path / model_type))
    captured = {}

    def capture(module, args, kwargs, output):
        captured["h"] = kwargs["hidden_states"]

    hook = model.model.layers[layer].self_attn.register_forward_hook(capture, with_kwargs=True)
    with press(model):
        model(random_ids(30))
    hook.remove()
    scores = press.score(model.model.layers[layer].self_attn, captured["h"], None, None, None, {})
    assert scores.shape == (1, 2, 30)
    expected_scores = surrogate.layers[layer](captured["h"]).transpose(1, 2)
    torch.testing.assert_close(scores, expected_scores)


def test_save_and_reload_round_trip(tmp_path):
    config = KVzapConfig(input_dim=64, output_dim=2, n_modules=2, hidden_dim=8)
    original = KVzapModel(config)
    original.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "kvzap"
    reloaded = KVzapModel.from_pretrained(str(tmp_path))
    assert reloaded.config.hidden_dim == 8 and reloaded.config.n_modules == 2
    for (name, a), (_, b) in zip(original.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    x = torch.randn(3, 2, 64)
    torch.testing.assert_close(original(x), reloaded(x))


def test_default_checkpoint_prefers_a_surrogate_shipped_beside_the_model(tmp_path):
    assert default_checkpoint("Qwen/Qwen3-8B", "mlp") == "nvidia/KVzap-mlp-Qwen3-8B"
    assert default_checkpoint("meta-llama/Llama-3.1-8B-Instruct", "linear") == \
        "nvidia/KVzap-linear-Llama-3.1-8B-Instruct"
    (tmp_path / "kvzap-mlp").mkdir()
    assert default_checkpoint(str(tmp_path), "mlp") == str(tmp_path / "kvzap-mlp")


def test_threshold_eviction_matches_surrogate_scores(tmp_path):
    write_published_layout(tmp_path / "linear", "linear")
    model = make_model("qwen3")
    press = DMSPress(KVzapPress(model_type="linear", checkpoint=str(tmp_path / "linear")), threshold=0.5,
                     sliding_window_size=10)
    with press(model):
        model(random_ids(60))
    scores = press.layer_state(0)["scores"]
    mask = press.evicted_mask(0)
    assert torch.equal(mask[..., :50], scores[..., :50] < 0.5)
    assert not mask[..., 50:].any()
