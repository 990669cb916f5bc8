from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from presses import compat
from presses.errors import PressError
from presses.expected_attention_press import ExpectedAttentionPress
from presses.scorer_press import ScorerPress


@dataclass
class CapPress(ScorerPress):
    """Keep the pairs whose values add the most capacity, weighted by their alignment with past queries (CAPKV).

    arXiv 2604.25975, as kvpress's CapPress: the anchor ``mu`` is the mean of the context's pre-RoPE queries after
    the first ``n_sink`` tokens, rotated by the RoPE averaged over the next ``n_future_positions`` positions (the
    rotation of :class:`ExpectedAttentionPress`); each non-sink key gets ``w = exp(tau * cos(mu, k))`` (shifted by
    its head's maximum); with ``A = I + sum_i (w_i + epsilon) v_i v_i^T`` per query head, the score is
    ``w_i * v_i^T A^-1 v_i``, averaged over each KV group. The ``n_sink`` first tokens are kept.
    Deviations: float32 throughout (kvpress: the model's dtype up to the solve); a context of at most ``n_sink``
    tokens keeps everything (kvpress raises).
    """

    tau: float = 5.0
    n_future_positions: int = 512
    n_sink: int = 4
    epsilon: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.n_future_positions, int) or self.n_future_positions < 1:
            raise PressError(f"CapPress: n_future_positions must be a positive integer, "
                             f"got {self.n_future_positions!r}")
        if not isinstance(self.n_sink, int) or self.n_sink < 0:
            raise PressError(f"CapPress: n_sink must be a non-negative integer, got {self.n_sink!r}")

    def post_init_from_model(self, model: nn.Module, tokenizer=None) -> None:
        base = model.model if hasattr(model, "model") else model
        self.__dict__["_rotary_emb"] = getattr(base, "language_model", base).rotary_emb

    def score(self, module: nn.Module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        batch, kv_heads, k_len, dim = keys.shape
        if k_len <= self.n_sink or hidden_states.shape[1] <= self.n_sink:
            return torch.ones(batch, kv_heads, k_len, device=keys.device)
        # The same averaged rotation as Expected Attention (this press has the fields it reads).
        rotation = ExpectedAttentionPress.average_rotation(self, module, hidden_states.shape[1], keys.device)
        queries = compat.query_states(module, hidden_states[:, self.n_sink:], None).float()
        anchor = F.normalize((queries @ rotation.T).mean(dim=2), dim=-1)  # (batch, heads, d)
        groups = compat.num_key_value_groups(module)
        keys_ = keys[:, :, self.n_sink:].float().repeat_interleave(groups, dim=1)
        values_ = values[:, :, self.n_sink:].float().repeat_interleave(groups, dim=1)
        alignment = torch.einsum("bhd,bhtd->bht", anchor, F.normalize(keys_, dim=-1)).clamp(-1, 1)
        logits = self.tau * alignment
        weights = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
        scaled = values_ * (weights + self.epsilon).sqrt()[..., None]
        capacity = torch.eye(dim, device=keys.device) + scaled.transpose(2, 3) @ scaled  # (batch, heads, d, d)
        solved = torch.linalg.solve(capacity, values_.transpose(2, 3))  # A^-1 v: (batch, heads, d, t)
        scores = weights * (values_.transpose(2, 3) * solved).sum(dim=2)
        scores = scores.view(batch, kv_heads, groups, -1).mean(dim=2)
        return F.pad(scores, (self.n_sink, 0), value=float(scores.max()) + 1)
