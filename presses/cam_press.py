from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from presses import compat
from presses.base_press import LayerInputs
from presses.decoding_press import DecodingPress
from presses.errors import PressError


@dataclass
class CAMPress(DecodingPress):
    """Cache merging while decoding: before evicting, fold evicted values into the kept tokens that follow them.

    Zhang et al., "CaM: Cache Merging for Memory-efficient LLMs Inference", ICML 2024 (openreview LCTmppB165), as
    kvpress's CAMPress. During decoding each layer sums, per KV head, the attention every cached token receives from
    each new token (the current query, averaged over the KV group). Every ``compression_interval`` steps, once more
    than ``target_size`` tokens are kept:

    1. ``base_press`` scores the cache; scores are averaged over KV heads and the lowest go, so that
       ``target_size`` tokens stay (the same tokens in every head);
    2. among the evicted, the ``k`` best scored (later positions first on ties), ``k`` = steps since the last
       compression, are merged: each into the ``merge_budget`` kept tokens right after it;
    3. a merge happens with probability ``clamp(A_i / mean(A_window), 0, 1)`` (``A`` = summed attention), drawn with
       ``torch.bernoulli`` (seed torch for repeatable runs); a merged value adds ``v_i / |window|`` to each value of
       its window.

    Cache: merged values are added in place to the layer's cached values (``rewrites_cache``); evicted pairs stay
    in the cache, masked. kvpress works on the physically compacted cache; here the same algorithm runs on the kept
    positions, which is the same sequence. Deviation: the attention sums are recomputed from the query in float32
    (kvpress takes the eager weights when present); no sweep knob, like DecodingPress.
    """

    merge_budget: int = 32
    rewrites_cache: ClassVar[bool] = True
    position_state: ClassVar[tuple[str, ...]] = ("evicted", "attention")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.merge_budget, int) or self.merge_budget < 1:
            raise PressError(f"CAMPress: merge_budget must be a positive integer, got {self.merge_budget!r}")

    def compress(self, layer: LayerInputs) -> torch.Tensor:
        if layer.is_prefill:
            return layer.evicted
        state = self.layer_state(layer.module.layer_idx)
        buffered = self.buffered_inputs(state, layer)
        attention = self.current_attention(layer)
        if "attention" in state:
            previous = state["attention"]
            attention = attention + torch.cat(
                [previous, previous.new_zeros(*previous.shape[:2], layer.k_len - previous.shape[-1])], dim=-1)
        steps = int(state.get("steps", torch.tensor(0))) + 1
        evicted = layer.evicted
        kept = int((~evicted[0, 0]).sum())
        if steps >= self.compression_interval and kept > self.target_size:
            kwargs = {**layer.kwargs, "position_embeddings": (buffered["cos"], buffered["sin"])}
            scores = self.base_press.score(layer.module, buffered["hidden"], layer.keys, layer.values, None, kwargs)
            evicted = self.merge_and_evict(scores, layer.values, attention, evicted, steps)
            steps = 0
            buffered = {name: t[:, :0] for name, t in buffered.items()}  # kvpress empties the buffer
        self.store_buffer(state, buffered, steps)
        state["attention"] = attention
        return evicted

    @staticmethod
    def current_attention(layer: LayerInputs) -> torch.Tensor:
        """Attention of this forward's last query to every cached pair, per KV head: (batch, kv_heads, k_len)."""
        cos, sin = layer.kwargs["position_embeddings"]
        query = compat.query_states(layer.module, layer.hidden_states[:, -1:], (cos[:, -1:], sin[:, -1:])).float()
        groups = compat.num_key_value_groups(layer.module)
        keys = layer.keys.float().repeat_interleave(groups, dim=1)
        logits = (query @ keys.transpose(2, 3))[:, :, 0] / math.sqrt(layer.keys.shape[-1])
        evicted = layer.evicted.repeat_interleave(groups, dim=1)
        weights = logits.masked_fill(evicted, float("-inf")).softmax(dim=-1)
        return weights.view(weights.shape[0], -1, groups, weights.shape[-1]).mean(dim=2)

    def merge_and_evict(self, scores: torch.Tensor, values: torch.Tensor, attention: torch.Tensor,
                        evicted: torch.Tensor, n_merge: int) -> torch.Tensor:
        """Steps 1-3 on the kept positions (the same in every head); returns the new eviction mask."""
        if scores.shape[0] != 1:
            raise PressError("CAMPress supports batch size 1 (as kvpress)")
        positions = torch.nonzero(~evicted[0, 0]).flatten()  # kept positions, in order: kvpress's cache
        n = positions.numel()
        n_evict = n - self.target_size
        mean_scores = scores[0].float().mean(dim=0)[positions]  # (n,)
        evict_rank = mean_scores.topk(n_evict, largest=False).indices.sort().values
        kept_rank = mean_scores.topk(self.target_size).indices.sort().values
        evict_scores = mean_scores[evict_rank]
        # The best evicted, later positions first on ties (kvpress flips before a stable sort).
        order = evict_scores.flip(0).argsort(descending=True, stable=True)[:n_merge]
        merging = evict_rank[n_evict - 1 - order].sort().values
        starts = torch.searchsorted(kept_rank, merging, right=True)
        window = starts[:, None] + torch.arange(self.merge_budget, device=starts.device)
        valid = window < self.target_size
        targets = kept_rank[window.clamp(max=self.target_size - 1)]  # (n_merging, budget), compacted index
        sizes = valid.sum(dim=-1)  # (n_merging,)
        kept_attention = attention[0][:, positions]  # (kv_heads, n)
        window_attention = (kept_attention[:, targets] * valid).sum(dim=-1) / sizes.clamp(min=1)
        probability = (kept_attention[:, merging] / window_attention).nan_to_num(nan=0.0, posinf=1.0).clamp(0, 1)
        merge = torch.bernoulli(probability)  # (kv_heads, n_merging)
        scale = torch.where(sizes > 0, merge / sizes.clamp(min=1), torch.zeros_like(merge))
        merged_values = values[0][:, positions[merging]].float()  # (kv_heads, n_merging, head_dim)
        contributions = (merged_values * scale[..., None])[:, :, None, :] * valid[None, :, :, None]
        target_positions = positions[targets].flatten()  # cache positions
        dim = values.shape[-1]
        update = torch.zeros_like(values[0], dtype=torch.float32)
        update.index_add_(1, target_positions, contributions.reshape(values.shape[1], -1, dim))
        values[0] += update.to(values.dtype)
        new_evicted = evicted.clone()
        new_evicted[..., positions[evict_rank]] = True
        return new_evicted
