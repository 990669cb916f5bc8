"""How a press hooks a model: the base class every press derives from.

A press is used as a context manager around any forward pass or generation of a Hugging Face causal LM::

    press = KnormPress(compression_ratio=0.5)
    with press(model):
        model.generate(input_ids, max_new_tokens=32)

While the context is open, two hooks sit on every (full-attention) attention module:

- after the module's forward (``_after_attention``), the press looks at the layer's cache and decides which
  (KV head, position) pairs to evict: after the prefill for every press, and on later forwards (question tokens,
  decoding steps) for presses that compress while decoding;
- before the module's forward (``_before_attention``), the evictions decided so far are applied to the attention
  mask, per KV head, so an evicted pair gets exactly zero attention weight from then on.

Memory: by default (``kv_storage="compact"``) evicted pairs are freed: the press swaps each layer of the
``DynamicCache`` it is handed for a :class:`presses.compact_cache.CompactLayer`, which packs the kept pairs as soon as
the press evicts and attends over what it holds. ``kv_storage="mask"`` keeps every pair and masks evicted ones in the
attention instead (kvpress's way); predictions are the same. Presses that rewrite cached keys or values in place
(``rewrites_cache``) always mask.

The prefill itself is always dense: pruning one layer does not change the hidden states of later layers within
that forward (the same as kvpress), so one prefill could serve every press.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cache, cached_property
from typing import ClassVar

import torch
from torch import nn
from transformers.cache_utils import Cache

from presses import compat
from presses.compact_cache import (
    COMPACT_EAGER,
    COMPACT_IMPLEMENTATIONS,
    CompactLayer,
    compact_layers,
    new_layer_for,
)
from presses.errors import PressError

KV_STORAGES = ("compact", "mask")

# While set, every press's hooks stand aside: KVzip's reconstruction passes and the sweep engine's batched decoding
# run forwards that other presses attached to the same model must not see (see :func:`presses_paused`).
_HOOKS_PAUSED: ContextVar[bool] = ContextVar("kvpress_eval_hooks_paused", default=False)


@contextmanager
def presses_paused() -> Iterator[None]:
    """Make the hooks of every attached press inert inside the block (forwards then run as if no press were on)."""
    token = _HOOKS_PAUSED.set(True)
    try:
        yield
    finally:
        _HOOKS_PAUSED.reset(token)


@dataclass(frozen=True)
class LayerInputs:
    """What a press sees of one attention layer after its forward pass.

    ``keys``/``values`` are the whole cache of the layer, (batch, kv_heads, k_len, head_dim), keys with RoPE; with
    compact storage, positions already freed read as zeros (and are evicted in ``evicted``). They are read lazily
    (``kv`` is the pair or a function returning it), so a press that never looks at them costs no copy.
    ``hidden_states`` are the inputs of this forward only, (batch, q_len, hidden_size), after the input norm.
    ``attentions`` are the attention weights (batch, num_heads, q_len, k_len) with eager attention, else None.
    ``evicted`` is the current eviction mask (batch, kv_heads, k_len), True = removed.
    ``kwargs`` are the keyword arguments of the attention forward (``position_embeddings``, ...).
    """

    module: nn.Module
    hidden_states: torch.Tensor
    kv: tuple[torch.Tensor, torch.Tensor] | Callable[[], tuple[torch.Tensor, torch.Tensor]]
    attentions: torch.Tensor | None
    evicted: torch.Tensor
    kwargs: dict

    @cached_property
    def _kv_pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv() if callable(self.kv) else self.kv

    @property
    def keys(self) -> torch.Tensor:
        return self._kv_pair[0]

    @property
    def values(self) -> torch.Tensor:
        return self._kv_pair[1]

    @property
    def is_prefill(self) -> bool:
        """True on the first forward into an empty cache (the context prefill)."""
        return self.k_len == self.hidden_states.shape[1]

    @property
    def q_len(self) -> int:
        return self.hidden_states.shape[1]

    @property
    def k_len(self) -> int:
        return self.evicted.shape[-1]


class _RewritesCacheIfAChildDoes:
    """``BasePress.rewrites_cache``: False on a class, on an instance True if any press it wraps rewrites the cache."""

    def __get__(self, press: BasePress | None, owner: type) -> bool:
        return press is not None and any(child.rewrites_cache for child in press.children())


@dataclass
class BasePress:
    """Base of all presses. Subclasses implement :meth:`compress`; most derive from ``ScorerPress`` instead.

    ``knob`` declares which setting a sweep varies: ``"compression_ratio"`` (fraction of pairs removed),
    ``"threshold"`` (score cut), or None (no knob, e.g. ``no_press``).
    """

    knob: ClassVar[str | None] = None
    # True for presses that write cached keys or values in place (ThinK, KeyRerotation, Merging, CAM): a sweep must
    # give such a press a private copy of the context's cache. Such a press declares
    # ``rewrites_cache: ClassVar[bool] = True``; any other press answers True on an instance when a press it wraps does.
    rewrites_cache: ClassVar[bool] = _RewritesCacheIfAChildDoes()
    # Per-layer state tensors indexed by position on their last axis: cut back when the cache is cropped.
    position_state: ClassVar[tuple[str, ...]] = ("evicted",)

    # True for presses that compress the context together with its question (FINCH): they run query-aware only.
    needs_question: ClassVar[bool] = False

    def children(self) -> list[BasePress]:
        """Presses this one wraps (their state is reset, saved and restored with this one's)."""
        return []

    def prompt_delimiter(self, tokenizer) -> str | None:
        """Text a query-aware prompt puts between the context and the question for this press (FINCH's delimiter
        token; it may add the token to ``tokenizer``). None: the plain prompt."""
        return None

    @property
    def compresses_while_decoding(self) -> bool:
        """True if the press also evicts after the prefill (question tokens, generated tokens)."""
        return False

    def compress(self, layer: LayerInputs) -> torch.Tensor:
        """Return the new eviction mask (batch, kv_heads, k_len) for this layer; must contain ``layer.evicted``."""
        raise NotImplementedError

    def post_init_from_model(self, model: nn.Module, tokenizer=None) -> None:
        """Optional: read what the press needs from the model (and tokenizer) before hooks are installed."""

    # ----------------------------------------------------------------------------------------------------------
    # State: one eviction mask per layer, plus press-specific tensors (e.g. DMS scores), reset at each prefill.

    @property
    def _layer_state(self) -> dict[int, dict[str, torch.Tensor]]:
        if "_state" not in self.__dict__:
            self.__dict__["_state"] = {}
        return self.__dict__["_state"]

    def layer_state(self, layer_idx: int) -> dict[str, torch.Tensor]:
        """Mutable per-layer state of this press; ``"evicted"`` holds the eviction mask."""
        return self._layer_state.setdefault(layer_idx, {})

    def reset(self) -> None:
        """Forget all evictions (a new context is about to be prefilled)."""
        self.__dict__["_state"] = {}  # a fresh dict: a state tree lent to a decoding row stays intact
        self.__dict__["_decode_masks"] = {}
        for child in self.children():
            child.reset()

    def snapshot(self) -> dict:
        """A copy of the state, to answer several questions from one compressed context (see :meth:`restore`)."""
        return {
            "layers": {layer: {name: t.clone() for name, t in st.items()} for layer, st in self._layer_state.items()},
            "children": [child.snapshot() for child in self.children()],
        }

    def restore(self, snapshot: dict) -> None:
        layers = snapshot["layers"]
        self.__dict__["_state"] = {layer: {name: t.clone() for name, t in st.items()} for layer, st in layers.items()}
        for child, child_snapshot in zip(self.children(), snapshot["children"], strict=True):
            child.restore(child_snapshot)

    def use_snapshot(self, snapshot: dict) -> None:
        """Make ``snapshot`` (from :meth:`snapshot`) the live state without copying it: later evictions update it.

        The sweep engine keeps one such tree per decoding row and lends it to the press for that row's forwards.
        """
        self.__dict__["_state"] = snapshot["layers"]
        for child, child_snapshot in zip(self.children(), snapshot["children"], strict=True):
            child.use_snapshot(child_snapshot)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Follow a reorder of the cache's rows (beam search): row ``i`` of the state becomes former row ``rows[i]``.

        Per-layer state tensors are batch-first; one whose first axis is not the batch (a step counter, rotary
        tables shared by every row) is left as it is.
        """
        for state in self._layer_state.values():
            for name, tensor in list(state.items()):
                if tensor.dim() and tensor.shape[0] == rows.numel():
                    state[name] = tensor[rows.to(tensor.device)]
        for child in self.children():
            child.select_rows(rows)

    def shared_work_key(self):
        """Presses of one sweep returning equal keys compute the same costly scores for a context (KVzip's
        reconstruction passes at every ratio): the sweep engine then hands them one dict per context, as
        ``self.shared_work``, to compute those scores once. None: nothing to share."""
        return None

    @property
    def shared_work(self) -> dict | None:
        return self.__dict__.get("_shared_work")

    @shared_work.setter
    def shared_work(self, store: dict | None) -> None:
        self.__dict__["_shared_work"] = store

    def evicted_mask(self, layer_idx: int) -> torch.Tensor | None:
        """Eviction mask (batch, kv_heads, k_len) of a layer, True = evicted; None before any prefill."""
        return self._layer_state.get(layer_idx, {}).get("evicted")

    @property
    def achieved_compression_ratio(self) -> float:
        """Removed pairs / total pairs over all compressed layers and KV heads, for the current cache length.

        For a press that only compresses the prefill this is the context's compression, also after generation.
        For a press that compresses while decoding it covers the whole cache, generated tokens included.
        """
        masks = [state["evicted"] for state in self._layer_state.values() if "evicted" in state]
        if not masks:
            return 0.0
        removed = sum(int(m.sum()) for m in masks)
        total = sum(m.numel() for m in masks)
        return removed / total

    # ----------------------------------------------------------------------------------------------------------
    # Hooks.

    @contextmanager
    def __call__(self, model: nn.Module, tokenizer=None, kv_storage: str = "compact") -> Iterator[BasePress]:
        """Apply this press to every forward of ``model`` inside the ``with`` block; hooks go away on exit.

        ``tokenizer`` is only needed by presses that build prompts of their own (KVzip's repeat prompt).
        ``kv_storage``: ``"compact"`` frees evicted pairs (the default), ``"mask"`` keeps them and masks them.
        Compact storage falls back to masking for presses that rewrite the cache and for attention
        implementations other than sdpa, flash-attention and eager.
        """
        if kv_storage not in KV_STORAGES:
            raise PressError(f"kv_storage must be one of {', '.join(KV_STORAGES)}, got {kv_storage!r}")
        modules = compat.attention_modules(model)
        self.post_init_from_model(model, tokenizer)
        self.reset()
        self.__dict__["_compact"] = kv_storage == "compact" and self.storage_for(model) == "compact"
        handles = []
        original = compat.attn_implementation(modules[0]) if modules else None
        try:
            if self.__dict__["_compact"] and original == "eager":
                compat.set_attn_implementation(model, COMPACT_EAGER)
            for module in modules:
                handles.append(module.register_forward_pre_hook(self._before_attention, with_kwargs=True))
                handles.append(module.register_forward_hook(self._after_attention, with_kwargs=True))
            yield self
        finally:
            if self.__dict__["_compact"] and original == "eager":
                compat.set_attn_implementation(model, original)
                # sdpa and flash-attention read a packed layer after the block (reading_compact_layers), eager not
                for cache in self.__dict__.get("_compact_caches", ()):
                    for layer in compact_layers(cache):
                        layer.needs_press = layer.packed
            self.__dict__.pop("_compact_caches", None)
            for handle in handles:
                handle.remove()
            self.__dict__["_compact"] = False

    def storage_for(self, model: nn.Module) -> str:
        """``"compact"`` if this press can free evicted pairs on ``model``, else ``"mask"``."""
        modules = compat.attention_modules(model)
        if self.rewrites_cache or not modules:
            return "mask"
        if compat.attn_implementation(modules[0]) not in COMPACT_IMPLEMENTATIONS:
            return "mask"
        return "compact"

    @contextmanager
    def prefilling_context(self) -> Iterator[None]:
        """Forwards inside the block are later chunks of the context prefill: the press compresses them as it
        compresses the first (chunked prefill; see :func:`presses.generation.prefill`)."""
        self.__dict__["_prefilling"] = True
        try:
            yield
        finally:
            self.__dict__["_prefilling"] = False

    @property
    def hooks_active(self) -> bool:
        """False while the sweep engine leaves this press out of a prefill (its cell has nothing left to answer
        for that context): its hooks then do nothing."""
        return not _HOOKS_PAUSED.get() and self.__dict__.get("_hooks_active", True)

    @hooks_active.setter
    def hooks_active(self, active: bool) -> None:
        self.__dict__["_hooks_active"] = active

    def _before_attention(self, module: nn.Module, args: tuple, kwargs: dict):
        if not self.hooks_active:
            return None
        cache = compat.cache_from_kwargs(kwargs)
        if module.layer_idx == 0:
            _follow_row_reorders(cache, self)
        if self.__dict__.get("_compact"):
            return self._before_compact_attention(module, cache, args, kwargs)
        past = compat.cache_length(cache, module.layer_idx)
        state = self.layer_state(module.layer_idx)
        evicted = state.get("evicted")
        if evicted is None or past == 0:  # nothing evicted yet, or a new prefill (cleared after attention)
            return None
        if evicted.shape[-1] > past:  # the cache was cropped (e.g. between questions): forget dropped positions
            self._truncate_positions(past)
            evicted = state["evicted"]
        masks = self.__dict__.setdefault("_decode_masks", {})
        cached = masks.get(module.layer_idx)
        if cached is None or cached["evicted"] is not evicted:  # the evictions changed: start a new entry
            cached = masks[module.layer_idx] = {"evicted": evicted, "any": bool(evicted.any()), "keep": None}
        if not cached["any"]:
            return None
        q_len = compat.hidden_states_from(args, kwargs).shape[1]
        if q_len == 1 and kwargs.get("attention_mask") is None and compat.attn_implementation(module) == "sdpa":
            # A decoding step under sdpa: the mask is the kept pairs, grown in place, so a step costs nothing that
            # grows with the eviction history (the buffer is rebuilt only when the evictions change).
            kwargs["attention_mask"] = _grown_keep_mask(cached, module, past + 1)
            return args, kwargs
        padded = _pad_positions(evicted, past + q_len)
        kwargs["attention_mask"] = compat.mask_evicted_pairs(module, kwargs.get("attention_mask"), padded, q_len)
        return args, kwargs

    def _before_compact_attention(self, module: nn.Module, cache, args: tuple, kwargs: dict):
        """Compact storage: make the layer a :class:`CompactLayer` on a new prefill, free what the press evicted
        since the last forward (presses that decide after the prefill, like KVzip), and hand the layer to the
        attention."""
        layer = compat.cache_layer(cache, module.layer_idx)
        past = layer.get_seq_length()
        if not isinstance(layer, CompactLayer):
            compat.check_pressable_layer(layer, module.layer_idx)
            if getattr(cache, "offloading", False):  # layers are copied across devices on a side stream, unseen
                raise PressError("compact KV storage cannot use an offloading cache (DynamicCache(offloading=True)): "
                                 "use kv_storage='mask', or a cache without offloading")
            if past:
                raise PressError("compact KV storage starts from an empty cache: pass a new DynamicCache, "
                                 "or use kv_storage='mask'")
            layer = compat.replace_cache_layer(cache, module.layer_idx, new_layer_for(cache))
        elif past:
            state = self.layer_state(module.layer_idx)
            if "evicted" in state and state["evicted"].shape[-1] > past:  # cropped between questions
                self._truncate_positions(past)
            layer.apply_evictions(state.get("evicted"))
        else:
            layer.reset()
        if not past:  # a new prefill: its padding keys, if any, go with the first eviction
            layer.padding = compat.padding_keys(kwargs.get("attention_mask"))
        if compat.attn_implementation(module) == COMPACT_EAGER:  # remembered to refuse reading it after the block
            layer.needs_press = False
            self.__dict__.setdefault("_compact_caches", weakref.WeakSet()).add(cache)
        return None

    def _after_attention(self, module: nn.Module, args: tuple, kwargs: dict, output):
        if not self.hooks_active:
            return output
        cache = compat.cache_from_kwargs(kwargs)
        attentions = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        kv = cache_kv_reader(cache, module.layer_idx)
        self.update_evictions(module, compat.hidden_states_from(args, kwargs), kv, compat.cache_length(
            cache, module.layer_idx), attentions, kwargs)
        if self.__dict__.get("_compact"):
            layer = compat.cache_layer(cache, module.layer_idx)
            if isinstance(layer, CompactLayer):
                layer.apply_evictions(self.evicted_mask(module.layer_idx))
        return output

    def update_evictions(self, module: nn.Module, hidden_states: torch.Tensor,
                         kv: tuple[torch.Tensor, torch.Tensor] | Callable[[], tuple[torch.Tensor, torch.Tensor]],
                         k_len: int, attentions: torch.Tensor | None, kwargs: dict) -> None:
        """Decide this layer's evictions after a forward: what the after-attention hook does.

        ``hidden_states`` (batch, q_len, hidden) are this forward's attention inputs and ``kv`` the layer's whole
        cache, keys and values (batch, kv_heads, k_len, head_dim) ending with this forward's tokens, or a function
        returning them (read only if the press looks). The sweep engine calls it per decoding row with that row's
        cache.
        """
        state = self.layer_state(module.layer_idx)
        is_prefill = k_len == hidden_states.shape[1]
        if not is_prefill and not self.compresses_while_decoding and not self.__dict__.get("_prefilling"):
            return  # later tokens are kept: the mask stays at the context length
        batch, device = hidden_states.shape[0], hidden_states.device
        heads = module.config.num_key_value_heads
        if is_prefill or "evicted" not in state:
            state.clear()
            evicted = torch.zeros((batch, heads, k_len), dtype=torch.bool, device=device)
        else:
            evicted = _pad_positions(state["evicted"], k_len)
        layer = LayerInputs(module, hidden_states, cache(kv) if callable(kv) else kv, attentions, evicted, kwargs)
        with torch.no_grad():  # eviction decisions are not differentiable
            new_evicted = self.compress(layer)
        if new_evicted.shape != evicted.shape or bool((evicted & ~new_evicted).any()):
            raise RuntimeError(f"{type(self).__name__}.compress must keep earlier evictions and the mask shape")
        state["evicted"] = new_evicted

    def _truncate_positions(self, length: int) -> None:
        for state in self._layer_state.values():
            for name in self.position_state:
                if name in state and state[name].shape[-1] > length:
                    state[name] = state[name][..., :length]
        for child in self.children():
            child._truncate_positions(length)


def _follow_row_reorders(cache, press: BasePress) -> None:
    """Make ``press``'s state follow the row reorders of ``cache`` (see :func:`_reorder_rows_and_press_state`)."""
    _ROW_FOLLOWERS[cache] = weakref.ref(press)


def _reorder_rows_and_press_state(cache: Cache, beam_idx: torch.LongTensor) -> None:
    """``Cache.reorder_cache``, then the same reorder of the state of the last press run on the cache.

    Beam search reorders the cache's rows between steps: the rows of the press's state (eviction masks, scores,
    buffers) must move with them, or a row would be masked with another beam's evictions. Patched on transformers'
    ``Cache`` class (not on cache objects, which are deep-copied and pickled); a cache no press ran on is untouched.
    """
    _reorder_cache(cache, beam_idx)
    follower = _ROW_FOLLOWERS.get(cache)
    press = follower() if follower is not None else None
    if press is not None:
        press.select_rows(beam_idx)


_ROW_FOLLOWERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> weakref to its last press
_reorder_cache = getattr(Cache.reorder_cache, "unpatched", Cache.reorder_cache)  # once, even if reloaded
_reorder_rows_and_press_state.unpatched = _reorder_cache
Cache.reorder_cache = _reorder_rows_and_press_state


def cache_kv_reader(cache, layer_idx: int) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """A function reading a layer's keys and values over every position (see :func:`presses.compat.keys_values`)."""
    return lambda: compat.keys_values(cache, layer_idx)


def _grown_keep_mask(cached: dict, module: nn.Module, k_len: int) -> torch.Tensor:
    """Boolean sdpa mask (batch, num_heads, 1, k_len), True = attend, over a buffer with room to grow: positions
    after the evicted ones are kept, so the next step's mask is a longer view of the same buffer."""
    keep = cached["keep"]
    if keep is None or keep.shape[-1] < k_len:
        evicted = cached["evicted"]
        capacity = max(2 * k_len, k_len + 256)
        keep = torch.ones((*evicted.shape[:2], 1, capacity), dtype=torch.bool, device=evicted.device)
        keep[..., 0, : evicted.shape[-1]] = ~evicted
        keep = cached["keep"] = keep.repeat_interleave(compat.num_key_value_groups(module), dim=1)
    return keep[..., :k_len]


def _pad_positions(mask: torch.Tensor, length: int) -> torch.Tensor:
    """Extend a (batch, heads, n) eviction mask to ``length`` positions; new positions are kept."""
    missing = length - mask.shape[-1]
    if missing <= 0:
        return mask[..., :length]
    return torch.cat([mask, mask.new_zeros((*mask.shape[:-1], missing))], dim=-1)


def n_kept_pairs(k_len: int, compression_ratio: float) -> int:
    """Pairs a head keeps out of ``k_len`` at ``compression_ratio``: kvpress's ``max(1, int(k_len * (1 - ratio)))``.

    The product is rounded to 9 decimals before truncation so that float error cannot drop a pair: in floating
    point ``10 * (1 - 0.8)`` is ``1.9999999999999996``, which kvpress truncates to 1; here it keeps 2. This is the
    one place where kept counts are derived from a ratio.
    """
    return max(1, math.floor(round(k_len * (1 - compression_ratio), 9)))


def keep_top_scores(scores: torch.Tensor, n_keep: int, evicted: torch.Tensor) -> torch.Tensor:
    """Evict all but the ``n_keep`` highest scores of each (batch, head) row, never reviving evicted pairs.

    ``scores`` and ``evicted`` are (batch, kv_heads, k_len). At least one pair per head is always kept.
    """
    n_keep = max(1, min(n_keep, scores.shape[-1]))
    masked = scores.float().masked_fill(evicted, float("-inf"))
    kept = masked.topk(n_keep, dim=-1).indices
    new_evicted = torch.ones_like(evicted)
    new_evicted.scatter_(-1, kept, False)
    return new_evicted | evicted


def validate_ratio(compression_ratio: float, press_name: str) -> None:
    """One-line error for a compression ratio outside [0, 1)."""
    if not isinstance(compression_ratio, (int, float)) or not 0 <= compression_ratio < 1:
        raise PressError(
            f"{press_name}: compression_ratio must be in [0, 1) (fraction of KV pairs removed), "
            f"got {compression_ratio!r}"
        )
