"""Text in, text out: a target, its tokenizer and a proposer behind one object.

    pipe = Pipeline.load("smollm2-135m-instruct", draft="none")
    for piece in pipe.stream("Write a haiku about the sea"): print(piece, end="")
    result = pipe.generate("Write a haiku about the sea", DecodeConfig(max_new_tokens=64))

`stream` yields text deltas as blocks are accepted (holding back incomplete UTF-8);
`generate` returns a `GenerationResult` with `text` filled in.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..devices import resolve_device
from ..hf.target import TargetModel
from .config import DecodeConfig, parse_block_size, parse_tree
from .decode import GenerationResult, SpeculativeDecoder, Step
from .loading import build_proposer, choose_verify_kernels, setup_static_steps
from .metrics import SpecStats
from .proposers.base import Proposer

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


def parse_dtype(name: str | torch.dtype | None, device: str) -> torch.dtype:
    """'auto' -> float32 on CPU (bf16 matmuls are emulated there), bfloat16 on GPU."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return torch.float32 if str(device).startswith("cpu") else torch.bfloat16
    from ..errors import InputError

    if name not in _DTYPES:
        raise InputError(f"unknown dtype {name!r}; choose one of auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[name]


@dataclass
class TextDelta:
    text: str
    step: Step


class Pipeline:
    def __init__(self, target: TargetModel, proposer: Proposer | None = None, block_size: int | None = None,
                 policy=None):
        self.target = target
        self.proposer = proposer
        self.decoder = SpeculativeDecoder(target, proposer, block_size, policy)

    @classmethod
    def load(cls, target: str, draft: str | None = None, device: str = "cpu", dtype: str | None = "auto",
             block_size: int | str | None = "auto", seed: int = 0, log=None,
             static_steps: str = "auto", tree: int | str | None = "auto") -> "Pipeline":
        """draft None: the drafter shipped for `target` if there is one, else plain decoding.
        block_size: 'auto' (default: cost-aware drafts per step, see `blockpolicy`), an int
        (fixed), or None (the drafter's own block, fixed). static_steps: see
        `loading.setup_static_steps` (auto: CUDA graphs on CUDA). tree: 'auto' (default:
        a cost-aware draft tree each step, treepolicy.py: the drafter's candidates plus the
        prompt-lookup branch; linear blocks when block_size is a fixed integer), a node
        budget, or None / 'off' (linear blocks, block_size)."""
        from .blockpolicy import make_policy
        from .treepolicy import make_tree_policy

        device = str(resolve_device(device))  # a device this machine lacks: an InputError, not torch's assert
        block_size = parse_block_size(block_size)
        tree = parse_tree(tree)
        if draft is None:
            from .loading import default_draft

            draft = default_draft(target)
        target_model = TargetModel.from_pretrained(target, dtype=parse_dtype(dtype, device), device=device)
        # The set-up steps, in order, each made once here and handed on:
        setup_static_steps(target_model, static_steps, say=log)  # the target's fixed-shape steps (CUDA graphs)
        numeric = block_size if isinstance(block_size, int) else None
        proposer = build_proposer(draft, target_model, seed=seed, block_size=numeric)  # + the drafter's steps
        choose_verify_kernels(target_model, proposer, log=log)  # this machine's kernels, before any cost
        size, policy = make_policy(block_size, target_model, proposer, log=log)  # drafts per step
        tree_policy = make_tree_policy(tree, target_model, proposer, log=log, block_size=block_size)  # or trees
        if tree_policy is not None:
            policy = tree_policy
        return cls(target_model, proposer, size, policy)

    @property
    def block_size(self) -> int:
        return self.decoder.block_size

    @property
    def block_policy(self) -> str:
        """'auto' or 'fixed' (plain decoding counts as fixed); 'tree' or 'tree-auto' when it
        verifies draft trees."""
        return self.decoder.policy.name

    def encode(self, prompt: str | list[dict[str, str]], chat: bool = True) -> list[int]:
        if isinstance(prompt, list):
            return self.target.encode_messages(prompt)
        return self.target.encode_prompt(prompt, chat=chat)

    def steps(self, prompt_ids: list[int], config: DecodeConfig, stats: SpecStats) -> Iterator[Step]:
        return self.decoder.steps(prompt_ids, config, stats)

    def stream(self, prompt: str | list[dict[str, str]], config: DecodeConfig | None = None, chat: bool = True,
               stats: SpecStats | None = None) -> Iterator[TextDelta]:
        """Yield text deltas step by step (one per target forward that produced text)."""
        config = config or DecodeConfig()
        ids = self.encode(prompt, chat)
        stats = stats if stats is not None else SpecStats()
        tokens: list[int] = []
        emitted = ""
        for step in self.decoder.steps(ids, config, stats):
            tokens.extend(step.tokens)
            text = self.target.decode(tokens)
            if step.finish_reason is None and text.endswith("\ufffd"):
                continue  # an incomplete multi-byte character: wait for the rest
            delta, emitted = text[len(emitted):], text
            yield TextDelta(delta, step)

    def generate(self, prompt: str | list[dict[str, str]], config: DecodeConfig | None = None,
                 chat: bool = True, keep_steps: bool = False) -> GenerationResult:
        ids = self.encode(prompt, chat)
        result = self.decoder.generate(ids, config or DecodeConfig(), keep_steps=keep_steps)
        result.text = self.target.decode(result.token_ids)
        return result
