"""Fixed-shape decoding steps on static KV caches, replayed as CUDA graphs on a GPU.

On a GPU a verify step of a few tokens is bound by kernel launches, not arithmetic: an
8B target's eager forward launches ~15 kernels per layer from Python. The fix is the one
vLLM and SGLang use: give every step the same shapes and addresses, capture it once as a
CUDA graph, and replay it. What that takes here:

- `StaticKV`: the target's KV cache as fixed buffers [1, kv_heads, capacity, d] per layer.
  A step writes its K/V at its positions (`index_copy_`), attention reads the whole buffer
  under the mask "key position <= query position", so entries past the committed length
  (a rejected block's) are never read and rollback is a pointer move. Capacity comes in
  buckets of the one capacity rule (cache.py's `grown_capacity`: 256 doubled); a sequence
  that outgrows its bucket moves to the next one (one copy).
- `CapturedStep`: one step function over static input buffers; on CUDA captured as a
  `torch.cuda.CUDAGraph` on its first call (after two warm-up runs) and replayed after;
  elsewhere the same function runs eagerly on the same buffers (what the CPU tests check).
- `StaticTargetSteps` (the target's verify steps: one graph per block length 1..max, and
  one per node count 1..max for a draft tree's verify step, `forward_tree`) and
  `StaticDraftSteps` (the drafter's step: block and new context rows padded to the block
  size, so one graph serves every step; a longer context, e.g. the prompt's, runs eagerly).
  Both run the models' own forwards (the lean forward; `DFlashDrafter.forward` over a
  `StaticContext`), only over static buffers.
- Buffers and their graphs live in slots pooled by capacity, reused by later requests;
  a cache handle returns its slot when it is garbage collected.

Outputs are cloned out of the graph's buffers before they are handed on. The attention
over the whole bucket (masked) sums in another order than over the exact length, so the
static path is exact up to float rounding, not bit-identical to the dynamic path.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable

import torch

from .cache import MIN_CAPACITY, grown_capacity
from .leanforward import attention_mask_form

logger = logging.getLogger(__name__)


class CapturedStep:
    """`fn()` -> tensors, computed from static buffers the caller fills before `run()`.

    On CUDA with `graphs`: the first `run` warms up twice on a side stream (lazy inits,
    cuBLAS workspaces), captures a CUDA graph into the shared memory pool and replays it;
    every later `run` is one replay. The step must be idempotent for the warm-up (a step
    that writes K/V at its positions and reads them back is). Elsewhere `run` calls `fn`."""

    def __init__(self, fn: Callable[[], tuple[torch.Tensor, ...]], device: torch.device, graphs: bool,
                 pool=None):
        self.fn = fn
        self.device = device
        self.graphs = graphs and device.type == "cuda"
        self.pool = pool
        self.graph = None
        self.outputs: tuple[torch.Tensor, ...] | None = None
        self.error: str | None = None  # why the capture failed (the step then runs eagerly)

    def run(self) -> tuple[torch.Tensor, ...]:
        if not self.graphs:
            return self.fn()
        if self.graph is None:
            try:
                self._capture()
            except RuntimeError as exc:  # keep decoding, eagerly
                self.graphs = False
                self.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                logger.warning("CUDA graph capture failed (%s); running this step eagerly", self.error)
                return self.fn()
        self.graph.replay()
        return self.outputs

    def _capture(self) -> None:
        with torch.cuda.device(self.device):
            current = torch.cuda.current_stream()
            side = torch.cuda.Stream()
            side.wait_stream(current)
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.fn()
            current.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.outputs = self.fn()
        self.graph = graph


def _graph_pool(device: torch.device):
    """A memory pool shared by every graph of one device (they replay one at a time)."""
    if device.type != "cuda":
        return None
    with torch.cuda.device(device):
        return torch.cuda.graph_pool_handle()


class Slot:
    """Fixed K/V buffers of one capacity, and the steps captured over them."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype,
                 device: torch.device):
        shape = (1, kv_heads, capacity, head_dim)
        self.capacity = capacity
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.key_positions = torch.arange(capacity, device=device)  # [capacity]
        self.steps: dict = {}  # key -> CapturedStep
        self.in_use = False


class SlotPool:
    """Slots by capacity; a free one is reused (with its captured steps), else one is made."""

    def __init__(self, make: Callable[[int], Slot]):
        self._make = make
        self._slots: dict[int, list[Slot]] = {}

    def acquire(self, capacity: int) -> Slot:
        for slot in self._slots.setdefault(capacity, []):
            if not slot.in_use:
                slot.in_use = True
                return slot
        slot = self._make(capacity)
        slot.in_use = True
        self._slots[capacity].append(slot)
        return slot

    @staticmethod
    def release(slot: Slot) -> None:
        slot.in_use = False

    def clear(self) -> None:
        self._slots.clear()

    @property
    def num_slots(self) -> int:
        return sum(len(s) for s in self._slots.values())


class StaticKV:
    """A sequence's KV cache on a pooled slot; `length` committed positions.

    Speaks the part of transformers' Cache protocol the lean forward uses (`update`,
    `get_seq_length`) and `crop` (a pointer move). The slot goes back to the pool when
    this handle is garbage collected."""

    def __init__(self, pool: SlotPool, capacity: int, maximum: int):
        self._pool = pool
        self.maximum = maximum
        self.slot = pool.acquire(grown_capacity(capacity, MIN_CAPACITY, maximum))
        self._finalizer = weakref.finalize(self, SlotPool.release, self.slot)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.slot.capacity

    def reserve(self, needed: int) -> None:
        """Make positions 0..needed-1 writable, moving to a bigger slot if needed."""
        if needed <= self.slot.capacity:
            return
        old = self.slot
        new = self._pool.acquire(grown_capacity(needed, MIN_CAPACITY, self.maximum))
        for src, dst in zip(old.keys + old.values, new.keys + new.values):
            dst[:, :, : self.length] = src[:, :, : self.length]
        self._finalizer.detach()
        SlotPool.release(old)
        self.slot = new
        self._finalizer = weakref.finalize(self, SlotPool.release, new)

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int,
               cache_kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """keys, values [1, kv_heads, n, d] at cache_kwargs['cache_position'] [n] -> the
        layer's whole buffers [1, kv_heads, capacity, d]."""
        positions = cache_kwargs["cache_position"]
        k, v = self.slot.keys[layer_idx], self.slot.values[layer_idx]
        k.index_copy_(2, positions, keys)
        v.index_copy_(2, positions, values)
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def crop(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of length {self.length} to {length}")
        self.length = length


class StaticTargetSteps:
    """The target's forwards over `StaticKV` caches: a block of 1..max_graph_tokens tokens
    runs as its own captured step (one per length and set of taps), anything longer (the
    prefill) or batched runs eagerly through the same fixed-shape forward."""

    def __init__(self, lean, model_config, dtype: torch.dtype, device: torch.device, max_context: int,
                 graphs: bool = True, max_graph_tokens: int = 16):
        self.lean = lean
        self.device = device
        self.dtype = dtype
        self.max_context = max_context
        self.graphs = graphs
        self.max_graph_tokens = max_graph_tokens
        self.graph_error: str | None = None  # why graphs were turned off, if a capture failed
        self.tree_graph_error: str | None = None  # why tree steps run eagerly, if their capture failed
        self._pool_handle = _graph_pool(device) if graphs else None
        cfg = model_config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.pool = SlotPool(lambda capacity: Slot(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim,
                                                   capacity, dtype, device))

    @property
    def mode(self) -> str:
        if self.graphs and self.device.type == "cuda":
            return "cuda-graphs"
        return "static-replay" if self.graphs else "static-eager"

    def new_cache(self, capacity: int = MIN_CAPACITY) -> StaticKV:
        return StaticKV(self.pool, capacity, self.max_context)

    def forward(self, ids: torch.Tensor, cache: StaticKV, logits_to_keep: int,
                taps: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ids [1, n] after the cache's positions -> logits [1, n or logits_to_keep, V] and
        the tapped features [1, n, K*H] (None without taps)."""
        n = int(ids.shape[1])
        start = cache.length
        cache.reserve(start + n)
        if self.graphs and ids.shape[0] == 1 and n <= self.max_graph_tokens:
            logits, features = self._replay(ids, start, cache, taps)
            if logits_to_keep:
                logits = logits[:, -logits_to_keep:]
        else:
            positions = torch.arange(start, start + n, device=ids.device)
            logits, captured = self.lean.fixed_shape(ids, positions, cache, cache.slot.key_positions,
                                                     logits_to_keep, taps)
            features = torch.cat([captured[i] for i in taps], dim=-1) if taps else None
        cache.length = start + n
        return logits, features

    def _replay(self, ids: torch.Tensor, start: int, cache: StaticKV,
                taps: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        slot, n = cache.slot, int(ids.shape[1])
        key = (n, taps)
        step = slot.steps.get(key)
        if step is None:
            step = slot.steps[key] = self._make_step(slot, n, taps)
        static_ids, static_positions = step.inputs
        static_ids.copy_(ids)
        torch.add(slot.key_positions[:n], start, out=static_positions)
        outputs = step.run()
        if step.error is not None and self.graphs:  # one failed capture turns graphs off from here on
            self.graphs, self.graph_error = False, step.error
        logits = outputs[0].clone()
        features = outputs[1].clone() if taps else None
        return logits, features

    def _make_step(self, slot: Slot, n: int, taps: tuple[int, ...]) -> CapturedStep:
        static_ids = torch.zeros((1, n), dtype=torch.long, device=self.device)
        static_positions = torch.zeros(n, dtype=torch.long, device=self.device)
        lean, key_positions = self.lean, slot.key_positions
        writer = _SlotWriter(slot)  # the graph must write into this slot, whatever the handle holds later

        def fn() -> tuple[torch.Tensor, ...]:
            logits, captured = lean.fixed_shape(static_ids, static_positions, writer, key_positions, 0, taps)
            if not taps:
                return (logits,)
            return logits, torch.cat([captured[i] for i in taps], dim=-1)

        step = CapturedStep(fn, self.device, self.graphs, self._pool_handle)
        step.inputs = (static_ids, static_positions)
        return step

    def forward_tree(self, ids: torch.Tensor, cache: StaticKV, depths: torch.Tensor, ancestor_mask: torch.Tensor,
                     taps: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A draft tree's verify step (target.py's `forward_tree`): node i of ids [1, n] at
        position length + depths[i], its K/V written to slot length + i, seeing the committed
        slots and its ancestors' (ancestor_mask [n, n] bool). Trees of up to max_graph_tokens
        nodes run as one captured step per node count and set of taps (a failed capture
        leaves tree steps eager, block steps as they were). -> logits [1, n, V], features."""
        n = int(ids.shape[1])
        start = cache.length
        cache.reserve(start + n)
        slot = cache.slot
        if self.graphs and self.tree_graph_error is None and n <= self.max_graph_tokens:
            key = ("tree", n, taps)
            step = slot.steps.get(key)
            if step is None:
                step = slot.steps[key] = self._make_tree_step(slot, n, taps)
            static_ids, static_positions, static_slots, static_ancestors = step.inputs
            static_ids.copy_(ids)
            torch.add(depths, start, out=static_positions)
            torch.add(slot.key_positions[:n], start, out=static_slots)
            static_ancestors.copy_(ancestor_mask)
            outputs = step.run()
            if step.error is not None:
                self.tree_graph_error = step.error
            logits = outputs[0].clone()
            features = outputs[1].clone() if taps else None
        else:
            slots = torch.arange(start, start + n, device=ids.device)
            logits, features = self._tree_step(ids, depths + start, slots, ancestor_mask, cache, slot.key_positions,
                                               taps)
        cache.length = start + n
        return logits, features

    def _tree_step(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                   ancestor_mask: torch.Tensor, writer, key_positions: torch.Tensor,
                   taps: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pure tensor work (capturable): the committed slots (before slots[0]) and each node's
        ancestors' slots are visible, every other slot (stale or padding) is not."""
        n = ids.shape[1]
        visible = (key_positions[None, :] < slots[:1, None]).expand(n, -1).clone()  # [n, capacity]
        visible.index_copy_(1, slots, ancestor_mask)
        mask = attention_mask_form(visible[None, None], self.lean.attention_implementation, self.dtype)
        logits, captured = self.lean.masked(ids, positions[None], slots, mask, writer, 0, taps)
        return logits, (torch.cat([captured[i] for i in taps], dim=-1) if taps else None)

    def _make_tree_step(self, slot: Slot, n: int, taps: tuple[int, ...]) -> CapturedStep:
        static_ids = torch.zeros((1, n), dtype=torch.long, device=self.device)
        static_positions = torch.zeros(n, dtype=torch.long, device=self.device)
        static_slots = torch.zeros(n, dtype=torch.long, device=self.device)
        static_ancestors = torch.zeros((n, n), dtype=torch.bool, device=self.device)
        writer, key_positions = _SlotWriter(slot), slot.key_positions

        def fn() -> tuple[torch.Tensor, ...]:
            logits, features = self._tree_step(static_ids, static_positions, static_slots, static_ancestors, writer,
                                               key_positions, taps)
            return (logits,) if features is None else (logits, features)

        step = CapturedStep(fn, self.device, self.graphs, self._pool_handle)
        step.inputs = (static_ids, static_positions, static_slots, static_ancestors)
        return step


class _SlotWriter:
    """The `update` of a StaticKV bound to one slot (what a captured step writes into)."""

    def __init__(self, slot: Slot):
        self.slot = slot

    update = StaticKV.update


class StaticContext:
    """A drafter's static context slot seen through the `ContextCache` interface (cache.py),
    so the fixed-shape step runs the drafter's own forward: new context K/V are written at
    their positions (`index_copy_`), the block attends to the whole buffer, and
    `context_mask` hides the entries from the block's first position (the anchor's) on,
    stale or padding. Bound to one slot, as a captured step must be; its `reserve` and
    `advance` are no-ops (the `StaticKV` handle reserves and counts outside the step)."""

    def __init__(self, slot: Slot):
        self.slot = slot

    def reserve(self, extra: int) -> None:
        pass

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor,
              positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """keys, values [1, kv_heads, c, d] at `positions` [c] -> the layer's whole buffers
        [1, kv_heads, capacity, d]."""
        k, v = self.slot.keys[layer], self.slot.values[layer]
        k.index_copy_(2, positions, keys)
        v.index_copy_(2, positions, values)
        return k, v

    def view(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.slot.keys[layer], self.slot.values[layer]

    def key_positions(self, num_keys: int) -> torch.Tensor:
        return self.slot.key_positions  # [capacity]

    def context_mask(self, block_positions: torch.Tensor, num_keys: int) -> torch.Tensor:
        """[q, capacity]: a key is context iff its position is before the block's first."""
        q = block_positions.shape[0]
        return (self.slot.key_positions[None, :] < block_positions[:1, None]).expand(q, -1)

    def advance(self, n: int) -> None:
        pass


class StaticDraftSteps:
    """The drafter's steps over static contexts (a `StaticKV` of the drafter's layers:
    `length` fused context positions). A step with at most `block` new context
    rows and a block of exactly `block` tokens (every decoding step) pads the context rows
    to `block` (zero features at the positions from the anchor on: written, never read, and
    overwritten by the next step) and runs one captured step; others run eagerly."""

    def __init__(self, drafter, target, graphs: bool = True):
        self.drafter = drafter
        self.target = target
        self.block = drafter.block_size
        self.device = target.device
        self.graphs = graphs
        self.graph_error: str | None = None
        self._pool_handle = _graph_pool(self.device) if graphs else None
        cfg = drafter.config
        dtype = drafter.fc.weight.dtype
        self.pool = SlotPool(lambda capacity: Slot(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
                                                   capacity, dtype, self.device))

    def new_context(self, capacity: int) -> StaticKV:
        return StaticKV(self.pool, capacity, self.target.max_context + 2 * self.block)

    def forward(self, ids: torch.Tensor, position: int, features: torch.Tensor, context: StaticKV) -> torch.Tensor:
        """ids [1, q] = [anchor, MASK...] at positions position..; features [1, c, K*H_t] the
        context rows not yet fused (positions context.length..position-1). -> hidden [1, q, H]."""
        q, c = int(ids.shape[1]), int(features.shape[1])
        start = context.length
        context.reserve(max(position + q, start + self.block))
        slot = context.slot
        features = features.to(self.drafter.fc.weight.dtype)
        if self.graphs and q == self.block and c <= self.block:
            step = slot.steps.get("draft")
            if step is None:
                step = slot.steps["draft"] = self._make_step(slot)
            static_ids, static_block_pos, static_features, static_feature_pos = step.inputs
            static_ids.copy_(ids)
            torch.add(slot.key_positions[:q], position, out=static_block_pos)
            static_features[:, :c].copy_(features)
            static_features[:, c:].zero_()
            torch.add(slot.key_positions[: self.block], start, out=static_feature_pos)
            hidden = step.run()[0].clone()
            if step.error is not None and self.graphs:
                self.graphs, self.graph_error = False, step.error
        else:
            block_pos = torch.arange(position, position + q, device=self.device)[None]  # [1, q]
            feature_pos = torch.arange(start, start + c, device=self.device)[None]  # [1, c]
            embeds = self.drafter.embed_block(ids, self.target.embed_raw)  # [1, q, H]
            hidden = self.drafter(embeds, block_pos, features, feature_pos, StaticContext(slot))
        context.length = start + c
        return hidden

    def _make_step(self, slot: Slot) -> CapturedStep:
        b, device = self.block, self.device
        static_ids = torch.zeros((1, b), dtype=torch.long, device=device)
        static_block_pos = torch.zeros(b, dtype=torch.long, device=device)
        static_features = torch.zeros((1, b, self.drafter.fc.in_features), dtype=self.drafter.fc.weight.dtype,
                                      device=device)
        static_feature_pos = torch.zeros(b, dtype=torch.long, device=device)

        context = StaticContext(slot)

        def fn() -> tuple[torch.Tensor, ...]:
            embeds = self.drafter.embed_block(static_ids, self.target.embed_raw)  # [1, block, H]
            return (self.drafter(embeds, static_block_pos[None], static_features, static_feature_pos[None], context),)

        step = CapturedStep(fn, device, self.graphs, self._pool_handle)
        step.inputs = (static_ids, static_block_pos, static_features, static_feature_pos)
        return step
