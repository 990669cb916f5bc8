"""Prefill a context under a press, then answer questions from the compressed cache with our own decoding loop.

This is kvpress's protocol (its pipeline): the context is prefilled and compressed once; each question (with its
answer prefix) is then appended and answered greedily or by sampling; between questions the cache is cut back
to the context (and its values restored, for a press that writes them while decoding) and the press's state
restored, so every question sees the same compressed context.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

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
from presses.compact_cache import CompactLayer, compact_layers
from presses.errors import PressError
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


def prefill(model: nn.Module, cache, context_ids: torch.Tensor, press: BasePress,
            chunk_size: int | None = None) -> None:
    """Prefill ``context_ids`` (1, n) into ``cache`` under ``press`` (already entered): at once, or in chunks of
    ``chunk_size`` tokens, the press compressing after each (DMS's own inference; threshold presses only)."""
    cache_kwarg = compat.model_cache_kwarg()
    n = context_ids.shape[1]
    if chunk_size is None or chunk_size >= n:
        model(input_ids=context_ids, **{cache_kwarg: cache}, use_cache=True)
        return
    if press.knob != "threshold":
        raise PressError(f"chunked prefill (prefill_chunk_size) needs a threshold press (dms, kvzap_*), not "
                         f"{type(press).__name__}, which scores the whole context at once: drop prefill_chunk_size")
    model(input_ids=context_ids[:, :chunk_size], **{cache_kwarg: cache}, use_cache=True)
    with press.prefilling_context():
        for start in range(chunk_size, n, chunk_size):
            model(input_ids=context_ids[:, start:start + chunk_size], **{cache_kwarg: cache}, use_cache=True)


def kv_bytes(cache) -> int:
    """Bytes of keys and values a cache holds now (a compact layer counts what it holds, padding included)."""
    return sum(layer.kv_bytes() if isinstance(layer, CompactLayer) else _dense_layer_bytes(layer)
               for layer in cache.layers)


def per_token_kv_bytes(model: nn.Module) -> int:
    """Bytes of keys and values one token adds to a dense cache over all layers (sliding layers counted in full)."""
    config = compat.text_config(model)
    head_dim = compat.head_dim(compat.decoder_layers(model)[0].self_attn)
    element_size = next(model.parameters()).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * element_size


def _dense_layer_bytes(layer) -> int:
    keys = getattr(layer, "keys", None)
    return 0 if keys is None else 2 * keys.numel() * keys.element_size()


@dataclass
class Measures:
    """What one context cost: KV bytes (dense equivalent, held after the prefill, held at the end of each answer,
    the cache's peak), wall time of the prefill and of the decoding, and on a GPU the allocator's peak (weights,
    activations and cache together)."""

    kv_bytes_dense: int = 0
    kv_bytes_held_after_prefill: int = 0
    kv_bytes_held_end: list[int] = field(default_factory=list)
    kv_bytes_peak: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    device_peak_bytes: int | None = None  # the CUDA allocator's peak over the context's prefill and answers (GPU only)


@torch.no_grad()
def answer_questions(
    model: nn.Module,
    tokenizer,
    context_ids: torch.Tensor,
    question_ids: list[torch.Tensor],
    press: BasePress | None = None,
    settings: GenerationSettings | None = None,
    kv_storage: str = "compact",
    prefill_chunk_size: int | None = None,
    measures: Measures | None = None,
) -> tuple[list[Answer], float]:
    """Prefill ``context_ids`` (1, n) once under ``press``, then answer each question from that cache.

    Returns the answers and the compression the press achieved on the context. Sampling is seeded per question
    (``settings.seed + index``), so results do not depend on how many questions share a context. ``kv_storage``
    and ``prefill_chunk_size``: see :meth:`BasePress.__call__` and :func:`prefill`. ``measures``, if given, is
    filled with what the context cost.
    """
    press = press or NoPress()
    settings = settings or GenerationSettings()
    measures = measures if measures is not None else Measures()
    eos_ids = eos_token_ids(model, tokenizer)
    cache = DynamicCache(config=model.config)
    answers: list[Answer] = []
    device = context_ids.device
    reset_device_peak(device)
    with press(model, tokenizer, kv_storage=kv_storage):
        start = device_clock(device)
        prefill(model, cache, context_ids, press, prefill_chunk_size)
        measures.prefill_seconds += device_clock(device) - start
        context_ratio = press.achieved_compression_ratio
        context_length = cache.get_seq_length()
        _free_evicted(press, cache)
        measures.kv_bytes_dense = per_token_kv_bytes(model) * context_length
        measures.kv_bytes_held_after_prefill = kv_bytes(cache)
        compressed = press.snapshot()
        # A press that evicts or writes while decoding changes the context's pairs: later questions need them back.
        saved = _save_context(cache, press) if press.compresses_while_decoding and len(question_ids) > 1 else None
        for index, ids in enumerate(question_ids):
            compat.crop_cache(cache, context_length)
            if saved is not None and index > 0:
                _restore_context(cache, saved)
            press.restore(compressed)
            generator = torch.Generator(device=ids.device).manual_seed(settings.seed + index)
            start = device_clock(device)
            tokens = decode(model, cache, ids, settings, eos_ids, generator)
            measures.decode_seconds += device_clock(device) - start
            _free_evicted(press, cache)
            measures.kv_bytes_held_end.append(kv_bytes(cache))
            text = tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else ""
            answers.append(Answer(text, tokens, press.achieved_compression_ratio))
    measures.kv_bytes_peak = max(measures.kv_bytes_peak, _peak(cache))
    peak = device_peak(device)
    if peak is not None:
        measures.device_peak_bytes = max(measures.device_peak_bytes or 0, peak)
    return answers, context_ratio


def device_clock(device: torch.device) -> float:
    """``time.perf_counter()`` once the device's queued work is done: CUDA kernels run asynchronously, so a clock
    read without waiting would time their launches, not their work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def reset_device_peak(device: torch.device) -> None:
    """Start the CUDA allocator's peak afresh (nothing to do elsewhere: a CPU has no allocator to ask)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def device_peak(device: torch.device) -> int | None:
    """The most bytes the CUDA allocator held since :func:`reset_device_peak`; None off CUDA."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _free_evicted(press: BasePress, cache) -> None:
    """Mirror the press's latest evictions into compact layers now (they are otherwise applied lazily, at the next
    forward of each layer), so what is measured is what the press keeps."""
    for index, layer in enumerate(cache.layers):
        if isinstance(layer, CompactLayer):
            layer.apply_evictions(press.evicted_mask(index))


def _save_context(cache, press: BasePress) -> list:
    """Per layer, what a later question needs back: a compact layer's whole state (a decoding press frees context
    pairs), the keys and values of a dense one if the press writes them (CAM's merges), else None."""
    saved = []
    for layer in cache.layers:
        if isinstance(layer, CompactLayer):
            saved.append(layer.state_copy())
        elif press.rewrites_cache and getattr(layer, "keys", None) is not None and not layer.is_sliding:
            saved.append((layer.keys.clone(), layer.values.clone()))
        else:
            saved.append(None)
    return saved


def _restore_context(cache, saved: list) -> None:
    """Put back what :func:`_save_context` kept (the cache already cut back to the context)."""
    for layer, state in zip(cache.layers, saved, strict=True):
        if isinstance(state, dict):
            layer.load_state(state)
        elif state is not None:
            layer.keys.copy_(state[0])
            layer.values.copy_(state[1])


def _peak(cache) -> int:
    """The most bytes of keys and values the cache held at once (compact layers share a running total; dense
    layers only grow, so their final size is their peak)."""
    layers = compact_layers(cache)
    peak = layers[0].tracker.peak if layers else 0
    return peak + sum(_dense_layer_bytes(layer) for layer in cache.layers if not isinstance(layer, CompactLayer))
