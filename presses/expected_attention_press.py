from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from presses import compat
from presses.errors import PressError
from presses.scorer_press import ScorerPress


@dataclass
class ExpectedAttentionPress(ScorerPress):
    """Score each key by the attention that future queries are expected to pay it, times its value's norm.

    Devoto, Jeblick, Jégou, "Expected Attention: KV Cache Compression by Estimating Attention from Future Queries
    Distribution", arXiv 2510.00636 (2025).

    As in kvpress:

    1. the queries of the context before RoPE, (batch, num_heads, n, head_dim), minus the first ``n_sink`` (attention
       sinks carry outlier activations), are modelled as one Gaussian per head: mean ``mu``, covariance ``S``;
    2. the RoPE rotation is averaged over the next ``n_future_positions`` positions into one matrix ``R``, and applied
       to the statistics: ``mu <- R mu``, ``S <- R S R^T``;
    3. for a post-RoPE key ``k``, ``E[exp(q.k / sqrt(d))] = exp(mu.k / sqrt(d) + k^T S k / (2 d))``: these logits
       (the second term only with ``use_covariance``) go through a softmax over the non-sink keys, and are averaged
       over the query heads of each KV head;
    4. with ``use_vnorm``, scores become ``(scores + epsilon) * ||v||``: what a pair adds to the residual stream.

    The ``n_sink`` first keys are always kept. Scores are (batch, kv_heads, k_len).

    Deviations from kvpress: contexts of at most ``n_sink`` tokens work (kvpress asserts), by scoring all but the
    first token; the future positions start after the whole cache (kvpress: after this forward's queries, the same in
    a prefill); a partial RoPE (Phi3) rotates only its rotary channels; Gemma3's full-attention layers use their own
    RoPE; statistics are computed in float32.
    """

    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.n_future_positions, int) or self.n_future_positions < 1:
            raise PressError(f"ExpectedAttentionPress: n_future_positions must be a positive integer, "
                             f"got {self.n_future_positions!r}")
        if not isinstance(self.n_sink, int) or self.n_sink < 0:
            raise PressError(f"ExpectedAttentionPress: n_sink must be a non-negative integer, got {self.n_sink!r}")

    def post_init_from_model(self, model: nn.Module, tokenizer=None) -> None:
        # Future positions need the model's rotary embedding (kvpress attaches it to every attention module).
        base = model.model if hasattr(model, "model") else model
        self.__dict__["_rotary_emb"] = getattr(base, "language_model", base).rotary_emb

    def average_rotation(self, module: nn.Module, start: int, device: torch.device) -> torch.Tensor:
        """The RoPE rotation averaged over positions ``start .. start + n_future_positions - 1``: (head_dim, head_dim).

        RoPE maps ``q`` to ``cos * q + sin * rotate_half(q)``, linear in (cos, sin): the average rotation is that
        of the average cos and sin, ``diag(cos) + diag(sin) P`` with ``P q = rotate_half(q)``. Channels past the
        rotary dimension (partial RoPE) are left as they are.
        """
        rotary = self.__dict__.get("_rotary_emb")
        if rotary is None:
            raise PressError("ExpectedAttentionPress needs the model's rotary embedding: apply it as "
                             "`with press(model):` (or call press.post_init_from_model(model) first)")
        positions = torch.arange(start, start + self.n_future_positions, device=device)[None]
        reference = torch.zeros(1, device=device)
        if "layer_type" in inspect.signature(rotary.forward).parameters:  # Gemma3: one RoPE per layer type
            cos, sin = rotary(reference, positions, layer_type=module.config.layer_types[module.layer_idx])
        else:
            cos, sin = rotary(reference, positions)
        cos, sin = cos[0].float().mean(dim=0), sin[0].float().mean(dim=0)  # (rotary_dim,)
        rotary_dim, half = cos.shape[0], cos.shape[0] // 2
        rotate_half = torch.zeros(rotary_dim, rotary_dim, device=device)
        rotate_half[:half, half:] = -torch.eye(half, device=device)
        rotate_half[half:, :half] = torch.eye(half, device=device)
        rotation = torch.eye(compat.head_dim(module), device=device)
        rotation[:rotary_dim, :rotary_dim] = torch.diag(cos) + torch.diag(sin) @ rotate_half
        return rotation

    def query_statistics(self, module: nn.Module, hidden_states: torch.Tensor, k_len: int):
        """Mean (batch, heads, d) and covariance (batch, heads, d, d) of future queries, after the averaged RoPE.

        From this forward's queries before RoPE, minus the sinks among them; the covariance is None without
        ``use_covariance``. Overridden by presses with precomputed statistics.
        """
        q_len = hidden_states.shape[1]
        # This forward's queries start at position k_len - q_len: skip those that are sinks, but keep one.
        skip = min(max(0, self.n_sink - (k_len - q_len)), q_len - 1)
        queries = compat.query_states(module, hidden_states[:, skip:], None).float()  # (batch, heads, n, d), pre-RoPE
        rotation = self.average_rotation(module, k_len, hidden_states.device)
        mean = queries.mean(dim=2) @ rotation.T
        if not self.use_covariance:
            return mean, None
        centered = queries - queries.mean(dim=2, keepdim=True)
        return mean, rotation @ (centered.transpose(2, 3) @ centered / queries.shape[2]) @ rotation.T

    def score(self, module: nn.Module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        batch, kv_heads, k_len, dim = keys.shape
        n_sink = min(self.n_sink, k_len - 1)  # leave at least one key to score
        mean, covariance = self.query_statistics(module, hidden_states, k_len)
        keys_ = keys[:, :, n_sink:].float().repeat_interleave(compat.num_key_value_groups(module), dim=1)
        logits = torch.einsum("bhd,bhnd->bhn", mean, keys_) / math.sqrt(dim)
        if covariance is not None:
            logits = logits + ((keys_ @ covariance) * keys_).sum(dim=-1) / (2 * dim)
        scores = F.softmax(logits, dim=-1).view(batch, kv_heads, -1, k_len - n_sink).mean(dim=2)
        if self.use_vnorm:
            scores = (scores + self.epsilon) * values[:, :, n_sink:].float().norm(dim=-1)
        # Sinks above every score (also across heads, for AdaKV).
        return F.pad(scores, (n_sink, 0), value=float(scores.max()) + 1)
