from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from presses.errors import PressError
from presses.scorer_press import ScorerPress


@dataclass
class LagKVPress(ScorerPress):
    """Score each token by how much its key and value stand out against the statistics of the next lag.

    Liang, Zhang, Li, Li, "LagKV: Lag-Relative Information of the KV Cache Tells Which Tokens Are Important",
    arXiv 2504.04704 (2025).

    After ``n_sink`` sink tokens the cache is cut into lags of ``lag_size`` tokens. Each lag is min-max normalised per
    channel with the range of the following lag (its reference, as a model is autoregressive); a token's score is the
    softmax over its lag of the channel standard deviation of its normalised key, plus the same for its value.
    Scores are (batch, kv_heads, k_len). Sinks and the last full lag with the partial remainder after it have no
    reference and are always kept.

    As in kvpress (``cross_scoring=False``, the only mode here): scores are replaced by their rank inside their lag,
    ``rank / lag_size``, so every lag keeps the same share of tokens, as the paper's per-lag top-k does; a context
    shorter than ``n_sink + 2 * lag_size`` keeps its sinks, then its most recent tokens.
    Deviations: kvpress gives sinks and the kept tail the same score (a tie when the budget cannot hold both); here
    sinks come first, then the tail by recency. A constant reference channel (zero range) gives NaN in kvpress; here
    the range is floored at 1e-6.
    """

    n_sink: int = 4
    lag_size: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.n_sink, int) or self.n_sink < 0:
            raise PressError(f"LagKVPress: n_sink must be a non-negative integer, got {self.n_sink!r}")
        if not isinstance(self.lag_size, int) or self.lag_size < 1:
            raise PressError(f"LagKVPress: lag_size must be a positive integer, got {self.lag_size!r}")

    def lag_scores(self, states: torch.Tensor) -> torch.Tensor:
        """(batch, kv_heads, n_lags * lag_size, head_dim) -> (batch, kv_heads, n_lags - 1, lag_size).

        Every lag but the last is normalised by the next one's per-channel range; each row sums to 1.
        """
        batch, heads, length, dim = states.shape
        lags = states.float().view(batch, heads, length // self.lag_size, self.lag_size, dim)
        reference = lags[:, :, 1:]
        low = reference.amin(dim=-2, keepdim=True)
        high = reference.amax(dim=-2, keepdim=True)
        normalised = (lags[:, :, :-1] - low) / (high - low).clamp_min(1e-6)
        return normalised.std(dim=-1).softmax(dim=-1)

    def score(self, module: nn.Module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        batch, kv_heads, k_len, _ = keys.shape
        n_sink = min(self.n_sink, k_len)
        sinks = torch.full((batch, kv_heads, n_sink), 2.0, device=keys.device)
        if k_len < self.n_sink + 2 * self.lag_size:
            # No lag has a reference yet: keep sinks, then recency (scores in [0, 1), as kvpress).
            recency = torch.arange(k_len - n_sink, device=keys.device) / max(1, k_len - n_sink)
            return torch.cat([sinks, recency.expand(batch, kv_heads, -1)], dim=-1)
        end = n_sink + (k_len - n_sink) // self.lag_size * self.lag_size
        scores = (self.lag_scores(keys[:, :, n_sink:end]) + self.lag_scores(values[:, :, n_sink:end])) / 2
        # Rank inside each lag, in [0, 1): every lag keeps the same share of its tokens.
        ranks = scores.argsort(dim=-1).argsort(dim=-1).float() / self.lag_size
        tail_len = k_len - end + self.lag_size  # last full lag and the remainder: no reference, always kept
        tail = 1 + torch.arange(tail_len, device=keys.device) / tail_len
        return torch.cat([sinks, ranks.flatten(2), tail.expand(batch, kv_heads, -1)], dim=-1)
