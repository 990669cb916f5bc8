"""KVzap surrogate training: KVzip+ targets against a direct computation, ridge, and ``train-kvzap`` end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import VOCAB_WORDS, make_model
from safetensors.torch import load_file
from transformers import DynamicCache

from evaluation.kvzap.targets import collect_targets, repeat_prompt
from evaluation.kvzap.train import fit_report, fit_ridge
from presses import DMSPress, KVzapPress
from presses.compat import model_cache_kwarg
from presses.generation import GenerationSettings, answer_questions

ROOT = Path(__file__).resolve().parent.parent
TEXT = " ".join(VOCAB_WORDS[(7 * i) % 40] for i in range(60))


def reference_targets(model, tokenizer, text: str) -> torch.Tensor:
    """log max_{h in group} max_{t in R} A[h,t,i] ||W_o^h v_i|| / ||x_t||, from eager attention probabilities."""
    input_ids, original, repeated = repeat_prompt(tokenizer, text)
    inputs = {}
    hooks = [layer.self_attn.register_forward_pre_hook(
        lambda module, args, kwargs, i=i: inputs.__setitem__(i, kwargs["hidden_states"]), with_kwargs=True)
        for i, layer in enumerate(model.model.layers)]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        attentions = model(input_ids=input_ids, **{model_cache_kwarg(): cache}, output_attentions=True).attentions
    for hook in hooks:
        hook.remove()
    config = model.config
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    per_layer = []
    for layer_idx, layer in enumerate(model.model.layers):
        values = cache.layers[layer_idx].values[0]  # (kv_heads, T, head_dim)
        w_o = layer.self_attn.o_proj.weight  # (hidden, heads * head_dim)
        x_norm = inputs[layer_idx][0].norm(dim=-1)  # (T,)
        scores = torch.empty(kv_heads, len(original))
        for k in range(kv_heads):
            best = torch.full((len(original),), -1.0)
            for h in range(k * heads // kv_heads, (k + 1) * heads // kv_heads):
                output_norm = (values[k] @ w_o[:, h * head_dim:(h + 1) * head_dim].T).norm(dim=-1)  # (T,)
                s = attentions[layer_idx][0, h][repeated][:, original] * output_norm[original] / x_norm[repeated, None]
                best = torch.maximum(best, s.amax(dim=0))
            scores[k] = best
        per_layer.append(scores.log().T)  # (P, kv_heads)
    return torch.stack(per_layer, dim=1)  # (P, layers, kv_heads)


def test_targets_equal_a_direct_kvzip_plus_computation(tokenizer):
    model = make_model("qwen3", attn_implementation="eager")
    _, original, _ = repeat_prompt(tokenizer, TEXT)
    pairs = collect_targets(model, tokenizer, TEXT, n_positions=10_000, generator=torch.Generator().manual_seed(0))
    expected = reference_targets(model, tokenizer, TEXT)
    assert pairs.targets.shape == expected.shape == (len(original), 2, 2)
    torch.testing.assert_close(pairs.targets, expected, atol=1e-4, rtol=1e-4)
    assert pairs.hidden.shape == (len(original), 2, model.config.hidden_size)


def test_targets_sample_the_requested_number_of_positions(tokenizer):
    model = make_model("llama")
    pairs = collect_targets(model, tokenizer, TEXT, n_positions=7, generator=torch.Generator().manual_seed(1))
    assert pairs.hidden.shape[0] == pairs.targets.shape[0] == 7
    assert torch.isfinite(pairs.targets).all()


def test_ridge_matches_the_normal_equations_with_an_unpenalised_intercept():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=generator) + 3.0
    true_weight = torch.randn(2, 6, generator=generator)
    y = x @ true_weight.T + torch.tensor([5.0, -7.0]) + 0.01 * torch.randn(500, 2, generator=generator)
    weight, bias = fit_ridge(x, y, alpha=1e-8)
    torch.testing.assert_close(weight, true_weight, atol=1e-2, rtol=0)
    torch.testing.assert_close(bias, torch.tensor([5.0, -7.0]), atol=5e-2, rtol=0)
    # With alpha > 0 the weights shrink toward 0 but the intercept still centres the predictions.
    shrunk, shrunk_bias = fit_ridge(x, y, alpha=1e4)
    assert shrunk.norm() < weight.norm()
    torch.testing.assert_close((x @ shrunk.T + shrunk_bias).mean(0), y.mean(0), atol=1e-3, rtol=0)


def test_fit_report_r2_and_pearson():
    truth = torch.arange(12.0).view(6, 1, 2)
    perfect = fit_report(truth, truth)
    assert perfect["r2"] == [pytest.approx(1.0)] and perfect["pearson"] == [pytest.approx(1.0)]
    constant = fit_report(truth, truth.mean(0, keepdim=True).expand_as(truth))
    assert constant["r2"] == [pytest.approx(0.0)]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evaluation.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_train_kvzap_end_to_end_on_a_tiny_model(tiny_model_dir, tmp_path):
    out = tmp_path / "surrogates"
    result = cli("train-kvzap", "--model", tiny_model_dir, "--output_dir", str(out), "--n_texts", "6",
                 "--min_text_tokens", "150", "--max_text_tokens", "250", "--positions_per_text", "50",
                 "--epochs", "2")
    assert result.returncode == 0, result.stderr
    assert "mean" in result.stdout and str(out) in result.stdout
    for model_type in ("linear", "mlp"):
        folder = out / f"kvzap-{model_type}"
        config = json.loads((folder / "config.json").read_text())
        assert config["model_type"] == "kvzap" and config["n_modules"] == 2 and config["output_dim"] == 2
        assert config["hidden_dim"] == (None if model_type == "linear" else 32 // 8)
        weights = load_file(str(folder / "model.safetensors"))
        assert ("layers.0.weight" in weights) == (model_type == "linear")
        assert ("layers.1.2.bias" in weights) == (model_type == "mlp")
        heldout = load_file(str(folder / "heldout.safetensors"))
        assert heldout["y_true"].shape == heldout["y_pred"].shape and heldout["y_true"].shape[1:] == (2, 2)
        report = json.loads((folder / "report.json").read_text())
        assert len(report[model_type]["r2"]) == 2 and report["wall_seconds"] > 0
    # The trained surrogates drive KVzap's threshold press.
    from evaluation.models import load_model

    model, tokenizer = load_model(tiny_model_dir, "cpu")
    press = DMSPress(KVzapPress(model_type="mlp", checkpoint=str(out / "kvzap-mlp")), threshold=1e9,
                     sliding_window_size=8)
    ids = tokenizer.encode(TEXT, return_tensors="pt")
    _, ratio = answer_questions(model, tokenizer, ids, [ids[:, :3]], press, GenerationSettings(max_new_tokens=2))
    assert ratio == pytest.approx((ids.shape[1] - 8) / ids.shape[1])


@pytest.mark.parametrize("texts, message", [
    ("/no/such/texts.txt", "does not exist"),
    ("EMPTY", "has no text of at least"),
])
def test_train_kvzap_bad_text_source(texts, message, tiny_model_dir, tmp_path):
    if texts == "EMPTY":
        texts = str(tmp_path / "empty.txt")
        Path(texts).write_text("")
    result = cli("train-kvzap", "--model", tiny_model_dir, "--output_dir", str(tmp_path / "out"), "--texts", texts)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("kvpress-eval: error:")
    assert not (tmp_path / "out").exists()
