from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from presses import compat
from presses.base_press import BasePress, LayerInputs, validate_ratio
from presses.errors import PressError
from presses.expected_attention_press import ExpectedAttentionPress
from presses.scorer_press import ScorerPress

CURVE_FILE = "lukv_budget_curve.npy"


@dataclass
class LUKVPress(BasePress):
    """Per-(layer, head) budgets read from a precomputed LU-KV curve, around any scorer.

    "Predicting Future Utility: Global Combinatorial Optimization for Task-Agnostic KV Cache Eviction",
    arXiv 2602.08585 (LU-KV), as kvpress's LUKVPress: the curve (``.npy``, shape (99, layers, kv_heads)) gives, for
    each ratio 0.01 .. 0.99, each head's prune ratio. At ratio ``r`` the row ``round(100 r) - 1`` is used: head
    keep rates ``1 - p`` times the context length, the layer's total rounded and the remainder handed to the
    largest fractions, each head at least 1; ``press`` ranks the tokens, the ``sink`` first and ``window`` last are
    always kept. kvpress's default is ``LUKVPress(ExpectedAttentionPress(epsilon=2e-2), sink=4, window=1)``.

    Curves are model- and scorer-specific (kvpress downloads the Llama-3.1-8B one from the LU-KV repository,
    ``evaluation/curve_data/llama-3.1-8b/ea_0.02_sink4_win1_llama_avg_ratio.npy``). Here nothing is downloaded:
    ``budget_curve`` is a local ``.npy`` path, by default ``<model dir>/lukv_budget_curve.npy`` of a local model.
    """

    press: ScorerPress = field(default_factory=lambda: ExpectedAttentionPress(epsilon=2e-2))
    compression_ratio: float = 0.0
    sink: int = 4
    window: int = 1
    budget_curve: str | None = None
    knob: ClassVar[str | None] = "compression_ratio"

    def __post_init__(self) -> None:
        validate_ratio(self.compression_ratio, "LUKVPress")
        if not isinstance(self.press, ScorerPress):
            raise PressError(f"LUKVPress wraps a ScorerPress, got {type(self.press).__name__}")
        if self.sink < 0 or self.window < 0:
            raise PressError(f"LUKVPress: sink and window must be non-negative, got {self.sink}, {self.window}")

    def children(self) -> list[BasePress]:
        return [self.press]

    def post_init_from_model(self, model: nn.Module, tokenizer=None) -> None:
        self.press.post_init_from_model(model, tokenizer)
        path = self.budget_curve or str(Path(model.name_or_path or ".") / CURVE_FILE)
        if not Path(path).is_file():
            raise PressError(f"LUKVPress needs a budget curve: pass budget_curve=PATH to a .npy of shape "
                             f"(99, layers, kv_heads) (LU-KV's generate_curve.sh), or put {CURVE_FILE} in the model "
                             f"folder; '{path}' does not exist")
        curve = np.load(path, allow_pickle=False)
        config = compat.text_config(model)
        expected = (99, config.num_hidden_layers, config.num_key_value_heads)
        if curve.shape != expected:
            raise PressError(f"LUKVPress: the budget curve {path} has shape {curve.shape}, this model needs {expected}")
        self.__dict__["_curve"] = torch.from_numpy(curve).float()

    def head_budgets(self, layer_idx: int, length: int) -> torch.Tensor:
        """Pairs each KV head of the layer keeps out of ``length``: (kv_heads,) long."""
        row = min(98, max(0, round(self.compression_ratio * 100) - 1))
        ideal = (1 - self.__dict__["_curve"][row, layer_idx]).clamp(0, 1) * length
        heads = ideal.numel()
        total = min(heads * length, max(heads, round(float(ideal.sum()))))
        budgets = ideal.floor().long()
        remainder = total - int(budgets.sum())
        if remainder > 0:
            budgets[(ideal - budgets).topk(min(remainder, heads)).indices] += 1
        return budgets.clamp(1, length)

    def compress(self, layer: LayerInputs) -> torch.Tensor:
        if not layer.is_prefill or self.compression_ratio == 0:
            return layer.evicted
        if "_curve" not in self.__dict__:
            raise PressError("LUKVPress needs its budget curve: apply it as `with press(model):`")
        scores = self.press.scores_for(layer).float()
        protected = float(scores.max()) + 1
        scores[..., : min(self.sink, layer.k_len)] = protected
        if self.window > 0:
            scores[..., max(0, layer.k_len - self.window):] = protected
        budgets = self.head_budgets(layer.module.layer_idx, layer.k_len).to(scores.device)
        rank = scores.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
        return (rank >= budgets[None, :, None]) | layer.evicted
