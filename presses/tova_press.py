from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from presses.scorer_press import ScorerPress
from presses.snapkv_press import window_attention


@dataclass
class TOVAPress(ScorerPress):
    """Score keys by the attention the last token pays them, averaged over all heads (one score for every head).

    Oren et al., "Transformers are Multi-State RNNs" (Token Omission Via Attention), EMNLP 2024 (arXiv 2401.06104).
    The last token is always kept. As in kvpress, the prefill is compressed once (the paper evicts one token per
    decoding step).
    """

    def score(self, module: nn.Module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        batch, kv_heads, k_len, _ = keys.shape
        if k_len < 2:
            return torch.ones(batch, kv_heads, k_len, device=keys.device)
        if attentions is not None:
            weights = attentions[..., -1:, :-1].float()
        else:
            weights = window_attention(module, hidden_states, keys, 1, kwargs["position_embeddings"])
        scores = weights.mean(dim=1)  # (batch, 1, k_len - 1): averaged over every query head
        scores = scores.expand(batch, kv_heads, k_len - 1)
        return F.pad(scores, (0, 1), value=float(scores.max()) + 1)
