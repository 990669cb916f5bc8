from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from presses.errors import PressError
from presses.scorer_press import ScorerPress

LEVERAGE_TYPES = ("key", "value", "kv_avg", "kv_product")


@dataclass
class CURPress(ScorerPress):
    """Keep the pairs with the largest approximate leverage scores of keys and values (CurDKV).

    Sengupta et al., "Value-Guided KV Compression for LLMs via Approximated CUR Decomposition", arXiv 2509.15038.
    As kvpress: squared row norms ``|k|^2`` and ``|v|^2`` (optionally after a random Gaussian projection to 20
    dimensions), normalised within windows of ``local_window_size`` positions, combined by ``leverage_type``
    (product by default), normalised per head; the ``num_sinks`` first tokens score 1 (above any other score).
    Deviation: computed in float32 (kvpress: the model's dtype); the random projection draws from torch's global
    generator like kvpress, so seed it for repeatable runs.
    """

    num_sinks: int = 4
    leverage_type: Literal["key", "value", "kv_avg", "kv_product"] = "kv_product"
    use_random_leverage: bool = False
    use_local_approximation: bool = True
    local_window_size: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.leverage_type not in LEVERAGE_TYPES:
            raise PressError(f"CURPress: leverage_type must be one of {', '.join(LEVERAGE_TYPES)}, "
                             f"got {self.leverage_type!r}")
        if not isinstance(self.local_window_size, int) or self.local_window_size < 1:
            raise PressError(f"CURPress: local_window_size must be a positive integer, got {self.local_window_size!r}")

    def score(self, module: nn.Module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        keys, values = keys.float(), values.float()
        if self.use_random_leverage:
            projection = torch.randn(keys.shape[-1], 20, device=keys.device) / math.sqrt(20)
            keys, values = keys @ projection, values @ projection
        k2, v2 = keys.pow(2).sum(dim=-1), values.pow(2).sum(dim=-1)
        if self.use_local_approximation:
            k2, v2 = self._local(k2), self._local(v2)
        scores = {"key": k2, "value": v2, "kv_avg": (k2 + v2) / 2, "kv_product": k2 * v2}[self.leverage_type]
        scores = scores / scores.sum(dim=-1, keepdim=True)
        scores[..., : self.num_sinks] = 1.0
        return scores

    def _local(self, energy: torch.Tensor) -> torch.Tensor:
        """Normalise (batch, heads, n) within consecutive windows of ``local_window_size`` positions."""
        batch, heads, n = energy.shape
        window = self.local_window_size
        windows = F.pad(energy, (0, -n % window)).reshape(batch, heads, -1, window)
        return (windows / windows.sum(dim=-1, keepdim=True)).reshape(batch, heads, -1)[..., :n]
