from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from presses.scorer_press import ScorerPress


@dataclass
class KnormPress(ScorerPress):
    """Keep the keys with the smallest L2 norm.

    Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression", EMNLP 2024
    (arXiv 2406.11430): low-norm keys draw high attention, so the score is minus the key norm.
    """

    def score(self, module: nn.Module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        # In float32 as kvpress: in bfloat16 most key norms tie and the choice among them is arbitrary.
        return -keys.float().norm(dim=-1)
