"""The DFlash drafter network (`DFlashDrafter`).

A stack of Qwen3-style decoder layers with no embedding and no LM head of its own:
- feature fusion: tapped target hidden states [.., K*H_t] -> fc -> hidden_norm -> c_t [.., H]
- KV injection: in every layer, c_t goes through that layer's k_proj / v_proj, k_norm
  (keys only) and RoPE at its absolute position, and serves as extra keys/values;
- the block ([anchor, MASK, ...] embedded with the target's embedding) attends to all
  context keys plus all block keys (bidirectional inside the block for
  `full_attention` layers; causal with a window for `sliding_attention` layers);
- output: final `norm`; the caller applies the target's LM head, or only its rows of
  the drafter's reduced draft vocabulary when it has one (`draft_vocab`).

Weight names match the published checkpoints (`fc.weight`, `hidden_norm.weight`,
`layers.{i}.self_attn.q_proj.weight`, ..., `norm.weight`), so z-lab drafters load here
and ours load in vLLM / SGLang / the z-lab runtime.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from ..hf.cache import ContextCache, ContextKVCache
from ..hf.rotary import rope_frequencies
from .checkpoint import CONFIG_NAME, check_weights, drafter_folder, read_weights, write_checkpoint
from .config import DrafterConfig
from .vocab import read_draft_vocab


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32 (as Qwen3 does), weight named `weight`."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [b, heads, n, d]; cos/sin: [b, n, d] -> x rotated at those positions."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


class RotaryEmbedding(nn.Module):
    """cos/sin tables for absolute positions, with the RoPE variants transformers knows
    (default, linear, dynamic, yarn, llama3, ...: hf/rotary.py). The inverse frequencies
    stay float32 whatever dtype the drafter is cast to (they are not a buffer)."""

    def __init__(self, config: DrafterConfig):
        super().__init__()
        self._inv_freq, self.attention_scaling = rope_frequencies(  # [d / 2], float
            config.head_dim, config.rope_theta, config.rope_scaling, config.max_position_embeddings,
            config.hidden_size, config.num_attention_heads, config.num_key_value_heads)

    def forward(self, like: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [b, n] -> cos, sin: [b, n, head_dim] in like.dtype."""
        if self._inv_freq.device != positions.device:
            self._inv_freq = self._inv_freq.to(positions.device)
        freqs = positions.float()[..., None] * self._inv_freq  # [b, n, d / 2]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(like.dtype), sin.to(like.dtype)


class DraftAttention(nn.Module):
    def __init__(self, config: DrafterConfig, layer_idx: int):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = d
        bias = config.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=bias)
        self.q_norm = RMSNorm(d, config.rms_norm_eps)
        self.k_norm = RMSNorm(d, config.rms_norm_eps)
        self.layer_idx = layer_idx

    def _heads(self, x: torch.Tensor, n_heads: int) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, n_heads, self.head_dim).transpose(1, 2)  # [b, heads, n, d]

    def context_kv(self, context: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused context features [b, c, H] -> keys, values [b, kv_heads, c, d] (k_norm, RoPE)."""
        k = self.k_norm(self._heads(self.k_proj(context), self.num_kv_heads))
        v = self._heads(self.v_proj(context), self.num_kv_heads)
        return apply_rope(k, cos, sin), v

    def forward(
        self,
        hidden: torch.Tensor,  # [b, q, H] block stream (after input_layernorm)
        cos_q: torch.Tensor, sin_q: torch.Tensor,  # [b, q, d]
        context_k: torch.Tensor, context_v: torch.Tensor,  # [b, kv, c, d] all visible context
        mask: torch.Tensor | None,  # [b|1, 1, q, c + q] bool, True = may attend; None = all
    ) -> torch.Tensor:
        q = apply_rope(self.q_norm(self._heads(self.q_proj(hidden), self.num_heads)), cos_q, sin_q)
        k_blk = apply_rope(self.k_norm(self._heads(self.k_proj(hidden), self.num_kv_heads)), cos_q, sin_q)
        v_blk = self._heads(self.v_proj(hidden), self.num_kv_heads)
        k = torch.cat([context_k, k_blk], dim=2)  # [b, kv, c + q, d]
        v = torch.cat([context_v, v_blk], dim=2)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=self.num_heads != self.num_kv_heads
        )  # [b, heads, q, d]
        b, _, n, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class DraftMLP(nn.Module):
    def __init__(self, config: DrafterConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftLayer(nn.Module):
    def __init__(self, config: DrafterConfig, layer_idx: int):
        super().__init__()
        self.self_attn = DraftAttention(config, layer_idx)
        self.mlp = DraftMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.layer_type = config.layer_types[layer_idx]

    def forward(self, hidden, cos_q, sin_q, context_k, context_v, mask) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos_q, sin_q, context_k, context_v, mask)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


def block_attention_mask(
    query_positions: torch.Tensor,  # [q]
    key_positions: torch.Tensor,  # [c + q]
    causal: bool,
    sliding_window: int | None,
) -> torch.Tensor | None:
    """Mask for decoding one block: keys are all context (positions < block start) plus
    the block itself. Full layers: everything visible (None). Causal layers: key
    position <= query position. Sliding layers: also query - key < window."""
    if not causal and sliding_window is None:
        return None
    qp = query_positions[:, None]
    kp = key_positions[None, :]
    visible = torch.ones(qp.shape[0], kp.shape[1], dtype=torch.bool, device=qp.device)
    if causal:
        visible &= kp <= qp
    if sliding_window is not None:
        visible &= (qp - kp) < sliding_window
        if not causal:
            visible &= (kp - qp) < sliding_window
    return visible[None, None]  # [1, 1, q, c + q]


class DFlashDrafter(nn.Module):
    """The DFlash block-diffusion drafter (no embedding, no LM head of its own)."""

    def __init__(self, config: DrafterConfig):
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.fc = nn.Linear(config.num_features * h, h, bias=False)
        self.hidden_norm = RMSNorm(h, config.rms_norm_eps)
        self.layers = nn.ModuleList(DraftLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(h, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)
        # Per-feature divisor applied before fc (training-time reparametrisation: target hidden
        # states have massive outlier dimensions). Not a weight: save_pretrained folds it into
        # fc.weight, so checkpoints keep the published format and load with scale 1.
        self.register_buffer("feature_scale", torch.ones(config.num_features * h), persistent=False)
        self.draft_vocab: torch.Tensor | None = None  # [N] sorted target ids the drafter proposes from

    def set_draft_vocab(self, ids: torch.Tensor | list[int] | None) -> "DFlashDrafter":
        """Restrict proposals to these target token ids (None: the full vocabulary)."""
        if ids is None:
            self.draft_vocab = None
            return self
        ids = torch.as_tensor(ids, dtype=torch.long).flatten().unique()  # sorted, distinct
        if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size:
            raise CheckpointError(f"draft vocabulary ids must lie in 0..{self.config.vocab_size - 1} "
                                  f"(vocab_size of config.json) and not be empty")
        self.draft_vocab = ids
        return self

    # --------------------------------------------------------------- helpers
    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def mask_token_id(self) -> int:
        return self.config.mask_token_id

    @property
    def target_layer_ids(self) -> tuple[int, ...]:
        return self.config.target_layer_ids

    def _layer_is_causal(self, layer: DraftLayer) -> bool:
        """Whether the block attends causally in this layer (sliding layers, or all with `is_causal`)."""
        if self.config.is_causal is not None:
            return bool(self.config.is_causal)
        return layer.layer_type == "sliding_attention"

    def _layer_window(self, layer: DraftLayer) -> int | None:
        """This layer's sliding window (None: full attention)."""
        return self.config.sliding_window if layer.layer_type == "sliding_attention" else None

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> "DFlashDrafter":
        """Random init: linear weights ~ N(0, std), biases 0, norms 1."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                with torch.no_grad():
                    module.weight.normal_(0.0, std, generator=generator)
                    if module.bias is not None:
                        module.bias.zero_()
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        return self

    def embed_block(self, ids: torch.Tensor, embed_rows, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Block ids [b, q] -> inputs [b, q, H]: the target's plain embedding rows
        (`embed_rows`, e.g. TargetModel.embed_raw) in `dtype` (default the drafter's), times
        input_embedding_scale."""
        embeds = embed_rows(ids).to(dtype or self.fc.weight.dtype)
        scale = self.config.input_embedding_scale
        return embeds * scale if scale != 1.0 else embeds

    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        """Concatenated target features [b, c, K*H_t] -> context features [b, c, H]."""
        return self.hidden_norm(self.fc(features / self.feature_scale))

    def published_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under the published names, with feature_scale folded into fc.weight."""
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("rotary.")}
        state["fc.weight"] = state["fc.weight"] / self.feature_scale.to(state["fc.weight"].dtype)[None, :]
        return state

    def compute_logits(self, hidden: torch.Tensor, lm_head) -> torch.Tensor:
        """Drafter output [.., H] -> logits [.., V] with the target's LM head (a callable)."""
        logits = lm_head(hidden)
        if self.config.output_multiplier != 1.0:
            logits = logits * self.config.output_multiplier
        cap = self.config.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def new_cache(self, batch: int = 1, capacity: int = 256, device=None, dtype=None) -> ContextKVCache:
        param = next(self.parameters())
        return ContextKVCache(
            self.config.num_hidden_layers, batch, self.config.num_key_value_heads, self.config.head_dim,
            dtype or param.dtype, device or param.device, capacity,
        )

    # --------------------------------------------------------------- forward
    def forward(
        self,
        block_embeds: torch.Tensor,  # [b, q, H] embedded [anchor, MASK, ...]
        block_positions: torch.Tensor,  # [b, q] absolute positions
        features: torch.Tensor | None = None,  # [b, c, K*H_t] raw concatenated target features
        feature_positions: torch.Tensor | None = None,  # [b, c]
        cache: ContextCache | None = None,
        attention_mask: torch.Tensor | None = None,  # [b|1, 1|heads, q, c + q] bool (training)
    ) -> torch.Tensor:
        """One draft forward -> hidden states [b, q, H] after the final norm.

        Decoding (cache given): the new context features are written into the cache at
        their positions (the dynamic `ContextKVCache`, or the fixed-size static context
        of the CUDA-graph steps, staticsteps.py), and the block attends to the cached
        context before it plus itself; the block's K/V are not cached. Training (no
        cache): keys are [context ; block] and `attention_mask` says who sees what.
        """
        hidden = block_embeds
        cos_q, sin_q = self.rotary(hidden, block_positions)
        context = None
        if cache is not None:
            if features is not None:  # new context into the cache first; the layers read it back
                self.extend_context(features, feature_positions, cache)
        elif features is not None and features.shape[1] > 0:
            context = self.fuse(features)  # [b, c, H]
            cos_c, sin_c = self.rotary(context, feature_positions)
        masks: dict[tuple[bool, int | None], torch.Tensor | None] = {}
        for layer in self.layers:
            attn = layer.self_attn
            if cache is not None:
                ctx_k, ctx_v = cache.view(attn.layer_idx)
            elif context is not None:
                ctx_k, ctx_v = attn.context_kv(context, cos_c, sin_c)
            else:
                b = hidden.shape[0]
                ctx_k = ctx_v = hidden.new_zeros(b, attn.num_kv_heads, 0, attn.head_dim)
            mask = attention_mask
            if mask is None:
                rule = (self._layer_is_causal(layer), self._layer_window(layer))
                if rule not in masks:
                    masks[rule] = self._block_mask(block_positions[0], ctx_k.shape[2], cache,
                                                   feature_positions if context is not None else None, *rule)
                mask = masks[rule]
            hidden = layer(hidden, cos_q, sin_q, ctx_k, ctx_v, mask)
        return self.norm(hidden)

    @property
    def blocks_see_everything(self) -> bool:
        """Whether every layer lets a block see all its context and itself (full, non-causal
        attention: the published drafters), so blocks of several sequences can share one
        forward with only their context lengths masked (`forward_blocks`)."""
        return all(not self._layer_is_causal(layer) and self._layer_window(layer) is None for layer in self.layers)

    def extend_context(self, features: torch.Tensor, feature_positions: torch.Tensor, cache: ContextCache) -> None:
        """Write context features [1, c, K*H_t] at positions [1, c] into a sequence's cache
        (dynamic or static): fused, then each layer's K/V (what `forward` does before its
        block, and `proposers.dflash.propose_batch` before the blocks of several sequences)."""
        n = features.shape[1]
        if n == 0:
            return
        context = self.fuse(features)  # [1, c, H]
        cos_c, sin_c = self.rotary(context, feature_positions)
        cache.reserve(n)
        for layer in self.layers:
            attn = layer.self_attn
            ctx_k, ctx_v = attn.context_kv(context, cos_c, sin_c)
            cache.write(attn.layer_idx, ctx_k, ctx_v, feature_positions[0])
        cache.advance(n)

    def forward_blocks(self, block_embeds: torch.Tensor, block_positions: torch.Tensor,
                       caches: list[ContextKVCache]) -> torch.Tensor:
        """Several sequences' blocks in one forward: block_embeds [B, q, H] at positions
        [B, q], sequence b attending to the context in caches[b] (its own length, the rest
        of the padded keys masked) and to its whole block -> hidden states [B, q, H] after
        the final norm. Layers must see everything (`blocks_see_everything`)."""
        if not self.blocks_see_everything:
            raise ValueError("batched blocks need full, non-causal attention in every layer")
        b, q = block_positions.shape
        lengths = torch.tensor([cache.length for cache in caches], device=block_positions.device)
        longest = int(lengths.max()) if b else 0
        keys = torch.arange(longest + q, device=block_positions.device)
        visible = (keys[None, :] < lengths[:, None]) | (keys[None, :] >= longest)  # [B, c + q]
        mask = visible[:, None, None, :].expand(b, 1, q, longest + q)  # [B, 1, q, c + q]
        hidden = block_embeds
        cos_q, sin_q = self.rotary(hidden, block_positions)
        for layer in self.layers:
            index = layer.self_attn.layer_idx
            ctx_k = hidden.new_zeros(b, layer.self_attn.num_kv_heads, longest, layer.self_attn.head_dim)
            ctx_v = torch.zeros_like(ctx_k)
            for i, cache in enumerate(caches):
                k, v = cache.view(index)  # [1, kv, length_i, d]
                ctx_k[i, :, : k.shape[2]] = k[0]
                ctx_v[i, :, : v.shape[2]] = v[0]
            hidden = layer(hidden, cos_q, sin_q, ctx_k, ctx_v, mask)
        return self.norm(hidden)

    @staticmethod
    def _block_mask(block_positions: torch.Tensor, num_keys: int, cache: ContextCache | None,
                    feature_positions: torch.Tensor | None, causal: bool,
                    sliding_window: int | None) -> torch.Tensor | None:
        """Mask [1, 1, q, n + q] of a block at `block_positions` [q] over its n context keys
        and itself: the layer's rule (`block_attention_mask`), and with a cache only the
        keys its `context_mask` lets the block see; None when everything is visible."""
        if cache is not None:
            key_positions = cache.key_positions(num_keys)  # [n]
        elif feature_positions is not None:
            key_positions = feature_positions[0]
        else:
            key_positions = block_positions[:0]
        rule = block_attention_mask(block_positions, torch.cat([key_positions, block_positions]), causal,
                                    sliding_window)
        context = cache.context_mask(block_positions, num_keys) if cache is not None else None  # [q, n]
        if context is None:
            return rule
        q = block_positions.shape[0]
        own = torch.ones(q, q, dtype=torch.bool, device=block_positions.device)
        visible = torch.cat([context, own], dim=1)  # [q, n + q]
        if rule is not None:
            visible = visible & rule[0, 0]
        return visible[None, None]

    # ------------------------------------------------------------ checkpoint
    def save_pretrained(self, folder: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
        """Write config.json + model.safetensors (default bf16) in the published layout, and
        draft_vocab.json when the drafter has a draft vocabulary."""
        return write_checkpoint(folder, self.published_state_dict(), self.config, dtype, self.draft_vocab)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu") -> "DFlashDrafter":
        """Load a drafter from a local folder or a hub id (no trust_remote_code)."""
        folder = drafter_folder(name_or_path)
        config = DrafterConfig.from_json_file(folder / CONFIG_NAME)
        state = read_weights(folder)
        model = cls(config)
        check_weights(folder, {k: v for k, v in model.state_dict().items() if not k.startswith("rotary.")}, state)
        model.load_state_dict(state, strict=False)
        model.set_draft_vocab(read_draft_vocab(folder))
        return model.to(device=device, dtype=dtype).eval()
