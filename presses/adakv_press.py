from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from presses.base_press import LayerInputs
from presses.scorer_press import ScorerPress
from presses.wrapper_press import ScorerWrapperPress


@dataclass
class AdaKVPress(ScorerWrapperPress):
    """Head-wise budgets over any scorer: remove the layer's lowest-scoring pairs across all its heads together.

    Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM Inference",
    arXiv 2407.11550. The layer removes ``int(heads * k_len * compression_ratio)`` pairs chosen jointly over
    heads, so heads with flat scores lose more than heads with peaked ones. As in kvpress, a safeguard keeps the top
    ``alpha_safeguard`` fraction of each head's uniform budget, so no head is emptied. Evictions are ragged across
    heads; they are applied as per-head attention masks.
    """

    alpha_safeguard: float = 0.20

    def __post_init__(self) -> None:
        if not isinstance(self.press, ScorerPress):
            raise TypeError(f"AdaKVPress wraps a ScorerPress, got {type(self.press).__name__}")
        if not 0 <= self.alpha_safeguard <= 1:
            raise ValueError(f"alpha_safeguard must be in [0, 1], got {self.alpha_safeguard}")

    def score(self, module: nn.Module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        """The wrapped press's scores (so that ``DecodingPress`` can score the cache through this press)."""
        return self.press.score(module, hidden_states, keys, values, attentions, kwargs)

    def select(self, scores: torch.Tensor, n_kept_per_head: int, evicted: torch.Tensor) -> torch.Tensor:
        """Evict ``heads * (k_len - n_kept_per_head)`` pairs of the layer, lowest scores over all heads together.

        ``scores`` and ``evicted`` are (batch, kv_heads, k_len); already evicted pairs count as removed first.
        """
        scores = scores.float().masked_fill(evicted, float("-inf"))
        batch, heads, k_len = scores.shape
        n_safe = max(1, int(n_kept_per_head * self.alpha_safeguard))
        safe = scores.topk(min(n_safe, k_len), dim=-1).indices
        scores = scores.scatter(-1, safe, float("inf"))
        n_removed = heads * (k_len - n_kept_per_head)
        removed = scores.reshape(batch, -1).topk(n_removed, dim=-1, largest=False).indices
        new_evicted = torch.zeros(batch, heads * k_len, dtype=torch.bool, device=scores.device)
        new_evicted.scatter_(-1, removed, True)
        return new_evicted.view(batch, heads, k_len) | evicted

    def compress(self, layer: LayerInputs) -> torch.Tensor:
        if not layer.is_prefill or self.compression_ratio == 0:
            return layer.evicted
        n_kept_per_head = self.press.n_kept(layer.k_len, layer.module.layer_idx)
        return self.select(self.press.scores_for(layer), n_kept_per_head, layer.evicted)
