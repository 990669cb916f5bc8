from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from presses import compat
from presses.base_press import LayerInputs, keep_top_scores, n_kept_pairs
from presses.errors import PressError
from presses.wrapper_press import ScorerWrapperPress

# Scores of pairs kept whatever the second stage says (kvpress uses the dtype's largest finite value).
_PROTECTED = torch.finfo(torch.float32).max


def projected_value_norm(module: nn.Module, values: torch.Tensor) -> torch.Tensor:
    """L1 norm of each value through its head's output projection, ``|v_h W_o,h|_1``, averaged over each KV group.

    ``values`` (batch, kv_heads, k_len, head_dim) -> (batch, kv_heads, k_len), in float32. One query head at a time,
    so the (k_len, hidden_size) products never exist for all heads together.
    """
    weights = compat.output_projection_per_head(module).float()  # (num_heads, head_dim, hidden)
    groups = compat.num_key_value_groups(module)
    batch, kv_heads, k_len, _ = values.shape
    norms = torch.empty(batch, kv_heads * groups, k_len, device=values.device)
    for head in range(kv_heads * groups):
        norms[:, head] = (values[:, head // groups].float() @ weights[head]).abs().sum(dim=-1)
    return norms.view(batch, kv_heads, groups, k_len).mean(dim=2)


def _check_stage(press: object) -> None:
    if not 0 <= press.first_stage_ratio <= 1:
        raise PressError(f"{type(press).__name__}: first_stage_ratio must be in [0, 1], "
                         f"got {press.first_stage_ratio!r}")


@dataclass
class CriticalKVPress(ScorerWrapperPress):
    """Two-stage selection: half the budget by ``press``'s scores, the rest by scores times ``|W_o v|_1``.

    Feng et al., "Identify Critical KV Cache in LLM Inference from an Output Perturbation Perspective",
    arXiv 2502.03805 (CriticalKV). As kvpress: the top ``int(n_kept * first_stage_ratio)`` pairs of ``press`` are
    kept outright; the others are ranked by ``(score + epsilon) * projected_value_norm``. Scores in float32.
    """

    epsilon: float = 1e-4
    first_stage_ratio: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_stage(self)

    def score(self, module: nn.Module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        scores = self.press.score(module, hidden_states, keys, values, attentions, kwargs).float()
        k_len = keys.shape[2]
        budget = int((1 - self.compression_ratio) * k_len * self.first_stage_ratio)
        if self.first_stage_ratio > 0:
            budget = max(1, budget)
        first_stage = scores.topk(min(budget, k_len), dim=-1).indices
        scores = (scores + self.epsilon) * projected_value_norm(module, values)
        return scores.scatter(-1, first_stage, _PROTECTED)

    def compress(self, layer: LayerInputs) -> torch.Tensor:
        if not layer.is_prefill or self.compression_ratio == 0:
            return layer.evicted
        scores = self.score(layer.module, layer.hidden_states, layer.keys, layer.values, layer.attentions,
                            layer.kwargs)
        return keep_top_scores(scores, n_kept_pairs(layer.k_len, self.compression_ratio), layer.evicted)


@dataclass
class CriticalAdaKVPress(ScorerWrapperPress):
    """CriticalKV's two stages inside AdaKV's head-wise budgets (arXiv 2502.03805).

    As kvpress: AdaKV's budgets (a safeguard of ``alpha_safeguard`` of each head's uniform budget, the rest chosen
    jointly over heads) give each head a budget ``b_h``; the top ``int(b_h * first_stage_ratio)`` pairs of each head
    by ``press``'s scores are kept outright, the scores are reweighted by ``|W_o v|_1``, each head's top ``b_h``
    reweighted scores are protected, and the layer drops its lowest ``heads * (k_len - n_kept)`` pairs.
    """

    alpha_safeguard: float = 0.20
    epsilon: float = 1e-4
    first_stage_ratio: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_stage(self)
        if not 0 <= self.alpha_safeguard <= 1:
            raise PressError(f"CriticalAdaKVPress: alpha_safeguard must be in [0, 1], got {self.alpha_safeguard!r}")

    def compress(self, layer: LayerInputs) -> torch.Tensor:
        if not layer.is_prefill or self.compression_ratio == 0:
            return layer.evicted
        scores = self.press.scores_for(layer).float()
        batch, heads, k_len = scores.shape
        n_kept = n_kept_pairs(k_len, self.compression_ratio)
        n_safe = max(1, int(n_kept * self.alpha_safeguard)) if self.alpha_safeguard > 0 else 0
        scores = scores.scatter(-1, scores.topk(n_safe, dim=-1).indices, _PROTECTED)
        chosen = scores.reshape(batch, -1).topk(n_kept * heads, dim=-1).indices // k_len  # head of each chosen pair
        budgets = torch.zeros(batch, heads, dtype=torch.long, device=scores.device)
        budgets.scatter_add_(1, chosen, torch.ones_like(chosen))
        scores = _protect_top(scores, (budgets * self.first_stage_ratio).long())
        scores = (scores + self.epsilon) * projected_value_norm(layer.module, layer.values)
        scores = _protect_top(scores, budgets)
        n_removed = heads * (k_len - n_kept)
        removed = scores.reshape(batch, -1).topk(n_removed, dim=-1, largest=False).indices
        evicted = torch.zeros(batch, heads * k_len, dtype=torch.bool, device=scores.device)
        evicted.scatter_(-1, removed, True)
        return evicted.view(batch, heads, k_len) | layer.evicted


def _protect_top(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Set the ``counts[b, h]`` best scores of each (batch, head) row to the protected value."""
    rank = scores.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
    return scores.masked_fill(rank < counts[..., None], _PROTECTED)
