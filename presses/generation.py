"""Prefill a context under a press, then answer questions from the compressed cache with our own decoding loop.

This is kvpress's protocol (its pipeline): the context is prefilled and compressed once; each question (with its
answer prefix) is then appended and answered greedily or by sampling; between questions the cache is cut back
to the context (and its values restored, for a press that writes them while decoding) and the press's state
restored, so every question sees the same compressed context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, LogitsProcessorList
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from presses import compat
from presses.base_press import BasePress
from presses.no_press import NoPress


@dataclass(frozen=True)
class GenerationSettings:
    """How answers are decoded. ``do_sample=False`` is greedy and ignores the sampling fields."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int = 0

    def warpers(self) -> LogitsProcessorList:
        warpers = LogitsProcessorList()
        if not self.do_sample:
            return warpers
        if self.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k > 0:
            warpers.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(self.top_p))
        if self.min_p > 0:
            warpers.append(MinPLogitsWarper(self.min_p))
        return warpers


@dataclass
class Answer:
    """One decoded answer and what it cost."""

    text: str
    token_ids: list[int]
    compression_ratio: float  # achieved by the press, measured after this answer was generated


def eos_token_ids(model: nn.Module, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return set(ids)


@torch.no_grad()
def decode(
    model: nn.Module,
    cache,
    prompt_ids: torch.Tensor,
    settings: GenerationSettings,
    eos_ids: set[int],
    generator: torch.Generator | None = None,
) -> list[int]:
    """Feed ``prompt_ids`` (1, n) after the cached tokens, then decode up to ``max_new_tokens`` tokens.

    Returns the generated ids (without the prompt), stopping after the first end-of-sequence token.
    """
    cache_kwarg = compat.model_cache_kwarg()
    warpers = settings.warpers()
    generated: list[int] = []
    input_ids = prompt_ids
    for _ in range(settings.max_new_tokens):
        logits = model(input_ids=input_ids, **{cache_kwarg: cache}, use_cache=True).logits[:, -1, :].float()
        history = torch.cat([prompt_ids, torch.tensor([generated], dtype=torch.long, device=prompt_ids.device)], -1)
        if settings.do_sample:
            probs = torch.softmax(warpers(history, logits), dim=-1)
            next_id = int(torch.multinomial(probs, 1, generator=generator))
        else:
            next_id = int(logits.argmax(dim=-1))
        generated.append(next_id)
        if next_id in eos_ids:
            break
        input_ids = torch.tensor([[next_id]], dtype=torch.long, device=prompt_ids.device)
    return generated


@torch.no_grad()
def answer_questions(
    model: nn.Module,
    tokenizer,
    context_ids: torch.Tensor,
    question_ids: list[torch.Tensor],
    press: BasePress | None = None,
    settings: GenerationSettings | None = None,
) -> tuple[list[Answer], float]:
    """Prefill ``context_ids`` (1, n) once under ``press``, then answer each question from that cache.

    Returns the answers and the compression the press achieved on the context. Sampling is seeded per question
    (``settings.seed + index``), so results do not depend on how many questions share a context.
    """
    press = press or NoPress()
    settings = settings or GenerationSettings()
    eos_ids = eos_token_ids(model, tokenizer)
    cache = DynamicCache(config=model.config)
    answers: list[Answer] = []
    with press(model, tokenizer):
        model(input_ids=context_ids, **{compat.model_cache_kwarg(): cache}, use_cache=True)
        context_ratio = press.achieved_compression_ratio
        context_length = cache.get_seq_length()
        compressed = press.snapshot()
        # A press that writes cached values while decoding (CAM's merges) would hand one answer's writes to the next
        # question: keep the post-prefill keys and values and put them back before every later question.
        saved = None
        if press.rewrites_cache and press.compresses_while_decoding and len(question_ids) > 1:
            saved = {module.layer_idx: [t.clone() for t in compat.keys_values(cache, module.layer_idx)]
                     for module in compat.attention_modules(model)}
        for index, ids in enumerate(question_ids):
            compat.crop_cache(cache, context_length)
            if saved is not None and index > 0:
                for layer_idx, originals in saved.items():
                    for cached, original in zip(compat.keys_values(cache, layer_idx), originals, strict=True):
                        cached.copy_(original)
            press.restore(compressed)
            generator = torch.Generator(device=ids.device).manual_seed(settings.seed + index)
            tokens = decode(model, cache, ids, settings, eos_ids, generator)
            text = tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else ""
            answers.append(Answer(text, tokens, press.achieved_compression_ratio))
    return answers, context_ratio
