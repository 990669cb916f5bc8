"""Decode many answers as one batch over shared, once-stored context caches (the sweep engine's decode loop).

Each *row* answers one question from one prefilled context under one press's evictions: it feeds its prompt
(question, template suffix, answer prefix), then generates greedily or by seeded sampling until end of sequence or
``max_new_tokens``. Rows run together in batches of at most ``batch_size``; when a row finishes, its slot is
refilled with the next row at once (continuous batching), so the longest answer does not set the pace.

Memory: a context's keys and values are stored once, as the dense prefill left them, however many rows read them.
Each row owns only its eviction masks over the context (one bool per KV head and position, shared between rows of
the same press and point) and the keys and values of its own tokens (prompt and answer), so a batch of B rows holds
``contexts x context bytes + B x (row tokens x per-token bytes + context_length x kv_heads x layers bools)``.
During a step the attention logits against a context take (rows x heads x context_length) floats per layer.

Attention is computed here (``kvpress_rows`` in transformers' attention registry, active only inside
:meth:`BatchedDecoder.run`): logits against the row's context keys with its evicted pairs set to -inf, logits
against its own keys (causal), one softmax over both, in float32. This is the same attention as masking a dense
cache, so answers equal those of the one-at-a-time path (:func:`presses.generation.answer_questions`) up to float
rounding. The masks are read as they are: a step costs nothing that grows with the eviction history.

Presses that compress while decoding (DMS with ``decoding=True``, decoding presses) keep one state per row: the
decoder lends each row's state to the press after every layer and mirrors the new evictions into the row's masks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AttentionInterface

from presses import compat
from presses.base_press import BasePress, presses_paused
from presses.generation import device_clock

ATTENTION_NAME = "kvpress_rows"
ROWS_KWARG = "kvpress_rows"


@dataclass
class SharedContext:
    """A context's dense prefill cache, stored once: per layer, keys and values (kv_heads, n, head_dim)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    _blocked: dict = field(default_factory=dict, repr=False)

    @property
    def length(self) -> int:
        return self.keys[0].shape[1]

    def kv_bytes(self) -> int:
        """Bytes of keys and values this context holds."""
        return sum(2 * k.numel() * k.element_size() for k in self.keys)

    def blocked(self, layer: int, masks: list[torch.Tensor | None]) -> torch.Tensor | None:
        """Its rows' eviction masks of a layer stacked (rows, kv_heads, n), or None if none evicts anything.

        Kept from one step to the next while the masks are the same objects (no row joined, left or evicted more),
        so a decode step does not rebuild them.
        """
        cached = self._blocked.get(layer)
        if cached is not None and len(cached[0]) == len(masks) and all(
                a is b for a, b in zip(cached[0], masks, strict=True)):
            return cached[1]
        if all(mask is None for mask in masks):
            stacked = None
        else:
            empty = torch.zeros(self.keys[layer].shape[:2], dtype=torch.bool, device=self.keys[layer].device)
            stacked = torch.stack([empty if mask is None else mask for mask in masks])
        self._blocked[layer] = (masks, stacked)  # holding the masks keeps their identities unique
        return stacked

    @classmethod
    def from_cache(cls, cache, n_layers: int) -> SharedContext:
        pairs = [compat.keys_values(cache, layer) for layer in range(n_layers)]
        return cls([k[0] for k, _ in pairs], [v[0] for _, v in pairs])


@dataclass
class Row:
    """One answer to decode: a prompt after a shared context, under one press's evictions.

    ``evicted`` holds per layer the context's eviction mask (kv_heads, n), True = removed, or None where nothing
    was evicted. ``press``/``state`` are set for presses that compress while decoding: ``state`` is this row's own
    copy of the press state (``press.snapshot()`` after the prefill). ``payload`` is the caller's.
    """

    context: SharedContext
    prompt_ids: list[int]
    evicted: list[torch.Tensor | None]
    max_new_tokens: int
    sampling: object = None  # a GenerationSettings with do_sample=True, or None for greedy
    generator: torch.Generator | None = None
    press: BasePress | None = None
    state: dict | None = None
    payload: object = None
    tokens: list[int] = field(default_factory=list)
    compression_ratio: float | None = None
    decode_seconds: float = 0.0  # this row's share of the wall time of the forwards it took part in


class _Slots:
    """The rows of the running batch and their own tokens' keys/values, per layer; active rows are 0..A-1."""

    def __init__(self, n_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.rows: list[Row] = []
        self.lengths: list[int] = []  # tokens of its own each row holds
        self.n_layers, self.kv_heads, self.head_dim = n_layers, kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.keys = [self._empty(0, 0) for _ in range(n_layers)]
        self.values = [self._empty(0, 0) for _ in range(n_layers)]
        self.row_evicted = [torch.zeros(0, kv_heads, 0, dtype=torch.bool, device=device) for _ in range(n_layers)]

    def _empty(self, rows: int, length: int) -> torch.Tensor:
        return torch.zeros(rows, self.kv_heads, length, self.head_dim, dtype=self.dtype, device=self.device)

    def reserve(self, rows: int, length: int) -> None:
        """Grow the per-row stores (doubling, so growth is amortised) to hold ``rows`` x ``length`` tokens."""
        have_rows, have_length = self.keys[0].shape[0], self.keys[0].shape[2]
        if rows <= have_rows and length <= have_length:
            return
        new_rows, new_length = max(rows, have_rows), max(length, have_length)
        if length > have_length:
            new_length = max(length, 2 * have_length)
        for layer in range(self.n_layers):
            for store in (self.keys, self.values):
                grown = self._empty(new_rows, new_length)
                grown[:have_rows, :, :have_length] = store[layer]
                store[layer] = grown
            mask = torch.zeros(new_rows, self.kv_heads, new_length, dtype=torch.bool, device=self.device)
            mask[:have_rows, :, :have_length] = self.row_evicted[layer]
            self.row_evicted[layer] = mask

    def add(self, row: Row) -> None:
        index = len(self.rows)
        self.rows.append(row)
        self.lengths.append(0)
        self.reserve(index + 1, len(row.prompt_ids) + row.max_new_tokens)
        for layer in range(self.n_layers):
            self.row_evicted[layer][index] = False

    def remove(self, index: int) -> None:
        """Drop a finished row; the last active row moves into its slot so active rows stay contiguous."""
        last = len(self.rows) - 1
        if index != last:
            for layer in range(self.n_layers):
                length = self.lengths[last]
                for store in (self.keys, self.values, self.row_evicted):
                    store[layer][index, :, :length] = store[layer][last, :, :length]
            self.rows[index], self.lengths[index] = self.rows[last], self.lengths[last]
        self.rows.pop()
        self.lengths.pop()


@dataclass
class _Forward:
    """What one batched forward covers: rows ``start .. start + len(q_lens) - 1`` of the slots, each feeding
    ``q_lens[i]`` tokens (right-padded to the longest)."""

    slots: _Slots
    start: int
    q_lens: list[int]

    @property
    def stop(self) -> int:
        return self.start + len(self.q_lens)


def shared_context_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask, scaling: float, dropout: float = 0.0, **kwargs):
    """Attention of a batch of rows over their shared contexts and their own tokens.

    ``query`` (rows, heads, q, head_dim) and ``key``/``value`` (rows, kv_heads, q, head_dim) are this forward's
    tokens, with RoPE. They are stored in the rows' own caches first. Returns (rows, q, heads, head_dim), None.
    """
    forward: _Forward = kwargs[ROWS_KWARG]
    slots, layer = forward.slots, module.layer_idx
    rows, heads, q_len, head_dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    device = query.device
    before = torch.tensor(slots.lengths[forward.start:forward.stop], device=device)
    positions = before[:, None] + torch.arange(q_len, device=device)  # (rows, q)
    index = positions[:, None, :, None].expand(rows, kv_heads, q_len, head_dim)
    own_keys = slots.keys[layer][forward.start:forward.stop]
    own_values = slots.values[layer][forward.start:forward.stop]
    own_keys.scatter_(2, index, key.to(own_keys.dtype))
    own_values.scatter_(2, index, value.to(own_values.dtype))
    own_length = int(positions.max()) + 1
    own_keys, own_values = own_keys[:, :, :own_length], own_values[:, :, :own_length]
    # Own token j is visible to query i if it is not after it and not evicted.
    visible = torch.arange(own_length, device=device)[None, None, :] <= positions[:, :, None]  # (rows, q, own)
    own_evicted = slots.row_evicted[layer][forward.start:forward.stop, :, :own_length]  # (rows, kv_heads, own)
    own_blocked = ~visible[:, None, None] | own_evicted[:, :, None, None]  # (rows, kv_heads, 1, q, own)

    queries = query.view(rows, kv_heads, groups, q_len, head_dim)
    # Every row against its own tokens at once; against its context, one group of rows per context. One softmax
    # over both parts, in float32.
    own_logits = torch.einsum("rkgqd,rkmd->rkgqm", queries, own_keys).float() * scaling
    own_logits.masked_fill_(own_blocked, float("-inf"))
    own_weights = torch.empty_like(own_logits)
    output = torch.empty(rows, kv_heads, groups, q_len, head_dim, dtype=torch.float32, device=device)
    for context, members in _by_context(slots.rows[forward.start:forward.stop]):
        part = slice(members[0], members[-1] + 1) if _contiguous(members) else torch.tensor(members, device=device)
        context_keys, context_values = context.keys[layer], context.values[layer]
        context_logits = torch.einsum("rkgqd,knd->rkgqn", queries[part], context_keys).float() * scaling
        blocked = context.blocked(layer, [slots.rows[forward.start + i].evicted[layer] for i in members])
        if blocked is not None:
            context_logits.masked_fill_(blocked[:, :, None, None, :], float("-inf"))
        weights = torch.cat([context_logits, own_logits[part]], dim=-1).softmax(dim=-1)
        n = context_keys.shape[1]
        own_weights[part] = weights[..., n:]
        output[part] = torch.einsum("rkgqn,knd->rkgqd", weights[..., :n].to(context_values.dtype),
                                    context_values).float()
    output += torch.einsum("rkgqm,rkmd->rkgqd", own_weights.to(own_values.dtype), own_values).float()
    output = output.view(rows, heads, q_len, head_dim).transpose(1, 2).to(query.dtype).contiguous()
    return output, None


def _contiguous(members: list[int]) -> bool:
    return members[-1] - members[0] + 1 == len(members)


def _by_context(rows: list[Row]) -> list[tuple[SharedContext, list[int]]]:
    groups: dict[int, tuple[SharedContext, list[int]]] = {}
    for index, row in enumerate(rows):
        groups.setdefault(id(row.context), (row.context, []))[1].append(index)
    return list(groups.values())


AttentionInterface.register(ATTENTION_NAME, shared_context_attention)


class BatchedDecoder:
    """Decode :class:`Row` s in batches of at most ``batch_size`` with continuous refilling.

    Use :meth:`run` with an iterator of rows (consumed lazily, so the caller can prefill the next context only when
    slots are free); it yields each row once its answer is complete, with ``tokens`` and ``compression_ratio`` set.
    """

    def __init__(self, model: nn.Module, eos_ids: set[int], batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model, self.eos_ids, self.batch_size = model, eos_ids, batch_size
        self.modules = compat.attention_modules(model)
        if len(self.modules) != len(compat.decoder_layers(model)):
            raise ValueError("batched decoding needs full attention in every layer (no sliding-window layers)")
        config = compat.text_config(model)
        parameter = next(model.parameters())
        self.slots = _Slots(config.num_hidden_layers, config.num_key_value_heads, compat.head_dim(self.modules[0]),
                            parameter.dtype, parameter.device)
        self.device = parameter.device

    @torch.no_grad()
    def run(self, rows: Iterable[Row]) -> Iterator[Row]:
        pending = iter(rows)  # pulled between forwards: the caller may prefill a context with its presses on
        exhausted = False
        while True:
            joining = []
            while not exhausted and len(self.slots.rows) + len(joining) < self.batch_size:
                row = next(pending, None)
                if row is None:
                    exhausted = True
                else:
                    joining.append(row)
            if joining:
                start = len(self.slots.rows)
                for row in joining:
                    self.slots.add(row)
                logits = self._forward(start, [row.prompt_ids for row in joining])
                yield from self._choose(start, logits)
            if not self.slots.rows:
                if exhausted:
                    return
                continue
            if joining and len(self.slots.rows) < self.batch_size and not exhausted:
                continue  # fill the freed slots before stepping
            logits = self._forward(0, [[row.tokens[-1]] for row in self.slots.rows])
            yield from self._choose(0, logits)

    def _forward(self, start: int, inputs: list[list[int]]) -> torch.Tensor:
        """Feed each row's tokens (rows ``start ..``); returns the logits at each row's last token (rows, vocab)."""
        q_lens = [len(ids) for ids in inputs]
        width = max(q_lens)
        ids = torch.zeros(len(inputs), width, dtype=torch.long, device=self.device)
        for i, row_ids in enumerate(inputs):
            ids[i, : len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
        rows = self.slots.rows[start:start + len(inputs)]
        offsets = torch.tensor([row.context.length + self.slots.lengths[start + i] for i, row in enumerate(rows)],
                               device=self.device)
        position_ids = offsets[:, None] + torch.arange(width, device=self.device)
        forward = _Forward(self.slots, start, q_lens)
        began = device_clock(self.device)
        with self._decoding():
            logits = self.model(input_ids=ids, position_ids=position_ids, use_cache=False,
                                **{ROWS_KWARG: forward}).logits
        share = (device_clock(self.device) - began) / len(rows)
        for row in rows:
            row.decode_seconds += share
        for i, q_len in enumerate(q_lens):
            self.slots.lengths[start + i] += q_len
        last = torch.tensor(q_lens, device=self.device) - 1
        return logits[torch.arange(len(inputs), device=self.device), last].float()

    def _choose(self, start: int, logits: torch.Tensor) -> Iterator[Row]:
        """Append each row's next token; yield and free the rows that are done."""
        greedy = logits.argmax(dim=-1).tolist()
        finished = []
        for i in range(logits.shape[0]):
            row = self.slots.rows[start + i]
            if row.sampling is not None:
                history = torch.tensor([row.prompt_ids + row.tokens], device=self.device)
                probs = torch.softmax(row.sampling.warpers()(history, logits[i:i + 1]), dim=-1)
                token = int(torch.multinomial(probs, 1, generator=row.generator))
            else:
                token = greedy[i]
            row.tokens.append(token)
            if token in self.eos_ids or len(row.tokens) >= row.max_new_tokens:
                finished.append(start + i)
        for index in sorted(finished, reverse=True):
            row = self.slots.rows[index]
            row.compression_ratio = self._achieved(row)
            self.slots.remove(index)
            row.state = None
            yield row

    @staticmethod
    def _achieved(row: Row) -> float | None:
        if row.press is None:
            return None
        row.press.use_snapshot(row.state)
        return row.press.achieved_compression_ratio

    @contextmanager
    def _decoding(self):
        """Route attention through :func:`shared_context_attention`; presses' own hooks stand aside."""
        config = self.model.config
        original = config._attn_implementation
        handles = [module.register_forward_hook(self._after_attention, with_kwargs=True) for module in self.modules]
        try:
            config._attn_implementation = ATTENTION_NAME
            with presses_paused():
                yield
        finally:
            config._attn_implementation = original
            for handle in handles:
                handle.remove()

    def _after_attention(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        """Rows whose press compresses while decoding: let the press see its row's cache, mirror its evictions."""
        forward: _Forward = kwargs[ROWS_KWARG]
        layer = module.layer_idx
        hidden_states = compat.hidden_states_from(args, kwargs)
        cos, sin = kwargs["position_embeddings"]
        for i, q_len in enumerate(forward.q_lens):
            slot = forward.start + i
            row = self.slots.rows[slot]
            if row.press is None:
                continue
            length = self.slots.lengths[slot] + q_len  # lengths are advanced after the whole forward
            context = row.context
            keys = torch.cat([context.keys[layer], self.slots.keys[layer][slot, :, :length]], dim=1)[None]
            values = torch.cat([context.values[layer], self.slots.values[layer][slot, :, :length]], dim=1)[None]
            row.press.use_snapshot(row.state)
            row_kwargs = {**kwargs, "position_embeddings": (cos[i:i + 1, :q_len], sin[i:i + 1, :q_len])}
            row.press.update_evictions(module, hidden_states[i:i + 1, :q_len], (keys, values), keys.shape[2], None,
                                        row_kwargs)
            evicted = row.press.evicted_mask(layer)
            if evicted is None:
                continue
            evicted = evicted[0]
            row.evicted[layer] = evicted[:, : context.length] if bool(evicted[:, : context.length].any()) else None
            own = evicted[:, context.length:]
            self.slots.row_evicted[layer][slot, :, : own.shape[1]] = own
