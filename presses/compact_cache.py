"""Compact KV storage: once a press has evicted pairs, they are physically gone from the cache.

A :class:`CompactLayer` is a transformers cache layer (a drop-in for ``DynamicLayer``, so any ``DynamicCache`` and
``model.generate`` keep working). It starts dense, like ``DynamicLayer``; the first time its press evicts pairs,
it *packs* the kept pairs and frees the rest. After that it holds two regions:

- **pages**: the kept pairs of the packed part, per (batch row, KV head), in pages of ``P`` pairs; a page belongs to
  one (row, head) and its unused tail slots are padding. When every head keeps the same count ``c`` (ratio presses
  without head-wise budgets) the pages are exactly ``(batch * kv_heads, c, head_dim)``, i.e. the
  (batch, kv_heads, kept, head_dim) layout with no padding. Head-wise presses (AdaKV budgets, DMS/KVzap
  thresholds) get pages of ``P`` pairs, a power of two near a sixteenth of the mean kept pairs per head (16 to
  512, :func:`page_size`), so a head's bytes track its kept pairs within ``P - 1`` slots, about 1/16.
- **recent**: tokens appended since the last packing (question, generated tokens), dense (batch, kv_heads, r,
  head_dim), all heads alike. Pairs a decoding press evicts there are masked until the region is folded into the
  pages (when it has grown past :data:`FOLD_MIN` tokens and an eighth of a head's page slots); pairs it evicts from
  the pages leave a hole, and the pages are repacked once holes are a quarter of their slots. Freeing costs O(1)
  amortised per evicted pair rather than a repack per step.

Why pages and not padding to the layer's largest head: measured on kvtiny v1 at 50% (RULER 1k), AdaKV-SnapKV keeps
0.500 of the pairs but padding every head of a layer to its largest head holds 0.617 of the dense bytes, and
AdaKV-Expected-Attention 0.681. Pages hold 0.50-0.54 (README, "How memory is held").

Positions: keys are cached after RoPE, so a packed key keeps its true rotation; new tokens get their true positions
from the model (the cache reports the logical length, tokens seen so far, not the packed length). Evictions are
mirrored from the press's logical mask (batch, kv_heads, tokens seen) by :meth:`CompactLayer.apply_evictions`.

Attention: the dense prefill uses the model's own kernel (sdpa, flash-attention, eager). Later forwards attend to
the pages and the recent region at once (:meth:`CompactLayer.attend`): one batched matmul per region (head-wise
pages add their empty slots' ``-inf`` inside it, from a bias kept beside the pages), a max and a sum per (row, head)
combined across pages with ``scatter_reduce``/``index_add``, softmax in float32. The cost of a step is proportional
to the pairs held, and nothing in it grows with the eviction history; a forward of many tokens (a prefill chunk) is
attended a block of queries at a time, its logits capped at :data:`ATTEND_LOGITS_BYTES`. A packed layer tags the
keys its ``update`` returns with itself, which is how the attention finds it: transformers' sdpa and
flash-attention are registered through :func:`reading_compact_layers`, which sends a packed layer to the compact
kernel and anything else to the kernel itself. So flash-attention, which cannot mask, runs presses with compact
storage, and a cache compressed inside ``with press(model)`` stays compressed, and readable, after the block
(kvpress's pattern: prefill under the press, answer with the cache). Eager attention is not in transformers'
registry: a press switches the model to :func:`compact_eager_attention` while it is on, and answering after the
block is refused in one line. Under flash-attention, forwards of several tokens over a packed layer (questions,
prefill chunks) go to flash-attention's varlen kernel, through transformers' own flash entry: each (row, KV head) is
one sequence of its held pairs, copied into one run per head (:meth:`CompactLayer.held_pairs`). Decoding steps keep
the compact kernel, which reads the pairs where they are rather than copying everything held each step (a choice
by bytes moved, not measured on a GPU). flash-attn's paged entry (``block_table``) would read the pages in place,
but it takes pages of a multiple of 256 pairs only, and head-wise layouts use 16 to 512.

A left-padded batch: the compact kernel has no attention mask, so the prefill's padding keys are freed with the
first eviction (the layer reads them off the prefill's mask, ``padding``).
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from presses.errors import PressError

# Pairs per page for head-wise layouts: a power of two near a sixteenth of the mean kept pairs per head, so padding
# stays under ~1/16 of what is held, within these bounds (small pages are slow: many tiny matmuls).
MIN_PAGE_SIZE, MAX_PAGE_SIZE = 16, 512
FOLD_MIN = 256  # recent tokens before evicted ones there are freed by folding the region into the pages
ATTEND_LOGITS_BYTES = 64 * 2**20  # most float32 logits the compact kernel makes at once (queries are blocked)
EMPTY = torch.iinfo(torch.int32).max  # page slot without a pair (padding or freed)
# A packed layer tags the keys its update() returns with itself, so the attention finds the layer it must read.
LAYER_TAG = "kvpress_compact_layer"
# Kernels that read a packed layer: transformers' own, registered through a wrapper that routes a packed layer's
# attention to the compact kernel (:func:`reading_compact_layers`). Eager attention is not in transformers' registry
# (each modeling file calls its own), so a press switches the model to a registered stand-in while it is on.
WRAPPED_KERNELS = ("sdpa", "flash_attention_2", "flash_attention_3")
COMPACT_EAGER = "kvpress_compact_eager"
COMPACT_IMPLEMENTATIONS = (*WRAPPED_KERNELS, "eager")


class ByteTracker:
    """Running total and peak of the key and value bytes held by the compact layers of one cache."""

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0

    def add(self, delta: int) -> None:
        self.current += delta
        self.peak = max(self.peak, self.current)


class CompactLayer(DynamicLayer):
    """A cache layer whose evicted pairs are freed. Dense (``DynamicLayer``) until its first :meth:`apply_evictions`
    that removes something, packed after."""

    def __init__(self, tracker: ByteTracker | None = None) -> None:
        super().__init__()
        self.packed = False
        self.applied: torch.Tensor | None = None  # the eviction mask last mirrored (batch, kv_heads, tokens seen)
        # (batch, prefill tokens) True at the prefill's padding keys (a left-padded batch), which no query may see:
        # they are freed with the first eviction, since the compact kernel has no attention mask to hide them with.
        self.padding: torch.Tensor | None = None
        # Set when the press that packed this layer exits under eager attention: outside the press, eager attention
        # cannot read a packed layer (sdpa and flash-attention can: see ``reading_compact_layers``).
        self.needs_press = False
        self.tracker = tracker or ByteTracker()
        self.accounted = 0  # this layer's bytes as last told to the tracker

    # -- transformers' cache layer interface ------------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.packed:
            keys, values = super().update(key_states, value_states, *args, **kwargs)
            self._note_peak()
            return keys, values
        if self.needs_press:
            raise PressError("this cache was compressed with compact storage under eager attention, which can read "
                             "it only inside `with press(model)`: decode there, use sdpa, or kv_storage='mask'")
        batch, heads, q_len, dim = key_states.shape
        end = self.recent_len + q_len
        if end > self.recent_keys.shape[2]:
            capacity = max(end, self.recent_keys.shape[2] + max(64, self.recent_keys.shape[2] // 4))
            self.recent_keys = _grow(self.recent_keys, capacity)
            self.recent_values = _grow(self.recent_values, capacity)
            self.recent_evicted = _grow(self.recent_evicted, capacity)
        self.recent_keys[:, :, self.recent_len:end] = key_states
        self.recent_values[:, :, self.recent_len:end] = value_states
        self.recent_evicted[:, :, self.recent_len:end] = False
        self.recent_len = end
        self._note_peak()
        setattr(key_states, LAYER_TAG, self)  # the attention reads the layer itself (reading_compact_layers)
        return key_states, value_states

    def get_seq_length(self) -> int:
        if not self.packed:
            return super().get_seq_length()
        return self.recent_start + self.recent_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        if not self.packed:
            super().crop(tokens_to_remove)
            self._note_peak()
            return
        if tokens_to_remove > 0:
            raise ValueError("CompactLayer.crop takes the number of tokens to remove, as a negative integer")
        if tokens_to_remove == 0:  # assisted generation crops the rejected candidates, which may be none
            return
        length = self.get_seq_length() + tokens_to_remove
        if length >= self.recent_start:
            self.recent_len = length - self.recent_start
        else:  # cut into the pages: free their slots from ``length`` on
            cut = (self.page_positions >= length) & (self.page_positions != EMPTY)
            self.page_positions[cut] = EMPTY
            self.page_bias = None
            self.holes += int(cut.sum())
            self.uniform = self.uniform and self.holes == 0
            self.recent_start, self.recent_len = length, 0
        if self.applied is not None:
            self.applied = self.applied[..., :length]
        self._note_peak()

    def reset(self) -> None:
        super().reset()
        self.packed = False
        self.applied = None
        self.padding = None
        self._note_peak()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``i`` becomes former row ``beam_idx[i]``."""
        self.select_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.select_rows(torch.arange(self.batch_size(), device=self.device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select_rows(indices)

    def batch_size(self) -> int:
        return self.batch if self.packed else self.keys.shape[0]

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep former rows ``rows`` (repeats allowed), in that order: row ``i`` becomes former row ``rows[i]``."""
        if not self.is_initialized:
            return
        rows = rows.to(device=self.device, dtype=torch.long)
        if self.padding is not None:
            self.padding = self.padding[rows]
        if self.applied is not None:
            self.applied = self.applied[rows]
        if not self.packed:
            self.keys, self.values = self.keys[rows], self.values[rows]
            self._note_peak()
            return
        # A (row, head)'s pages are consecutive (packing sorts by owner): gather each new owner's former pages.
        heads = self.heads
        former_owner = (rows[:, None] * heads + torch.arange(heads, device=self.device)).reshape(-1)
        pages_per_owner = torch.bincount(self.page_owner, minlength=self.batch * heads)
        counts = pages_per_owner[former_owner]
        page_owner = torch.arange(former_owner.numel(), device=self.device).repeat_interleave(counts)
        pages = _starts(pages_per_owner)[former_owner][page_owner] + _rank_within_owner(page_owner, counts)
        old_slots = max(1, self.page_positions.numel())
        self.page_keys, self.page_values = self.page_keys[pages], self.page_values[pages]
        self.page_positions, self.page_owner = self.page_positions[pages], page_owner
        self.page_bias = None if self.page_bias is None else self.page_bias[pages]
        # Holes are counted per layer, not per row: scaled with the slots kept (it only decides when to repack).
        self.holes = self.holes * self.page_positions.numel() // old_slots
        self.recent_keys, self.recent_values = self.recent_keys[rows], self.recent_values[rows]
        self.recent_evicted = self.recent_evicted[rows]
        self.batch = rows.numel()
        self._note_peak()

    # -- evictions ------------------------------------------------------------------------------------------

    def apply_evictions(self, evicted: torch.Tensor) -> None:
        """Free the pairs that ``evicted`` (batch, kv_heads, n) marks and this layer still holds."""
        if evicted is None or evicted is self.applied:
            return
        if not self.packed:
            freed = self._with_padding(evicted)
            if bool(freed.any()):
                self._pack_dense(freed)
            self.applied = evicted
            return
        n = evicted.shape[-1]
        applied = self.applied
        if applied is None or applied.shape[-1] < n:
            applied = _pad_false(applied, evicted.shape, n)
        newly = evicted & ~applied[..., :n]  # padding keys were never packed: nothing below frees them twice
        self.applied = evicted
        if not bool(newly.any()):
            return
        start = self.recent_start
        if bool(newly[..., :start].any()):  # pairs in the pages: free their slots
            flat = newly[..., :start].reshape(-1, start)
            occupied = self.page_positions != EMPTY
            slot_positions = torch.where(occupied, self.page_positions, 0).long()
            freed = flat[self.page_owner[:, None], slot_positions] & occupied
            self.page_positions[freed] = EMPTY
            self.page_bias = None
            self.holes += int(freed.sum())
            self.uniform = self.uniform and self.holes == 0
        recent = newly[..., start:start + self.recent_len]
        if recent.shape[-1]:
            self.recent_evicted[:, :, : recent.shape[-1]] |= recent
        # Freed slots are reclaimed by repacking once they are a quarter of the pages, and masked recent pairs once
        # the region is long: O(1) amortised per freed pair.
        slots_per_head = self.page_positions.numel() // max(1, self.batch * self.heads)
        long_recent = self.recent_len >= max(FOLD_MIN, slots_per_head // 8)
        if self.holes > self.page_positions.numel() // 4 or (
                long_recent and bool(self.recent_evicted[:, :, : self.recent_len].any())):
            self._fold()

    def _with_padding(self, evicted: torch.Tensor) -> torch.Tensor:
        """``evicted`` (batch, kv_heads, n) with the prefill's padding keys marked too."""
        if self.padding is None:
            return evicted
        width = min(self.padding.shape[-1], evicted.shape[-1])
        marked = evicted.clone()
        marked[..., :width] |= self.padding[:, None, :width]
        return marked

    def _pack_dense(self, evicted: torch.Tensor) -> None:
        batch, heads, n, dim = self.keys.shape
        owner = torch.arange(batch * heads, device=self.device).repeat_interleave(n)
        positions = torch.arange(n, device=self.device).repeat(batch * heads)
        self._pack(self.keys.reshape(-1, dim), self.values.reshape(-1, dim), owner, positions,
                   ~evicted.reshape(-1), batch, heads)
        self.recent_start = n
        self.keys = self.values = None
        self._note_peak()

    def _fold(self) -> None:
        """Repack the pages' held pairs and the recent region's kept ones into new pages (frees both)."""
        batch, heads = self.batch, self.heads
        dim = self.page_keys.shape[-1]
        bh = batch * heads
        r = self.recent_len
        page_owner = self.page_owner[:, None].expand_as(self.page_positions).reshape(-1)
        recent_owner = torch.arange(bh, device=self.device).repeat_interleave(r)
        recent_positions = (self.recent_start + torch.arange(r, device=self.device)).repeat(bh)
        keys = torch.cat([self.page_keys.reshape(-1, dim), self.recent_keys[:, :, :r].reshape(-1, dim)])
        values = torch.cat([self.page_values.reshape(-1, dim), self.recent_values[:, :, :r].reshape(-1, dim)])
        owner = torch.cat([page_owner, recent_owner])
        positions = torch.cat([self.page_positions.reshape(-1).long(), recent_positions])
        keep = torch.cat([self.page_positions.reshape(-1) != EMPTY, ~self.recent_evicted[:, :, :r].reshape(-1)])
        end = self.recent_start + r
        self._pack(keys, values, owner, positions, keep, batch, heads)
        self.recent_start = end
        self._note_peak()

    def _pack(self, keys: torch.Tensor, values: torch.Tensor, owner: torch.Tensor, positions: torch.Tensor,
              keep: torch.Tensor, batch: int, heads: int) -> None:
        """Pages from flat pairs (N, head_dim) with their owner (row * heads + head) and position, kept ones only."""
        bh = batch * heads
        index = keep.nonzero().squeeze(1)
        owner, positions = owner[index], positions[index]
        order = torch.argsort(owner * (int(positions.max()) + 1 if positions.numel() else 1) + positions, stable=True)
        index, owner, positions = index[order], owner[order], positions[order]
        counts = torch.bincount(owner, minlength=bh)
        page, uniform = page_layout(counts)
        pages_per_owner = (counts + page - 1) // page
        rank = _rank_within_owner(owner, counts)
        slot = (_starts(pages_per_owner)[owner] + rank // page) * page + rank % page
        n_pages = int(pages_per_owner.sum())
        dim = keys.shape[-1]
        page_keys = keys.new_zeros(n_pages * page, dim)
        page_values = values.new_zeros(n_pages * page, dim)
        page_positions = torch.full((n_pages * page,), EMPTY, dtype=torch.int32, device=keys.device)
        page_keys[slot] = keys[index]
        page_values[slot] = values[index]
        page_positions[slot] = positions.to(torch.int32)
        self.page_keys = page_keys.view(n_pages, page, dim)
        self.page_values = page_values.view(n_pages, page, dim)
        self.page_positions = page_positions.view(n_pages, page)
        self.page_bias = None  # (n_pages, 1, page): 0 at held slots, -inf at empty ones; built when first read
        self.page_owner = torch.arange(bh, device=keys.device).repeat_interleave(pages_per_owner)
        self.uniform = uniform  # one full page per (row, head), in order: no gather, no scatter
        self.batch, self.heads = batch, heads
        self.recent_keys = keys.new_zeros(batch, heads, 0, dim)
        self.recent_values = values.new_zeros(batch, heads, 0, dim)
        self.recent_evicted = torch.zeros(batch, heads, 0, dtype=torch.bool, device=keys.device)
        self.recent_len = 0
        self.holes = 0  # slots freed by evictions since this packing (padding excluded)
        self.packed = True

    # -- views and accounting -------------------------------------------------------------------------------

    def logical_keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values over every position seen (batch, kv_heads, n, head_dim), zeros where freed.

        For presses that score the whole cache while decoding; a copy once packed, so only read when needed.
        """
        if not self.packed:
            return self.keys, self.values
        n, bh, dim = self.get_seq_length(), self.batch * self.heads, self.page_keys.shape[-1]
        out = []
        for pages, recent in ((self.page_keys, self.recent_keys), (self.page_values, self.recent_values)):
            dense = pages.new_zeros(bh * n, dim)
            held = self.page_positions != EMPTY
            owner = self.page_owner[:, None].expand_as(self.page_positions)
            dense[(owner[held] * n + self.page_positions[held].long())] = pages[held]
            dense = dense.view(self.batch, self.heads, n, dim)
            dense[:, :, self.recent_start:] = recent[:, :, : self.recent_len]
            out.append(dense)
        return out[0], out[1]

    def kv_bytes(self) -> int:
        """Bytes of key and value tensors this layer holds now (padding included, spare growth room excluded)."""
        if not self.packed:
            return 0 if self.keys is None else 2 * self.keys.numel() * self.keys.element_size()
        recent = self.recent_keys[:, :, : self.recent_len]
        return 2 * (self.page_keys.numel() + recent.numel()) * self.page_keys.element_size()

    def index_bytes(self) -> int:
        """Bytes of bookkeeping beside the pairs (page positions, owners and mask, recent eviction flags)."""
        if not self.packed:
            return 0
        bias = 0 if self.page_bias is None else self.page_bias.numel() * self.page_bias.element_size()
        return (self.page_positions.numel() * 4 + self.page_owner.numel() * self.page_owner.element_size()
                + self.recent_evicted[:, :, : self.recent_len].numel() + bias)

    def _note_peak(self) -> None:
        held = self.kv_bytes()
        self.tracker.add(held - self.accounted)
        self.accounted = held

    def state_copy(self) -> dict:
        """A copy of what the layer holds, for :meth:`load_state` (several questions after a decoding press)."""
        return {name: value.clone() if isinstance(value, torch.Tensor) else value
                for name, value in self.__dict__.items() if name not in ("tracker", "accounted")}

    def load_state(self, state: dict) -> None:
        self.__dict__.update({name: value.clone() if isinstance(value, torch.Tensor) else value
                              for name, value in state.items()})
        self._note_peak()

    @classmethod
    def from_dense(cls, keys: torch.Tensor, values: torch.Tensor, evicted: torch.Tensor) -> CompactLayer:
        """A packed layer holding the pairs of ``keys``/``values`` (batch, kv_heads, n, head_dim) not in
        ``evicted`` (a copy: the dense tensors stay as they are)."""
        layer = cls()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values  # read in place by the packing, not copied first
        layer._note_peak()
        layer.apply_evictions(evicted)
        return layer

    def held_pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A copy of every held pair of a packed layer as one run per (row, head), in position order: keys and values
        (total, head_dim) and the runs' lengths (batch * kv_heads), the layout of flash-attention's varlen kernel."""
        bh, dim, r = self.batch * self.heads, self.page_keys.shape[-1], self.recent_len
        page_slots = (self.page_positions != EMPTY).reshape(-1).nonzero().squeeze(1)
        # sorted by owner, and by position within an owner: an owner's pages are consecutive and in position order
        page_owner = self.page_owner[page_slots // self.page_positions.shape[1]]
        recent_slots = (~self.recent_evicted[:, :, :r]).reshape(-1).nonzero().squeeze(1)
        recent_owner = recent_slots // max(r, 1)
        page_counts = torch.bincount(page_owner, minlength=bh)
        recent_counts = torch.bincount(recent_owner, minlength=bh)
        lengths = page_counts + recent_counts
        start = _starts(lengths)
        # a run is its owner's page pairs, then its recent ones; each already in position order
        page_destination = start[page_owner] + _rank_within_owner(page_owner, page_counts)
        recent_destination = (start[recent_owner] + page_counts[recent_owner]
                              + _rank_within_owner(recent_owner, recent_counts))
        out = []
        for pages, recent in ((self.page_keys, self.recent_keys), (self.page_values, self.recent_values)):
            held = pages.new_empty(int(lengths.sum()), dim)
            held[page_destination] = pages.reshape(-1, dim)[page_slots]
            held[recent_destination] = recent[:, :, :r].reshape(-1, dim)[recent_slots]
            out.append(held)
        return out[0], out[1], lengths

    # -- attention ------------------------------------------------------------------------------------------

    def attends_varlen(self, q_len: int) -> bool:
        """Whether a forward of ``q_len`` tokens reads this layer with flash-attention's varlen kernel
        (:meth:`attend_varlen`) rather than :meth:`attend`: forwards of several tokens (a question, an answer
        prefix, a prefill chunk; flash-attention never makes their queries x held pairs logits, which the compact
        kernel makes a block of queries at a time), none of whose own tokens is evicted (the kernel's causal mask
        counts them all). A decoding step keeps :meth:`attend`, which reads the held pairs where they are: the
        varlen kernel needs them copied into one run per head first (:meth:`held_pairs`), everything held, each
        step."""
        return 1 < q_len <= self.recent_len and not bool(
            self.recent_evicted[:, :, self.recent_len - q_len:self.recent_len].any())

    def attend_varlen(self, kernel, module: nn.Module, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """:meth:`attend` through ``kernel``, transformers' flash-attention entry, with its varlen kernel: each
        (row, KV head) is one sequence of its held pairs (:meth:`held_pairs`) and of this forward's queries of its
        query group (its heads); causal, aligned to the end (this forward's tokens are the last of each run).
        Returns the output (batch, q, num_heads, head_dim)."""
        batch, num_heads, q_len, dim = query.shape
        heads = self.heads
        groups = num_heads // heads
        bh = batch * heads
        keys, values, lengths = self.held_pairs()
        int32 = dict(dtype=torch.int32, device=query.device)
        cu_seq_lens_k = torch.zeros(bh + 1, **int32)
        cu_seq_lens_k[1:] = torch.cumsum(lengths, 0)
        cu_seq_lens_q = torch.arange(0, (bh + 1) * q_len, q_len, **int32)
        # (batch, heads * groups, q, dim) -> one sequence of q tokens per (row, head), its group as the heads
        queries = query.view(batch, heads, groups, q_len, dim).transpose(2, 3).reshape(1, bh * q_len, groups, dim)
        output, _ = kernel(module, queries.transpose(1, 2), keys.view(1, 1, -1, dim), values.view(1, 1, -1, dim),
                           None, dropout=0.0, scaling=scaling, is_causal=True, cu_seq_lens_q=cu_seq_lens_q,
                           cu_seq_lens_k=cu_seq_lens_k, max_length_q=q_len, max_length_k=int(lengths.max()))
        return output.view(batch, heads, q_len, groups, dim).transpose(1, 2).reshape(batch, q_len, num_heads, dim)

    def attend(self, query: torch.Tensor, scaling: float, with_weights: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of this forward's queries (batch, num_heads, q, head_dim) over everything the layer holds
        (this forward's tokens are already in the recent region). Returns the output (batch, q, num_heads, head_dim)
        and, if ``with_weights``, the attention weights over every position seen (batch, num_heads, q, tokens seen),
        zero at freed pairs, as eager attention over a masked cache gives them (``output_attentions``).

        A forward of many queries over many held pairs (a prefill chunk) is attended a block of queries at a time,
        so that its float32 logits stay under :data:`ATTEND_LOGITS_BYTES`: a chunk's transient memory then does not
        grow with the pairs held times the chunk."""
        batch, num_heads, q_len, _ = query.shape
        slots = self.page_positions.numel() + batch * self.heads * self.recent_len  # logits per query and group
        block = max(1, ATTEND_LOGITS_BYTES // (4 * (num_heads // self.heads) * slots))
        if with_weights or block >= q_len:
            return self._attend(query, scaling, with_weights)
        outputs = [self._attend(query[:, :, start:start + block], scaling, later=max(0, q_len - start - block))[0]
                   for start in range(0, q_len, block)]
        return torch.cat(outputs, 1), None

    def _attend(self, query: torch.Tensor, scaling: float, with_weights: bool = False, later: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`attend` for queries of this forward's tokens followed by ``later`` more of its tokens."""
        batch, num_heads, q_len, dim = query.shape
        heads = self.heads
        groups = num_heads // heads
        bh = batch * heads
        gq = groups * q_len
        queries = query.reshape(bh, gq, dim)
        # recent region: dense; a key is visible if not evicted and not after the query
        r = self.recent_len
        recent_keys = self.recent_keys[:, :, :r].reshape(bh, r, dim)
        recent_values = self.recent_values[:, :, :r].reshape(bh, r, dim)
        recent_logits = torch.bmm(queries, recent_keys.transpose(1, 2)).float().mul_(scaling)  # (bh, gq, r)
        blocked = self.recent_evicted[:, :, :r].reshape(bh, 1, r)
        if q_len > 1 or later:
            first = r - later - q_len  # recent index of the first query's token
            future = torch.arange(r, device=query.device)[None, :] > first + torch.arange(q_len, device=query.device)[
                :, None]  # (q, r)
            blocked = blocked | future.repeat(groups, 1)[None]
        recent_logits.masked_fill_(blocked, float("-inf"))
        # pages: one (gq x page) block of logits per page
        if self.uniform:
            page_queries = queries
        else:
            page_queries = queries[self.page_owner]
        if self.uniform:
            page_logits = torch.bmm(page_queries, self.page_keys.transpose(1, 2)).float().mul_(scaling)
        else:  # the empty slots' -inf added by the matmul itself: one pass over the logits instead of three
            if self.page_bias is None:
                self.page_bias = torch.zeros(self.page_positions.shape, dtype=query.dtype, device=query.device
                                             ).masked_fill_(self.page_positions == EMPTY, float("-inf"))[:, None]
            page_logits = torch.baddbmm(self.page_bias, page_queries, self.page_keys.transpose(1, 2),
                                        alpha=scaling).float()
        # finite once combined: a query always sees its own token (or, for a caller without one, some pair)
        maximum = recent_logits.amax(-1) if r else recent_logits.new_full((bh, gq), float("-inf"))
        if self.uniform:
            maximum = torch.maximum(maximum, page_logits.amax(-1))
        else:
            owner = self.page_owner[:, None].expand(-1, gq)
            maximum = maximum.scatter_reduce(0, owner, page_logits.amax(-1), "amax")
        recent_weights = torch.exp(recent_logits - maximum[..., None])
        page_weights = torch.exp(page_logits - (maximum if self.uniform else maximum[self.page_owner])[..., None])
        total = recent_weights.sum(-1)
        output = torch.bmm(recent_weights.to(recent_values.dtype), recent_values).float()
        page_output = torch.bmm(page_weights.to(self.page_values.dtype), self.page_values).float()
        if self.uniform:
            total += page_weights.sum(-1)
            output += page_output
        else:
            total.index_add_(0, self.page_owner, page_weights.sum(-1))
            output.index_add_(0, self.page_owner, page_output)
        output /= total[..., None]
        output = output.view(batch, heads, groups, q_len, dim).reshape(batch, num_heads, q_len, dim)
        weights = None
        if with_weights:
            n = self.get_seq_length()
            weights = recent_weights.new_zeros(bh, gq, n)
            weights[:, :, self.recent_start:] = recent_weights
            held = self.page_positions != EMPTY
            owner = self.page_owner[:, None].expand_as(self.page_positions)
            weights[owner[held], :, self.page_positions[held].long()] = page_weights.transpose(1, 2)[held]
            weights /= total[..., None]
            weights = weights.view(batch, heads, groups, q_len, n).reshape(batch, num_heads, q_len, n).to(query.dtype)
        return output.transpose(1, 2).to(query.dtype).contiguous(), weights


def compact_eager_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask, scaling: float, dropout: float = 0.0, **kwargs):
    """Eager attention while a press with compact storage is on: the modeling file's own eager kernel until the
    layer is packed, then :meth:`CompactLayer.attend`, with the weights eager attention returns."""
    layer: CompactLayer | None = getattr(key, LAYER_TAG, None)
    if layer is None or not layer.packed:
        eager = sys.modules[type(module).__module__].eager_attention_forward
        return eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    return layer.attend(query, scaling, with_weights=True)


def page_layout(counts: torch.Tensor) -> tuple[int, bool]:
    """Pairs per page and whether the layout is uniform (one full page per (row, head)), for per-(row, head) kept
    counts: the one rule the packing follows."""
    uniform = bool((counts == counts[0]).all()) and int(counts[0]) > 0
    return (int(counts[0]) if uniform else page_size(float(counts.float().mean()))), uniform


def packed_kv_bytes(evicted: torch.Tensor, head_dim: int, element_size: int) -> int:
    """Bytes of keys and values a layer packed from the eviction mask ``evicted`` (batch, kv_heads, n) holds,
    without packing it (the sweep engine reports what each press's compact cache holds this way)."""
    counts = (~evicted).sum(-1).reshape(-1)
    page, _ = page_layout(counts)
    slots = int(((counts + page - 1) // page).sum()) * page
    return 2 * slots * head_dim * element_size


def page_size(mean_kept: float) -> int:
    """Pairs per page for a head-wise layout whose heads keep ``mean_kept`` pairs on average."""
    size = 1 << max(0, int(mean_kept / 16)).bit_length() - 1 if mean_kept >= 32 else MIN_PAGE_SIZE
    return max(MIN_PAGE_SIZE, min(MAX_PAGE_SIZE, size))


def _starts(counts: torch.Tensor) -> torch.Tensor:
    """Where each owner's run begins when runs of ``counts`` are laid end to end (an exclusive cumulative sum)."""
    return torch.cumsum(counts, 0) - counts


def _rank_within_owner(owner: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """For items sorted by ``owner``, each one's index within its owner's run (``counts`` items per owner)."""
    return torch.arange(owner.numel(), device=owner.device) - _starts(counts)[owner]


def _grow(tensor: torch.Tensor, capacity: int) -> torch.Tensor:
    grown = tensor.new_zeros(*tensor.shape[:2], capacity, *tensor.shape[3:])
    grown[:, :, : tensor.shape[2]] = tensor
    return grown


def _pad_false(mask: torch.Tensor | None, shape: torch.Size, n: int) -> torch.Tensor:
    padded = torch.zeros((*shape[:2], n), dtype=torch.bool, device=None if mask is None else mask.device)
    if mask is not None:
        padded[..., : mask.shape[-1]] = mask
    return padded


def reading_compact_layers(kernel, varlen: bool = False):
    """``kernel`` (transformers' sdpa or flash-attention), except over a packed compact layer, which it reads with
    :meth:`CompactLayer.attend`, or, with ``varlen`` (``kernel`` is flash-attention's entry), forwards of several
    tokens with the kernel's varlen path (:meth:`CompactLayer.attend_varlen`).

    Registered in place of the kernel, so that a press needs no switch of attention implementation for it, and a
    cache compressed inside ``with press(model)`` stays compressed, and readable, after the block, as kvpress's
    physically compressed caches do (prefill under the press, then answer with the cache). The dense prefill and
    anything that is not a packed layer go to ``kernel`` unchanged.
    """

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                  dropout: float = 0.0, scaling: float | None = None, **kwargs):
        layer = getattr(key, LAYER_TAG, None)
        if layer is None or not layer.packed:
            return kernel(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        if varlen and layer.attends_varlen(query.shape[2]):
            return layer.attend_varlen(kernel, module, query, scaling), None
        return layer.attend(query, scaling)

    attention.kernel = kernel
    return attention


for _name in WRAPPED_KERNELS:
    if _name in ALL_ATTENTION_FUNCTIONS and not hasattr(ALL_ATTENTION_FUNCTIONS[_name], "kernel"):
        AttentionInterface.register(_name, reading_compact_layers(ALL_ATTENTION_FUNCTIONS[_name],
                                                                  varlen=_name.startswith("flash")))
AttentionInterface.register(COMPACT_EAGER, compact_eager_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(COMPACT_EAGER, eager_mask)


def new_layer_for(cache) -> CompactLayer:
    """A compact layer that counts its bytes in the running total of ``cache``'s compact layers."""
    tracker = getattr(cache, "kvpress_bytes", None)
    if tracker is None:
        tracker = cache.kvpress_bytes = ByteTracker()
    return CompactLayer(tracker)


def compact_layers(cache) -> list[CompactLayer]:
    """The compact layers of a cache (empty for a cache without any)."""
    return [layer for layer in getattr(cache, "layers", []) if isinstance(layer, CompactLayer)]
