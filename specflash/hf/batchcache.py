"""A transformers KV cache over preallocated storage, for batched generation.

`DynamicCache` appends with `torch.cat`, which copies every cached key and value on
every step: at batch 48 and ~500 cached tokens that is ~2 GB of memory traffic per
step on SmolLM2-135M, more than the weights themselves. `buffered_cache` returns a
`transformers.Cache` whose layers write new keys/values in place into storage with
spare room (grown by cache.py's capacity rule when full) and hand attention views of the
filled part, so a step moves only the new token's K/V. `select_rows` drops finished sequences from the batch
(one copy of the filled part), so a batch does not keep computing rows that are done.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .cache import grown_capacity


class BufferedLayer(DynamicLayer):
    """One decoder layer's K/V in storage [batch, kv_heads, capacity, head_dim]; `keys`
    and `values` are views [batch, kv_heads, length, head_dim] of the filled part."""

    def __init__(self, capacity: int = 256):
        super().__init__()
        self.capacity = max(1, int(capacity))
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.allocate(key_states, value_states, key_states.shape[0])

    def allocate(self, keys: torch.Tensor, values: torch.Tensor, batch: int) -> None:
        """Zeroed storage for `batch` rows shaped like `keys` / `values` [_, kv_heads, _, dim]
        (zeros, not garbage: left padding is masked, and masked NaNs would still poison
        an additive mask)."""
        self.dtype, self.device = keys.dtype, keys.device
        self._k = keys.new_zeros((batch, keys.shape[1], self.capacity, keys.shape[-1]))
        self._v = values.new_zeros((batch, values.shape[1], self.capacity, values.shape[-1]))
        self.is_initialized = True

    def write_row(self, row: int, end: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Put one sequence's K/V [1, kv_heads, n, head_dim] at positions end - n..end - 1
        of batch row `row` (right-aligned, as in a left-padded batch); the cache length
        becomes `end`."""
        n = keys.shape[-2]
        self._k[row, :, end - n:end] = keys[0]
        self._v[row, :, end - n:end] = values[0]
        self.length = end
        self._views()

    def _grow(self, needed: int) -> None:
        capacity = grown_capacity(needed, self.capacity)
        self._k, self._v = self._moved(self._k, capacity=capacity), self._moved(self._v, capacity=capacity)
        self.capacity = capacity

    def _moved(self, storage: torch.Tensor, rows: torch.Tensor | None = None,
               capacity: int | None = None) -> torch.Tensor:
        """New storage holding the filled part of `storage` (only `rows`, when given)."""
        batch = storage.shape[0] if rows is None else len(rows)
        out = storage.new_empty((batch, storage.shape[1], capacity or storage.shape[2], storage.shape[3]))
        filled = storage[:, :, :self.length] if rows is None else storage[rows, :, :self.length]
        out[:, :, :self.length] = filled
        return out

    def _views(self) -> None:
        self.keys = self._k[:, :, :self.length]
        self.values = self._v[:, :, :self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
               cache_kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """key_states, value_states [batch, kv_heads, n, head_dim] -> all cached K/V."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            self._grow(end)
        self._k[:, :, self.length:end] = key_states
        self._v[:, :, self.length:end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, max_length: int) -> None:
        if max_length < 0:
            max_length = self.length + max_length
        if self.is_initialized and max_length < self.length:
            self.length = max(0, max_length)
            self._views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        self._k, self._v = self._moved(self._k, rows=indices), self._moved(self._v, rows=indices)
        self._views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("BufferedLayer does not repeat rows")


def buffered_cache(num_layers: int, capacity: int) -> Cache:
    """A `transformers.Cache` of `num_layers` preallocated layers with room for `capacity`
    positions each (more doubles the storage)."""
    return Cache(layers=[BufferedLayer(capacity) for _ in range(num_layers)])


def prefill_rows(cache: Cache, row: int, end: int, source: Cache, batch: int) -> None:
    """Copy a one-sequence cache `source` into batch row `row` of `cache`, right-aligned at
    `end` (storage for `batch` rows is allocated on first use)."""
    for layer, src in zip(cache.layers, source.layers):
        if not layer.is_initialized:
            layer.allocate(src.keys, src.values, batch)
        layer.write_row(row, end, src.keys, src.values)


def select_rows(cache: Cache, indices: torch.Tensor) -> None:
    """Keep only batch rows `indices` of every layer (in that order)."""
    for layer in cache.layers:
        layer.batch_select_indices(indices)
