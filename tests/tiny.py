"""Tiny randomly initialised targets and drafters built from configs (no download)."""

from __future__ import annotations

import torch

from specflash.drafter import DrafterConfig, default_target_layer_ids
from specflash.drafter import DFlashDrafter
from specflash.hf.target import TargetModel

FAMILIES = ("llama", "qwen2", "qwen3", "gemma3")


def tiny_hf_model(family: str, vocab: int = 256, layers: int = 6, max_positions: int = 512, seed: int = 0,
                  dtype: torch.dtype = torch.float64, varied: bool = True):
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if family == "llama":
        config = tf.LlamaConfig(**common)
        cls = tf.LlamaForCausalLM
    elif family == "qwen2":
        config = tf.Qwen2Config(**common)
        cls = tf.Qwen2ForCausalLM
    elif family == "qwen3":
        config = tf.Qwen3Config(head_dim=16, **common)
        cls = tf.Qwen3ForCausalLM
    elif family == "gemma3":
        types = ["sliding_attention", "sliding_attention", "full_attention"] * (layers // 3) + \
            ["sliding_attention"] * (layers % 3)
        config = tf.Gemma3TextConfig(head_dim=16, sliding_window=8, layer_types=types, tie_word_embeddings=False,
                                     **common)
        cls = tf.Gemma3ForCausalLM
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = cls(config)
    # The default init (std 0.02) makes tiny models repeat one token forever; a wider
    # init gives varied greedy outputs, a stronger test of the decoding loop.
    with torch.no_grad():
        for name, param in (model.named_parameters() if varied else ()):
            if param.dim() == 2:
                param.normal_(0.0, 0.025 if (family == "gemma3" and "embed" in name) else 0.2)
    return model.to(dtype).eval()


def tiny_target(family: str = "llama", **kwargs) -> TargetModel:
    return TargetModel(tiny_hf_model(family, **kwargs), name=f"tiny-{family}")


_CACHED_TARGETS: dict = {}


def cached_tiny_target(family: str, forward: str, attention: str, taps: tuple[int, ...]) -> TargetModel:
    """One tiny target per (family, forward, attention), built once per test process: forward
    "lean" or "transformers" (SPECFLASH_FORWARD), "static-eager" / "static-replay" the lean
    forward with static steps (graphs off / on); attention "sdpa" or "eager"."""
    import pytest

    key = (family, forward, attention)
    if key not in _CACHED_TARGETS:
        model = tiny_hf_model(family)
        if attention != "sdpa":
            model.set_attn_implementation(attention)
        with pytest.MonkeyPatch.context() as env:
            if forward == "transformers":
                env.setenv("SPECFLASH_FORWARD", "transformers")
            target = TargetModel(model, name=f"tiny-{family}")
            assert target.forward_path == ("transformers" if forward == "transformers" else "lean")
        if forward.startswith("static"):
            target.enable_static_steps(graphs=forward == "static-replay")
        _CACHED_TARGETS[key] = target
    target = _CACHED_TARGETS[key]
    target.set_taps(taps)
    return target


def tiny_drafter(target: TargetModel, num_layers: int = 2, block_size: int = 16, num_features: int = 3,
                 seed: int = 1, layer_types: tuple[str, ...] | None = None, sliding_window: int | None = None,
                 mask_token_id: int | None = None) -> DFlashDrafter:
    cfg = target.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    config = DrafterConfig(
        hidden_size=target.hidden_size, intermediate_size=96, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, vocab_size=target.vocab_rows,
        num_target_layers=target.num_layers,
        target_layer_ids=tuple(default_target_layer_ids(target.num_layers, num_features)),
        mask_token_id=target.vocab_rows - 1 if mask_token_id is None else mask_token_id, block_size=block_size,
        layer_types=layer_types or (), sliding_window=sliding_window,
        input_embedding_scale=target.embed_scale,
    )
    generator = torch.Generator().manual_seed(seed)
    return DFlashDrafter(config).init_weights(std=0.05, generator=generator).to(target.dtype).eval()


def hf_greedy(target: TargetModel, prompt: list[int], max_new_tokens: int, eos: list[int] | None = None) -> list[int]:
    """Plain greedy decoding with Hugging Face generate (do_sample False), transformers as shipped."""
    ids = torch.tensor([prompt])
    with target.stock_kernels():
        out = target.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                    do_sample=False, eos_token_id=eos, pad_token_id=0, top_p=None, top_k=None,
                                    temperature=None)
    return out[0, len(prompt):].tolist()


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer(vocab: int = 256):
    """A byte-level BPE tokenizer trained on a few sentences, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<mask>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = ["Write a haiku about the sea. The sea is wide and blue, waves roll in.",
            "def add(a, b):\n    return a + b\n", "Hello, how are you today? I am fine, thanks."] * 20
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None)
    fast.chat_template = CHATML
    return fast


def tiny_model_folder(path, family: str = "llama", max_positions: int = 512, dtype=torch.float32,
                      varied: bool = True):
    """Save a tiny random target with a tokenizer to `path` (a local target folder).
    varied=False keeps the default init, whose greedy outputs fall into short loops (like
    small real models do): a learnable target for training tests."""
    tokenizer = tiny_tokenizer()
    model = tiny_hf_model(family, vocab=max(256, len(tokenizer)), max_positions=max_positions, dtype=dtype,
                          varied=varied)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class RandomDrafts:
    """A block policy that verifies an arbitrary number of drafts each step (0 included):
    the loop must stay lossless whatever a policy picks."""

    name = "random"

    def __init__(self, seed: int = 0):
        self._rng = torch.Generator().manual_seed(seed)

    def choose(self, max_drafts: int) -> int:
        return int(torch.randint(0, max_drafts + 1, (), generator=self._rng))

    def observe(self, num_drafted: int, num_accepted: int) -> None:
        pass


def policy_for(name: str, block_size: int):
    """fixed / auto (on a synthetic cost curve where the choice moves with acceptance) / random."""
    from specflash.runtime.blockpolicy import AutoBlock, FixedBlock
    from specflash.perf.costmodel import StepCosts

    if name == "fixed":
        return FixedBlock()
    if name == "auto":
        costs = StepCosts({1: 1.0, 4: 1.3, 16: 2.4}, draft=0.2)
        return AutoBlock(costs, max(block_size - 1, 0), probe_every=3)
    return RandomDrafts()
