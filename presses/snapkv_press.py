from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from presses import compat
from presses.scorer_press import ScorerPress


def window_attention(module: nn.Module, hidden_states: torch.Tensor, keys: torch.Tensor, window_size: int,
                     position_embeddings) -> torch.Tensor:
    """Attention of the last ``window_size`` queries to every key before the window.

    Queries are recomputed from ``hidden_states`` (batch, q_len, hidden) with their RoPE; causal inside the window.
    Returns (batch, num_heads, window_size, k_len - window_size).
    """
    cos, sin = position_embeddings
    queries = compat.query_states(module, hidden_states[:, -window_size:],
                                  (cos[:, -window_size:], sin[:, -window_size:]))
    keys = keys.repeat_interleave(compat.num_key_value_groups(module), dim=1)
    logits = queries @ keys.transpose(2, 3) / math.sqrt(compat.head_dim(module))
    k_len = keys.shape[2]
    causal = torch.ones(window_size, k_len, dtype=torch.bool, device=keys.device).triu(k_len - window_size + 1)
    logits = logits.masked_fill(causal, float("-inf"))
    weights = torch.softmax(logits, dim=-1, dtype=torch.float32)
    return weights[..., : k_len - window_size]


@dataclass
class SnapKVPress(ScorerPress):
    """Score keys by the attention the last ``window_size`` context tokens pay them, smoothed by pooling.

    Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024 (arXiv 2404.14469).
    As in kvpress: attention weights of the observation window averaged over its queries, 1-D average pooling with
    ``kernel_size``, averaged over the query heads of each KV group; the window itself is always kept. A context no
    longer than the window uses a window of ``k_len - 1`` tokens.
    """

    window_size: int = 64
    kernel_size: int = 5

    def score(self, module: nn.Module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        batch, kv_heads, k_len, _ = keys.shape
        window = min(self.window_size, k_len - 1)
        if window < 1:
            return torch.ones(batch, kv_heads, k_len, device=keys.device)
        if attentions is not None:
            weights = attentions[..., -window:, : k_len - window].float()
        else:
            weights = window_attention(module, hidden_states, keys, window, kwargs["position_embeddings"])
        scores = weights.mean(dim=-2)  # (batch, heads, k_len - window)
        kernel = min(self.kernel_size, scores.shape[-1])
        kernel -= 1 - kernel % 2  # odd, so pooling keeps the length
        scores = F.avg_pool1d(scores, kernel_size=kernel, padding=kernel // 2, stride=1)
        scores = scores.view(batch, kv_heads, -1, k_len - window).mean(dim=2)
        return F.pad(scores, (0, window), value=float(scores.max()) + 1)
