from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from presses.snapkv_press import SnapKVPress


@dataclass
class PyramidKVPress(SnapKVPress):
    """SnapKV scores with per-layer budgets that shrink linearly with depth.

    Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling",
    arXiv 2406.02069. As in kvpress: with ``avg = k_len * (1 - compression_ratio)`` kept pairs per layer, the
    first layer keeps ``max = 2 * avg - avg / beta`` and the last ``min = avg / beta``, linearly in between, so the
    average over layers stays ``avg``. When that pyramid does not fit (short contexts, extreme ratios) every layer
    keeps ``avg`` (plain SnapKV).
    """

    beta: int = 20

    def post_init_from_model(self, model: nn.Module, tokenizer=None) -> None:
        from presses import compat

        self._num_layers = compat.text_config(model).num_hidden_layers

    def n_kept(self, k_len: int, layer_idx: int) -> int:
        average = k_len * (1 - self.compression_ratio)
        num_layers = getattr(self, "_num_layers", 1)
        smallest = average / self.beta
        largest = 2 * average - smallest
        if num_layers < 2 or not (k_len >= largest >= smallest >= self.window_size):
            return max(1, k_len - int(k_len * self.compression_ratio))
        step = (largest - smallest) / (num_layers - 1)
        return max(1, round(largest - layer_idx * step))
