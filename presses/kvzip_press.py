from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from presses import compat
from presses.base_press import BasePress, LayerInputs, validate_ratio
from presses.errors import PressError

REPEAT_FIRST_CHUNK = "\n\nRepeat the previous context exactly."
REPEAT_NEXT_CHUNK = "\n\nRepeat the part of the previous context exactly, starting with"
OVERLAP_TOKENS = 8  # tokens of the previous chunk quoted to say where the repetition starts


def value_output_norms(module: nn.Module, values: torch.Tensor) -> torch.Tensor:
    """``||W_o^h v_i||`` for every query head h and position i: (batch, num_heads, n).

    ``values`` is (batch, kv_heads, n, head_dim). Computed through the per-head Gram matrix of ``o_proj`` so the
    (n, hidden) products are never materialised.
    """
    per_head = compat.output_projection_per_head(module).float()  # (heads, head_dim, hidden)
    gram = per_head @ per_head.transpose(1, 2)  # (heads, head_dim, head_dim)
    values = values.float().repeat_interleave(compat.num_key_value_groups(module), dim=1)
    squared = torch.einsum("bhnd,hde,bhne->bhn", values, gram, values)
    return squared.clamp_min(0).sqrt()


def reconstruction_scores(
    module: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings,
    keys: torch.Tensor,
    values: torch.Tensor,
    scored: slice,
    sinks: int,
    plus_normalization: bool,
) -> torch.Tensor:
    """KVzip score of the cached pairs in ``scored`` from the queries of a repeat prompt: (batch, kv_heads, n).

    ``hidden_states`` (batch, R, hidden) are the repeat prompt's attention inputs; ``keys``/``values`` are the
    layer's whole cache, whose last R positions are the repeat prompt itself. As in KVzip, the softmax runs over a
    reduced key set: the first ``sinks`` positions, the ``scored`` chunk and the repeat prompt (causal inside it).
    KVzip keeps the attention weight; KVzip+ multiplies it by ``||W_o^h v_i|| / ||x_q||``. The score of a pair is
    the max over repeat queries and over the query heads of its KV group.
    """
    batch, kv_heads, k_len, _ = keys.shape
    repeat = hidden_states.shape[1]
    index = torch.cat([
        torch.arange(sinks, device=keys.device),
        torch.arange(scored.start, scored.stop, device=keys.device),
        torch.arange(k_len - repeat, k_len, device=keys.device),
    ])
    groups = compat.num_key_value_groups(module)
    queries = compat.query_states(module, hidden_states, position_embeddings).float()
    selected_keys = keys[:, :, index].float().repeat_interleave(groups, dim=1)
    logits = queries @ selected_keys.transpose(2, 3) * module.scaling  # (batch, heads, R, n_keys)
    n_before = index.shape[0] - repeat
    causal = torch.ones(repeat, repeat, dtype=torch.bool, device=keys.device).triu(1)
    logits[..., n_before:] = logits[..., n_before:].masked_fill(causal, float("-inf"))
    weights = torch.softmax(logits, dim=-1)
    chunk = slice(sinks, sinks + scored.stop - scored.start)
    weights = weights[..., chunk]  # (batch, heads, R, chunk_len)
    if plus_normalization:
        norms = value_output_norms(module, values[:, :, scored])  # (batch, heads, chunk_len)
        query_norms = hidden_states.float().norm(dim=-1)  # (batch, R)
        weights = weights * norms[:, :, None, :] / query_norms[:, None, :, None]
    scores = weights.amax(dim=2)  # over repeat queries
    return scores.view(batch, kv_heads, groups, -1).amax(dim=2)  # over the query heads of each KV group


@dataclass
class KVzipPress(BasePress):
    """Query-agnostic oracle: keep the pairs the model attends to when asked to repeat its context.

    Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction", arXiv 2505.23416;
    ``kvzip_plus_normalization`` adds KVzap's normalisation (Jegou et al., arXiv 2601.07891), whose log is the KVzap
    training target. After a dense prefill the context is repeated chunk by chunk (``chunk_size`` tokens, each
    chunk after the first quoting the previous chunk's last 8 tokens); each chunk's repeat prompt runs through the
    model on top of the context's cache, scores are read from its attention, and the cache is cut back. Then the
    lowest-scoring ``compression_ratio`` of all pairs is evicted, globally over layers and heads (or per layer with
    ``layerwise``). The first ``n_sink`` positions score 1.0 (kept); chat-template positions before the context
    score 0 (pruned first). Follows kvpress's KVzipPress. Deviations: softmax in float32 (kvpress uses the model
    dtype), and every head keeps at least one pair. Batch size 1; needs the tokenizer for the repeat prompt.
    """

    compression_ratio: float = 0.0
    layerwise: bool = False
    n_sink: int = 4
    kvzip_plus_normalization: bool = False
    chunk_size: int = 2048
    knob: ClassVar[str | None] = "compression_ratio"

    def __post_init__(self) -> None:
        validate_ratio(self.compression_ratio, type(self).__name__)
        if self.chunk_size < 1:
            raise PressError(f"KVzipPress: chunk_size must be positive, got {self.chunk_size}")

    def post_init_from_model(self, model: nn.Module, tokenizer=None) -> None:
        if tokenizer is None:
            try:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
            except (OSError, ValueError):
                raise PressError("kvzip needs the model's tokenizer for its repeat prompt: use "
                                 "`with press(model, tokenizer)`") from None
        self._model = model
        self._prefix_length, self._suffix_ids = chat_template_pieces(tokenizer)
        self._first_instruction = tokenizer.encode(REPEAT_FIRST_CHUNK, add_special_tokens=False)
        self._next_instruction = tokenizer.encode(REPEAT_NEXT_CHUNK, add_special_tokens=False)

    @contextmanager
    def __call__(self, model: nn.Module, tokenizer=None) -> Iterator[KVzipPress]:
        self._scoring = False
        with super().__call__(model, tokenizer):
            base = model.model if hasattr(model, "model") else model
            handle = base.register_forward_hook(self._after_prefill, with_kwargs=True)
            try:
                yield self
            finally:
                handle.remove()

    def compress(self, layer: LayerInputs) -> torch.Tensor:
        return layer.evicted  # decided once the whole prefill is done, over all layers (see _after_prefill)

    def _after_prefill(self, base: nn.Module, args: tuple, kwargs: dict, output) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = compat.cache_from_output(output)
        if self._scoring or cache is None or input_ids is None or self.compression_ratio == 0:
            return
        context_length = cache.get_seq_length()
        if input_ids.shape[1] != context_length:
            return  # not a prefill
        if input_ids.shape[0] != 1:
            raise PressError("kvzip scores one context at a time: use batch size 1")
        self._scoring = True
        try:
            scores = self._score_context(input_ids, cache, context_length)
        finally:
            self._scoring = False
        for layer_idx, evicted in self._select(scores).items():
            self.layer_state(layer_idx)["evicted"] = evicted

    @torch.no_grad()
    def _score_context(self, input_ids: torch.Tensor, cache, context_length: int) -> dict[int, torch.Tensor]:
        modules = compat.attention_modules(self._model)
        kv_heads = compat.text_config(self._model).num_key_value_heads
        scores = {m.layer_idx: torch.zeros(1, kv_heads, context_length, device=input_ids.device) for m in modules}
        for layer_scores in scores.values():
            layer_scores[..., : self.n_sink] = 1.0
        chunk_slot: dict[str, slice] = {}

        def score_hook(module: nn.Module, args: tuple, hook_kwargs: dict, out) -> None:
            keys, values = compat.keys_values(compat.cache_from_kwargs(hook_kwargs), module.layer_idx)
            scored = chunk_slot["chunk"]
            sinks = min(self.n_sink, scored.start)
            scores[module.layer_idx][..., scored] = reconstruction_scores(
                module, compat.hidden_states_from(args, hook_kwargs), hook_kwargs["position_embeddings"], keys,
                values, scored, sinks, self.kvzip_plus_normalization)

        handles = [m.register_forward_hook(score_hook, with_kwargs=True) for m in modules]
        try:
            start = min(self._prefix_length, context_length)
            while start < context_length:
                stop = min(start + self.chunk_size, context_length)
                chunk_slot["chunk"] = slice(start, stop)
                if start == min(self._prefix_length, context_length):
                    instruction = self._first_instruction
                else:
                    instruction = self._next_instruction + input_ids[0, start - OVERLAP_TOKENS : start].tolist()
                repeat_ids = instruction + self._suffix_ids + input_ids[0, start:stop].tolist()
                repeat = torch.tensor([repeat_ids], device=input_ids.device)
                self._model(input_ids=repeat, **{compat.model_cache_kwarg(): cache}, use_cache=True)
                compat.crop_cache(cache, context_length)
                start = stop
        finally:
            for handle in handles:
                handle.remove()
        return scores

    def _select(self, scores: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Evict the lowest scores: over all layers at once, or within each layer with ``layerwise``."""
        layers = sorted(scores)
        stacked = torch.stack([scores[i] for i in layers])  # (layers, 1, kv_heads, T)
        groups = [stacked[i : i + 1] for i in range(len(layers))] if self.layerwise else [stacked]
        evicted = []
        for group in groups:
            flat = group.flatten()
            n_removed = int(flat.numel() * self.compression_ratio)
            mask = torch.zeros_like(flat, dtype=torch.bool)
            mask[flat.topk(n_removed, largest=False).indices] = True
            evicted.append(mask.view_as(group))
        evicted = torch.cat(evicted)
        # A head that lost every pair keeps its best one.
        emptied = evicted.all(dim=-1, keepdim=True)
        best = torch.zeros_like(evicted).scatter_(-1, stacked.argmax(dim=-1, keepdim=True), True)
        evicted &= ~(emptied & best)
        return {layer: evicted[i] for i, layer in enumerate(layers)}


def chat_template_pieces(tokenizer) -> tuple[int, list[int]]:
    """Token count of the chat-template text before a user message, and the ids that close it and open the answer.

    Without a chat template: no prefix, suffix "\\n" (as kvpress).
    """
    if getattr(tokenizer, "chat_template", None) is None:
        return 0, tokenizer.encode("\n", add_special_tokens=False)
    separator = "#" * 13
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "dummy context\n" + separator}],
        add_generation_prompt=True,
        tokenize=False,
        enable_thinking=False,
    )
    prefix = text.split("dummy context")[0]
    suffix = text.split(separator)[-1]
    return len(tokenizer.encode(prefix, add_special_tokens=False)), tokenizer.encode(suffix, add_special_tokens=False)
