from __future__ import annotations

from dataclasses import dataclass

import torch

from presses.base_press import LayerInputs, n_kept_pairs
from presses.wrapper_press import ScorerWrapperPress, check_positive_int


@dataclass
class BlockPress(ScorerWrapperPress):
    """Evict block by block as the prompt would stream in, keeping a fixed budget (KeyDiff's block prefill).

    Park et al., "KeyDiff", arXiv 2504.15364, simulated as kvpress's BlockPress: the budget ``n`` is
    ``n_kept_pairs(k_len, ratio)``; the first ``n`` tokens are kept, then each next block of ``block_size`` tokens
    joins the kept ones and ``press`` rescoring that union (its hidden states, keys and values) keeps the best ``n``
    per head. The prefill itself stays one dense forward, as in kvpress.
    """

    block_size: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self, "block_size")

    def compress(self, layer: LayerInputs) -> torch.Tensor:
        if not layer.is_prefill or self.compression_ratio == 0:
            return layer.evicted
        batch, kv_heads, k_len, head_dim = layer.keys.shape
        n_keep = n_kept_pairs(k_len, self.compression_ratio)
        block = min(self.block_size, k_len)
        # kvpress views the hidden states as one slice per KV head; kept here so that hidden-state scorers match.
        states = layer.hidden_states.reshape(batch, k_len, kv_heads, -1).transpose(1, 2)
        kept = torch.arange(n_keep, device=layer.keys.device).expand(batch, kv_heads, -1)
        for start in range(n_keep, k_len, block):
            new = torch.arange(start, min(start + block, k_len), device=kept.device).expand(batch, kv_heads, -1)
            candidates = torch.cat([kept, new], dim=-1)
            gather = candidates[..., None]
            hidden = states.gather(2, gather.expand(-1, -1, -1, states.shape[-1]))
            hidden = hidden.transpose(1, 2).reshape(batch, -1, layer.hidden_states.shape[-1])
            scores = self.press.score(layer.module, hidden, layer.keys.gather(2, gather.expand(-1, -1, -1, head_dim)),
                                      layer.values.gather(2, gather.expand(-1, -1, -1, head_dim)), None,
                                      layer.kwargs)
            kept = candidates.gather(-1, scores.topk(n_keep, dim=-1).indices)
        evicted = torch.ones_like(layer.evicted).scatter_(-1, kept, False)
        return evicted | layer.evicted
