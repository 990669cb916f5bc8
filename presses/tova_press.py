from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from presses.scorer_press import ScorerPress
from presses.snapkv_press import keep_window, window_attention


@dataclass
class TOVAPress(ScorerPress):
    """Score each key by the attention the last token pays it, averaged over all query heads.

    Oren, Hassid, Yarden, Adi, Schwartz, "Transformers are Multi-State RNNs" (Token Omission Via Attention),
    EMNLP 2024 (arXiv 2401.06104).

    The last query's weights (batch, num_heads, 1, k_len - 1), from eager attention or recomputed under sdpa, are
    averaged over every query head, so all KV heads share one score and evict the same positions (as in the paper).
    Scores are (batch, kv_heads, k_len); the last token is always kept.

    Deviations, as in kvpress: the paper evicts one token per decoding step to hold a fixed cache size; here the
    prefill is compressed once to the requested ratio. The last token is forced to stay (kvpress pads it with the
    maximum score, a tie; here strictly above); the paper does not force it, but it attends to itself strongly.
    """

    def score(self, module: nn.Module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        batch, kv_heads, k_len, _ = keys.shape
        if k_len < 2:  # nothing before the last token to score
            return torch.zeros(batch, kv_heads, k_len, device=keys.device)
        if attentions is not None:
            weights = attentions[..., -1:, :-1].float()
        else:
            weights = window_attention(module, hidden_states, keys, 1, kwargs["position_embeddings"])
        # One score per position for the whole layer: the mean over every query head.
        scores = weights.mean(dim=(1, 2))[:, None].expand(batch, kv_heads, k_len - 1)
        return keep_window(scores, 1)
