from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from presses.scorer_press import ScorerPress


@dataclass
class KeyDiffPress(ScorerPress):
    """Keep the keys least similar to the head's average key direction.

    Park, Jones, Morse, Goel, Lee, Lott, "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM
    Inference in Resource-Constrained Environments", arXiv 2504.15364 (2025).

    Distinctive keys draw high attention, and no attention weights are needed. The anchor of each head is the mean
    of its L2-normalised keys (batch, kv_heads, 1, head_dim); a key's score is minus its cosine similarity to the
    anchor, (batch, kv_heads, k_len), so the keys pointing away from the crowd are kept.

    Deviation, as in kvpress: the paper evicts block by block while the prompt streams in, with the anchor of the
    cache at each step; here the whole prefill is scored once (kvpress's BlockPress wrapper reproduces the paper).
    """

    def score(self, module: nn.Module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        keys = keys.float()
        anchor = F.normalize(keys, p=2, dim=-1).mean(dim=2, keepdim=True)
        return -F.cosine_similarity(keys, anchor, dim=-1)
