from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from presses import compat
from presses.scorer_press import ScorerPress


@dataclass
class ExpectedAttentionPress(ScorerPress):
    """Score keys by the attention that future queries are expected to give them.

    Devoto et al., "Expected Attention: KV Cache Compression by Estimating Attention from Future Queries
    Distribution", arXiv 2510.00636 (kvpress). Queries (before RoPE) of the context after its ``n_sink`` sinks are
    modelled as a Gaussian per head; RoPE is averaged over the next ``n_future_positions`` positions and applied to
    its mean and covariance. The expected logit of key k is ``mu.k / sqrt(d) + k^T Sigma k / (2 d)`` (second-order
    term only with ``use_covariance``); softmax over keys, averaged over the query heads of each KV group, and
    (``use_vnorm``) multiplied by ``||v|| `` after adding ``epsilon``. Sinks are always kept.
    """

    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0

    def post_init_from_model(self, model: nn.Module, tokenizer=None) -> None:
        base = model.model if hasattr(model, "model") else model
        self._rotary_embedding = getattr(base, "language_model", base).rotary_emb

    def average_rotation(self, module: nn.Module, start: int, reference: torch.Tensor) -> torch.Tensor:
        """The RoPE rotation matrix averaged over positions ``start .. start + n_future_positions``: (d, d)."""
        dim = compat.head_dim(module)
        positions = torch.arange(start, start + self.n_future_positions, device=reference.device)[None]
        cos, sin = self._rotary_embedding(reference, positions)
        cos, sin = cos[0].float(), sin[0].float()  # (n_future, d)
        identity = torch.eye(dim, device=reference.device)
        rotate_half = torch.zeros(dim, dim, device=reference.device)  # rotate_half(x) == x @ rotate_half.T
        rotate_half[: dim // 2, dim // 2 :] = -torch.eye(dim // 2, device=reference.device)
        rotate_half[dim // 2 :, : dim // 2] = torch.eye(dim // 2, device=reference.device)
        rotations = cos[:, :, None] * identity + sin[:, :, None] * rotate_half  # (n_future, d, d)
        return rotations.mean(dim=0)

    def score(self, module: nn.Module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        batch, kv_heads, k_len, dim = keys.shape
        n_sink = min(self.n_sink, k_len - 1)
        queries = compat.query_states(module, hidden_states[:, n_sink:], None).float()  # (b, heads, n, d)
        mean = queries.mean(dim=2, keepdim=True)
        rotation = self.average_rotation(module, k_len, hidden_states)
        mean = mean @ rotation.T
        keys_ = keys[:, :, n_sink:].float().repeat_interleave(compat.num_key_value_groups(module), dim=1)
        logits = (mean @ keys_.transpose(2, 3)).squeeze(2) / math.sqrt(dim)  # (b, heads, k_len - n_sink)
        if self.use_covariance:
            centered = queries - queries.mean(dim=2, keepdim=True)
            covariance = centered.transpose(2, 3) @ centered / max(1, queries.shape[2])
            covariance = rotation @ covariance @ rotation.T
            logits = logits + torch.einsum("bhnd,bhde,bhne->bhn", keys_, covariance, keys_) / dim / 2
        scores = F.softmax(logits, dim=-1).view(batch, kv_heads, -1, k_len - n_sink).mean(dim=2)
        if self.use_vnorm:
            scores = (scores + self.epsilon) * values[:, :, n_sink:].float().norm(dim=-1)
        return F.pad(scores, (n_sink, 0), value=float(scores.max()) + 1)
