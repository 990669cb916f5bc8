from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from presses.base_press import BasePress, LayerInputs
from presses.errors import PressError
from presses.snapkv_press import window_attention


@dataclass
class SimLayerKVPress(BasePress):
    """In "lazy" layers keep only the first and the most recent tokens; other layers keep everything.

    Zhang et al., "SimLayerKV: A Simple Framework for Layer-Level KV Cache Reduction", arXiv 2410.13846. As kvpress:
    a layer is lazy when the last ``n_last`` queries pay more than ``lazy_threshold`` of their attention (averaged
    over batch, heads and queries) to the ``n_initial`` first and ``n_recent`` last keys before them; a lazy layer
    keeps its ``n_initial`` first tokens and its ``n_recent - n_last`` last ones. Contexts of at most
    ``n_initial + n_recent + n_last`` tokens, or ``lazy_threshold == 1``, are left alone. It has no sweep knob
    (kvpress reports the achieved ratio).
    """

    lazy_threshold: float = 1.0
    n_last: int = 1
    n_recent: int = 1024
    n_initial: int = 4
    knob: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        if not 0 <= self.lazy_threshold <= 1:
            raise PressError(f"SimLayerKVPress: lazy_threshold must be in [0, 1], got {self.lazy_threshold!r}")
        for name in ("n_last", "n_recent"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise PressError(f"SimLayerKVPress: {name} must be a positive integer, got {getattr(self, name)!r}")

    def is_lazy(self, layer: LayerInputs) -> bool:
        weights = window_attention(layer.module, layer.hidden_states, layer.keys, self.n_last,
                                   layer.kwargs["position_embeddings"]).mean(dim=(0, 1, 2))
        share = weights[: self.n_initial].sum() + weights[-self.n_recent:].sum()
        return float(share) > self.lazy_threshold

    def compress(self, layer: LayerInputs) -> torch.Tensor:
        if not layer.is_prefill or self.lazy_threshold == 1.0:
            return layer.evicted
        if layer.k_len <= self.n_initial + self.n_recent + self.n_last or not self.is_lazy(layer):
            return layer.evicted
        evicted = layer.evicted.clone()
        evicted[..., self.n_initial: layer.k_len - (self.n_recent - self.n_last)] = True
        return evicted
