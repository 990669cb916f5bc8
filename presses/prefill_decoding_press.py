from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from presses.base_press import BasePress, LayerInputs


@dataclass
class PrefillDecodingPress(BasePress):
    """One press for the prefill, another for decoding (either may be None).

    The sweep knob is the prefilling press's, if any.
    """

    prefilling_press: BasePress | None = None
    decoding_press: BasePress | None = None

    @property
    def knob(self) -> str | None:  # type: ignore[override]
        return self.prefilling_press.knob if self.prefilling_press is not None else None

    @property
    def compresses_while_decoding(self) -> bool:
        return self.decoding_press is not None

    def children(self) -> list[BasePress]:
        return [p for p in (self.prefilling_press, self.decoding_press) if p is not None]

    def post_init_from_model(self, model: nn.Module, tokenizer=None) -> None:
        for press in self.children():
            press.post_init_from_model(model, tokenizer)

    def compress(self, layer: LayerInputs) -> torch.Tensor:
        press = self.prefilling_press if layer.is_prefill else self.decoding_press
        return layer.evicted if press is None else press.compress(layer)
