from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from presses import compat
from presses.base_press import n_kept_pairs, validate_ratio
from presses.context_pass_press import ContextPassPress
from presses.errors import PressError

AGGREGATIONS = ("max", "mean")


@dataclass
class KVComposePress(ContextPassPress):
    """Budgets over layers (and heads) from the attention a re-read of the context pays to it.

    Akulov et al., "KVCompose: Efficient Structured KV Cache Compression with Composite Tokens", arXiv 2509.05165,
    as kvpress's KVComposePress. After a dense prefill the context is fed again on top of its own cache (the cache
    is cut back afterwards); for every query head, a context token's score is the ``agg_task`` (max) over the
    re-read queries of the attention they pay it; scores are averaged over each KV group (``agg_group``), optionally
    multiplied by the value norm, and the mean over the layer's KV heads is added (``add_mean_across_heads``).

    Budgets: with ``structured`` (default), every head of a layer keeps the same number of tokens: per layer, the
    ``agg_head`` (mean) over heads of the descending-sorted scores is a "composite" score curve, the first layer's
    curve is raised to the maximum over layers, and the ``n_kept_pairs(layers * T, ratio)`` best composite scores
    over all layers give each layer its count. Unstructured: the same over all (layer, head) sorted curves, each
    head its own count. Each head then keeps its best-scored tokens. ``keep_token_lower_bound`` sorted slots per
    curve are always counted. Batch size 1.

    Deviations from kvpress: attention recomputed in float32 from the re-read's queries (kvpress: eager weights in
    the model's dtype); an unstructured head keeps at least one token (kvpress can empty it); the cache is cut back
    to the context after the re-read in both modes (kvpress keeps the re-read's pairs in the unstructured mode).
    """

    structured: bool = True
    compression_ratio: float = 0.0
    agg_task: str = "max"
    agg_group: str = "mean"
    agg_head: str = "mean"
    add_v_norm: bool = False
    add_mean_across_heads: bool = True
    keep_token_lower_bound: int = 0
    knob: ClassVar[str | None] = "compression_ratio"
    pass_name: ClassVar[str] = "kvcompose"

    def __post_init__(self) -> None:
        validate_ratio(self.compression_ratio, type(self).__name__)
        for name in ("agg_task", "agg_group", "agg_head"):
            if getattr(self, name) not in AGGREGATIONS:
                raise PressError(f"KVComposePress: {name} must be one of {', '.join(AGGREGATIONS)}, "
                                 f"got {getattr(self, name)!r}")
        if not isinstance(self.keep_token_lower_bound, int) or self.keep_token_lower_bound < 0:
            raise PressError(f"KVComposePress: keep_token_lower_bound must be a non-negative integer, "
                             f"got {self.keep_token_lower_bound!r}")

    def shared_work_key(self):
        """The re-read's scores depend on these settings only, not on the ratio or the budget mode."""
        return ("kvcompose", self.agg_task, self.agg_group, self.add_v_norm, self.add_mean_across_heads)

    @torch.no_grad()
    def _score_context(self, input_ids: torch.Tensor, cache, context_length: int) -> torch.Tensor:
        """Scores (layers, kv_heads, T) of the T context tokens, float32, after ``agg_group`` and enhancement."""
        per_layer: dict[int, torch.Tensor] = {}

        def hook(module: nn.Module, args: tuple, hook_kwargs: dict, output) -> None:
            keys, values = compat.keys_values(compat.cache_from_kwargs(hook_kwargs), module.layer_idx)
            hidden = compat.hidden_states_from(args, hook_kwargs)
            queries = compat.query_states(module, hidden, hook_kwargs["position_embeddings"]).float()
            groups = compat.num_key_value_groups(module)
            scaling = getattr(module, "scaling", None) or compat.head_dim(module) ** -0.5
            logits = queries @ keys.float().repeat_interleave(groups, dim=1).transpose(2, 3) * scaling
            n_queries, n_keys = logits.shape[-2:]
            future = torch.ones(n_queries, n_keys, dtype=torch.bool, device=keys.device).triu(n_keys - n_queries + 1)
            weights = logits.masked_fill(future, float("-inf")).softmax(dim=-1)[..., :context_length]
            task = weights.amax(dim=2) if self.agg_task == "max" else weights.mean(dim=2)  # (1, heads, T)
            task = task.view(1, keys.shape[1], groups, context_length)
            scores = (task.amax(dim=2) if self.agg_group == "max" else task.mean(dim=2))[0]  # (kv_heads, T)
            if self.add_v_norm:
                scores = scores * values[0, :, :context_length].float().norm(dim=-1)
            if self.add_mean_across_heads:
                scores = scores + scores.mean(dim=0, keepdim=True)
            per_layer[module.layer_idx] = scores

        handles = [module.register_forward_hook(hook, with_kwargs=True) for module in self._modules]
        try:
            self._base_model(input_ids=input_ids, **{compat.model_cache_kwarg(): cache}, use_cache=True)
        finally:
            for handle in handles:
                handle.remove()
            compat.crop_cache(cache, context_length)
        return torch.stack([per_layer[module.layer_idx] for module in self._modules])

    def _select(self, scores: torch.Tensor) -> dict[int, torch.Tensor]:
        """Eviction masks (1, kv_heads, T) per layer from the scores (layers, kv_heads, T)."""
        n_layers, kv_heads, length = scores.shape
        curves = scores.sort(dim=-1, descending=True).values  # (layers, kv_heads, T)
        if self.structured:
            composite = curves.amax(dim=1) if self.agg_head == "max" else curves.mean(dim=1)  # (layers, T)
            composite[:, : self.keep_token_lower_bound] += 1e9
            composite[0] = composite.amax(dim=0)  # the first layer gets the largest budget, as kvpress
            chosen = composite.flatten().topk(n_kept_pairs(composite.numel(), self.compression_ratio)).indices
            counts = torch.bincount(chosen // length, minlength=n_layers).clamp(min=max(1, self.keep_token_lower_bound))
            counts = counts[:, None].expand(n_layers, kv_heads)
        else:
            curves[..., : self.keep_token_lower_bound] += 1e9
            chosen = curves.flatten().topk(n_kept_pairs(curves.numel(), self.compression_ratio)).indices
            counts = torch.bincount(chosen // length, minlength=n_layers * kv_heads).view(n_layers, kv_heads)
            counts = counts.clamp(min=1)
        rank = scores.argsort(dim=-1, descending=True).argsort(dim=-1)
        evicted = rank >= counts[..., None]
        return {module.layer_idx: evicted[i][None] for i, module in enumerate(self._modules)}
