from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from presses.base_press import LayerInputs, keep_top_scores
from presses.errors import PressError
from presses.wrapper_press import ScorerWrapperPress


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
    model's ``inv_freq`` like kvpress (models with a partial RoPE or RoPE scaling factors on cos/sin are refused).
    """

    rewrites_cache: ClassVar[bool] = True

    def post_init_from_model(self, model: nn.Module, tokenizer=None) -> None:
        super().post_init_from_model(model, tokenizer)
        base = model.model if hasattr(model, "model") else model
        rotary = getattr(getattr(base, "language_model", base), "rotary_emb", None)
        if rotary is None or getattr(rotary, "attention_scaling", 1.0) != 1.0:
            raise PressError("KeyRerotationPress needs a model with a plain rotary embedding (no attention scaling)")
        self.__dict__["_inv_freq"] = rotary.inv_freq

    def compress(self, layer: LayerInputs) -> torch.Tensor:
        if not layer.is_prefill or self.compression_ratio == 0:
            return layer.evicted
        inv_freq = self.__dict__.get("_inv_freq")
        if inv_freq is None:
            raise PressError("KeyRerotationPress needs the model's rotary embedding: apply it as `with press(model):`")
        dim = layer.keys.shape[-1]
        if 2 * inv_freq.numel() != dim:
            raise PressError("KeyRerotationPress supports full-head RoPE only (this model rotates part of the head)")
        kept_now = int((~layer.evicted).sum(-1).max())
        evicted = keep_top_scores(self.press.scores_for(layer), self.press.n_kept(kept_now, layer.module.layer_idx),
                                  layer.evicted)
        n_kept = (~evicted).sum(-1)
        if bool((n_kept != n_kept.flatten()[0]).any()):
            raise PressError("KeyRerotationPress needs the same number of kept pairs in every head")
        n = int(n_kept.flatten()[0])
        kept = evicted.to(torch.uint8).argsort(dim=-1, stable=True)[..., :n]  # kept positions, ascending
        shift = (layer.k_len - n + torch.arange(n, device=kept.device)) - kept  # (batch, kv_heads, n)
        angles = shift[..., None].float() * inv_freq.float().to(kept.device)  # (batch, kv_heads, n, dim / 2)
        cos, sin = torch.cat([angles, angles], dim=-1).cos(), torch.cat([angles, angles], dim=-1).sin()
        index = kept[..., None].expand(-1, -1, -1, dim)
        keys = layer.keys.gather(2, index).float()
        rotated = keys * cos + torch.cat([-keys[..., dim // 2:], keys[..., : dim // 2]], dim=-1) * sin
        layer.keys.scatter_(2, index, rotated.to(layer.keys.dtype))
        return evicted
