from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from presses.errors import PressError
from presses.leverage_press import LeverageScorePress
from presses.non_causal_attention_press import NonCausalAttnPress
from presses.scorer_press import ScorerPress


@dataclass
class CompactorPress(ScorerPress):
    """Blend of key leverage (geometry) and non-causal chunked attention, query-agnostic.

    Chari & Van Durme, "Compactor: Calibrated Query-Agnostic KV Cache Compression with Approximate Leverage Scores",
    arXiv 2507.08143. As kvpress: the first ``sink_size_start`` and last ``sink_size_end`` tokens are kept; the
    others score ``blending * leverage + attention`` (both z-scored, :class:`LeverageScorePress` with
    ``sketch_dimension`` and :class:`NonCausalAttnPress` with ``chunk_size``, computed on the tokens between the
    sinks); ``blending`` defaults to the compression ratio. Prefill only.
    Deviation: float32 throughout; the leverage sketch is random (seed torch for repeatable runs), like kvpress.
    """

    sink_size_start: int = 8
    sink_size_end: int = 4
    chunk_size: int = 256
    sketch_dimension: int = 48
    blending: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("sink_size_start", "sink_size_end"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise PressError(f"CompactorPress: {name} must be a non-negative integer, got {getattr(self, name)!r}")
        # Validate the parts' settings now rather than in the first forward.
        LeverageScorePress(sketch_dimension=self.sketch_dimension)
        NonCausalAttnPress(chunk_size=self.chunk_size)

    def score(self, module: nn.Module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        n = hidden_states.shape[1]
        if keys.shape[2] != n:
            raise PressError("CompactorPress scores the prefill only (every key needs its hidden state)")
        left = min(self.sink_size_start, n)
        right = min(self.sink_size_end, n - left)
        if left + right == n:
            return torch.ones(keys.shape[:3], device=keys.device)
        inner = slice(left, n - right)
        cos, sin = kwargs["position_embeddings"]
        inner_kwargs = {"position_embeddings": (cos[:, inner], sin[:, inner])}
        parts = (hidden_states[:, inner], keys[:, :, inner], values[:, :, inner], None, inner_kwargs)
        leverage = LeverageScorePress(sketch_dimension=self.sketch_dimension).score(module, *parts)
        attention = NonCausalAttnPress(chunk_size=self.chunk_size).score(module, *parts)
        blending = self.compression_ratio if self.blending is None else self.blending
        scores = blending * leverage + attention
        return F.pad(scores, (left, right), value=float(scores.max()))
