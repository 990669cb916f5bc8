"""Top-k presses: score every cached pair, remove the lowest-scoring fraction after the prefill."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from presses.base_press import BasePress, LayerInputs, keep_top_scores, n_kept_pairs, validate_ratio


@dataclass
class ScorerPress(BasePress):
    """Remove ``compression_ratio`` of the context's KV pairs in every head, keeping the highest scores.

    Subclasses implement :meth:`score` only. Every head of every layer keeps the same number of pairs,
    ``n_kept_pairs(k_len, compression_ratio)`` (kvpress's ``int(k_len * (1 - ratio))``, at least 1), so a short
    context never loses its whole cache.
    """

    compression_ratio: float = 0.0
    knob: ClassVar[str | None] = "compression_ratio"

    def __post_init__(self) -> None:
        validate_ratio(self.compression_ratio, type(self).__name__)

    def score(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> torch.Tensor:
        """Importance of each cached pair, (batch, kv_heads, k_len); higher means keep."""
        raise NotImplementedError

    def scores_for(self, layer: LayerInputs) -> torch.Tensor:
        return self.score(layer.module, layer.hidden_states, layer.keys, layer.values, layer.attentions, layer.kwargs)

    def select(self, scores: torch.Tensor, n_kept_per_head: int, evicted: torch.Tensor) -> torch.Tensor:
        """Keep the ``n_kept_per_head`` best scores of each head (``DecodingPress`` selects through this)."""
        return keep_top_scores(scores, n_kept_per_head, evicted)

    def n_kept(self, k_len: int, layer_idx: int) -> int:
        """Pairs each head keeps out of ``k_len`` (overridden by presses with per-layer budgets)."""
        return n_kept_pairs(k_len, self.compression_ratio)

    def compress(self, layer: LayerInputs) -> torch.Tensor:
        if not layer.is_prefill or self.compression_ratio == 0:
            return layer.evicted
        # Relative to what is still kept, so that presses composed in sequence compound.
        kept_now = int((~layer.evicted).sum(-1).max())
        n_keep = self.n_kept(kept_now, layer.module.layer_idx)
        return keep_top_scores(self.scores_for(layer), n_keep, layer.evicted)
