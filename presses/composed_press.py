from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from presses.base_press import BasePress, LayerInputs


@dataclass
class ComposedPress(BasePress):
    """Apply several prefill presses in turn; each compresses what the previous ones kept.

    Ratios compound: two presses at 0.5 leave about a quarter of the context. Its sweep knob is that of the first
    press that has one (``snap_think``: SnapKV's compression_ratio); the others keep their constructor settings.
    """

    presses: list[BasePress] | None = None

    @property
    def knob(self) -> str | None:
        return next((press.knob for press in self.children() if press.knob), None)

    def children(self) -> list[BasePress]:
        return list(self.presses or [])

    @property
    def compresses_while_decoding(self) -> bool:
        return any(p.compresses_while_decoding for p in self.children())

    def post_init_from_model(self, model: nn.Module, tokenizer=None) -> None:
        for press in self.children():
            press.post_init_from_model(model, tokenizer)

    def compress(self, layer: LayerInputs) -> torch.Tensor:
        evicted = layer.evicted
        for press in self.children():
            evicted = press.compress(_with_evicted(layer, evicted))
        return evicted


def _with_evicted(layer: LayerInputs, evicted: torch.Tensor) -> LayerInputs:
    return replace(layer, evicted=evicted)
