"""KV caches where rollback means moving a length pointer.

`ContextKVCache` is the drafter's cache: per draft layer the keys/values of the
committed context features (after k_norm and RoPE). It only ever holds context for
positions 0..length-1; a block's own keys/values are never written into it.
Storage is preallocated and grows by doubling, so appending costs no copy of the
cached part in the common case.
"""

from __future__ import annotations

import torch


class ContextKVCache:
    """Per-layer K/V storage of shape [batch, kv_heads, capacity, head_dim]."""

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
        needed = self.length + extra
        if needed > self.capacity:
            capacity = self.capacity
            while capacity < needed:
                capacity *= 2
            self._allocate(capacity)

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new context K/V at positions length..length+n-1 of `layer` (call
        `reserve(n)` first) and return views of all cached K/V of that layer.

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

    def advance(self, n: int) -> None:
        self.length += n

    def crop(self, length: int) -> None:
        """Roll back to the first `length` positions (a pointer move, no copy)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of length {self.length} to {length}")
        self.length = length
