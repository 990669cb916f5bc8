"""Presses that decide after the whole prefill, from passes of their own over the context (KVzip, KVCompose)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from presses import compat
from presses.base_press import BasePress, LayerInputs, presses_paused
from presses.errors import PressError


class ContextPassPress(BasePress):
    """Base of presses that score the context with extra forwards after its prefill, then evict over all layers.

    A hook on the base model fires once a prefill of token ids into an empty cache is done. The subclass's
    :meth:`_score_context` then runs its passes on top of that cache (KVzip's reconstruction prompts, KVCompose's
    re-read) and must cut the cache back to the context; :meth:`_select` turns the scores into one eviction mask
    (1, kv_heads, n) per layer. The passes run with every other attached press paused, so the sweep engine can
    attach many presses to one prefill; presses of one sweep with equal ``shared_work_key`` score a context once.
    Batch size 1. ``pass_name`` names the press in its one-line errors.
    """

    pass_name = "this press"

    def post_init_from_model(self, model: nn.Module, tokenizer=None) -> None:
        modules = compat.attention_modules(model)
        if len(modules) != len(compat.decoder_layers(model)):
            raise PressError(f"{self.pass_name} cannot run on models with sliding-window layers (e.g. Gemma3): their "
                             "cache cannot be cut back after its passes over the context; use another press")
        self._base_model = model.model if hasattr(model, "model") else model
        self._modules = modules

    @contextmanager
    def __call__(self, model: nn.Module, tokenizer=None, kv_storage: str = "compact") -> Iterator[ContextPassPress]:
        """The base hooks, plus a hook on the base model that scores and selects once a prefill is done."""
        self._scoring = False
        with super().__call__(model, tokenizer, kv_storage):
            handle = self._base_model.register_forward_hook(self._after_prefill, with_kwargs=True)
            try:
                yield self
            finally:
                handle.remove()

    def compress(self, layer: LayerInputs) -> torch.Tensor:
        return layer.evicted  # decided over all layers at once, after the whole prefill (see _after_prefill)

    def _score_context(self, input_ids: torch.Tensor, cache, context_length: int):
        """Scores of the context's pairs from passes over the cache, which must end cut back to the context."""
        raise NotImplementedError

    def _select(self, scores) -> dict[int, torch.Tensor]:
        """Eviction masks (1, kv_heads, context_length) per layer index from the scores."""
        raise NotImplementedError

    def _after_prefill(self, base: nn.Module, args: tuple, kwargs: dict, output) -> None:
        if self._scoring or getattr(self, "compression_ratio", 1) == 0 or not self.hooks_active:
            return
        cache = compat.cache_from_output(output)
        if cache is None:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None:
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            if kwargs.get("inputs_embeds") is not None and cache.get_seq_length() == kwargs["inputs_embeds"].shape[1]:
                raise PressError(f"{self.pass_name} needs the context's token ids: call the model with input_ids")
            return
        context_length = cache.get_seq_length()
        if input_ids.shape[1] != context_length:
            return  # not a prefill into an empty cache (question tokens, decoding steps)
        if input_ids.shape[0] != 1:
            raise PressError(f"{self.pass_name} scores one context at a time: use batch size 1, "
                             f"got {input_ids.shape[0]}")
        shared = self.shared_work
        scores = shared.get("scores") if shared is not None else None
        if scores is None:
            self._scoring = True
            try:
                with presses_paused():  # other presses on the model must not see these passes
                    scores = self._score_context(input_ids, cache, context_length)
            finally:
                self._scoring = False
            if shared is not None:
                shared["scores"] = scores
        for layer_idx, evicted in self._select(scores).items():
            self.layer_state(layer_idx)["evicted"] = evicted
