from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from presses.base_press import LayerInputs, keep_top_scores
from presses.errors import PressError
from presses.wrapper_press import ScorerWrapperPress

_EPS = 1e-6


@dataclass
class MergingPress(ScorerWrapperPress):
    """Evict like ``press``, but first fold each evicted value into the kept pair whose key is most similar.

    kvpress's MergingPress (merge-on-evict, after Token Merging, Bolya et al. ICLR 2023, arXiv 2210.09461, and D2O,
    Wan et al. 2024, arXiv 2406.13035): ``press`` keeps its top pairs per head; each evicted pair finds the kept key
    of highest cosine similarity ``s``; if ``s >= similarity_threshold`` (and it is among the ``merge_fraction``
    most similar evictions) it adds its value with weight ``max(s, 0) * |v_e| / (|v_e| + |v_t| + 1e-6)``; each
    target value becomes ``(v_t + sum w v_e) / (1 + sum w)``. Keys are unchanged (RoPE-safe).

    Cache: the merged values are written in place into the layer's cached values at the kept positions
    (``rewrites_cache``); evicted pairs stay in the cache, masked, with their original values, so attention sees
    exactly kvpress's compressed cache. The merge needs the same number of kept pairs in every head (true at the
    prefill); arithmetic in float32, the result cast to the cache's dtype as in kvpress.
    """

    similarity_threshold: float = 0.0
    merge_fraction: float = 1.0
    rewrites_cache: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.similarity_threshold <= 1:
            raise PressError(f"MergingPress: similarity_threshold must be in [0, 1], got {self.similarity_threshold!r}")
        if not 0 < self.merge_fraction <= 1:
            raise PressError(f"MergingPress: merge_fraction must be in (0, 1], got {self.merge_fraction!r}")

    def compress(self, layer: LayerInputs) -> torch.Tensor:
        if not layer.is_prefill or self.compression_ratio == 0:
            return layer.evicted
        kept_now = int((~layer.evicted).sum(-1).max())
        evicted = keep_top_scores(self.press.scores_for(layer), self.press.n_kept(kept_now, layer.module.layer_idx),
                                  layer.evicted)
        self.merge(layer.keys, layer.values, evicted)
        return evicted

    def merge(self, keys: torch.Tensor, values: torch.Tensor, evicted: torch.Tensor) -> None:
        """Fold evicted values into kept ones, writing ``values`` (batch, kv_heads, k_len, head_dim) in place."""
        batch, heads, k_len, dim = keys.shape
        n_kept = (~evicted).sum(-1)
        if bool((n_kept != n_kept.flatten()[0]).any()):
            raise PressError("MergingPress needs the same number of kept pairs in every head: wrap a uniform press")
        n_kept = int(n_kept.flatten()[0])
        if n_kept in (0, k_len):
            return
        order = evicted.to(torch.uint8).argsort(dim=-1, stable=True)  # kept positions first, in position order
        kept_idx, evicted_idx = order[..., :n_kept, None], order[..., n_kept:, None]
        kept_dir = _unit(keys.gather(2, kept_idx.expand(-1, -1, -1, dim)).float())
        evicted_dir = _unit(keys.gather(2, evicted_idx.expand(-1, -1, -1, dim)).float())
        similarity, target = (evicted_dir @ kept_dir.transpose(-2, -1)).max(dim=-1)  # (batch, heads, n_evicted)
        merge = similarity >= self.similarity_threshold
        if self.merge_fraction < 1 and bool(merge.any()):
            cut = similarity.masked_fill(~merge, float("-inf")).quantile(1 - self.merge_fraction, dim=-1,
                                                                         keepdim=True)
            merge &= similarity >= cut
        kept_values = values.gather(2, kept_idx.expand(-1, -1, -1, dim)).float()
        evicted_values = values.gather(2, evicted_idx.expand(-1, -1, -1, dim)).float()
        evicted_norm = evicted_values.norm(dim=-1)
        target_norm = kept_values.norm(dim=-1).gather(2, target)
        weight = similarity.clamp(min=0) * merge * evicted_norm / (evicted_norm + target_norm + _EPS)
        added = torch.zeros_like(kept_values).scatter_add_(2, target[..., None].expand(-1, -1, -1, dim),
                                                           weight[..., None] * evicted_values)
        total = torch.zeros_like(kept_values[..., 0]).scatter_add_(2, target, weight)
        merged = torch.where((total > 0)[..., None], (kept_values + added) / (1 + total[..., None]), kept_values)
        values.scatter_(2, kept_idx.expand(-1, -1, -1, dim), merged.to(values.dtype))


def _unit(vectors: torch.Tensor) -> torch.Tensor:
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp(min=_EPS)
