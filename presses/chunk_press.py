from __future__ import annotations

from dataclasses import dataclass

import torch

from presses.base_press import LayerInputs, keep_top_scores, n_kept_pairs
from presses.wrapper_press import ScorerWrapperPress, check_positive_int


@dataclass
class ChunkPress(ScorerWrapperPress):
    """Compress each ``chunk_length`` slice of the context on its own, so every region keeps its share.

    From FINCH (Corallo & Papotti, TACL 2024), as kvpress's ChunkPress: ``press`` scores each chunk from that chunk's
    hidden states and keys alone, and each chunk keeps ``n_kept_pairs(chunk, ratio)`` pairs per head.
    Deviation: none in what is kept; the per-chunk count follows our ``n_kept_pairs`` rounding.
    """

    chunk_length: int = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self, "chunk_length")

    def compress(self, layer: LayerInputs) -> torch.Tensor:
        if not layer.is_prefill or self.compression_ratio == 0:
            return layer.evicted
        parts = []
        for start in range(0, layer.k_len, self.chunk_length):
            end = min(start + self.chunk_length, layer.k_len)
            scores = self.press.score(layer.module, layer.hidden_states[:, start:end], layer.keys[:, :, start:end],
                                      layer.values[:, :, start:end], None, layer.kwargs)
            evicted = layer.evicted[..., start:end]
            parts.append(keep_top_scores(scores, n_kept_pairs(end - start, self.compression_ratio), evicted))
        return torch.cat(parts, dim=-1)
