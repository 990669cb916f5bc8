from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from presses.scorer_press import ScorerPress


@dataclass
class RandomPress(ScorerPress):
    """Evict uniformly random pairs: the floor every informed press must beat.

    With ``seed`` set, layer ``i`` draws from ``seed + i`` so results repeat exactly. Without it, the press takes
    a copy of torch's global generator state when its state is reset (a new context) and draws from that copy,
    layer after layer: the same numbers as drawing from the global generator itself, but independent of whatever
    else draws between layers (other presses scoring the same prefill in the sweep engine).
    """

    seed: int | None = None

    def reset(self) -> None:
        super().reset()
        self.__dict__["_global_state"] = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.__dict__["_global_state"]["cuda"] = torch.cuda.get_rng_state()
        self.__dict__["_generators"] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        generators = self.__dict__.setdefault("_generators", {})
        if device.type not in generators:
            generator = torch.Generator(device=device)
            state = self.__dict__.get("_global_state", {}).get(device.type)
            if state is None:
                state = torch.get_rng_state() if device.type == "cpu" else torch.cuda.get_rng_state(device)
            generator.set_state(state)
            generators[device.type] = generator
        return generators[device.type]

    def score(self, module: nn.Module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        if self.seed is not None:
            generator = torch.Generator(device=keys.device).manual_seed(self.seed + module.layer_idx)
        else:
            generator = self._generator(keys.device)
        return torch.rand(keys.shape[:-1], generator=generator, device=keys.device)
