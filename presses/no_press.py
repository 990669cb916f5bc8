from __future__ import annotations

from dataclasses import dataclass

import torch

from presses.base_press import BasePress, LayerInputs


@dataclass
class NoPress(BasePress):
    """The uncompressed reference: hooks are installed (so the code path is the same) but nothing is evicted."""

    def compress(self, layer: LayerInputs) -> torch.Tensor:
        return layer.evicted
