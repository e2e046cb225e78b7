"""One target forward over several sequences' rows: packing, masks and the K/V writer.

A batched step (`TargetModel.forward_batch`) takes `BatchRow`s, each one sequence's new
tokens after the committed positions of its slot in a `SlotKVCache` (slotcache.py):

    BatchRow(slot, ids [n], logits="all" | "last" | "none", tree=None | (depths [n], ancestor_mask [n, n]))

- a plain decoding step: n = 1; a drafted block: the anchor and k drafts, n = 1 + k;
- a prompt, or one chunk of it (chunked prefill): n = the chunk's length, logits "last"
  for the chunk that ends the prompt, "none" for the others (features are always kept);
- a draft tree (`tree`): node i at position length + depths[i], seeing its ancestors
  (ancestor_mask[i, j]: node j is node i or one of its ancestors, as `forward_tree` takes).

`PackedBatch` lays the rows out as one batch [B, L] (L = the longest row; shorter rows are
padded at the end; at least `min_positions` positions in all, which the row-invariant
forward sets to 2) with per-row RoPE positions [B, L], and builds the "may see" mask
[B, 1, L, T] over the T = max(length + n) first storage columns of each row's slot (rounded
up to a multiple of `key_multiple` within the cache's maximum; columns past a row's own are
never visible):
a real query sees its slot's committed columns (< length) and, among its own new keys,
its causal predecessors (or its ancestors); a padding query sees column 0 only (never an
empty row, which would make NaNs), and no real query sees a padding key (padding K/V are
never written). Sliding-window layers additionally apply transformers' own window test
by position. `SlotWriter` is the cache object the forward calls `update` on: it scatters
the real tokens' K/V into their slots (one indexed write per layer for K and for V) and
returns each row's slot columns 0..T-1, a view when the rows' slots are consecutive in
row order, else a gather.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .slotcache import SlotKVCache

LOGITS_MODES = ("all", "last", "none")
SEGMENT_COPIES = 32  # up to this many rows, K/V are written with one slice copy per row


@dataclass
class BatchRow:
    """One sequence's tokens in a batched step (see the module docstring).

    slot: the sequence's slot in the SlotKVCache; ids: [n] long; logits: which positions
    get logits ("all", "last", "none"); tree: None (a causal row) or (depths [n] long,
    ancestor_mask [n, n] bool) for a draft tree whose node 0 is the root."""

    slot: int
    ids: torch.Tensor
    logits: str = "all"
    tree: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[-1])


class PackedBatch:
    """The rows of one batched step laid out for one forward (shapes in the module docstring)."""

    def __init__(self, rows: Sequence[BatchRow], cache: SlotKVCache, device: torch.device,
                 min_positions: int = 1, key_multiple: int = 1):
        if not rows:
            raise ValueError("a batched step needs at least one row")
        slots = [int(row.slot) for row in rows]
        if len(set(slots)) != len(slots):
            raise ValueError(f"each slot takes at most one row per batched step (slots {slots})")
        self.rows = list(rows)
        self.slots = slots
        self.starts = [cache.length(s) for s in slots]  # committed length of each row's slot
        self.counts = [row.num_tokens for row in rows]
        for row, n in zip(rows, self.counts):
            if row.ids.dim() != 1 or n < 1:
                raise ValueError(f"a row's ids are [n] with n >= 1, not {tuple(row.ids.shape)} (slot {row.slot})")
            if row.logits not in LOGITS_MODES:
                raise ValueError(f"a row's logits are one of {LOGITS_MODES}, not {row.logits!r}")
            if row.tree is not None:
                depths, ancestors = row.tree
                if tuple(depths.shape) != (n,) or tuple(ancestors.shape) != (n, n):
                    raise ValueError(f"a tree row of {n} nodes needs depths [{n}] and ancestor_mask [{n}, {n}], "
                                     f"not {tuple(depths.shape)} and {tuple(ancestors.shape)}")
        self.cache = cache
        self.device = device
        b, length = len(rows), max(self.counts)
        while b * length < min_positions:  # e.g. never one position: a row-wise reduction over a single
            length += 1                    # row takes another kernel than over several
        self.batch, self.width = b, length
        needed = max(s + n for s, n in zip(self.starts, self.counts))
        t = -(-needed // key_multiple) * key_multiple  # T: rounded up (the row-invariant attention's key blocks)
        if cache.maximum is not None:
            t = max(needed, min(t, cache.maximum))
        self.key_length = t
        cache.reserve(self.key_length)

        ids = torch.zeros(b, length, dtype=torch.long)
        depths = torch.zeros(b, length, dtype=torch.long)  # offsets from the row's start; padding: n
        own = torch.zeros(b, length, length, dtype=torch.bool)  # [row, query, new key] visibility
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        for i, (row, n) in enumerate(zip(rows, self.counts)):
            ids[i, :n] = row.ids.detach().to("cpu", torch.long)
            if row.tree is None:
                depths[i, :n] = torch.arange(n)
                own[i, :n, :n] = causal[:n, :n]
            else:
                depths[i, :n] = row.tree[0].detach().to("cpu", torch.long)
                own[i, :n, :n] = row.tree[1].detach().to("cpu", torch.bool)
            depths[i, n:] = n
        starts = torch.tensor(self.starts, dtype=torch.long)
        counts = torch.tensor(self.counts, dtype=torch.long)
        self.ids = ids.to(device)  # [B, L]
        self.positions = (starts[:, None] + depths).to(device)  # [B, L] RoPE positions
        self.cache_position = torch.arange(length, device=device)  # [L] (the writer ignores it)
        real = torch.arange(length)[None, :] < counts[:, None]  # [B, L]
        self._real = real

        # Which (row, column) pairs are real tokens, and where their K/V go.
        row_idx, col_idx = real.nonzero(as_tuple=True)
        self._row_idx, self._col_idx = row_idx.to(device), col_idx.to(device)
        slot_t = torch.tensor(slots, dtype=torch.long)
        self._write_slots = slot_t[row_idx].to(device)
        self._write_columns = (starts[row_idx] + col_idx).to(device)
        # Per row: (row, slot, first storage column, tokens): one contiguous copy each.
        self._segments = [(i, slot, start, n)
                          for i, (slot, start, n) in enumerate(zip(slots, self.starts, self.counts))]
        s0 = slots[0]
        self._slot_range = slice(s0, s0 + b) if slots == list(range(s0, s0 + b)) else None
        self._slot_index = slot_t.to(device)

        # Visibility over storage columns 0..T-1 (without any sliding window).
        t = self.key_length
        columns = torch.arange(t)
        rel = columns[None, :] - starts[:, None]  # [B, T] column - start
        is_new = (rel >= 0) & (rel < counts[:, None])  # [B, T]
        gathered = own.gather(2, rel.clamp(0, length - 1)[:, None, :].expand(b, length, t))  # [B, L, T]
        visible = (columns[None, None, :] < starts[:, None, None]) | (gathered & is_new[:, None, :])
        visible &= real[:, :, None]
        visible[:, :, 0] |= ~real  # a padding query sees column 0 only
        self._visible = visible
        # Key positions (for sliding windows): a committed column's position is its index,
        # a new key's is start + its node depth.
        key_depth = depths.gather(1, rel.clamp(0, length - 1))  # [B, T]
        self._key_positions = torch.where(is_new, starts[:, None] + key_depth, columns[None, :].expand(b, t))
        self._query_positions = starts[:, None] + depths  # [B, L]
        self.writer = SlotWriter(self)

    def visible(self, sliding_window: int | None = None) -> torch.Tensor:
        """[B, 1, L, T] bool "may see" mask; with a sliding window, also transformers' own
        window test by position (a padding query keeps column 0 whatever the window)."""
        visible = self._visible
        if sliding_window is not None:
            from transformers.masking_utils import sliding_window_overlay

            inside = sliding_window_overlay(sliding_window)(
                0, 0, self._query_positions[:, :, None], self._key_positions[:, None, :])  # [B, L, T]
            visible = visible & inside
            visible[:, :, 0] |= ~self._real
        return visible[:, None].to(self.device)

    def commit(self) -> None:
        """Every row's K/V were written: advance each slot by its row's token count."""
        for slot, n in zip(self.slots, self.counts):
            self.cache.advance(slot, n)

    def logit_rows(self) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """(row index [N], column [N], per-row counts) of the positions that get logits."""
        rows, cols, sizes = [], [], []
        for i, (row, n) in enumerate(zip(self.rows, self.counts)):
            chosen = range(n) if row.logits == "all" else (range(n - 1, n) if row.logits == "last" else range(0))
            rows += [i] * len(chosen)
            cols += list(chosen)
            sizes.append(len(chosen))
        return (torch.tensor(rows, dtype=torch.long, device=self.device),
                torch.tensor(cols, dtype=torch.long, device=self.device), sizes)


class SlotWriter:
    """The cache a batched forward writes through (`update`, as transformers' layers and the
    lean forward call it): real tokens' K/V [B, kv_heads, L, d] go to their slots' columns,
    and each row gets its slot's columns 0..T-1 back, [B, kv_heads, T, d]."""

    is_compileable = False

    def __init__(self, batch: PackedBatch):
        self.batch = batch

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int,
               cache_kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        b, cache = self.batch, self.batch.cache
        store_k, store_v = cache.keys[layer_idx], cache.values[layer_idx]
        if len(b._segments) <= SEGMENT_COPIES:  # a few rows: one slice copy per row (no index tensors)
            for row, slot, start, n in b._segments:
                store_k[slot, :, start: start + n] = keys[row, :, :n]
                store_v[slot, :, start: start + n] = values[row, :, :n]
        else:
            store_k[b._write_slots, :, b._write_columns] = keys[b._row_idx, :, b._col_idx]
            store_v[b._write_slots, :, b._write_columns] = values[b._row_idx, :, b._col_idx]
        t = b.key_length
        if b._slot_range is not None:
            return store_k[b._slot_range, :, :t], store_v[b._slot_range, :, :t]
        return store_k[b._slot_index, :, :t], store_v[b._slot_index, :, :t]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are explicit in a batched step; nothing reads this

    def __len__(self) -> int:
        return self.batch.cache.num_layers
