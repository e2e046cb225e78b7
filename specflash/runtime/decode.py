"""The speculative decoding loop: prefill, propose, verify, accept, commit.

`SpeculativeDecoder.steps` is a generator of `Step`s (the first step holds the token
chosen from the prefill; each later step is one verify forward of the target);
`SpeculativeDecoder.generate` drains it into a `GenerationResult`. The loop works on
token ids only; text lives in `pipeline.py`. It does not know how proposals are made
(see `proposers/`) nor how acceptance is decided (see `acceptance.py`).

Invariants after every step: the target's KV cache holds exactly the prompt and the
committed output except its last token (the anchor, at position `start`); the
proposer has been told every committed token with its tapped features.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import ContextLengthError, InputError
from ..hf.target import TargetModel
from .acceptance import accept_block
from .blockpolicy import FixedBlock
from .config import DecodeConfig
from .metrics import SpecStats
from .proposers.base import Proposer
from .sampling import Sampler
from .treedecode import TreeStepper, VerifyResult
from .treepolicy import is_tree_policy


@dataclass
class Step:
    """What one step added to the output."""

    tokens: list[int]  # new output tokens (after stop / length truncation)
    num_drafted: int  # draft tokens verified in this step (0: prefill or plain step)
    num_accepted: int  # of which accepted
    finish_reason: str | None = None  # "stop", "length" or None while running


@dataclass
class GenerationResult:
    """The documented result of one generation.

    token_ids: generated tokens only (a stop token, if hit, is the last one);
    text: their decoded text (None when generated from ids without a tokenizer);
    finish_reason: "stop" (a stop token), "length" (max_new_tokens or the context limit);
    stats: acceptance and timing figures, see `metrics.SpecStats`.
    """

    prompt_ids: list[int]
    token_ids: list[int]
    finish_reason: str
    stats: SpecStats
    text: str | None = None
    steps: list[Step] = field(default_factory=list, repr=False)

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)

    def to_dict(self) -> dict:
        stats = self.stats.to_dict()
        return {
            "text": self.text,
            "token_ids": list(self.token_ids),
            "num_prompt_tokens": len(self.prompt_ids),
            "num_new_tokens": self.num_new_tokens,
            "finish_reason": self.finish_reason,
            "tau": stats["tau"],
            "acceptance_lengths": stats["acceptance_lengths"],
            "acceptance_histogram": stats["acceptance_histogram"],
            "drafted_per_position": stats["drafted_per_position"],
            "accepted_per_position": stats["accepted_per_position"],
            "tokens_per_s": stats["tokens_per_s"],
            "time_to_first_token_s": stats["time_to_first_token_s"],
            "tpot_s": stats["tpot_s"],
            "decode_time_s": stats["decode_time_s"],
        }


def _truncate(tokens: list[int], stop_ids: frozenset[int], room: int) -> tuple[list[int], str | None]:
    """Cut new tokens at the first stop token (kept) or at `room` tokens."""
    for i, token in enumerate(tokens[:room]):
        if token in stop_ids:
            return tokens[: i + 1], "stop"
    if len(tokens) >= room:
        return tokens[:room], "length"
    return tokens, None


class SpeculativeDecoder:
    """Runs a target with an optional proposer; block_size 1 or no proposer = plain decoding.

    block_size is the most tokens one step verifies (anchor + drafts); `policy` picks how
    many drafts each step actually verifies (`blockpolicy.FixedBlock`: all of them, the
    default; `AutoBlock`: what the cost model says pays, 0 included; a tree policy,
    `treepolicy.FixedTree` / `AutoTree`: each step verifies a draft tree, treedecode.py)."""

    def __init__(self, target: TargetModel, proposer: Proposer | None = None, block_size: int | None = None,
                 policy=None):
        if block_size is None:
            block_size = getattr(proposer, "block_size", 8) if proposer is not None else 1
        if block_size < 1:
            raise InputError(f"block size must be >= 1 (got {block_size}); use 1 for plain decoding")
        self.target = target
        self.proposer = proposer if block_size > 1 else None
        self.block_size = block_size
        self.policy = policy if policy is not None else FixedBlock()

    def _prompt_tensor(self, prompt_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(prompt_ids, dtype=torch.long).flatten().to(self.target.device)
        if ids.numel() == 0:
            raise InputError("the prompt is empty; give at least one token")
        if ids.numel() >= self.target.max_context:
            raise ContextLengthError(
                f"the prompt has {ids.numel()} tokens but the target's context is {self.target.max_context}; "
                "shorten the prompt")
        return ids

    @torch.inference_mode()
    def steps(self, prompt_ids: Sequence[int] | torch.Tensor, config: DecodeConfig,
              stats: SpecStats | None = None) -> Iterator[Step]:
        """Yield one Step per target forward until a stop token or a length limit."""
        target, proposer, policy = self.target, self.proposer, self.policy
        # Without a proposer every step is plain decoding, whatever block was asked for.
        block_size = (config.block_size or self.block_size) if proposer is not None else 1
        prompt = self._prompt_tensor(prompt_ids)
        stats = stats if stats is not None else SpecStats()
        stop_ids = frozenset(config.stop_token_ids if config.stop_token_ids is not None else target.eos_token_ids)
        sampler = Sampler.create(config.temperature, config.top_k, config.top_p, config.seed, device=target.device)
        tree = TreeStepper(target, proposer, policy) if is_tree_policy(policy) else None
        if tree is not None:
            block_size = max(block_size, 2)  # a prompt-lookup branch needs no drafter
        target.set_taps(proposer.layer_ids if proposer is not None else ())
        max_context = target.max_context

        t_start = time.perf_counter()
        room = max(block_size, policy.max_nodes + 1) if tree is not None else block_size
        cache = target.new_cache(capacity=prompt.numel() + config.max_new_tokens + room)
        out = target.forward(prompt[None], cache, logits_to_keep=1)
        anchor = int(sampler.choose(out.logits[0, -1]).item())
        if tree is not None:
            tree.reset(prompt, out.features)
        elif proposer is not None:
            proposer.reset(prompt, out.features)
        stats.time_to_first_token_s = time.perf_counter() - t_start
        t_decode = time.perf_counter()

        start = prompt.numel()  # absolute position of the anchor
        produced = 1
        stats.num_new_tokens = 1
        first, reason = _truncate([anchor], stop_ids, config.max_new_tokens)
        if reason is None and start + 1 >= max_context:
            reason = "length"
        try:
            yield Step(first, 0, 0, reason)
            while reason is None:
                remaining = config.max_new_tokens - produced
                max_depth = min(remaining - 1, max_context - 2 - start)  # drafts past it could not be kept
                if tree is not None:  # a draft tree (treedecode.py)
                    result = tree.step(anchor, start, cache, max_depth, sampler)
                else:
                    result = self._block_step(anchor, start, cache, min(block_size - 1, max_depth), sampler)
                stats.forward_time_s += result.forward_s
                a = len(result.accepted)
                stats.record_step(result.num_drafts, a, depth=result.depth)
                new_tokens, reason = _truncate(result.accepted + [result.next_token], stop_ids, remaining)
                produced += len(new_tokens)
                stats.num_new_tokens = produced
                start += a + 1
                anchor = result.next_token
                if reason is None and start + 1 >= max_context:
                    reason = "length"
                stats.decode_time_s = time.perf_counter() - t_decode
                yield Step(new_tokens, result.num_drafts, a, reason)
        finally:
            stats.decode_time_s = time.perf_counter() - t_decode

    def _block_step(self, anchor: int, start: int, cache, max_drafts: int, sampler: Sampler) -> VerifyResult:
        """One linear verify step: the policy's number of drafts (at most max_drafts), one
        target forward over [anchor, drafts], acceptance, rollback of the cache, and the
        accepted tokens' features handed to the proposer."""
        target, proposer, policy = self.target, self.proposer, self.policy
        device = target.device
        num_drafts = policy.choose(max_drafts) if proposer is not None and max_drafts > 0 else 0
        t_forwards = time.perf_counter()
        if num_drafts > 0:
            proposal = proposer.propose(anchor, start, num_drafts, sampler)
            drafts = proposal.tokens[:num_drafts].to(device)
            draft_probs = proposal.probs[: drafts.shape[0]] if proposal.probs is not None else None
        else:
            drafts, draft_probs = torch.empty(0, dtype=torch.long, device=device), None
        k = int(drafts.shape[0])
        block = torch.cat([torch.tensor([anchor], device=device), drafts])  # [k + 1]
        out = target.forward(block[None], cache)
        if device.type == "cuda":  # timing the forwards (engine efficiency): wait for their async kernels
            torch.cuda.synchronize(device)
        forward_s = time.perf_counter() - t_forwards
        logits = out.logits[0]  # [k + 1, V]
        verdict = accept_block(drafts, draft_probs, logits, sampler)
        a = verdict.num_accepted
        target.crop_cache(cache, start + a + 1)
        if proposer is not None:
            feats = out.features[:, : a + 1] if out.features is not None else None
            proposer.commit(block[: a + 1], feats)
            policy.observe(k, a)
        return VerifyResult(drafts[:a].tolist(), verdict.next_token, k, k, num_drafts > 0, forward_s)

    def generate(self, prompt_ids: Sequence[int] | torch.Tensor, config: DecodeConfig | None = None,
                 keep_steps: bool = False) -> GenerationResult:
        config = config or DecodeConfig()
        stats = SpecStats()
        tokens: list[int] = []
        steps: list[Step] = []
        reason = "length"
        for step in self.steps(prompt_ids, config, stats):
            tokens.extend(step.tokens)
            if keep_steps:
                steps.append(step)
            if step.finish_reason:
                reason = step.finish_reason
        prompt = [int(t) for t in torch.as_tensor(prompt_ids).flatten().tolist()]
        return GenerationResult(prompt, tokens, reason, stats, steps=steps)
