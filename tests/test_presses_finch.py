"""FINCH: the question after a delimiter token is the observation window; it runs query-aware, one context at a time."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, make_tokenizer, random_ids

from evaluation.config import ConfigError, EvalConfig, resolve_config
from evaluation.engine import answer_group, engine_refusal
from evaluation.runner import sweep_grid
from presses import FinchPress, GenerationSettings, PressError, SnapKVPress, answer_questions, build_press
from presses.base_press import n_kept_pairs
from presses.pipeline import encode_prompt


def finch_prompt(press: FinchPress, tokenizer, n_context: int = 100, n_question: int = 10) -> torch.Tensor:
    press.prompt_delimiter(tokenizer)
    delimiter = torch.tensor([[press.delimiter_token_id]])
    return torch.cat([random_ids(n_context), delimiter, random_ids(n_question, seed=1)], dim=1)


@pytest.mark.parametrize("architecture", ["llama", "qwen3"])
def test_finch_without_normalisation_keeps_what_snapkv_keeps_with_the_question_as_window(architecture):
    """Unnormalised, unsmoothed FINCH is SnapKV whose window is exactly the tokens after the delimiter."""
    model, tokenizer = make_model(architecture), make_tokenizer()
    finch = FinchPress(compression_ratio=0.5, normalize_scores=False, rerotate_keys=False)
    prompt = finch_prompt(finch, tokenizer)
    answer_questions(model, tokenizer, prompt, [random_ids(3, seed=2)], finch, GenerationSettings(max_new_tokens=2))
    snapkv = SnapKVPress(compression_ratio=0.5, window_size=10, kernel_size=1)
    without_delimiter = torch.cat([prompt[:, :100], prompt[:, 101:]], dim=1)
    answer_questions(model, tokenizer, without_delimiter, [random_ids(3, seed=2)], snapkv,
                     GenerationSettings(max_new_tokens=2))
    for layer in range(model.config.num_hidden_layers):
        mask = finch.evicted_mask(layer)
        assert mask.shape[-1] == 110  # the delimiter never reached the cache
        assert torch.equal(mask, snapkv.evicted_mask(layer))
        assert not mask[..., 100:].any()  # the question is kept
        assert ((~mask).sum(-1) == n_kept_pairs(110, 0.5)).all()


def test_normalisation_and_chunks_change_the_choice_but_keep_the_question_and_the_count():
    model, tokenizer = make_model("qwen3"), make_tokenizer()
    kept = {}
    for key, press in {"plain": FinchPress(0.75, normalize_scores=False), "normalised": FinchPress(0.75),
                       "chunked": FinchPress(0.75, chunk_length=55)}.items():
        answer_questions(model, tokenizer, finch_prompt(press, tokenizer), [random_ids(3, seed=2)], press,
                         GenerationSettings(max_new_tokens=2))
        mask = press.evicted_mask(1)
        assert not mask[..., 100:].any()
        kept[key] = mask
    assert ((~kept["normalised"]).sum(-1) == n_kept_pairs(110, 0.75)).all()
    assert ((~kept["chunked"]).view(1, 2, 2, 55).sum(-1) == n_kept_pairs(55, 0.75)).all()
    assert not torch.equal(kept["plain"], kept["normalised"]) and not torch.equal(kept["normalised"], kept["chunked"])


def test_missing_delimiter_generate_and_short_chunks_are_one_line_errors():
    model, tokenizer = make_model("qwen3"), make_tokenizer()
    press = build_press("finch", compression_ratio=0.5)
    with pytest.raises(PressError, match=r"^FinchPress found no question after a delimiter token '<\|finch_sep\|>'"):
        answer_questions(model, tokenizer, random_ids(50), [random_ids(3)], press)
    with pytest.raises(PressError, match="model.generate adds them"):
        with press(model, tokenizer):
            model.generate(finch_prompt(press, tokenizer), max_new_tokens=2)
    with pytest.raises(PressError, match="use chunk_length > 40"):
        chunked = FinchPress(0.75, chunk_length=20)
        answer_questions(model, tokenizer, finch_prompt(chunked, tokenizer), [random_ids(3)], chunked)
    with pytest.raises(PressError, match="needs its delimiter token"):
        with FinchPress(0.5)(model):
            pass
    press = FinchPress(0.5)  # kvpress's set-up call also works, and leaves the model's embeddings alone
    assert press.update_model_and_tokenizer(model, tokenizer) is tokenizer
    assert press.delimiter_token_id == tokenizer.convert_tokens_to_ids("<|finch_sep|>")
    with press(model):
        pass
    assert model.get_input_embeddings().num_embeddings == 128


def test_the_sweep_runs_finch_query_aware_and_one_context_at_a_time(tiny_model_dir):
    with pytest.raises(ConfigError, match="press 'finch' compresses the context with its question: add --query_aware"):
        sweep_grid(resolve_config(press="finch", compression_ratio="0.5", max_samples=1))
    from evaluation.models import load_model

    model, tokenizer = load_model(tiny_model_dir, "cpu", "float32", "sdpa")
    press = build_press("finch", compression_ratio=0.5)
    assert engine_refusal(model, press) is not None
    assert engine_refusal(model, FinchPress(0.5, rerotate_keys=False)) == \
        "the press reads its question from a prompt of its own"
    parts = encode_prompt(tokenizer, "the sky is blue.", ["what is blue?"], "answer:", query_aware=True,
                          delimiter=press.prompt_delimiter(tokenizer))
    found = (parts.context_ids[0] == press.delimiter_token_id).nonzero().flatten().tolist()
    question = tokenizer.encode("what is blue?", add_special_tokens=False)
    assert len(found) == 1 and parts.context_ids[0, found[0] + 1: found[0] + 1 + len(question)].tolist() == question
    record = {"sample_id": "s0", "task": "t", "context": "the sky is blue. " * 20, "question": "what is blue?",
              "answer_prefix": "answer:", "answer": ["sky"], "max_new_tokens": 4}
    config = EvalConfig(query_aware=True, max_new_tokens=4)
    [prediction] = answer_group(model, tokenizer, [record], press, config, 0, "start")
    # The compressed prompt is context + question (the delimiter dropped); half its pairs are gone.
    assert prediction["compression_ratio"] == pytest.approx(0.5, abs=0.02)
    assert press.evicted_mask(0).shape[-1] == prediction["context_length"] - 1


def test_delimiter_beyond_the_embedding_matrix_needs_no_resize():
    """The delimiter is dropped from the ids before the lookup, so its id may lie past the model's vocabulary."""
    model, tokenizer = make_model("llama", vocab_size=50), make_tokenizer()
    press = FinchPress(compression_ratio=0.5)
    press.prompt_delimiter(tokenizer)
    assert press.delimiter_token_id >= 50
    prompt = torch.cat([random_ids(60, vocab_size=50), torch.tensor([[press.delimiter_token_id]]),
                        random_ids(8, seed=1, vocab_size=50)], dim=1)
    answers, ratio = answer_questions(model, tokenizer, prompt, [random_ids(3, seed=2, vocab_size=50)], press,
                                      GenerationSettings(max_new_tokens=3))
    assert len(answers[0].token_ids) == 3 and ratio == pytest.approx(1 - n_kept_pairs(68, 0.5) / 68)
