from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from presses.scorer_press import ScorerPress


@dataclass
class RandomPress(ScorerPress):
    """Evict uniformly random pairs: the floor every informed press must beat.

    With ``seed`` set, layer ``i`` draws from ``seed + i`` so results repeat exactly; without it, from torch's
    global generator.
    """

    seed: int | None = None

    def score(self, module: nn.Module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        generator = None
        if self.seed is not None:
            generator = torch.Generator(device=keys.device).manual_seed(self.seed + module.layer_idx)
        return torch.rand(keys.shape[:-1], generator=generator, device=keys.device)
