from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from presses.errors import PressError
from presses.scorer_press import ScorerPress


@dataclass
class ObservedAttentionPress(ScorerPress):
    """Score each key by the average attention it received during the prefill (heavy hitters).

    Zhang, Sheng, Zhou, Chen, Zheng, Cai, Song, Tian, Ré, Barrett, Wang, Chen, "H2O: Heavy-Hitter Oracle for
    Efficient Generative Inference of Large Language Models", NeurIPS 2023 (arXiv 2306.14048).

    As in kvpress: the eager attention weights (batch, num_heads, q_len, k_len) are summed over queries and divided by
    the number of queries that could attend to each key (causal), so late keys are not penalised for being seen by
    fewer queries; then averaged over the query heads of each KV head. Scores are (batch, kv_heads, k_len).
    Only eager attention returns the weights: under sdpa the press raises a :class:`PressError`.

    Deviations, as in kvpress: H2O accumulates unnormalised attention while decoding, evicts one token per step and
    always keeps a window of recent tokens; here the prefill is compressed once, with no recent window. kvpress's
    ``output_attentions`` flag is not needed: the weights never leave the attention layer's hook.
    """

    def score(self, module: nn.Module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        if attentions is None:
            raise PressError("ObservedAttentionPress needs attention weights, which only eager attention returns: "
                             "load the model with attn_implementation='eager'")
        batch, kv_heads, k_len, _ = keys.shape
        q_len = attentions.shape[2]
        received = attentions.float().sum(dim=2)  # (batch, num_heads, k_len)
        # The queries sit at the last q_len positions: key j is seen by min(q_len, k_len - j) of them.
        n_seen = (k_len - torch.arange(k_len, device=keys.device)).clamp(max=q_len)
        scores = received / n_seen
        return scores.view(batch, kv_heads, -1, k_len).mean(dim=2)
