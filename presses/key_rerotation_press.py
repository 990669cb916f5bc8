from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from presses.base_press import LayerInputs, keep_top_scores
from presses.errors import PressError
from presses.wrapper_press import ScorerWrapperPress

# RoPE types whose inverse frequencies depend on the sequence length (transformers' dynamic_rope_update).
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


@dataclass
class KeyRerotationPress(ScorerWrapperPress):
    """Evict like ``press``, then re-rotate the kept keys as if they had been contiguous (RoPE re-positioning).

    kvpress's KeyRerotationPress (the rerotation of Hugging Face's SinkCache and of FINCH, Corallo & Papotti, TACL
    2024). In kvpress the ``n`` kept keys of a head are gathered and re-rotated to positions ``0 .. n-1`` and the
    question then starts at position ``n``, so a query ``t`` tokens later sees kept key ``i`` at distance
    ``n + t - i``.

    Cache: here the cache keeps every position and the question starts after the whole context (``k_len``), so kept
    key ``i`` (at position ``p_i``) is rotated in place by ``k_len - n + i - p_i`` positions (``rewrites_cache``).
    RoPE depends only on the distance, so every later query sees exactly kvpress's distances. The rotation uses the
    model's ``inv_freq`` like kvpress. A constant factor on cos and sin (YaRN's attention temperature) is already in
    the cached keys and a rotation keeps it, so it needs nothing; a partial RoPE, and RoPE types whose frequencies
    change with the sequence length (dynamic NTK, LongRoPE), are refused.
    """

    rewrites_cache: ClassVar[bool] = True

    def post_init_from_model(self, model: nn.Module, tokenizer=None) -> None:
        super().post_init_from_model(model, tokenizer)
        self.__dict__["_inv_freq"] = rotary_inv_freq(model, type(self).__name__)

    def compress(self, layer: LayerInputs) -> torch.Tensor:
        if not layer.is_prefill or self.compression_ratio == 0:
            return layer.evicted
        kept_now = int((~layer.evicted).sum(-1).max())
        evicted = keep_top_scores(self.press.scores_for(layer), self.press.n_kept(kept_now, layer.module.layer_idx),
                                  layer.evicted)
        rerotate_kept_keys(layer.keys, evicted, self.__dict__.get("_inv_freq"), type(self).__name__)
        return evicted


def rotary_inv_freq(model: nn.Module, press_name: str) -> torch.Tensor:
    """The model's RoPE inverse frequencies (head_dim / 2,); a one-line error for a model whose frequencies are not
    fixed (no rotary embedding, or a RoPE type that recomputes them with the sequence length)."""
    base = model.model if hasattr(model, "model") else model
    rotary = getattr(getattr(base, "language_model", base), "rotary_emb", None)
    if rotary is None or getattr(rotary, "rope_type", "default") in LENGTH_DEPENDENT_ROPE:
        raise PressError(f"{press_name} needs a model whose rotary frequencies do not change with the sequence length "
                         f"(got rope_type {getattr(rotary, 'rope_type', None)!r})")
    return rotary.inv_freq


def rerotate_kept_keys(keys: torch.Tensor, evicted: torch.Tensor, inv_freq: torch.Tensor | None,
                       press_name: str) -> None:
    """Rotate the kept keys in place as if the ``n`` kept pairs of each head sat at positions ``k_len - n ..``.

    ``keys`` (batch, kv_heads, k_len, head_dim) is the layer's cache, ``evicted`` (batch, kv_heads, k_len) the
    final mask, with the same number ``n`` of kept pairs in every head. Kept key ``i`` (at position ``p_i``) turns by
    ``k_len - n + i - p_i`` positions, so a question appended after ``k_len`` sees kvpress's distances ``n + t - i``.
    """
    if inv_freq is None:
        raise PressError(f"{press_name} needs the model's rotary embedding: apply it as `with press(model):`")
    dim = keys.shape[-1]
    if 2 * inv_freq.numel() != dim:
        raise PressError(f"{press_name} supports full-head RoPE only (this model rotates part of the head)")
    n_kept = (~evicted).sum(-1)
    if bool((n_kept != n_kept.flatten()[0]).any()):
        raise PressError(f"{press_name} needs the same number of kept pairs in every head")
    n, k_len = int(n_kept.flatten()[0]), keys.shape[2]
    kept = evicted.to(torch.uint8).argsort(dim=-1, stable=True)[..., :n]  # kept positions, ascending
    shift = (k_len - n + torch.arange(n, device=kept.device)) - kept  # (batch, kv_heads, n)
    angles = shift[..., None].float() * inv_freq.float().to(kept.device)  # (batch, kv_heads, n, dim / 2)
    cos, sin = torch.cat([angles, angles], dim=-1).cos(), torch.cat([angles, angles], dim=-1).sin()
    index = kept[..., None].expand(-1, -1, -1, dim)
    gathered = keys.gather(2, index).float()
    rotated = gathered * cos + torch.cat([-gathered[..., dim // 2:], gathered[..., : dim // 2]], dim=-1) * sin
    keys.scatter_(2, index, rotated.to(keys.dtype))
