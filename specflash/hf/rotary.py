"""RoPE frequencies for the drafter, computed by transformers' own rotary embedding so the
drafter supports every variant transformers knows (default, linear, dynamic, yarn, llama3,
...) exactly as the engines that serve it do: the one place the drafter touches
transformers."""

from __future__ import annotations

import torch


def rope_frequencies(head_dim: int, rope_theta: float, rope_scaling: dict | None, max_position_embeddings: int,
                     hidden_size: int, num_attention_heads: int,
                     num_key_value_heads: int) -> tuple[torch.Tensor, float]:
    """-> (inverse frequencies [head_dim / 2] float32, attention scaling) of a Qwen3-style
    attention with these settings."""
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    config = Qwen3Config(hidden_size=hidden_size, num_attention_heads=num_attention_heads,
                         num_key_value_heads=num_key_value_heads, head_dim=head_dim, rope_theta=rope_theta,
                         rope_scaling=rope_scaling, max_position_embeddings=max_position_embeddings)
    reference = Qwen3RotaryEmbedding(config)
    return reference.inv_freq.detach().float().clone(), float(reference.attention_scaling)
