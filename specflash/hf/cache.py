"""KV caches where rollback means moving a length pointer: the capacity rule every cache
grows by, the interface the drafter's forward runs over, and its dynamic implementation.

`grown_capacity` is the one capacity rule: storage is preallocated and doubles when a
cache outgrows it (the drafter's context caches, the target's static slots, the batched
cache of batchcache.py), so appending costs no copy of the cached part in the common case.

`ContextCache` is what `DFlashDrafter.forward` needs of a context cache: per draft layer
the keys/values of the committed context features (after k_norm and RoPE), only ever for
positions before the block being drafted; a block's own keys/values are never written.
`ContextKVCache` (here) holds exactly positions 0..length-1; the static context of
staticsteps.py holds a fixed-size buffer whose entries from the block's first position on
are stale or padding, which its `context_mask` hides. The drafter's dynamic and fixed-shape
(CUDA-graph) steps run the same forward over either.
"""

from __future__ import annotations

from typing import Protocol

import torch

MIN_CAPACITY = 256


def grown_capacity(needed: int, capacity: int = MIN_CAPACITY, maximum: int | None = None) -> int:
    """The capacity that holds `needed` positions: `capacity` itself when it does, else
    `capacity` doubled until it does; capped at `maximum` (a ValueError when `needed`
    exceeds it)."""
    if maximum is not None and needed > maximum:
        raise ValueError(f"{needed} positions do not fit a context of {maximum}")
    capacity = max(1, int(capacity))
    while capacity < needed:
        capacity *= 2
    return capacity if maximum is None else min(capacity, maximum)


class ContextCache(Protocol):
    """A drafter's context K/V, per draft layer, as its forward reads and writes them."""

    def reserve(self, extra: int) -> None:
        """Make room for `extra` more context positions."""

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor,
              positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new context K/V [b, kv_heads, c, d] at `positions` [c] of `layer`; -> all
        the K/V the block may attend to there, [b, kv_heads, n, d]."""

    def view(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The K/V [b, kv_heads, n, d] of `layer` when no new context is written."""

    def key_positions(self, num_keys: int) -> torch.Tensor:
        """Positions [n] of the n keys `write` / `view` return."""

    def context_mask(self, block_positions: torch.Tensor, num_keys: int) -> torch.Tensor | None:
        """Which of those keys a block at `block_positions` [q] may see, [q, n] bool; None:
        all of them."""

    def advance(self, n: int) -> None:
        """`n` more positions are committed (after every layer was written)."""


class ContextKVCache:
    """The dynamic `ContextCache`: per-layer K/V storage [batch, kv_heads, capacity, head_dim]
    holding positions 0..length-1."""

    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, capacity: int = 256):
        self.num_layers = num_layers
        self._shape = (batch, kv_heads, head_dim)
        self.dtype = dtype
        self.device = torch.device(device)
        self.length = 0
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self._allocate(capacity)

    def _allocate(self, capacity: int) -> None:
        batch, kv_heads, head_dim = self._shape
        new_k, new_v = [], []
        for layer in range(self.num_layers):
            k = torch.zeros(batch, kv_heads, capacity, head_dim, dtype=self.dtype, device=self.device)
            v = torch.zeros_like(k)
            if self._keys:
                k[:, :, : self.length] = self._keys[layer][:, :, : self.length]
                v[:, :, : self.length] = self._values[layer][:, :, : self.length]
            new_k.append(k)
            new_v.append(v)
        self._keys, self._values = new_k, new_v
        self.capacity = capacity

    def reserve(self, extra: int) -> None:
        """Make room for `extra` more positions."""
        capacity = grown_capacity(self.length + extra, self.capacity)
        if capacity != self.capacity:
            self._allocate(capacity)

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor,
              positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new context K/V at positions length..length+n-1 of `layer` (call
        `reserve(n)` first; `positions`, when given, must be those) and return views of all
        cached K/V of that layer.

        keys, values: [batch, kv_heads, n, head_dim] -> views [batch, kv_heads, length + n, head_dim]
        The shared length moves only in `advance`, once every layer has been written.
        """
        n = keys.shape[2]
        end = self.length + n
        self._keys[layer][:, :, self.length:end] = keys
        self._values[layer][:, :, self.length:end] = values
        return self._keys[layer][:, :, :end], self._values[layer][:, :, :end]

    def view(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._keys[layer][:, :, : self.length], self._values[layer][:, :, : self.length]

    def key_positions(self, num_keys: int) -> torch.Tensor:
        return torch.arange(num_keys, device=self.device)  # [n]: the cache holds positions 0..n-1

    def context_mask(self, block_positions: torch.Tensor, num_keys: int) -> None:
        return None  # every cached position precedes the block

    def advance(self, n: int) -> None:
        self.length += n

    def crop(self, length: int) -> None:
        """Roll back to the first `length` positions (a pointer move, no copy)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of length {self.length} to {length}")
        self.length = length
