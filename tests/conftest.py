"""Tiny random models and an offline tokenizer, built from configs in the tests (no downloads)."""

from __future__ import annotations

import os

# Tests never reach the Hugging Face hub: a missing local file must fail fast, not wait on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB_WORDS = (
    "the a is of and to in what magic number special for text repeat previous context exactly part starting with "
    "question answer : . , ? ! # user assistant system grass green sky blue sun yellow here we go there back again"
).split() + [str(i) for i in range(10)]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|> {{ message['role'] }} {{ message['content'] }} <|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2)

ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {"head_dim": 16}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
    # YaRN: interpolated frequencies and an attention temperature on cos and sin (how issue 19 extends kvtiny to 4k).
    "llama_yarn": (LlamaConfig, LlamaForCausalLM, {"head_dim": 16, "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256}}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"head_dim": 16, "sliding_window": None}),
    "phi3": (Phi3Config, Phi3ForCausalLM, {"pad_token_id": 0}),
    # Presses compress Gemma3's full-attention layers only (its sliding layers keep a window, not the context).
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM,
               {"head_dim": 16, "sliding_window": 32, "layer_types": ["sliding_attention", "full_attention"]}),
}


def make_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: i for i, token in enumerate(specials + VOCAB_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<unk>",
                                        additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_model(architecture: str = "qwen3", attn_implementation: str = "sdpa", dtype=torch.float32, seed: int = 0,
               vocab_size: int = 128):
    config_class, model_class, extra = ARCHITECTURES[architecture]
    config = config_class(vocab_size=vocab_size, **SHAPE, **extra)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return model_class(config).to(dtype).eval()


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="session", params=["llama", "qwen3"])
def model(request):
    return make_model(request.param)


def random_ids(n: int, seed: int = 0, vocab_size: int = 128) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(5, vocab_size, (1, n), generator=generator)


EMBEDDED_TOKENIZER_DIR = "evaluation/embedded/kvtiny"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A folder with a tiny random Qwen3 (GQA) and the embedded model's byte-level tokenizer, as a user's local
    model folder would be: loads with ``--model <folder>``, no download."""
    from pathlib import Path

    from transformers import AutoTokenizer

    source = Path(__file__).resolve().parent.parent / EMBEDDED_TOKENIZER_DIR
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=2048,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-qwen3")
    Qwen3ForCausalLM(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return str(folder)


def without_timings(metrics: dict) -> dict:
    """metrics.json less its wall-clock throughputs, which no two runs share."""
    return {k: v for k, v in metrics.items() if k not in ("prefill_tokens_per_s", "decode_tokens_per_s")}
