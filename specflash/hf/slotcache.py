"""Per-sequence KV caches in one preallocated store, for batched steps (batchstep.py).

`SlotKVCache` holds, per decoder layer, keys and values [slots, kv_heads, capacity,
head_dim] and a committed length per slot. A sequence `acquire()`s a slot when it joins
and `release()`s it when it leaves; nothing is copied either way. Slot s holds the K/V of
its sequence's positions 0..length(s)-1 at storage columns 0..length(s)-1.

- Appending: a batched forward (`TargetModel.forward_batch`) writes each row's new K/V at
  columns length(s).. of its slot and then advances the length by the row's token count.
- Rollback is a length move (`crop`): a rejected draft's K/V stay in storage past the
  length, are never visible (a batched step's mask shows a row only the keys of its own
  slot below the committed length plus its own new keys) and are overwritten by the next
  write there.
- A draft tree's row writes its nodes at consecutive columns; `keep_path` then moves the
  accepted path's K/V to consecutive columns (as `TargetModel.keep_cache_path` does on a
  one-sequence cache) and sets the length.
- Capacity is shared by every slot and grows by the one capacity rule (cache.py's
  `grown_capacity`: doubling, one copy of the slots' committed columns when a step
  outgrows it). On the CPU the storage comes from lazily zeroed pages, so growing to a
  long prompt's capacity costs only the committed columns' copy (4096 columns for 8
  slots of SmolLM2-135M: 4.8 s with eager zero-filling on the Intel Xeon VM).

Storage is zero-initialised and only ever receives finite K/V, so masked columns (stale,
padding, other sequences') cannot turn an attention row into NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .cache import MIN_CAPACITY, grown_capacity


class NoFreeSlotError(RuntimeError):
    """Every slot of a SlotKVCache is in use."""


class SlotKVCache:
    """K/V storage for up to `max_slots` sequences (see the module docstring).

    keys[layer], values[layer]: [max_slots, kv_heads, capacity, head_dim]."""

    def __init__(self, num_layers: int, max_slots: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", capacity: int = MIN_CAPACITY, maximum: int | None = None):
        if max_slots < 1:
            raise ValueError(f"a slot cache needs at least one slot (got {max_slots})")
        self.num_layers = int(num_layers)
        self.max_slots = int(max_slots)
        self.kv_heads, self.head_dim = int(kv_heads), int(head_dim)
        self.dtype, self.device = dtype, torch.device(device)
        self.maximum = maximum
        self._lengths = [0] * self.max_slots
        self._in_use = [False] * self.max_slots
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._allocate(grown_capacity(1, capacity, maximum))
        self.grows = 0  # how many times the storage was reallocated (a measure for tests and logs)

    # ----------------------------------------------------------------- slots
    def acquire(self) -> int:
        """The lowest free slot, now in use with length 0."""
        for slot, used in enumerate(self._in_use):
            if not used:
                self._in_use[slot] = True
                self._lengths[slot] = 0
                return slot
        raise NoFreeSlotError(f"all {self.max_slots} slots of the KV cache are in use; release one first")

    def release(self, slot: int) -> None:
        """Give `slot` back (its K/V stay in storage, unreachable, until reused)."""
        self._check(slot)
        self._in_use[slot] = False
        self._lengths[slot] = 0

    def in_use(self, slot: int) -> bool:
        return 0 <= slot < self.max_slots and self._in_use[slot]

    @property
    def num_free(self) -> int:
        return self._in_use.count(False)

    @property
    def used_slots(self) -> list[int]:
        return [s for s, used in enumerate(self._in_use) if used]

    def length(self, slot: int) -> int:
        """Committed positions of `slot`."""
        self._check(slot)
        return self._lengths[slot]

    def crop(self, slot: int, length: int) -> None:
        """Roll `slot` back to its first `length` positions (a length move, no copy)."""
        self._check(slot)
        if not 0 <= length <= self._lengths[slot]:
            raise ValueError(f"cannot crop slot {slot} of length {self._lengths[slot]} to {length}")
        self._lengths[slot] = length

    def advance(self, slot: int, n: int) -> None:
        """`n` more positions of `slot` are committed (their K/V were written)."""
        self._check(slot)
        if self._lengths[slot] + n > self.capacity:
            raise ValueError(f"slot {slot} of length {self._lengths[slot]} cannot advance {n} past capacity "
                             f"{self.capacity}")
        self._lengths[slot] += n

    @torch.inference_mode()
    def keep_path(self, slot: int, start: int, path: Sequence[int] | torch.Tensor) -> None:
        """After a tree row at committed length `start`: move node path[j]'s K/V (column
        start + path[j]) to column start + j and set the length to start + len(path).
        `path` lists node indices from the root (0) upwards, each above the one before."""
        self._check(slot)
        nodes = [int(i) for i in (path.tolist() if isinstance(path, torch.Tensor) else path)]
        length = self._lengths[slot]
        if not nodes or nodes[0] != 0 or any(b <= a for a, b in zip(nodes, nodes[1:])):
            raise ValueError(f"a tree path starts at the root (0) and goes to higher node indices, not {nodes}")
        if start < 0 or start + nodes[-1] >= length:
            raise ValueError(f"path {nodes} after position {start} is not in slot {slot} of length {length}")
        moved = next((j for j, node in enumerate(nodes) if node != j), len(nodes))  # before it: in place
        keep = start + len(nodes)
        if moved < len(nodes):
            source = torch.tensor(nodes[moved:], device=self.device) + start
            for kv in self.keys + self.values:
                kv[slot, :, start + moved: keep] = kv[slot].index_select(1, source)
        self._lengths[slot] = keep

    # --------------------------------------------------------------- storage
    def reserve(self, needed: int) -> None:
        """Make columns 0..needed-1 writable in every slot (one copy when it grows)."""
        if needed > self.capacity:
            self._allocate(grown_capacity(needed, self.capacity, self.maximum))
            self.grows += 1

    def _zeros(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Zero-filled storage; on the CPU from the OS's lazily zeroed pages (numpy's calloc),
        so a large cache costs its memory (and the page faults) only where it is written,
        and growing it does not stall a step on filling gigabytes with zeros."""
        if self.device.type == "cpu":
            try:
                import numpy as np

                numpy_dtype = torch.empty(0, dtype=self.dtype).numpy().dtype
                return torch.from_numpy(np.zeros(shape, dtype=numpy_dtype))
            except (TypeError, RuntimeError):  # a dtype numpy lacks (bfloat16)
                pass
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def _allocate(self, capacity: int) -> None:
        shape = (self.max_slots, self.kv_heads, capacity, self.head_dim)
        new_k, new_v = [], []
        for layer in range(self.num_layers):
            k, v = self._zeros(shape), self._zeros(shape)
            for slot, length in enumerate(self._lengths if self.keys else ()):
                if self._in_use[slot] and length:  # only what is committed moves
                    k[slot, :, :length] = self.keys[layer][slot, :, :length]
                    v[slot, :, :length] = self.values[layer][slot, :, :length]
            new_k.append(k)
            new_v.append(v)
        self.keys, self.values = new_k, new_v
        self.capacity = capacity

    def _check(self, slot: int) -> None:
        if not (0 <= slot < self.max_slots and self._in_use[slot]):
            raise ValueError(f"slot {slot} is not in use in this cache (slots in use: {self.used_slots})")
