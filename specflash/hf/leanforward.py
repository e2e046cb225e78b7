"""A lean forward for Llama-style targets: transformers' own operations, in the same
order, with less framework between them.

A one-token decode step of SmolLM2-135M spends a large share of its time outside the
matrix products, in the per-op and per-call machinery of transformers' forward (output
dataclasses, keyword plumbing, decorators, per-layer hooks and mask/attention dispatch).
For the calls speculative decoding makes - one sequence or an unpadded batch, positions
implied by the KV cache - `LeanForward` runs each decoder layer itself: the same modules
(norms, projections, MLP, called as modules so the kernel choice of kernels.py applies),
the model's own rotary embedding, causal-mask builder, `apply_rotary_pos_emb` and
attention function, with the same arguments. So its logits are *bit-identical* to
transformers' forward, and `TargetModel` proves that on the loaded model before using it
(a prefill, a one-token step and a two-token block against transformers' forward, tapped
features included); anything that differs (another transformers release, an unusual
config) leaves the target on transformers' forward.

Families: decoder layers of Llama, Qwen2 and Qwen3 (optional per-head q/k norm) with full
attention in every layer. Others (Gemma's extra norms and soft-capping, sliding-window
layers) keep transformers' forward. `SPECFLASH_FORWARD=transformers` turns the lean
forward off (for A/B measurements).

`LeanForward.masked` runs the same layers under explicit RoPE positions and an explicit
4-D mask (a draft tree's one verify forward, target.py's `forward_tree`);
`attention_mask_form` turns a bool "may see" mask into what an attention implementation
adds or selects with, for that and for the transformers forward alike. `masked_hidden` is
`masked` without the LM head, for a batched step that needs logits at only some positions
(target.py's `forward_batch`).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

import torch


def decoder_of(model: torch.nn.Module) -> torch.nn.Module | None:
    """The decoder stack (embeddings, layers, final norm) of a causal LM."""
    return model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)


SUPPORTED_LAYERS = {  # decoder layer: (attention, MLP)
    "LlamaDecoderLayer": ("LlamaAttention", "LlamaMLP"),
    "Qwen2DecoderLayer": ("Qwen2Attention", "Qwen2MLP"),
    "Qwen3DecoderLayer": ("Qwen3Attention", "Qwen3MLP"),
}


def attention_mask_form(visible: torch.Tensor, implementation: str | None, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask [b, 1, q, kv] (True: the query may see the key) in the form the attention
    implementation takes an explicit 4-D mask: the bool mask itself where transformers builds
    SDPA masks (sdpa and implementations registered with its mask builder), an additive
    float mask (0 / finfo(dtype).min) where it builds eager ones. Others (flash, flex) take
    no dense mask: a ValueError."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask

    builder = ALL_MASK_ATTENTION_FUNCTIONS.get(implementation or "sdpa")
    if builder is sdpa_mask:
        return visible
    if builder is eager_mask:
        mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
        return mask.masked_fill(~visible, torch.finfo(dtype).min)
    raise ValueError(f"an explicit attention mask needs sdpa or eager attention, not {implementation}; "
                     "load the target with attn_implementation='sdpa'")


def lean_forward_allowed() -> bool:
    return os.environ.get("SPECFLASH_FORWARD", "").lower() not in ("transformers", "hf", "stock")


class LeanForward:
    """Decoder forward of a supported causal LM, without transformers' per-layer machinery."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.decoder = decoder_of(model)
        self.config = self.decoder.config
        attn = self.decoder.layers[0].self_attn
        from transformers.masking_utils import create_causal_mask
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        family = sys.modules[type(attn).__module__]
        self._create_causal_mask = create_causal_mask
        self._rotary: Callable = family.apply_rotary_pos_emb
        self._attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, family.eager_attention_forward)
        self.attention_implementation: str | None = self.config._attn_implementation  # what _attention is

    @staticmethod
    def supports(model: torch.nn.Module) -> str | None:
        """None if the model's layout is one this forward reproduces, else why not."""
        decoder = decoder_of(model)
        layers = getattr(decoder, "layers", None)
        if decoder is None or layers is None or len(layers) == 0:
            return "no decoder layers found"
        for name in ("embed_tokens", "rotary_emb", "norm"):
            if not hasattr(decoder, name):
                return f"the decoder has no {name}"
        if not hasattr(model, "lm_head"):
            return "the model has no lm_head"
        for layer in layers:
            parts = SUPPORTED_LAYERS.get(type(layer).__name__)
            if parts is None or (type(layer.self_attn).__name__, type(layer.mlp).__name__) != parts:
                return f"{type(layer).__name__} is not a supported decoder layer"
            hooked = [m for m in layer.modules() if m is not layer and (m._forward_hooks or m._forward_pre_hooks)]
            if hooked:
                return f"forward hooks on {type(hooked[0]).__name__} (the lean forward does not run them)"
        config = decoder.config
        if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or ())):
            return "sliding-window layers"
        if getattr(decoder, "has_sliding_layers", False) or getattr(config, "final_logit_softcapping", None):
            return "sliding-window layers or logit soft-capping"
        if any(getattr(m, "_hf_hook", None) is not None for m in model.modules()):
            return "accelerate hooks (offloaded or dispatched weights)"
        if model.training:
            return "the model is in training mode"
        return None

    def __call__(self, ids: torch.Tensor, cache, logits_to_keep: int = 0,
                 taps: tuple[int, ...] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """ids [b, n] after the cache's positions -> logits [b, n or logits_to_keep, V] and
        {layer id: output [b, n, H]} of the tapped layers."""
        decoder = self.decoder
        hidden = decoder.embed_tokens(ids)  # [b, n, H]
        past = cache.get_seq_length() if cache is not None else 0
        n = ids.shape[1]
        cache_position = torch.arange(past, past + n, device=hidden.device)
        position_ids = cache_position.unsqueeze(0)
        mask = self._create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=None,
                                        cache_position=cache_position, past_key_values=cache,
                                        position_ids=position_ids)
        return self._layers_and_head(hidden, mask, position_ids, cache_position, cache, logits_to_keep, taps)

    def fixed_shape(self, ids: torch.Tensor, positions: torch.Tensor, cache, key_positions: torch.Tensor,
                    logits_to_keep: int = 0,
                    taps: tuple[int, ...] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The forward over a static KV cache (staticsteps.py): ids [1, n] at `positions` [n]
        (a device tensor, so the call has the same shapes whatever the positions); the cache's
        `update` writes K/V at those positions and returns its whole buffers, whose slots
        `key_positions` [capacity] number. A key is visible iff its position <= the query's,
        so stale entries past the committed length are never read. Pure tensor work: no host
        sync, no data-dependent Python, hence capturable as a CUDA graph."""
        decoder = self.decoder
        hidden = decoder.embed_tokens(ids)  # [1, n, H]
        visible = (key_positions[None, :] <= positions[:, None])[None, None]  # [1, 1, n, capacity]
        if self.config._attn_implementation == "sdpa":
            mask = visible
        else:  # eager attention adds its mask
            mask = torch.zeros(visible.shape, dtype=hidden.dtype, device=hidden.device)
            mask = mask.masked_fill(~visible, torch.finfo(hidden.dtype).min)
        return self._layers_and_head(hidden, mask, positions[None], positions, cache, logits_to_keep, taps)

    def masked(self, ids: torch.Tensor, position_ids: torch.Tensor, cache_position: torch.Tensor, mask: torch.Tensor,
               cache, logits_to_keep: int = 0,
               taps: tuple[int, ...] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """ids [b, n] with explicit RoPE positions `position_ids` [b, n] under an explicit 4-D
        `mask` [b, 1, n, kv] in `attention_mask_form` for `attention_implementation`, over
        the keys the cache's `update` returns; `cache_position` [n] says where the cache
        writes the new K/V (a DynamicCache appends whatever it says, a static one writes
        those slots). Same outputs as `__call__`."""
        hidden = self.decoder.embed_tokens(ids)  # [b, n, H]
        return self._layers_and_head(hidden, mask, position_ids, cache_position, cache, logits_to_keep, taps)

    def masked_hidden(self, ids: torch.Tensor, position_ids: torch.Tensor, cache_position: torch.Tensor,
                      mask: torch.Tensor, cache, taps: tuple[int, ...] = (),
                      attention: Callable | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """`masked` without the LM head: -> the final-norm hidden states [b, n, H] and the
        tapped layers' outputs, for a caller that needs logits at only some positions (a
        batched step's padded rows and prompt chunks, batchstep.py). `attention`, if given,
        replaces the attention function (same arguments and result)."""
        decoder = self.decoder
        hidden = decoder.embed_tokens(ids)  # [b, n, H]
        cos, sin = decoder.rotary_emb(hidden, position_ids)
        cache_kwargs = {"sin": sin, "cos": cos, "cache_position": cache_position}
        captured: dict[int, torch.Tensor] = {}
        tapped = set(taps)
        for index, layer in enumerate(decoder.layers[: self.config.num_hidden_layers]):
            hidden = self._layer(layer, hidden, mask, cos, sin, cache, cache_kwargs, position_ids, attention)
            if index in tapped:
                captured[index] = hidden
        return decoder.norm(hidden), captured

    def _layers_and_head(self, hidden, mask, position_ids, cache_position, cache, logits_to_keep,
                         taps) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        decoder = self.decoder
        cos, sin = decoder.rotary_emb(hidden, position_ids)
        cache_kwargs = {"sin": sin, "cos": cos, "cache_position": cache_position}
        captured: dict[int, torch.Tensor] = {}
        tapped = set(taps)
        for index, layer in enumerate(decoder.layers[: self.config.num_hidden_layers]):
            hidden = self._layer(layer, hidden, mask, cos, sin, cache, cache_kwargs, position_ids)
            if index in tapped:
                captured[index] = hidden
        hidden = decoder.norm(hidden)
        keep = slice(-logits_to_keep, None)
        return self.model.lm_head(hidden[:, keep, :]), captured

    def _layer(self, layer, hidden, mask, cos, sin, cache, cache_kwargs, position_ids,
               attention: Callable | None = None) -> torch.Tensor:
        # Submodules are entered through `.forward` (no hook dispatch: `supports` refuses
        # models with hooks), which still takes kernels.py's per-instance kernel choice.
        attn, mlp = layer.self_attn, layer.mlp
        residual = hidden
        x = layer.input_layernorm.forward(hidden)
        shape = (*x.shape[:-1], -1, attn.head_dim)
        q = attn.q_proj.forward(x).view(shape)  # [b, n, heads, d]
        k = attn.k_proj.forward(x).view(shape)  # [b, n, kv_heads, d]
        q_norm = getattr(attn, "q_norm", None)
        if q_norm is not None:
            q, k = q_norm.forward(q), attn.k_norm.forward(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = attn.v_proj.forward(x).view(shape).transpose(1, 2)  # [b, kv_heads, n, d]
        q, k = self._rotary(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, attn.layer_idx, cache_kwargs)
        extra: dict[str, Any] = {"position_ids": position_ids, "use_cache": cache is not None}
        if hasattr(attn, "sliding_window"):
            extra["sliding_window"] = attn.sliding_window
        out, _ = (attention or self._attention)(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling, **extra)
        out = out.reshape(*x.shape[:-1], -1).contiguous()
        hidden = residual + attn.o_proj.forward(out)
        residual = hidden
        x = layer.post_attention_layernorm.forward(hidden)
        x = mlp.down_proj.forward(mlp.act_fn(mlp.gate_proj.forward(x)) * mlp.up_proj.forward(x))
        return residual + x
