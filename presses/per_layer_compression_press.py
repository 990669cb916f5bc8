from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from presses.base_press import BasePress, LayerInputs, validate_ratio
from presses.errors import PressError
from presses.scorer_press import ScorerPress


@dataclass
class PerLayerCompressionPress(BasePress):
    """Run ``press`` with its own compression ratio in each layer: ``compression_ratios[layer_idx]``.

    kvpress's PerLayerCompressionPress (there flash-attention only, here any attention: evictions are masks).
    Configured by its list, it has no sweep knob. A model with more layers than ratios is a PressError.
    """

    press: ScorerPress = None
    compression_ratios: list[float] = field(default_factory=list)
    knob: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        if not isinstance(self.press, ScorerPress):
            raise PressError(f"PerLayerCompressionPress wraps a ScorerPress, got {type(self.press).__name__}")
        for ratio in self.compression_ratios:
            validate_ratio(ratio, "PerLayerCompressionPress")

    def children(self) -> list[BasePress]:
        return [self.press]

    def post_init_from_model(self, model, tokenizer=None) -> None:
        self.press.post_init_from_model(model, tokenizer)

    def compress(self, layer: LayerInputs) -> torch.Tensor:
        layer_idx = layer.module.layer_idx
        if layer_idx >= len(self.compression_ratios):
            raise PressError(f"PerLayerCompressionPress: no ratio for layer {layer_idx}: give one ratio per layer "
                             f"({len(self.compression_ratios)} given)")
        shared = self.press.compression_ratio
        self.press.compression_ratio = self.compression_ratios[layer_idx]
        try:
            return self.press.compress(layer)
        finally:
            self.press.compression_ratio = shared
