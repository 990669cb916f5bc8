from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from presses import compat
from presses.base_press import BasePress, LayerInputs
from presses.errors import PressError


@dataclass
class ThinKPress(BasePress):
    """Prune the least useful key channels of each KV head (the head dimension, not the sequence).

    Xu et al., "ThinK: Thinner Key Cache by Query-Driven Pruning", ICLR 2025 (arXiv 2407.21018). As kvpress: the
    last ``window_size`` queries of the prefill (with RoPE) score each channel ``c`` of a KV head by
    ``mean_t q[t, c]^2`` (averaged over the head's query group) times ``mean_n k[n, c]^2``; the
    ``int(head_dim * key_channel_compression_ratio)`` lowest channels are set to zero in every cached key.

    Cache: it rewrites the layer's cached keys in place (``rewrites_cache``). Zeroing a channel is exactly removing
    it from every later dot product ``q . k``, so later tokens attend as if the channel were gone; no pair is evicted.
    Keys written after the prefill (question, answer) keep all channels, as in kvpress.
    ``achieved_compression_ratio`` reports ``key_channel_compression_ratio / 2`` as kvpress does (keys are half the
    cache); no memory is saved in either implementation.
    Deviation: scores in float32 (kvpress: the model's dtype).
    """

    key_channel_compression_ratio: float = 0.0
    window_size: int = 32
    knob: ClassVar[str | None] = "key_channel_compression_ratio"
    rewrites_cache: ClassVar[bool] = True

    def __post_init__(self) -> None:
        ratio = self.key_channel_compression_ratio
        if not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
            raise PressError(f"ThinKPress: key_channel_compression_ratio must be in [0, 1) (fraction of key "
                             f"channels zeroed), got {ratio!r}")
        if not isinstance(self.window_size, int) or self.window_size < 1:
            raise PressError(f"ThinKPress: window_size must be a positive integer, got {self.window_size!r}")

    @property
    def achieved_compression_ratio(self) -> float:
        return self.key_channel_compression_ratio / 2

    def channel_scores(self, layer: LayerInputs) -> torch.Tensor:
        """Importance of each key channel, (batch, kv_heads, head_dim)."""
        window = min(self.window_size, layer.q_len)
        cos, sin = layer.kwargs["position_embeddings"]
        queries = compat.query_states(layer.module, layer.hidden_states[:, -window:],
                                      (cos[:, -window:], sin[:, -window:])).float()
        batch, kv_heads, _, dim = layer.keys.shape
        query_energy = queries.pow(2).mean(dim=2).view(batch, kv_heads, -1, dim).mean(dim=2)
        return query_energy * layer.keys.float().pow(2).mean(dim=2)

    def compress(self, layer: LayerInputs) -> torch.Tensor:
        n_pruned = int(layer.keys.shape[-1] * self.key_channel_compression_ratio)
        if not layer.is_prefill or n_pruned == 0:
            return layer.evicted
        channels = self.channel_scores(layer).topk(n_pruned, dim=-1, largest=False).indices
        layer.keys.scatter_(-1, channels[:, :, None, :].expand(-1, -1, layer.k_len, -1), 0)
        return layer.evicted
