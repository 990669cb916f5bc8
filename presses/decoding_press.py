from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from presses.adakv_press import AdaKVPress
from presses.base_press import BasePress, LayerInputs
from presses.errors import PressError
from presses.scorer_press import ScorerPress


@dataclass
class DecodingPress(BasePress):
    """Compress while generating: every ``compression_interval`` decoding steps, shrink each head to ``target_size``.

    kvpress's DecodingPress: the prefill is left alone; during decoding the hidden states of the last
    ``hidden_states_buffer_size`` steps (with their rotary embeddings) are buffered and handed to ``base_press`` to
    score the whole cache; each head then keeps its ``target_size`` best pairs. Configured by its constructor, it
    has no sweep knob (like kvpress, it runs at one setting and reports the compression it achieved). With an
    ``AdaKVPress`` base the layer keeps ``kv_heads * target_size`` pairs chosen over all heads together.
    """

    base_press: ScorerPress | AdaKVPress = None
    compression_interval: int = 512
    target_size: int = 2048
    hidden_states_buffer_size: int = 256
    knob: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        if not isinstance(self.base_press, (ScorerPress, AdaKVPress)):
            raise TypeError(f"DecodingPress wraps a ScorerPress or an AdaKVPress, got {type(self.base_press).__name__}")
        if self.compression_interval <= 0 or self.target_size <= 0:
            raise PressError("DecodingPress: compression_interval and target_size must be positive")

    @property
    def compresses_while_decoding(self) -> bool:
        return True

    def children(self) -> list[BasePress]:
        return [self.base_press]

    def post_init_from_model(self, model: nn.Module, tokenizer=None) -> None:
        self.base_press.post_init_from_model(model, tokenizer)

    def resolve_target_size(self, k_len: int) -> int:
        """Pairs per head to keep when compressing a cache of ``k_len`` positions (tokens seen so far)."""
        return self.target_size

    def compress(self, layer: LayerInputs) -> torch.Tensor:
        if layer.is_prefill:
            return layer.evicted
        state = self.layer_state(layer.module.layer_idx)
        buffered = self.buffered_inputs(state, layer)
        steps = int(state.get("steps", torch.tensor(0))) + 1
        evicted = layer.evicted
        kept = int((~evicted).sum(-1).max())
        target_size = self.resolve_target_size(layer.k_len)
        if steps >= self.compression_interval and kept > target_size:
            kwargs = {**layer.kwargs, "position_embeddings": (buffered["cos"], buffered["sin"])}
            scores = self.base_press.score(
                layer.module, buffered["hidden"], layer.keys, layer.values, None, kwargs
            )
            if scores.shape[-1] != layer.k_len:
                raise PressError(f"{type(self.base_press).__name__} cannot score a whole cache while decoding")
            evicted = self.base_press.select(scores, target_size, evicted)
        if steps >= self.compression_interval:
            steps = 0
        self.store_buffer(state, buffered, steps)
        return evicted

    @staticmethod
    def buffered_inputs(state: dict, layer: LayerInputs) -> dict[str, torch.Tensor]:
        """This forward's hidden states and rotary (cos, sin), after those buffered from earlier steps."""
        cos, sin = layer.kwargs["position_embeddings"]
        buffered = {"hidden": layer.hidden_states, "cos": cos, "sin": sin}
        if "hidden" in state:
            buffered = {name: torch.cat([state[name], t], dim=1) for name, t in buffered.items()}
        return buffered

    def store_buffer(self, state: dict, buffered: dict[str, torch.Tensor], steps: int) -> None:
        """Keep the last ``hidden_states_buffer_size`` buffered steps and the step counter."""
        keep = self.hidden_states_buffer_size
        for name, tensor in buffered.items():
            state[name] = tensor[:, -keep:] if keep > 0 else tensor[:, :0]
        state["steps"] = torch.tensor(steps)
