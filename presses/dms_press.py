from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from presses.base_press import BasePress, LayerInputs
from presses.errors import PressError
from presses.scorer_press import ScorerPress


@dataclass
class DMSPress(BasePress):
    """Threshold eviction with a sliding window, in prefill and (with ``decoding=True``) while generating.

    Łańcucki et al., "Inference-Time Hyper-Scaling with KV Cache Compression" (Dynamic Memory Sparsification),
    arXiv 2506.05345; used by KVzap (Jegou et al., arXiv 2601.07891) over the KVzap surrogate's scores.

    Each token is scored by ``press`` when it is first processed. The ``sliding_window_size`` most recent tokens
    are never evicted; when a token leaves the window, each KV head evicts it if its score is strictly below
    ``threshold``. Decisions are per head and final. In prefill, everything but the last window is decided at once.
    With ``decoding=False`` only the prefilled context is pruned; with ``decoding=True`` question and generated
    tokens are pruned too as they leave the window.
    Deviation: the window is at least 1, so the newest token of every head is always kept (a window of 0 with all
    scores below the threshold would otherwise empty the cache).
    """

    press: ScorerPress = None
    threshold: float = 0.0
    sliding_window_size: int = 128
    decoding: bool = False
    knob: ClassVar[str | None] = "threshold"
    position_state: ClassVar[tuple[str, ...]] = ("evicted", "scores")

    def __post_init__(self) -> None:
        if not isinstance(self.press, ScorerPress):
            raise TypeError(f"DMSPress wraps a ScorerPress, got {type(self.press).__name__}")
        if not isinstance(self.threshold, (int, float)) or self.threshold != self.threshold:
            raise PressError(f"DMSPress: threshold must be a number, got {self.threshold!r}")
        if self.sliding_window_size < 0:
            raise PressError(f"DMSPress: sliding_window_size must be >= 0, got {self.sliding_window_size}")

    @property
    def compresses_while_decoding(self) -> bool:
        return self.decoding

    def children(self) -> list[BasePress]:
        return [self.press]

    def post_init_from_model(self, model: nn.Module, tokenizer=None) -> None:
        self.press.post_init_from_model(model, tokenizer)

    def compress(self, layer: LayerInputs) -> torch.Tensor:
        state = self.layer_state(layer.module.layer_idx)
        new_scores = self.press.scores_for(layer)[..., -layer.q_len :].float()
        previous = None if layer.is_prefill else state.get("scores")
        scores = new_scores if previous is None else torch.cat([previous, new_scores], dim=-1)
        if scores.shape[-1] != layer.k_len:  # a forward ran outside this press's view: re-score nothing, keep all
            return layer.evicted
        state["scores"] = scores
        window = max(1, self.sliding_window_size)
        start = max(0, scores.shape[-1] - layer.q_len - window)
        end = max(0, layer.k_len - window)
        if end <= start:
            return layer.evicted
        evicted = layer.evicted.clone()
        evicted[..., start:end] |= scores[..., start:end] < self.threshold
        return evicted


ThresholdPress = DMSPress  # the name the KVzap README uses
