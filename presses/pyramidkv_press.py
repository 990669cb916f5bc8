from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from presses import compat
from presses.errors import PressError
from presses.snapkv_press import SnapKVPress


@dataclass
class PyramidKVPress(SnapKVPress):
    """SnapKV scores with per-layer budgets that shrink linearly with depth (a pyramid).

    Cai, Zhang, Gao, Liu, Liu, Lu, Xiong, Dong, Chang, Hu, Xiao, "PyramidKV: Dynamic KV Cache Compression based on
    Pyramidal Information Funneling", COLM 2025 (arXiv 2406.02069). Attention is spread out in lower layers and
    focused on a few tokens in upper ones, so lower layers get more of the cache.

    Budgets as in kvpress (the KVCache-Factory formula, rescaled so that the total matches the compression ratio):
    with ``average = k_len * (1 - compression_ratio)`` pairs kept per head on average, the last layer keeps
    ``average / beta`` and the first ``2 * average - average / beta``, linearly in between; if the first exceeds
    ``k_len - window_size`` it is capped there and the last raised to keep the average. The average over layers stays
    ``average`` (up to rounding). When the pyramid does not fit (``k_len >= first >= last >= window_size`` fails: short
    contexts, extreme ratios) every layer keeps the uniform budget (plain SnapKV).

    Deviations from kvpress: layers whose cache is not compressed (Gemma3's sliding-window layers) are left out of the
    pyramid, so the compressed layers still average to the ratio; a 1-layer model keeps the uniform budget (kvpress
    divides by zero); rounding of the uniform fallback follows ``ScorerPress``.
    """

    beta: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.beta, (int, float)) or self.beta < 1:
            raise PressError(f"PyramidKVPress: beta must be >= 1 (the pyramid's steepness), got {self.beta!r}")

    def post_init_from_model(self, model: nn.Module, tokenizer=None) -> None:
        config = compat.text_config(model)
        layer_types = getattr(config, "layer_types", None) or []
        sliding = {i for i, kind in enumerate(layer_types) if kind == "sliding_attention"}
        compressed = [i for i in range(config.num_hidden_layers) if i not in sliding]
        # Depth of each compressed layer in the pyramid: layer index -> 0 .. n_layers - 1.
        self.__dict__["_depth"] = {layer: depth for depth, layer in enumerate(compressed)}

    def n_kept(self, k_len: int, layer_idx: int) -> int:
        depths = self.__dict__.get("_depth")
        if depths is None:
            raise PressError("PyramidKVPress needs the model's number of layers: apply it as `with press(model):` "
                             "(or call press.post_init_from_model(model) first)")
        uniform = super().n_kept(k_len, layer_idx)
        if len(depths) < 2 or layer_idx not in depths:
            return uniform
        average = k_len * (1 - self.compression_ratio)
        smallest = average / self.beta
        largest = 2 * average - smallest
        if largest >= k_len - self.window_size:
            largest = k_len - self.window_size
            smallest = 2 * average - largest
        if not k_len >= largest >= smallest >= self.window_size:
            return uniform
        step = (largest - smallest) / (len(depths) - 1)
        return max(1, round(largest - depths[layer_idx] * step))
