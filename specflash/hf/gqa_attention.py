"""Decode-step attention for grouped-query models without copying keys and values.

transformers' SDPA path repeats every cached key/value head for each query head that
shares it (`repeat_kv`) whenever an attention mask is given, as in a left-padded batch:
SmolLM2 (9 query heads, 3 KV heads) then writes and reads three copies of the whole KV
cache per layer per step. For one query token the heads sharing a KV head can instead be
stacked as query rows against that one head: q [b, kv_heads * g, 1, d] ->
[b, kv_heads, g, d]; the padding mask [b, 1, 1, kv] covers every row. Longer queries
(prefill) take transformers' own SDPA path unchanged.

`grouped_query_attention(model)` switches a loaded model to it for a `with` block.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "specflash_gqa_decode"


def gqa_decode_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0,
                         scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """query [b, hq, q, d], key/value [b, hk, kv, d] -> ([b, q, hq, d], None)."""
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads = key.shape[1]
    if q_len != 1 or q_heads == kv_heads or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    groups = q_heads // kv_heads
    # Query head h uses KV head h // groups (repeat_kv's order), so heads j*g..j*g+g-1
    # become the g query rows of KV head j.
    stacked = query.reshape(batch, kv_heads, groups, head_dim)  # [b, hk, g, d]
    mask = attention_mask[:, :, :, : key.shape[-2]] if attention_mask is not None else None
    out = F.scaled_dot_product_attention(stacked, key, value, attn_mask=mask, scale=scaling)  # [b, hk, g, d]
    return out.reshape(batch, 1, q_heads, head_dim), None


AttentionInterface.register(NAME, gqa_decode_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


@contextlib.contextmanager
def grouped_query_attention(model):
    """Run `model` (an SDPA transformers model) with the copy-free decode attention."""
    config = model.config
    previous = config._attn_implementation
    if previous != "sdpa":  # eager / flash / custom: leave the model as it is
        yield
        return
    # Set on the config directly: set_attn_implementation only accepts transformers'
    # own names and hub kernels. Every attention module reads it on each forward.
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
