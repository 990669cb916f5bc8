from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from presses.scorer_press import ScorerPress


@dataclass
class StreamingLLMPress(ScorerPress):
    """Keep the first ``n_sink`` tokens (attention sinks) and the most recent ones; evict the middle.

    Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024 (arXiv 2309.17453).
    """

    n_sink: int = 4

    def score(self, module: nn.Module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        k_len = keys.shape[2]
        # Sinks first, then recency: later positions score higher, sinks score highest.
        scores = torch.arange(k_len, device=keys.device, dtype=torch.float32) + 1
        scores[: self.n_sink] = k_len + 1
        return scores.expand(*keys.shape[:2], k_len)
