"""The kv-press-text-generation pipeline: kvpress's prompt protocol on a tiny model with an offline tokenizer."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, make_tokenizer
from transformers import DynamicCache, pipeline

from presses import KnormPress, NoPress, encode_prompt

CONTEXT = "the grass is green . the sky is blue . the magic number for sun is 7 . " * 6


def test_pipeline_without_press_matches_plain_generation_of_the_full_prompt():
    model, tokenizer = make_model("qwen3", vocab_size=64), make_tokenizer()
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")
    answer = pipe(CONTEXT, question="what is the magic number for sun ?", answer_prefix="answer :",
                  press=NoPress(), max_new_tokens=8)["answer"]
    parts = encode_prompt(tokenizer, CONTEXT, ["what is the magic number for sun ?"], "answer :")
    full = torch.cat([parts.context_ids, parts.question_ids[0]], dim=1)
    generated = model.generate(full, max_new_tokens=8, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    assert answer == tokenizer.decode(generated[0, full.shape[1]:].tolist(), skip_special_tokens=True)
    assert isinstance(answer, str)


def test_pipeline_answers_several_questions_from_one_compressed_context():
    model, tokenizer = make_model("llama", vocab_size=64), make_tokenizer()
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")
    questions = ["what is the magic number ?", "what is blue ?", "repeat the text"]
    out = pipe(CONTEXT, questions=questions, press=KnormPress(compression_ratio=0.5), max_new_tokens=5)
    assert list(out) == ["answers"] and len(out["answers"]) == 3
    single = pipe(CONTEXT, question=questions[1], press=KnormPress(compression_ratio=0.5), max_new_tokens=5)
    assert single["answer"] == out["answers"][1]


def test_chat_template_split_puts_question_after_the_compressed_context():
    tokenizer = make_tokenizer()
    parts = encode_prompt(tokenizer, "the sky is blue", ["what is blue ?"], "answer :")
    context = tokenizer.decode(parts.context_ids[0].tolist())
    question = tokenizer.decode(parts.question_ids[0][0].tolist())
    assert context.startswith("<|im_start|> user the sky is blue")
    assert "<|im_end|>" not in context
    assert question.startswith("what is blue ?") and "<|im_start|> assistant" in question
    assert question.rstrip().endswith("answer :")
    plain = encode_prompt(make_tokenizer(chat_template=False), "the sky", ["what ?"], "")
    assert tokenizer.decode(plain.context_ids[0].tolist()).startswith("<s>")
    aware = encode_prompt(tokenizer, "the sky is blue\n", ["what is blue ?"], "", query_aware=True)
    assert "what is blue" in tokenizer.decode(aware.context_ids[0].tolist())


def test_model_card_usage_from_a_local_model_directory(tmp_path):
    """The KVzap model card's code, with a local directory in place of the hub name."""
    from presses import DMSPress, KVzapConfig, KVzapModel, KVzapPress

    make_model("qwen3", vocab_size=64).save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    # A surrogate shipped beside the model is found without naming it.
    KVzapModel(KVzapConfig(input_dim=64, output_dim=2, n_modules=2, hidden_dim=8)).save_pretrained(
        tmp_path / "kvzap-mlp")
    pipe = pipeline("kv-press-text-generation", model=str(tmp_path), dtype="auto")
    # The card uses -4 for Qwen3-8B; this random surrogate scores near 0, so a higher cut evicts something.
    press = DMSPress(KVzapPress(model_type="mlp"), threshold=10)
    press.decoding = False
    answer = pipe(CONTEXT * 3, question="what is green ?", press=press, max_new_tokens=5)["answer"]
    assert isinstance(answer, str)
    assert press.achieved_compression_ratio > 0
    press.decoding = True
    assert isinstance(pipe("what is blue ?", press=press, enable_thinking=True, max_new_tokens=5)["answer"], str)


def test_a_misspelt_parameter_or_a_cache_is_refused_in_one_line_not_dropped():
    model, tokenizer = make_model("qwen3", vocab_size=64), make_tokenizer()
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")
    with pytest.raises(ValueError, match=r"^unknown kv-press-text-generation parameter\(s\) max_new_token: use "
                                         r"question, .*max_new_tokens"):
        pipe(CONTEXT, question="what is blue ?", max_new_token=5)
    with pytest.raises(ValueError, match=r"^cache=DynamicCache: this pipeline builds its own DynamicCache"):
        pipe(CONTEXT, question="what is blue ?", cache=DynamicCache())
    assert "answer" in pipe(CONTEXT, question="what is blue ?", max_new_tokens=2)
