from __future__ import annotations

from dataclasses import dataclass

import torch

from presses.base_press import LayerInputs, n_kept_pairs
from presses.wrapper_press import ScorerWrapperPress, check_positive_int


@dataclass
class ChunkKVPress(ScorerWrapperPress):
    """Keep whole chunks of ``chunk_length`` tokens, ranked by the mean score of their tokens over all heads.

    Liu et al., "ChunkKV: Semantic-Preserving KV Cache Compression for Efficient Long-Context LLM Inference",
    arXiv 2502.00299. As kvpress: ``press`` scores the whole context (batch, kv_heads, k_len); a chunk's score is
    the sum over heads of its tokens' scores averaged over the chunk (the last, shorter chunk included); the best
    ``n_kept_pairs(n_chunks, ratio)`` chunks are kept in every head. A context shorter than one chunk falls back to
    ``press`` alone. The achieved ratio is that of whole chunks, so it can miss the request by up to a chunk.
    Deviation: kvpress ranks chunks on the first batch element for the whole batch; here each element has its own.
    """

    chunk_length: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self, "chunk_length")

    def compress(self, layer: LayerInputs) -> torch.Tensor:
        if not layer.is_prefill or self.compression_ratio == 0:
            return layer.evicted
        if layer.k_len < self.chunk_length:
            return self.press.compress(layer)
        scores = self.press.scores_for(layer).float().sum(dim=1)  # (batch, k_len)
        chunk_of = torch.arange(layer.k_len, device=scores.device) // self.chunk_length
        n_chunks = int(chunk_of[-1]) + 1
        chunk_scores = torch.zeros(scores.shape[0], n_chunks, device=scores.device).index_add_(1, chunk_of, scores)
        chunk_scores = chunk_scores / torch.bincount(chunk_of, minlength=n_chunks)
        kept_chunks = chunk_scores.topk(n_kept_pairs(n_chunks, self.compression_ratio), dim=-1).indices
        kept = torch.zeros_like(chunk_scores, dtype=torch.bool).scatter_(-1, kept_chunks, True)
        evicted = ~kept.gather(-1, chunk_of.expand(scores.shape[0], -1))  # (batch, k_len)
        return evicted[:, None, :].expand_as(layer.evicted) | layer.evicted
