"""Adapter over a Hugging Face causal LM. Together with the rest of the hf/ package it is
the only code that knows transformers' internals; the runtime, the trainer and the
benchmarks see the target through it.

`TargetModel` exposes what speculative decoding needs and nothing more:
- `embed(ids)` (with the family's embedding scaling, e.g. Gemma's sqrt(H)) and
  `embed_raw(ids)` (the plain embedding rows, what DFlash drafters are fed);
- `lm_head(hidden)` (with final logit soft-capping where the family has it);
- `forward(ids, cache)` -> logits plus the hidden states of only the tapped layers,
  captured with forward hooks on those decoder layers (never output_hidden_states).
  Unpadded forwards of Llama / Qwen2 / Qwen3 targets run `LeanForward` instead
  (leanforward.py: the same operations with less framework, checked bit-identical on the
  loaded model before first use), whose taps come straight from its layer loop.
- `forward_tree(ids, cache, depths, ancestor_mask)` verifies a draft tree in one forward
  (every node sees the cached context and its own root-to-node path, at position
  cache length + depth), and `keep_cache_path(cache, start, path)` then keeps only the
  accepted path's K/V; `tree_attention_inputs(parents)` builds depths and ancestor mask.
- `forward_batch(slot_cache, rows)` runs several sequences' rows (a decoding step, a
  drafted block, a prompt chunk, a draft tree) in one forward over per-sequence slots of a
  `SlotKVCache` from `new_slot_cache` (batchstep.py, slotcache.py).
- the shape a drafter must match (`num_attention_heads`, `head_dim`, `rope_theta`, ...) and
  the weights a drafter may start from (`decoder_layer_state(i)`, `final_norm_state()`,
  `head_weight`), under names that do not depend on the family's module layout.
Layer id i is the output of decoder layer i, i.e. Hugging Face `hidden_states[i + 1]`.

The KV cache is a transformers `DynamicCache` built without a config, so every layer
(sliding-window ones too) keeps all positions and can be cropped back after a rejected
block; the model's own masks still apply the sliding window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import CheckpointError, InputError
from ..perf.kernelchoice import STOCK, KernelChoice
from ..perf.kernels import (RowInvariance, attention_bias, attention_invariance, invariant_form,
                             row_invariant_attention, row_invariant_kernels, small_batch_linear, stock_kernels,
                             use_small_batch_kernel)
from .batchstep import BatchRow, PackedBatch
from .gqa_attention import gqa_decode_attention
from .leanforward import LeanForward, attention_mask_form, decoder_of, lean_forward_allowed
from .slotcache import SlotKVCache
from .staticsteps import StaticKV, StaticTargetSteps


@dataclass
class TargetOutput:
    logits: torch.Tensor  # [b, n_kept, V]
    features: torch.Tensor | None  # [b, n, K*H] tapped layers concatenated in tap order


KEY_BLOCK = 64  # row-invariant batched forward: keys in blocks of this many columns (64: 5% faster steps than 256)


class TargetModel:
    """Wraps a transformers causal LM (Llama, Qwen2, Qwen3, Gemma3 and alike)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any = None, name: str | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name or getattr(model.config, "_name_or_path", None) or type(model).__name__
        self.config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        decoder = decoder_of(model)
        self.layers = decoder.layers
        self._embedding = model.get_input_embeddings()
        self._head = model.get_output_embeddings()
        # Few-row verify steps on the CPU: which row counts take which linear kernel is
        # measured per machine (kernelchoice.py, applied where drafts are verified); until
        # then transformers' own kernels everywhere.
        self._decoder_linears = [m for m in decoder.modules()
                                 if isinstance(m, torch.nn.Linear) and m is not self._head]
        self._kernel_choice = STOCK
        self._taps: tuple[int, ...] = ()
        self._hooks: list[Any] = []
        self._captured: dict[int, torch.Tensor] = {}
        self._lean: LeanForward | bool | None = None  # None: not checked yet; False: not used
        self._static: StaticTargetSteps | None = None  # fixed-shape steps (enable_static_steps)
        self._row_invariant: tuple | bool | None = None  # batched steps (enable_row_invariance)

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu", **resolve_kwargs: Any) -> "TargetModel":
        """Load a registered name (see `specflash models`), a local folder or a hub id."""
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from ..models import resolve_model

        folder = resolve_model(str(name_or_path), **resolve_kwargs)
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a per-weight bar for a sub-second load is noise
        try:
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"cannot load target model from {folder}: {str(exc).splitlines()[0]}") from None
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        target = cls(model.to(device), tokenizer, name=str(name_or_path))
        target._lean_forward()  # its bit-identity check at load, not in a first request
        return target

    # ------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        return self._embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self._embedding.weight.dtype

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def vocab_rows(self) -> int:
        """Rows of the input embedding (may exceed the tokenizer's vocabulary)."""
        return int(self._embedding.weight.shape[0])

    @property
    def output_rows(self) -> int:
        """Logits per position (rows of the LM head)."""
        return int(self._head.weight.shape[0])

    @property
    def max_context(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", None) or 2048)

    @property
    def embed_scale(self) -> float:
        scale = getattr(self._embedding, "embed_scale", None)
        return float(scale) if scale is not None else 1.0

    @property
    def num_attention_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def num_key_value_heads(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.num_attention_heads)

    @property
    def head_dim(self) -> int:
        return int(getattr(self.config, "head_dim", None) or self.hidden_size // self.num_attention_heads)

    @property
    def intermediate_size(self) -> int:
        return int(self.config.intermediate_size)

    @property
    def rms_norm_eps(self) -> float:
        return float(getattr(self.config, "rms_norm_eps", 1e-6))

    @property
    def rope_theta(self) -> float:
        """The RoPE base of the full-attention layers (Gemma3 keeps one per layer type)."""
        rope = getattr(self.config, "rope_parameters", None) or {}
        if isinstance(rope, dict) and "full_attention" in rope:
            rope = rope["full_attention"]
        fallback = getattr(self.config, "rope_theta", 10000.0)
        return float(rope.get("rope_theta", fallback) if isinstance(rope, dict) else fallback)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        ids: list[int] = []
        gen = getattr(self.model, "generation_config", None)
        for source in (getattr(gen, "eos_token_id", None), getattr(self.config, "eos_token_id", None),
                       getattr(self.tokenizer, "eos_token_id", None)):
            if source is None:
                continue
            for i in (source if isinstance(source, (list, tuple)) else [source]):
                if i is not None and int(i) not in ids:
                    ids.append(int(i))
        return tuple(ids)

    # -------------------------------------------------------------- pieces
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """[b, n] ids -> [b, n, H] embeddings exactly as the first decoder layer sees them."""
        return self._embedding(ids)

    def embed_raw(self, ids: torch.Tensor) -> torch.Tensor:
        """[b, n] ids -> [b, n, H] plain embedding rows (no family scaling)."""
        return F.embedding(ids, self._embedding.weight)

    def head_rows(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The LM head's weight [N, H] (and bias [N]) rows of these token ids, for `lm_head(.., rows=)`."""
        ids = ids.to(self._head.weight.device)
        bias = self._head.bias[ids] if getattr(self._head, "bias", None) is not None else None
        return self._head.weight[ids].detach().contiguous(), bias

    @property
    def head_weight(self) -> torch.Tensor:
        """The LM head's weight [V, H] (detached: the target is never trained here)."""
        return self._head.weight.detach()

    def decoder_layer_state(self, index: int) -> dict[str, torch.Tensor]:
        """Decoder layer `index`'s weights, named relative to the layer (`self_attn.q_proj.weight`,
        `mlp.gate_proj.weight`, `input_layernorm.weight`, ...: the names a DFlash draft layer
        uses too), detached."""
        return {name: value.detach() for name, value in self.layers[index].state_dict().items()}

    def final_norm_state(self) -> dict[str, torch.Tensor]:
        """The final norm's weights (`weight`), detached."""
        return {name: value.detach() for name, value in decoder_of(self.model).norm.state_dict().items()}

    def lm_head(self, hidden: torch.Tensor,
                rows: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> torch.Tensor:
        """[.., H] final hidden states -> [.., V] logits (with soft-capping if the family has it);
        with `rows` (from `head_rows`) only those N logits, [.., N]."""
        logits = self._head(hidden) if rows is None else \
            small_batch_linear(hidden, rows[0], rows[1], self._kernel_choice.head_rows)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    @property
    def kernel_choice(self) -> KernelChoice:
        return self._kernel_choice

    def set_kernel_choice(self, choice: KernelChoice) -> None:
        """Route the LM head's and the decoder linears' few-row products as `choice` says
        (kernelchoice.py; exact either way, speed differs by machine)."""
        use_small_batch_kernel(self._head, choice.head_rows, choice.packed_rows)
        for module in self._decoder_linears:
            use_small_batch_kernel(module, choice.decoder_rows, choice.packed_rows)
        self._kernel_choice = choice

    def stock_kernels(self) -> stock_kernels:
        """Context manager: run the model exactly as transformers ships it (no kernel choice)."""
        return stock_kernels(self._head, *self._decoder_linears)  # it takes the routed ones

    # ------------------------------------------------------------------ taps
    def set_taps(self, layer_ids: tuple[int, ...] | list[int] | None) -> None:
        """Capture the outputs of these decoder layers on every forward (None: none)."""
        layer_ids = tuple(int(i) for i in (layer_ids or ()))
        bad = [i for i in layer_ids if not 0 <= i < self.num_layers]
        if bad:
            raise CheckpointError(f"target_layer_ids {bad} out of range: the target has {self.num_layers} "
                                  f"layers (valid ids 0..{self.num_layers - 1})")
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._taps = layer_ids
        for layer_id in sorted(set(layer_ids)):
            self._hooks.append(self.layers[layer_id].register_forward_hook(self._make_hook(layer_id)))

    def _make_hook(self, layer_id: int):
        def hook(_module, _args, output):
            self._captured[layer_id] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    @property
    def taps(self) -> tuple[int, ...]:
        return self._taps

    # ---------------------------------------------------------- static steps
    def enable_static_steps(self, graphs: bool = True, max_graph_tokens: int = 16) -> StaticTargetSteps:
        """From now on `new_cache` hands out static KV caches and steps of 1..max_graph_tokens
        tokens run fixed-shape, as CUDA graphs on CUDA when `graphs` (staticsteps.py).
        Needs the lean forward (Llama / Qwen2 / Qwen3 targets)."""
        lean = self._lean_forward()
        if lean is None:
            why = LeanForward.supports(self.model) if lean_forward_allowed() else "SPECFLASH_FORWARD=transformers"
            raise InputError(f"static steps / CUDA graphs need the lean forward, which this target cannot use "
                             f"({why or 'its check against transformers failed'}); run without them "
                             "(--static-steps off)")
        attention = getattr(self.config, "_attn_implementation", None) or "sdpa"
        if attention not in ("sdpa", "eager"):
            raise InputError(f"static steps / CUDA graphs attend over a masked static cache, which needs sdpa or "
                             f"eager attention, not {attention}; load the target with attn_implementation='sdpa' "
                             "or run with --static-steps off")
        self._static = StaticTargetSteps(lean, self.config, self.dtype, self.device, self.max_context,
                                         graphs=graphs, max_graph_tokens=max_graph_tokens)
        return self._static

    def disable_static_steps(self) -> None:
        self._static = None

    @property
    def static_steps(self) -> StaticTargetSteps | None:
        return self._static

    @property
    def step_mode(self) -> str:
        """How decoding steps run: 'dynamic' (a growing cache, eager), 'static-eager',
        'static-replay' (fixed-shape buffers, no graphs: the CPU stand-in) or 'cuda-graphs'."""
        return self._static.mode if self._static is not None else "dynamic"

    # --------------------------------------------------------------- forward
    def new_cache(self, capacity: int | None = None):
        """A KV cache for one sequence; `capacity` (positions it will likely need) sizes a
        static cache (it still grows if outrun), a dynamic one ignores it."""
        if self._static is not None:
            return self._static.new_cache(min(capacity or 0, self.max_context) or 1)
        return self._dynamic_cache()

    @staticmethod
    def _dynamic_cache():
        from transformers import DynamicCache

        return DynamicCache()

    @staticmethod
    def cache_length(cache) -> int:
        return int(cache.get_seq_length())

    @staticmethod
    def crop_cache(cache, length: int) -> None:
        """Drop cached positions >= length."""
        if cache.get_seq_length() > length:
            cache.crop(length)

    @property
    def forward_path(self) -> str:
        """'lean' when unpadded forwards run `LeanForward` (checked bit-identical on this
        model), else 'transformers'."""
        return "lean" if self._lean_forward() is not None else "transformers"

    def _lean_forward(self) -> LeanForward | None:
        if self._lean is None:
            self._lean = False
            if lean_forward_allowed() and LeanForward.supports(self.model) is None:
                lean = LeanForward(self.model)
                if self._lean_matches_transformers(lean):
                    self._lean = lean
        return self._lean or None

    @torch.inference_mode()
    def _lean_matches_transformers(self, lean: LeanForward) -> bool:
        """Bit-identical logits and tapped features (the current taps, else the first and
        last layer) to transformers' forward on this model: a 3-token prefill, a 1-token
        step and a 2-token block, each path on its own fresh cache."""
        saved = self._taps
        self.set_taps(saved or (0, self.num_layers - 1))
        try:
            ours, theirs = self._dynamic_cache(), self._dynamic_cache()  # what transformers' forward takes
            for feed in ([1, 2, 3], [4], [5, 6]):
                ids = (torch.tensor([feed]) % self.vocab_rows).to(self.device)
                expected, got = self._transformers_forward(ids, theirs), self._lean_output(lean, ids, ours)
                if not (torch.equal(got.logits, expected.logits) and torch.equal(got.features, expected.features)):
                    return False
            return True
        finally:
            self.set_taps(saved)

    def _lean_output(self, lean: LeanForward, ids: torch.Tensor, cache, logits_to_keep: int = 0) -> TargetOutput:
        logits, captured = lean(ids, cache, logits_to_keep, self._taps)
        features = torch.cat([captured[i] for i in self._taps], dim=-1) if self._taps else None
        return TargetOutput(logits, features)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache=None, logits_to_keep: int = 0,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> TargetOutput:
        """ids [b, n] at positions cache_length..cache_length+n-1 (or `position_ids` [b, n]).

        attention_mask [b, cache_length + n] marks padding (0) in left-padded batches.
        Returns logits [b, n or logits_to_keep, V] and the tapped features [b, n, K*H]
        (None when no layers are tapped)."""
        if isinstance(cache, StaticKV):
            if attention_mask is not None or position_ids is not None:
                raise ValueError("a static KV cache takes unpadded single sequences (no mask / position ids)")
            logits, features = self._static.forward(ids, cache, logits_to_keep, self._taps)
            return TargetOutput(logits, features)
        lean = self._lean_forward() if attention_mask is None and position_ids is None else None
        if lean is not None:
            return self._lean_output(lean, ids, cache, logits_to_keep)
        return self._transformers_forward(ids, cache, logits_to_keep, attention_mask, position_ids)

    def _transformers_forward(self, ids: torch.Tensor, cache=None, logits_to_keep: int = 0,
                              attention_mask: torch.Tensor | None = None,
                              position_ids: torch.Tensor | None = None) -> TargetOutput:
        """`forward` through the model's own forward, taps captured by the layer hooks."""
        self._captured.clear()
        try:
            out = self.model(input_ids=ids, past_key_values=cache, use_cache=cache is not None,
                             logits_to_keep=logits_to_keep, attention_mask=attention_mask,
                             position_ids=position_ids)
            features = None
            if self._taps:
                features = torch.cat([self._captured[i] for i in self._taps], dim=-1)
        finally:
            self._captured.clear()
        return TargetOutput(out.logits, features)

    def new_slot_cache(self, max_slots: int = 8, capacity: int = 256) -> SlotKVCache:
        """Per-sequence KV caches for `forward_batch`: `max_slots` slots of this target's layer
        shapes, room for `capacity` positions each (grown when a step needs more)."""
        return SlotKVCache(self.num_layers, max_slots, self.num_key_value_heads, self.head_dim, self.dtype,
                           self.device, capacity=min(capacity, self.max_context), maximum=self.max_context)

    def enable_row_invariance(self, threads: int | None = None) -> bool:
        """Make `forward_batch` give every position the same bits whatever else the forward
        computes (other rows, a wider row, padding): its linears take the first form of
        perf/kernels.py's FORMS (MKL's packed GEMM where torch has it, else x @ W^T or
        (W @ x^T)^T) over row pieces, after checking on this machine, with this model's
        weights, that a row's result does not depend on the piece size; attention is
        `row_invariant_attention` (a query's result depends only on the keys it sees) over
        keys rounded up to KEY_BLOCK columns, and a forward never has a single position (a
        reduction over one row takes another kernel). So a sequence's tokens are the same
        alone and in any batch, whatever drafts each step verifies. Lean forward only
        (Llama / Qwen2 / Qwen3). `threads`: the torch threads the batched forwards will run with
        (BLAS blockings, hence invariance, depend on it; default: this thread's). The first
        call decides. -> whether it is on."""
        if self._lean_forward() is None:
            return False
        if self._row_invariant is None:
            before = torch.get_num_threads()
            if threads:
                torch.set_num_threads(threads)
            try:
                self._row_invariant = self._check_row_invariance()
            finally:
                torch.set_num_threads(before)
        return bool(self._row_invariant)

    def _check_row_invariance(self) -> tuple | bool:
        """(linears, scores, values) RowInvariance found on this machine, or False."""
        head = self._head.weight.detach()
        weights = [m.weight.detach() for m in self._decoder_linears] + [head[: min(8192, head.shape[0])]]
        d = int(getattr(self.config, "head_dim", None) or self.hidden_size // self.config.num_attention_heads)
        linears, attention = invariant_form(weights), attention_invariance(d, KEY_BLOCK, self.dtype, self.device)
        return (linears, *attention) if linears is not None and attention is not None else False

    @property
    def row_invariance(self) -> tuple[RowInvariance, RowInvariance, RowInvariance] | None:
        """The row-invariant products chosen by `enable_row_invariance` for the linears, the
        attention scores and attention's P @ V (None: off)."""
        return self._row_invariant or None

    def describe_row_invariance(self) -> str:
        """The row-invariant products and key blocking in words ('' when off): part of the
        cache key of batched forward costs."""
        if not self._row_invariant:
            return ""
        linears, scores, values = self._row_invariant
        return (f"linears {linears.describe()}; scores {scores.describe()}; values {values.describe()}; "
                f"keys in blocks of {KEY_BLOCK}")

    @property
    def row_invariant(self) -> bool:
        """Whether `forward_batch(.., row_invariant=True)` is row-invariant here (enable_row_invariance)."""
        return bool(self._row_invariant)

    @torch.inference_mode()
    def forward_batch(self, cache: SlotKVCache, rows: Sequence[BatchRow],
                      row_invariant: bool = False) -> list[TargetOutput]:
        """Several sequences' rows in one forward (batchstep.py): row r's ids [n_r] sit after
        the committed positions of its slot (or as a draft tree over them) and see only
        that slot's keys and their own causal (or ancestor) predecessors. Each row's K/V are
        written to its slot, whose length then grows by n_r (`cache.crop` rolls back).
        -> one TargetOutput per row, in row order: logits [1, n_r, V] ("all"), [1, 1, V]
        ("last") or [1, 0, V] ("none"), features [1, n_r, K*H] (None without taps).

        Runs the lean forward (Llama / Qwen2 / Qwen3) or the model's own forward with a
        prepared 4-D mask (per layer type where sliding-window layers exist, e.g. Gemma3);
        sdpa or eager attention. Other targets raise InputError: step them one at a time.
        row_invariant: every position's bits independent of the rest of the forward, where
        `enable_row_invariance` turned it on (else ignored); a forward of one prompt chunk
        alone then runs stock kernels over exactly its own keys (bits that depend on the
        prompt alone), so put each sequence's prompt chunks in a forward of their own."""
        lean = self._lean_forward()
        invariant = row_invariant and lean is not None and bool(self._row_invariant)
        # One sequence's prompt chunk alone: stock kernels, attention over exactly its own keys
        # (contiguous): its shapes depend on the prompt alone, so its bits do too, and a long
        # prompt keeps the speed of one large product.
        solo_prefill = invariant and len(rows) == 1 and rows[0].logits != "all"
        invariant = invariant and not solo_prefill
        batch = PackedBatch(rows, cache, self.device, min_positions=2 if invariant else 1,
                            key_multiple=KEY_BLOCK if invariant else 1)
        try:
            masks = attention_mask_form(batch.visible(), lean.attention_implementation, self.dtype) \
                if lean is not None else self._batch_masks(batch)
        except ValueError as exc:  # an attention implementation that takes no dense mask
            raise InputError(f"batched step: {exc}; or step the sequences one at a time") from None
        if invariant:
            with row_invariant_kernels(self._decoder_linears, self._row_invariant[0]):
                hidden, captured = lean.masked_hidden(batch.ids, batch.positions, batch.cache_position, masks,
                                                      batch.writer, self._taps, self._row_attention(batch))
        elif lean is not None:
            attention = self._contiguous_attention(lean) if solo_prefill else \
                gqa_decode_attention if lean.attention_implementation == "sdpa" else None  # no K/V copies per head
            hidden, captured = lean.masked_hidden(batch.ids, batch.positions, batch.cache_position, masks,
                                                  batch.writer, self._taps, attention)
        else:
            hidden, captured = self._transformers_hidden(batch, masks)
        batch.commit()
        features = torch.cat([captured[i] for i in self._taps], dim=-1) if self._taps else None  # [B, L, K*H]
        row_index, column, sizes = batch.logit_rows()
        if invariant:
            with row_invariant_kernels([self._head], self._row_invariant[0]):
                logits = self.lm_head(hidden[row_index, column][None])[0]  # [N, V]
        else:
            logits = self.lm_head(hidden[row_index, column][None])[0]  # [N, V]
        outputs, offset = [], 0
        for r, (n, size) in enumerate(zip(batch.counts, sizes)):
            row_features = features[r: r + 1, :n] if features is not None else None
            outputs.append(TargetOutput(logits[offset: offset + size][None], row_features))
            offset += size
        return outputs

    @staticmethod
    def _contiguous_attention(lean: LeanForward):
        """The model's attention over contiguous copies of its operands (a kernel's path, and
        rounding, can depend on strides, and a slot's keys are a view into the cache)."""

        def attention(module, query, key, value, mask, **kwargs):
            return lean._attention(module, query.contiguous(), key.contiguous(), value.contiguous(),
                                   mask.contiguous() if mask is not None else None, **kwargs)

        return attention

    def _row_attention(self, batch: PackedBatch):
        """The attention function of a row-invariant batched forward (`row_invariant_attention`
        over the batch's own "may see" mask): a query's result depends only on the keys it
        sees, so a row gets the bits it gets alone, at any width and next to any rows."""
        visible = batch.visible()[:, 0]  # [B, L, T]
        _, scores_how, values_how = self._row_invariant
        biases: dict = {}

        def attention(module, query, key, value, mask, scaling=None, **kwargs):
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            shape = (key.shape[1], query.shape[1] // key.shape[1])
            if shape not in biases:  # once per forward
                biases[shape] = attention_bias(visible, *shape, query.dtype)
            return row_invariant_attention(query, key, value, biases[shape], scale, scores_how, values_how,
                                           KEY_BLOCK), None

        return attention

    def _batch_masks(self, batch: PackedBatch):
        """A batched step's 4-D mask as the model's own forward takes a prepared one."""
        implementation = getattr(self.config, "_attn_implementation", None)
        return self._masks_by_layer_type(
            "forward_batch", lambda sliding: attention_mask_form(batch.visible(sliding), implementation, self.dtype))

    def _transformers_hidden(self, batch: PackedBatch, masks) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The decoder stack's own forward over a packed batch (no LM head): -> final-norm
        hidden states [B, L, H] and the tapped layers' outputs (from the layer hooks)."""
        self._captured.clear()
        try:
            out = decoder_of(self.model)(input_ids=batch.ids, attention_mask=masks, position_ids=batch.positions,
                                         past_key_values=batch.writer, use_cache=True,
                                         cache_position=batch.cache_position)
            captured = dict(self._captured)
        finally:
            self._captured.clear()
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return hidden, captured

    # ----------------------------------------------------------- draft trees
    @torch.inference_mode()
    def forward_tree(self, ids: torch.Tensor, cache, depths: torch.Tensor,
                     ancestor_mask: torch.Tensor) -> TargetOutput:
        """Verify a draft tree of n nodes in one forward (batch 1).

        ids [1, n] node tokens (node 0 the root: the last committed token, not cached yet;
        every other node's parent has a smaller index); depths [n] (root 0); ancestor_mask
        [n, n] bool, [i, j]: node j is node i or one of its ancestors (`tree_attention_inputs`).
        Node i sits at position cache_length + depths[i] and sees every cached key (within
        a layer's sliding window) plus its own root-to-node path: its logits and tapped
        features are those a forward over that path after the cache would give. The n
        nodes' K/V land in the cache's next n slots; `keep_cache_path` then keeps the
        accepted path. -> logits [1, n, V], features [1, n, K*H] (None without taps)."""
        n = int(ids.shape[-1])
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise ValueError(f"forward_tree takes one sequence, ids [1, n], not {tuple(ids.shape)}")
        if tuple(depths.shape) != (n,) or tuple(ancestor_mask.shape) != (n, n):
            raise ValueError(f"a tree of {n} nodes needs depths [{n}] and ancestor_mask [{n}, {n}], not "
                             f"{tuple(depths.shape)} and {tuple(ancestor_mask.shape)}")
        depths = depths.to(device=ids.device, dtype=torch.long)
        ancestor_mask = ancestor_mask.to(device=ids.device, dtype=torch.bool)
        if isinstance(cache, StaticKV):
            logits, features = self._static.forward_tree(ids, cache, depths, ancestor_mask, self._taps)
            return TargetOutput(logits, features)
        if any(getattr(layer, "is_sliding", False) for layer in getattr(cache, "layers", ())):
            raise ValueError(_SLIDING_CACHE)
        past = self.cache_length(cache) if cache is not None else 0
        position_ids = (depths + past)[None]  # [1, n]
        lean = self._lean_forward()
        if lean is not None:
            mask = self._mask_form(_tree_visible(past, depths, ancestor_mask), lean.attention_implementation)
            cache_position = torch.arange(past, past + n, device=ids.device)
            logits, captured = lean.masked(ids, position_ids, cache_position, mask, cache, 0, self._taps)
            features = torch.cat([captured[i] for i in self._taps], dim=-1) if self._taps else None
            return TargetOutput(logits, features)
        masks = self._tree_masks(past, depths, ancestor_mask)
        return self._transformers_forward(ids, cache, attention_mask=masks, position_ids=position_ids)

    def _tree_masks(self, past: int, depths: torch.Tensor, ancestor_mask: torch.Tensor):
        """The tree's 4-D mask as the model's own forward takes a prepared one."""
        implementation = getattr(self.config, "_attn_implementation", None)
        return self._masks_by_layer_type(
            "forward_tree",
            lambda sliding: self._mask_form(_tree_visible(past, depths, ancestor_mask, sliding), implementation))

    def _masks_by_layer_type(self, caller: str, form):
        """`form(sliding_window or None)` -> a mask, as the model's own forward takes prepared
        ones: one tensor where every layer attends alike (Mistral-style configs slide in
        every layer), else {layer type: mask} (Gemma3 / Qwen2 / Qwen3 with sliding-window
        layers; the window applied by position as transformers does)."""
        config = self.config
        window = getattr(config, "sliding_window", None)
        if getattr(config, "use_bidirectional_attention", False):
            raise InputError(f"{caller} needs a causal target; this one attends bidirectionally")
        types = set(getattr(config, "layer_types", None) or ())
        if not types:
            return form(window)
        unknown = types - {"full_attention", "sliding_attention"}
        if unknown:
            raise InputError(f"{caller} does not know the attention of layer types {sorted(unknown)}; "
                             "step these sequences one at a time")
        if types == {"full_attention"}:
            return form(None)
        if window is None:
            raise InputError("the target has sliding-window layers but no sliding_window in its config")
        return {"full_attention": form(None), "sliding_attention": form(int(window))}

    def _mask_form(self, visible: torch.Tensor, implementation: str | None) -> torch.Tensor:
        try:
            return attention_mask_form(visible, implementation, self.dtype)
        except ValueError as exc:
            raise InputError(f"draft-tree verification: {exc}") from None

    @staticmethod
    def _every_position_cached(cache) -> list:
        """The cache's layers, checked to keep every position (a sliding-window cache layer
        drops old ones, which a tree's mask and `keep_cache_path` cannot address)."""
        layers = list(getattr(cache, "layers", None) or ())
        if not layers:
            raise ValueError(f"a {type(cache).__name__} has no per-layer K/V this adapter can address")
        if any(getattr(layer, "is_sliding", False) for layer in layers):
            raise ValueError(_SLIDING_CACHE)
        return layers

    @torch.inference_mode()
    def keep_cache_path(self, cache, start: int, path: Sequence[int] | torch.Tensor) -> None:
        """After `forward_tree` at cached length `start`: keep positions < start, move node
        path[j]'s K/V (slot start + path[j]) to slot start + j and drop everything from
        start + len(path), in every layer. `path` lists node indices from the root (0), each
        a child of the one before; a path 0..a is a plain crop (nothing moves)."""
        nodes = [int(i) for i in (path.tolist() if isinstance(path, torch.Tensor) else path)]
        length = self.cache_length(cache)
        if not nodes or nodes[0] != 0 or any(b <= a for a, b in zip(nodes, nodes[1:])):
            raise ValueError(f"a tree path starts at the root (0) and goes to higher node indices, not {nodes}")
        if start < 0 or start + nodes[-1] >= length:
            raise ValueError(f"path {nodes} after position {start} is not in a cache of length {length}")
        keep = start + len(nodes)
        moved = next((j for j, node in enumerate(nodes) if node != j), len(nodes))  # before it: in place
        if moved < len(nodes):
            if isinstance(cache, StaticKV):
                tensors = cache.slot.keys + cache.slot.values
            else:
                layers = self._every_position_cached(cache)
                tensors = [layer.keys for layer in layers] + [layer.values for layer in layers]
            source = torch.tensor(nodes[moved:], device=tensors[0].device) + start
            for kv in tensors:
                kv[:, :, start + moved: keep] = kv.index_select(2, source)
        self.crop_cache(cache, keep)

    # ------------------------------------------------------------ tokenizer
    def encode_prompt(self, prompt: str, chat: bool = True, system: str | None = None) -> list[int]:
        """Prompt text -> ids, through the chat template when `chat` and the tokenizer has one."""
        if not prompt or not prompt.strip():
            raise InputError("the prompt is empty; pass some text with --prompt")
        if self.tokenizer is None:
            raise InputError("this target has no tokenizer; pass token ids instead of text")
        if chat and getattr(self.tokenizer, "chat_template", None):
            messages = ([{"role": "system", "content": system}] if system else []) + \
                [{"role": "user", "content": prompt}]
            return self.encode_messages(messages)
        return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])

    def encode_messages(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                        **template_kwargs: Any) -> list[int]:
        """Chat-template ids of `messages`; with add_generation_prompt the opening of the
        assistant turn the model answers in (False: a finished conversation)."""
        if not messages:
            raise InputError("messages is empty; give at least one {'role': 'user', 'content': ...}")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                 tokenize=True, **template_kwargs)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


_SLIDING_CACHE = ("the cache drops positions outside a sliding window; use TargetModel.new_cache() "
                  "(every layer keeps every position)")


def tree_attention_inputs(parents: Sequence[int] | torch.Tensor,
                          device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A draft tree's `forward_tree` inputs from its parents: parents[i] < i for every node
    but the root (node 0, parent -1). -> depths [n] long, ancestor_mask [n, n] bool
    ([i, j]: j is i or an ancestor of i)."""
    parents = [int(p) for p in (parents.tolist() if isinstance(parents, torch.Tensor) else parents)]
    if not parents or parents[0] != -1 or any(not 0 <= p < i for i, p in enumerate(parents) if i):
        raise ValueError(f"a tree's parents are -1 for node 0 and a smaller node index for every other, not {parents}")
    n = len(parents)
    depths = [0] * n
    ancestors = torch.zeros(n, n, dtype=torch.bool)
    ancestors[0, 0] = True
    for i in range(1, n):
        depths[i] = depths[parents[i]] + 1
        ancestors[i] = ancestors[parents[i]]
        ancestors[i, i] = True
    return torch.tensor(depths, device=device), ancestors.to(device)


def _tree_visible(past: int, depths: torch.Tensor, ancestor_mask: torch.Tensor,
                  sliding_window: int | None = None) -> torch.Tensor:
    """[1, 1, n, past + n] bool: node i (at position past + depths[i]) may see every cached
    key (positions 0..past-1) and the new keys of its ancestors and itself; with a sliding
    window, only keys whose position passes transformers' own window test."""
    from transformers.masking_utils import sliding_window_overlay

    n = depths.shape[0]
    device = ancestor_mask.device
    visible = torch.cat([torch.ones(n, past, dtype=torch.bool, device=device), ancestor_mask], dim=1)
    if sliding_window is not None:
        queries = depths + past
        keys = torch.cat([torch.arange(past, device=device), queries])
        visible = visible & sliding_window_overlay(sliding_window)(0, 0, queries[:, None], keys[None, :])
    return visible[None, None]


def choose_mask_token_id(tokenizer: Any, vocab_rows: int) -> int:
    """A token id real text never uses, for a drafter's MASK embedding.

    Preference: the tokenizer's own mask token; else a padded embedding row past the
    tokenizer's vocabulary (as Qwen3's 151669); else the highest-id special token that is
    not bos/eos/pad/unk and not used by the chat template.
    """
    if tokenizer is None:
        return vocab_rows - 1
    mask_id = getattr(tokenizer, "mask_token_id", None)
    if mask_id is not None and 0 <= mask_id < vocab_rows:
        return int(mask_id)
    if len(tokenizer) < vocab_rows:
        return len(tokenizer)
    reserved = {getattr(tokenizer, name, None) for name in
                ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")}
    template = getattr(tokenizer, "chat_template", None) or ""
    candidates = []
    for token_id, token in getattr(tokenizer, "added_tokens_decoder", {}).items():
        content = getattr(token, "content", str(token))
        if token_id in reserved or content in template or not getattr(token, "special", True):
            continue
        candidates.append(int(token_id))
    if candidates:
        return max(c for c in candidates if c < vocab_rows)
    return vocab_rows - 1
