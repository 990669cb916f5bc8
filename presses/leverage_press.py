from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from presses import compat
from presses.errors import PressError
from presses.scorer_press import ScorerPress


def prerope_key_states(module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Keys of ``hidden_states`` before RoPE, (batch, kv_heads, n, head_dim); Qwen3/Gemma3 ``k_norm`` applied."""
    batch, n, _ = hidden_states.shape
    kv_heads, dim = module.config.num_key_value_heads, compat.head_dim(module)
    if hasattr(module, "k_proj"):
        keys = module.k_proj(hidden_states)
    else:  # Phi3: fused projection, keys after the queries
        start = module.config.num_attention_heads * dim
        keys = module.qkv_proj(hidden_states)[..., start: start + kv_heads * dim]
    keys = keys.view(batch, n, kv_heads, dim)
    if hasattr(module, "k_norm"):
        keys = module.k_norm(keys)
    return keys.transpose(1, 2)


@dataclass
class LeverageScorePress(ScorerPress):
    """Keep keys that are geometric outliers: approximate statistical leverage of the pre-RoPE keys.

    Chari & Van Durme, "Compactor: Calibrated Query-Agnostic KV Cache Compression with Approximate Leverage Scores",
    arXiv 2507.08143. As kvpress: centred pre-RoPE keys ``X`` (per KV head) are sketched by a Gaussian
    ``Phi`` (head_dim x ``sketch_dimension``, entries N(0, 1/sketch_dimension)); the leverage of row ``x`` of
    ``XPhi`` is ``x (Phi^T X^T X Phi)^-1 x^T`` (Cholesky with jitter), clipped at 0, then z-scored over the whole
    layer. Prefill only (scores need every context key's hidden state).
    Deviation: the sketch is drawn in float32 (kvpress: in the model's dtype) from torch's global generator, so
    seed it for repeatable runs; all arithmetic in float32.
    """

    sketch_dimension: int = 48

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.sketch_dimension, int) or self.sketch_dimension < 1:
            raise PressError(f"LeverageScorePress: sketch_dimension must be a positive integer, "
                             f"got {self.sketch_dimension!r}")

    @staticmethod
    def leverage(keys: torch.Tensor, sketch_dimension: int) -> torch.Tensor:
        """(batch, heads, n, d) pre-RoPE keys -> (batch, heads, n) approximate leverage scores."""
        batch, heads, _, dim = keys.shape
        sketch = torch.randn(batch, heads, dim, sketch_dimension, device=keys.device) / math.sqrt(sketch_dimension)
        sketched = (keys.float() - keys.float().mean(dim=-2, keepdim=True)) @ sketch  # (batch, heads, n, k)
        gram = sketched.transpose(-2, -1) @ sketched
        gram = (gram + gram.transpose(-2, -1)) / 2
        factor = _cholesky_with_jitter(gram)
        solved = torch.cholesky_solve(sketched.transpose(-2, -1), factor)  # (X^T X)^-1 X^T: (batch, heads, k, n)
        return (sketched * solved.transpose(-2, -1)).sum(dim=-1).clamp_min(0)

    def score(self, module: nn.Module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        if keys.shape[2] != hidden_states.shape[1]:
            raise PressError(f"{type(self).__name__} scores the prefill only (every key needs its hidden state)")
        scores = self.leverage(prerope_key_states(module, hidden_states), self.sketch_dimension)
        return z_score(scores)


def z_score(scores: torch.Tensor) -> torch.Tensor:
    """``(scores - mean) / std`` over the whole tensor (std at least 1e-6); a single score gives 0."""
    if scores.numel() < 2:
        return torch.zeros_like(scores)
    return (scores - scores.mean()) / scores.std().clamp_min(1e-6)


def _cholesky_with_jitter(gram: torch.Tensor, tries: int = 5) -> torch.Tensor:
    """Lower Cholesky factor of ``gram + jitter * I``; the jitter starts at 1e-2 and grows tenfold on failure."""
    identity = torch.eye(gram.shape[-1], device=gram.device)
    jitter = 1e-2
    for _ in range(tries):
        factor, info = torch.linalg.cholesky_ex(gram + jitter * identity)
        if bool((info == 0).all()):
            return factor
        jitter *= 10
    raise PressError(f"LeverageScorePress: the sketched key Gram matrix is not positive definite after {tries} "
                     f"jitters: lower sketch_dimension")
