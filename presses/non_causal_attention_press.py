from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from presses import compat
from presses.errors import PressError
from presses.leverage_press import z_score
from presses.scorer_press import ScorerPress


def chunked_attention_received(queries: torch.Tensor, keys: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Attention each key receives from the queries of its chunk, non-causal: (batch, heads, n).

    ``queries`` and ``keys`` are (batch, heads, n, d), n padded with zero rows to a multiple of ``chunk_size``; the
    logits ``q . k`` are not scaled (as kvpress). As kvpress, in the last chunk the logits of padded keys are set
    to -1e-9 (about 0, so padded keys still take a share) and the rows of padded queries to 0 for real keys, so a
    padded query spreads its unit weight evenly; the share real keys receive from padded queries is kept.
    """
    batch, heads, n, dim = keys.shape
    padded = math.ceil(n / chunk_size) * chunk_size
    queries = F.pad(queries.float(), (0, 0, 0, padded - n)).view(batch, heads, -1, chunk_size, dim)
    keys = F.pad(keys.float(), (0, 0, 0, padded - n)).view(batch, heads, -1, chunk_size, dim)
    logits = queries @ keys.transpose(-2, -1)  # (batch, heads, chunks, chunk_size, chunk_size)
    invalid = torch.arange(padded - chunk_size, padded, device=keys.device) >= n
    last = logits[:, :, -1]
    last.masked_fill_(invalid[:, None], 0)
    last.masked_fill_(invalid[None, :], -1e-9)
    return logits.softmax(dim=-1).sum(dim=-2).reshape(batch, heads, padded)[..., :n]


@dataclass
class NonCausalAttnPress(ScorerPress):
    """Score each key by the attention it receives inside its chunk, both directions, times its value's norm.

    The attention half of Compactor (Chari & Van Durme, arXiv 2507.08143), as kvpress: queries with RoPE attend
    non-causally within chunks of ``chunk_size`` (:func:`chunked_attention_received`), averaged over each KV group,
    times ``|v|``, smoothed by a 3-wide average pool, z-scored over the layer. Prefill only.
    Deviation: in float32 throughout (kvpress: logits in the model's dtype).
    """

    chunk_size: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise PressError(f"NonCausalAttnPress: chunk_size must be a positive integer, got {self.chunk_size!r}")

    def score(self, module: nn.Module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        if keys.shape[2] != hidden_states.shape[1]:
            raise PressError(f"{type(self).__name__} scores the prefill only (every key needs its query)")
        cos, sin = kwargs["position_embeddings"]
        n = hidden_states.shape[1]
        queries = compat.query_states(module, hidden_states, (cos[:, -n:], sin[:, -n:]))
        groups = compat.num_key_value_groups(module)
        received = chunked_attention_received(queries, keys.repeat_interleave(groups, dim=1), self.chunk_size)
        received = received.view(received.shape[0], keys.shape[1], groups, n).mean(dim=2)
        scores = F.avg_pool1d(received * values.float().norm(dim=-1), kernel_size=3, padding=1, stride=1)
        return z_score(scores)
