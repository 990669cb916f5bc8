from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from presses.scorer_press import ScorerPress


@dataclass
class KeyDiffPress(ScorerPress):
    """Keep the keys least similar to the average key direction.

    Park et al., "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference in
    Resource-Constrained Environments", arXiv 2504.15364. The anchor is the mean of the L2-normalised keys of each
    head; the score is minus the cosine similarity to it, so distinctive keys are kept.
    """

    def score(self, module: nn.Module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        anchor = F.normalize(keys.float(), p=2, dim=-1).mean(dim=2, keepdim=True)
        return -F.cosine_similarity(keys.float(), anchor, dim=-1)
