from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from presses.scorer_press import ScorerPress


@dataclass
class LagKVPress(ScorerPress):
    """Score each token by how much its key and value stand out from the statistics of the next lag.

    Liang et al., "LagKV: Lag-Relative Information of the KV Cache Tells Which Tokens Are Important",
    arXiv 2504.04704. After ``n_sink`` sink tokens the context is cut into lags of ``lag_size`` tokens; each lag
    is min-max normalised with the range of the following lag, and a token's score is the softmax over its lag of the
    standard deviation of its normalised key plus that of its value. Sinks and the last (partial) lag are always
    kept. A context shorter than ``n_sink + 2 * lag_size`` has no lag to compare with: every score is equal and
    ties are broken by position (recent kept), as a plain window would.
    """

    n_sink: int = 4
    lag_size: int = 128

    def score(self, module: nn.Module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        batch, kv_heads, k_len, dim = keys.shape
        recency = torch.linspace(0, 1e-3, k_len, device=keys.device).expand(batch, kv_heads, k_len)
        if k_len < self.n_sink + 2 * self.lag_size:
            return recency.clone()
        n_lags = (k_len - self.n_sink) // self.lag_size
        end = self.n_sink + n_lags * self.lag_size

        def lag_scores(states: torch.Tensor) -> torch.Tensor:
            lags = states[:, :, self.n_sink : end].float().view(batch, kv_heads, n_lags, self.lag_size, dim)
            reference = lags[:, :, 1:]  # each lag is judged against the next one
            low = reference.amin(dim=-2, keepdim=True)
            high = reference.amax(dim=-2, keepdim=True)
            normalised = (lags[:, :, :-1] - low) / (high - low).clamp_min(1e-6)
            return normalised.std(dim=-1).softmax(dim=-1)  # (batch, heads, n_lags - 1, lag_size)

        scores = (lag_scores(keys) + lag_scores(values)).flatten(2)
        keep = torch.full((batch, kv_heads, 1), float(scores.max()) + 1, device=keys.device)
        sinks = keep.expand(batch, kv_heads, self.n_sink)
        tail = keep.expand(batch, kv_heads, k_len - self.n_sink - scores.shape[-1])
        return torch.cat([sinks, scores, tail], dim=-1) + recency
