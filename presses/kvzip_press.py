"""KVzip and KVzip+: keep the pairs the model attends to when it is asked to repeat its context.

Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction", arXiv 2505.23416; the KVzip+
normalisation is from KVzap (Jegou et al., arXiv 2601.07891), whose log is the KVzap training target.
:func:`kvzip_scores` is the per-layer score, reusable outside the press (e.g. to collect KVzip+ targets).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from presses import compat
from presses.base_press import validate_ratio
from presses.context_pass_press import ContextPassPress
from presses.errors import PressError

REPEAT_FIRST_CHUNK = "\n\nRepeat the previous context exactly."
REPEAT_NEXT_CHUNK = "\n\nRepeat the part of the previous context exactly, starting with"
OVERLAP_TOKENS = 8  # tokens of the previous chunk quoted to say where the repetition starts


def value_output_norms(module: nn.Module, values: torch.Tensor) -> torch.Tensor:
    """``||W_o^h v_i||`` for every query head h and position i, float32: (batch, num_heads, n).

    ``values`` is (batch, kv_heads, n, head_dim) and ``W_o^h`` the head-h slice (head_dim, hidden) of ``o_proj``.
    Computed through the per-head Gram matrix ``W_o^h W_o^h^T`` so no (n, hidden) product is materialised.
    """
    per_head = compat.output_projection_per_head(module).float()  # (heads, head_dim, hidden)
    gram = per_head @ per_head.transpose(1, 2)  # (heads, head_dim, head_dim)
    values = values.float().repeat_interleave(compat.num_key_value_groups(module), dim=1)
    squared = torch.einsum("bhnd,hde,bhne->bhn", values, gram, values)
    return squared.clamp_min(0).sqrt()


def kvzip_scores(
    module: nn.Module,
    query_hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    keys: torch.Tensor,
    values: torch.Tensor,
    key_slice: slice,
    plus_normalization: bool = False,
    n_sink: int = 0,
    query_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """KVzip(+) score of the cached pairs in ``key_slice``, float32: (batch, kv_heads, n_keys).

    ``query_hidden_states`` (batch, R, hidden) are the attention inputs (after the input norm) of R queries whose
    own keys are the last R positions of ``keys``/``values`` (batch, kv_heads, k_len, head_dim; keys with RoPE);
    ``position_embeddings`` is the (cos, sin) pair of those R positions. ``key_slice`` must end before them.

    As in KVzip (reference.md section 5) the softmax runs over a reduced key set: the first ``min(n_sink, start)``
    positions, the ``key_slice`` positions and the R query positions themselves (causal among them); logits are
    ``q.k * module.scaling``. KVzip keeps the attention weight a_ji; KVzip+ uses ``a_ji * ||W_o^h v_i|| / ||x_j||``
    (no log); with ``query_weights`` (batch, R), KVgrad's gradient norms, ``a_ji * ||W_o^h v_i|| * w_j``. The score of
    pair i is the max over the R queries and over the query heads of its KV group.
    With ``key_slice = slice(0, k_len - R)`` the key set is the whole causal prefix, i.e. the plain attention.
    Memory: one (batch, group, R, n_sink + n_keys + R) float32 block at a time (one KV head at a time).
    """
    batch, kv_heads, k_len, _ = keys.shape
    n_queries = query_hidden_states.shape[1]
    start, stop, step = key_slice.indices(k_len)
    if step != 1 or stop > k_len - n_queries or start > stop:
        raise ValueError(f"key_slice {key_slice} must be a contiguous range before the {n_queries} query positions")
    n_keys = stop - start
    sinks = min(n_sink, start)
    device = keys.device
    index = torch.cat([
        torch.arange(sinks, device=device),
        torch.arange(start, stop, device=device),
        torch.arange(k_len - n_queries, k_len, device=device),
    ])
    groups = compat.num_key_value_groups(module)
    queries = compat.query_states(module, query_hidden_states, position_embeddings).float()
    queries = queries.view(batch, kv_heads, groups, n_queries, -1)
    future = torch.ones(n_queries, n_queries, dtype=torch.bool, device=device).triu(1)
    weighted = plus_normalization or query_weights is not None
    if weighted:
        output_norms = value_output_norms(module, values[:, :, start:stop]).view(batch, kv_heads, groups, 1, n_keys)
        if query_weights is None:
            query_weights = query_hidden_states.float().norm(dim=-1).reciprocal()
        query_weights = query_weights.float()[:, None, :, None]  # (b, 1, R, 1)
    scores = torch.empty(batch, kv_heads, n_keys, dtype=torch.float32, device=device)
    for head in range(kv_heads):
        selected = keys[:, head, index].float()  # (batch, n_sink + n_keys + R, head_dim)
        logits = torch.einsum("bgrd,bnd->bgrn", queries[:, head], selected) * module.scaling
        logits[..., -n_queries:].masked_fill_(future, float("-inf"))
        weights = torch.softmax(logits, dim=-1)[..., sinks : sinks + n_keys]  # (batch, group, R, n_keys)
        if weighted:
            weights = weights * output_norms[:, head] * query_weights
        scores[:, head] = weights.amax(dim=(1, 2))
    return scores


def chat_template_pieces(tokenizer) -> tuple[int, list[int]]:
    """Token count of the chat-template text before a user message, and the ids that close it and open the answer.

    Derived once from a dummy user turn (reference.md section 5 step 2). Without a chat template: no prefix and
    the suffix "\\n" (as kvpress).
    """
    if getattr(tokenizer, "chat_template", None) is None:
        return 0, tokenizer.encode("\n", add_special_tokens=False)
    dummy, separator = "dummy context", "\n" + "#" * len("dummy context")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": dummy + separator}],
        add_generation_prompt=True,
        tokenize=False,
        enable_thinking=False,
    )
    before, suffix = text.split(separator, 1)
    prefix = before.split(dummy)[0]
    return len(tokenizer.encode(prefix, add_special_tokens=False)), tokenizer.encode(suffix, add_special_tokens=False)


@dataclass
class KVzipPress(ContextPassPress):
    """Query-agnostic oracle: evict the pairs least attended to while the model repeats its context.

    Kim et al., arXiv 2505.23416; ``kvzip_plus_normalization`` is KVzip+ (KVzap, arXiv 2601.07891). After a dense
    prefill into an empty cache, the context (minus the chat-template prefix) is repeated ``chunk_size`` tokens at a
    time: each repeat prompt (instruction, for later chunks quoting the previous chunk's last 8 tokens, then the
    chat template's turn change, then the chunk) runs through the model on top of the context's cache, the chunk's
    pairs are scored from every layer's inputs with :func:`kvzip_scores`, and the cache is cut back to the context.
    The scoring's extra memory depends on ``chunk_size`` only, not on the context length (the repeat forward
    itself attends to the whole cache, like any chunked prefill). Then the ``compression_ratio`` lowest
    scores are evicted over all layers and heads at once (per layer with ``layerwise``). The first ``n_sink``
    positions are always kept, chat-template prefix positions after them are evicted first, and every head keeps at
    least one pair. Batch size 1; the tokenizer builds the repeat prompt. Deviations from kvpress: scores are
    computed in float32 (kvpress: model dtype), sinks are kept even when they fall inside the first chunk (kvpress
    then overwrites their score 1.0), and every head keeps a pair.
    """

    compression_ratio: float = 0.0
    layerwise: bool = False
    n_sink: int = 4
    kvzip_plus_normalization: bool = False
    chunk_size: int = 2048
    knob: ClassVar[str | None] = "compression_ratio"
    pass_name: ClassVar[str] = "kvzip"

    def __post_init__(self) -> None:
        validate_ratio(self.compression_ratio, type(self).__name__)
        if not isinstance(self.n_sink, int) or self.n_sink < 0:
            raise PressError(f"KVzipPress: n_sink must be a non-negative integer, got {self.n_sink!r}")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise PressError(f"KVzipPress: chunk_size must be a positive integer, got {self.chunk_size!r}")

    def post_init_from_model(self, model: nn.Module, tokenizer=None) -> None:
        super().post_init_from_model(model, tokenizer)
        if tokenizer is None:
            try:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
            except Exception:  # any failure to find a tokenizer gets the same one-line answer
                raise PressError(f"{self.pass_name} needs the model's tokenizer: call press(model, "
                                 "tokenizer)") from None
        self._prefix_length, self._suffix_ids = chat_template_pieces(tokenizer)
        self._first_instruction = tokenizer.encode(REPEAT_FIRST_CHUNK, add_special_tokens=False)
        self._next_instruction = tokenizer.encode(REPEAT_NEXT_CHUNK, add_special_tokens=False)

    def shared_work_key(self):
        """The reconstruction scores depend on these settings only, not on the ratio."""
        return ("kvzip", self.n_sink, self.kvzip_plus_normalization, self.chunk_size)

    def _repeat_prompts(self, context_ids: list[int]) -> Iterator[tuple[slice, list[int]]]:
        """(context positions scored, repeat prompt ids) for each chunk of the context after the template prefix."""
        first = start = min(self._prefix_length, len(context_ids))
        while start < len(context_ids):
            stop = min(start + self.chunk_size, len(context_ids))
            if start == first:
                instruction = self._first_instruction
            else:  # quote the previous chunk's last tokens (all of it if shorter than 8), as kvpress
                instruction = self._next_instruction + context_ids[start - min(OVERLAP_TOKENS, self.chunk_size) : start]
            yield slice(start, stop), instruction + self._suffix_ids + context_ids[start:stop]
            start = stop

    @torch.no_grad()
    def _score_context(self, input_ids: torch.Tensor, cache, context_length: int) -> dict[int, torch.Tensor]:
        """KVzip(+) scores of the context's pairs, per layer: (1, kv_heads, context_length) float32.

        Positions before the first chunk (the chat-template prefix) score 0; sinks are handled by :meth:`_select`.
        """
        scores: dict[int, torch.Tensor] = {}
        chunk: dict[str, slice] = {}

        def score_hook(module: nn.Module, args: tuple, hook_kwargs: dict, output) -> None:
            keys, values = compat.keys_values(compat.cache_from_kwargs(hook_kwargs), module.layer_idx)
            if module.layer_idx not in scores:
                scores[module.layer_idx] = keys.new_zeros((1, keys.shape[1], context_length), dtype=torch.float32)
            scores[module.layer_idx][..., chunk["slice"]] = kvzip_scores(
                module, compat.hidden_states_from(args, hook_kwargs), hook_kwargs["position_embeddings"],
                keys, values, chunk["slice"], self.kvzip_plus_normalization, self.n_sink)

        handles = [module.register_forward_hook(score_hook, with_kwargs=True) for module in self._modules]
        try:
            for chunk["slice"], repeat_ids in self._repeat_prompts(input_ids[0].tolist()):
                repeat = torch.tensor([repeat_ids], dtype=input_ids.dtype, device=input_ids.device)
                self._base_model(input_ids=repeat, **{compat.model_cache_kwarg(): cache}, use_cache=True)
                compat.crop_cache(cache, context_length)
        finally:
            for handle in handles:
                handle.remove()
            compat.crop_cache(cache, context_length)
        for module in self._modules:  # a context no longer than the template prefix has no chunk
            if module.layer_idx not in scores:
                keys, _ = compat.keys_values(cache, module.layer_idx)
                scores[module.layer_idx] = keys.new_zeros((1, keys.shape[1], context_length), dtype=torch.float32)
        return scores

    def _select(self, scores: dict[int, torch.Tensor],
                compression_ratio: float | None = None) -> dict[int, torch.Tensor]:
        """Evict the lowest scores over all layers at once, or within each layer with ``layerwise``.

        ``int(n * compression_ratio)`` (the press's own ratio unless one is given) of the n pairs go (n over all
        layers, or per layer), fewer if that would touch the first ``n_sink`` positions, which are always kept.
        Chat-template prefix positions after the sinks go first; a head that lost every pair keeps its best one.
        """
        layers = sorted(scores)
        device = scores[layers[0]].device
        ranked = torch.stack([scores[i].to(device) for i in layers])  # (layers, 1, kv_heads, T)
        ranked[..., self.n_sink : self._prefix_length] = float("-inf")
        ranked[..., : self.n_sink] = float("inf")
        groups = [ranked[i : i + 1] for i in range(len(layers))] if self.layerwise else [ranked]
        evicted = []
        for group in groups:
            flat = group.flatten()
            candidates = (flat != float("inf")).nonzero().squeeze(1)
            ratio = self.compression_ratio if compression_ratio is None else compression_ratio
            n_removed = min(int(flat.numel() * ratio), candidates.numel())
            mask = torch.zeros_like(flat, dtype=torch.bool)
            mask[candidates[flat[candidates].topk(n_removed, largest=False).indices]] = True
            evicted.append(mask.view_as(group))
        evicted = torch.cat(evicted)
        emptied = evicted.all(dim=-1, keepdim=True)
        best = torch.zeros_like(evicted).scatter_(-1, ranked.argmax(dim=-1, keepdim=True), True)
        evicted &= ~(emptied & best)
        return {layer: evicted[i].to(scores[layer].device) for i, layer in enumerate(layers)}
