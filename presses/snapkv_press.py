from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from presses import compat
from presses.errors import PressError
from presses.scorer_press import ScorerPress


def window_attention(module: nn.Module, hidden_states: torch.Tensor, keys: torch.Tensor, window_size: int,
                     position_embeddings) -> torch.Tensor:
    """Attention weights of the last ``window_size`` queries to the keys before the window.

    ``hidden_states`` (batch, q_len, hidden) are this forward's attention inputs, ``keys`` (batch, kv_heads, k_len,
    head_dim) the whole cache with RoPE, ``position_embeddings`` the (cos, sin) of the q_len positions; the window
    must lie inside this forward (``window_size <= q_len``) and end at the last cached position. The softmax runs over
    every key, causal inside the window, as eager attention computes it (in float32). Returns
    (batch, num_heads, window_size, k_len - window_size).
    """
    cos, sin = position_embeddings
    queries = compat.query_states(module, hidden_states[:, -window_size:],
                                  (cos[:, -window_size:], sin[:, -window_size:])).float()
    keys = keys.float().repeat_interleave(compat.num_key_value_groups(module), dim=1)
    # The model's own scale; kvpress uses 1/sqrt(head_dim), the same but for Gemma3's query_pre_attn_scalar.
    scaling = getattr(module, "scaling", None) or compat.head_dim(module) ** -0.5
    logits = queries @ keys.transpose(2, 3) * scaling
    k_len = keys.shape[2]
    # Window query i sits at position k_len - window_size + i and must not see the keys after it.
    future = torch.ones(window_size, k_len, dtype=torch.bool, device=keys.device).triu(k_len - window_size + 1)
    weights = logits.masked_fill(future, float("-inf")).softmax(dim=-1)
    return weights[..., : k_len - window_size]


def smooth(scores: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Average pooling along positions, zero padded, same length out: (batch, heads, n) -> (batch, heads, n).

    For an odd kernel this is ``F.avg_pool1d(scores, kernel_size, padding=kernel_size // 2, stride=1)`` as in SnapKV
    and kvpress; padding by hand also keeps the length for an even kernel and for n < kernel_size.
    """
    left = (kernel_size - 1) // 2
    return F.avg_pool1d(F.pad(scores, (left, kernel_size - 1 - left)), kernel_size, stride=1)


def keep_window(scores: torch.Tensor, window: int) -> torch.Tensor:
    """Append ``window`` scores above every score of ``scores`` (batch, heads, n) -> (batch, heads, n + window).

    Above the global maximum, so the window also survives a cross-head selection (AdaKV). Inside the window later
    tokens rank higher, which matters only when the budget is smaller than the window.
    """
    top = float(scores.max()) + 1 if scores.numel() else 1.0
    ramp = torch.arange(window, device=scores.device, dtype=scores.dtype) / window
    return torch.cat([scores, (top + ramp).expand(*scores.shape[:2], window)], dim=-1)


@dataclass
class SnapKVPress(ScorerPress):
    """Score each key by the attention the last ``window_size`` context tokens (the observation window) pay it.

    Li, Huang, Yang, Venkitesh, Locatelli, Ye, Cai, Lewis, Chen, "SnapKV: LLM Knows What You are Looking for Before
    Generation", NeurIPS 2024 (arXiv 2404.14469).

    As in kvpress: the window's attention weights (batch, num_heads, window, k_len - window), taken from eager
    attention or recomputed from the hidden states under sdpa, are averaged over the window's queries, smoothed by
    1-D average pooling of ``kernel_size`` (so neighbours of important tokens survive too), then averaged over the
    query heads of each KV head (GQA). The window itself is always kept. Scores are (batch, kv_heads, k_len).

    Deviations: the paper sums over the window (same ranking) and selects per query head; kvpress, like this press,
    averages per KV group. kvpress pads the window with the maximum score (a tie with the best prefix key); here
    it scores strictly above it. kvpress asserts ``k_len > window_size``; here the window shrinks to this forward's
    queries and to ``k_len - 1`` tokens (so a 10-token context keeps its most recent tokens), and a 1-token
    context scores 0.
    """

    window_size: int = 64
    kernel_size: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("window_size", "kernel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise PressError(f"{type(self).__name__}: {name} must be a positive integer, got {value!r}")

    def score(self, module: nn.Module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        batch, kv_heads, k_len, _ = keys.shape
        # The window is made of this forward's last queries and leaves at least one key to score.
        window = min(self.window_size, hidden_states.shape[1], k_len - 1)
        if window < 1:
            return torch.zeros(batch, kv_heads, k_len, device=keys.device)
        if attentions is not None:  # eager attention already computed these weights
            weights = attentions[..., -window:, : k_len - window].float()
        else:
            weights = window_attention(module, hidden_states, keys, window, kwargs["position_embeddings"])
        scores = smooth(weights.mean(dim=-2), self.kernel_size)  # (batch, num_heads, k_len - window)
        scores = scores.view(batch, kv_heads, -1, k_len - window).mean(dim=2)
        return keep_window(scores, window)
