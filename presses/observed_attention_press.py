from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from presses.errors import PressError
from presses.scorer_press import ScorerPress


@dataclass
class ObservedAttentionPress(ScorerPress):
    """Score keys by the average attention they received during the prefill (H2O-style heavy hitters).

    Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models",
    NeurIPS 2023 (arXiv 2306.14048). As in kvpress: the attention each key receives is summed over queries and
    divided by the number of queries that could see it (causal), then averaged over the query heads of each KV
    group. Needs the attention weights, so the model must use eager attention.
    """

    def score(self, module: nn.Module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        if attentions is None:
            raise PressError("observed_attention needs attention weights: load the model with "
                             "attn_implementation='eager'")
        batch, kv_heads, k_len, _ = keys.shape
        received = attentions.float().sum(dim=2)  # (batch, heads, k_len)
        n_queries = torch.arange(k_len, 0, -1, device=keys.device, dtype=received.dtype)
        scores = received / n_queries
        return scores.view(batch, kv_heads, -1, k_len).mean(dim=2)
