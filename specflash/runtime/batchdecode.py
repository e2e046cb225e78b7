"""Several generations decoded together: one target forward per step for all of them.

`BatchDecoder` is `SpeculativeDecoder`'s loop (decode.py) run for many sequences at once
over a `SlotKVCache` (hf/slotcache.py). Each sequence has its own slot, its own proposer
(a shallow copy of the decoder's, as the server makes per request: the drafter's weights
are shared, the per-generation state is rebuilt by `reset`), its own sampler (seed,
temperature, top-k / top-p of its `DecodeConfig`) and stop rules. Per `step()`:

  1. every sequence still prefilling contributes the next chunk of its prompt (at most
     `prefill_chunk` tokens; logits only for the chunk that ends the prompt), so a long
     prompt is spread over several steps and never stalls the others' tokens;
  2. every decoding sequence asks the batch policy how many drafts to verify (default
     `PerSequencePolicy`: its own block policy alone, `FixedBlock` unless given) and its
     proposer for them: a row of anchor + drafts;
  3. one `TargetModel.forward_batch` over all rows (two when prompt chunks are longer
     than the decode rows: decode rows first, then the chunks, so that no decode row is
     padded to a chunk's length; `split_prefill`);
  4. per row: the prefill's first token, or acceptance (`accept_block`: `greedy_accept` /
     `rejection_accept`, the same calls in the same order as the solo loop, so a seeded
     sequence draws the same random numbers), rollback of its slot to the accepted length
     (`SlotKVCache.crop`), the accepted tokens' features committed to its proposer.

Sequences join (`add`) and leave (finished, or `cancel`: the slot frees at once) between
steps. Invariants per decoding sequence, as in decode.py: its slot holds exactly the
prompt and the committed output except its last token (the anchor); its proposer has been
told every committed token with its features.

Exactness: at temperature 0 a sequence's tokens are those it gets alone when the target's
batched forward is row-invariant (`row_invariant`, on by default where the target supports
it: Llama / Qwen2 / Qwen3 on the lean forward, after a check of the kernels on this
machine): every row then gets the same bits whatever else is in the batch and however wide
its rows are padded, so the batch cannot flip an argmax. One exception, for speed: a step
whose only decode row is one sequence's (`solo_when_alone`, the default) runs that row with
the one-sequence kernels, which cost ~20% less than the row-invariant ones alone, so a
lone request decodes as fast as in the solo loop; its steps before and after others join
then take different kernels. Against the one-at-a-time `SpeculativeDecoder` (other
kernels: F.linear, one attention call for the whole block), with those lone steps, or
without row invariance, tokens agree as long as no argmax flips between forwards that
compute the same logits up to float rounding (the test suite checks 1e-9 on float64
models; benchmarks/batch_exactness.py counts flips on real prompts). With a seed, a
sampled sequence consumes its generator exactly as the solo loop does, so it gets the solo
tokens under the same proviso.

The drafter runs once per step for every drafting sequence (`propose_batch`: each block
attends to its own context, padded and masked) where the proposer allows it (DFlash on its
dynamic context cache, full-attention drafter layers); other proposers draft one sequence
at a time. Draft trees are not batched yet (`forward_batch` takes tree rows; this loop
drafts linear blocks).
"""

from __future__ import annotations

import copy
import itertools
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import ContextLengthError, InputError
from ..hf.batchstep import BatchRow
from ..hf.cache import MIN_CAPACITY
from ..hf.target import TargetModel
from .acceptance import accept_block
from .blockpolicy import FixedBlock
from .config import DecodeConfig, at_least
from .decode import GenerationResult, Step, _truncate
from .metrics import SpecStats
from .proposers.base import Proposer
from .proposers.dflash import propose_batch
from .sampling import Sampler
from .treepolicy import is_tree_policy


@dataclass
class DraftRequest:
    """A decoding sequence asking how many drafts its next row verifies (at most max_drafts)."""

    sequence: "BatchSequence"
    max_drafts: int


class PerSequencePolicy:
    """The default batch policy: each sequence's own block policy (`blockpolicy.FixedBlock`,
    `AutoBlock`, ...) chooses alone, as in a solo run. A load-aware policy implements the
    same two methods and sees every request of the step at once."""

    name = "per-sequence"

    def choose(self, requests: Sequence[DraftRequest]) -> list[int]:
        return [r.sequence.policy.choose(r.max_drafts) if r.max_drafts > 0 else 0 for r in requests]

    def observe(self, sequence: "BatchSequence", num_drafted: int, num_accepted: int) -> None:
        sequence.policy.observe(num_drafted, num_accepted)


@dataclass(eq=False)  # identity: two sequences may hold equal prompts
class BatchSequence:
    """One generation in a BatchDecoder: what it has produced so far and its state."""

    id: int
    prompt_ids: list[int]
    config: DecodeConfig
    policy: object  # its block policy (choose / observe)
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "abort" once done
    stats: SpecStats = field(default_factory=SpecStats)
    slot: int | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def prefilling(self) -> bool:
        return not self.done and self._anchor is None

    def result(self) -> GenerationResult:
        return GenerationResult(list(self.prompt_ids), list(self.tokens), self.finish_reason or "length", self.stats)

    # Set by BatchDecoder.add.
    def _init(self, prompt: torch.Tensor, sampler: Sampler, proposer, block_size: int, stop_ids: frozenset[int]):
        self._prompt = prompt
        self._sampler = sampler
        self._proposer = proposer
        self._block_size = block_size
        self._stop_ids = stop_ids
        self._prefilled = 0  # prompt tokens already in the slot
        self._prefill_features: list[torch.Tensor] = []
        self._anchor: int | None = None  # the last committed token, not yet in the slot
        self._start = 0  # its absolute position
        self._produced = 0
        self._added_at = time.perf_counter()
        self._decode_from = 0.0


@dataclass
class BatchEvent:
    """What one step added to one sequence's output (`step.finish_reason` set when it ended)."""

    sequence: BatchSequence
    step: Step


class BatchDecoder:
    """Runs several generations together, one target forward per step (module docstring).

    proposer: shared by nothing: each sequence gets a shallow copy (None: plain decoding);
    block_size: most tokens one row verifies (anchor + drafts), as SpeculativeDecoder's;
    policy: the block policy a sequence uses unless `add` gives its own (shared, as the
    server shares its decoder's); batch_policy: decides every step's drafts at once
    (default `PerSequencePolicy`); max_slots: sequences at once; capacity: positions per
    slot to start with (grows); prefill_chunk: most prompt tokens a sequence feeds per step;
    split_prefill: run prompt chunks in a forward of their own when they are longer than the
    step's decode rows (no padding of decode rows to a chunk's length; see `_forwards`);
    row_invariant: turn on the target's row-invariant batched forward where it can
    (`TargetModel.enable_row_invariance`; `self.row_invariant` says whether it is on;
    default on unless the environment sets SPECFLASH_ROW_INVARIANT=0); solo_when_alone: a
    step with a single decode row runs it with the one-sequence kernels, as fast as the
    solo loop (default on unless SPECFLASH_SOLO_WHEN_ALONE=0; module docstring);
    batch_drafts: the step's DFlash drafts from one drafter forward for all drafting
    sequences (`proposers.dflash.propose_batch`) instead of one forward each."""

    def __init__(self, target: TargetModel, proposer: Proposer | None = None, block_size: int | None = None,
                 policy=None, batch_policy=None, max_slots: int = 8, capacity: int = MIN_CAPACITY,
                 prefill_chunk: int = 256, split_prefill: bool = True, row_invariant: bool | None = None,
                 solo_when_alone: bool | None = None, batch_drafts: bool = True):
        if block_size is None:
            block_size = getattr(proposer, "block_size", 8) if proposer is not None else 1
        if block_size < 1:
            raise InputError(f"block size must be >= 1 (got {block_size}); use 1 for plain decoding")
        if is_tree_policy(policy):
            raise InputError("the batched decoder verifies linear blocks; draft trees run one sequence at a time")
        self.target = target
        self.proposer = proposer if block_size > 1 else None
        self.block_size = block_size
        self.policy = policy if policy is not None else FixedBlock()
        self.batch_policy = batch_policy if batch_policy is not None else PerSequencePolicy()
        self.prefill_chunk = at_least("prefill_chunk", int(prefill_chunk), 1)
        self.cache = target.new_slot_cache(max_slots=at_least("max_slots", int(max_slots), 1), capacity=capacity)
        self._taps = tuple(self.proposer.layer_ids) if self.proposer is not None else ()
        self._running: list[BatchSequence] = []
        self._ids = itertools.count()
        self.split_prefill = split_prefill
        # Each row's bits independent of the batch (target.enable_row_invariance): a sequence's
        # tokens are then the same alone and next to any others, at any row widths.
        if row_invariant is None:  # default: on, unless SPECFLASH_ROW_INVARIANT=0 (for A/B measurements)
            row_invariant = os.environ.get("SPECFLASH_ROW_INVARIANT", "1") not in ("0", "off", "false")
        self.row_invariant = bool(row_invariant) and target.enable_row_invariance()
        # A decode row with no other decode row in its step runs the one-sequence kernels (as
        # fast as the solo loop) instead of the row-invariant ones (default on unless
        # SPECFLASH_SOLO_WHEN_ALONE=0).
        if solo_when_alone is None:
            solo_when_alone = os.environ.get("SPECFLASH_SOLO_WHEN_ALONE", "1") not in ("0", "off", "false")
        self.solo_when_alone = bool(solo_when_alone)
        self.batch_drafts = bool(batch_drafts)
        self.num_batched_drafts = 0  # steps whose drafts came from one drafter forward
        self.num_steps = 0  # steps run
        self.num_forwards = 0  # batched forwards run (two in a step whose prompt chunks ran apart)
        self.rows_per_step: list[int] = []  # rows of each batched forward
        self.tokens_per_step: list[int] = []  # tokens (rows' lengths summed) of each
        self.last_forwards: list[tuple[int, int]] = []  # (rows, tokens) of each forward of the last step

    # ------------------------------------------------------------ sequences
    @property
    def running(self) -> list[BatchSequence]:
        return list(self._running)

    @property
    def num_free(self) -> int:
        return self.cache.num_free

    def add(self, prompt_ids: Sequence[int] | torch.Tensor, config: DecodeConfig | None = None,
            policy=None) -> BatchSequence:
        """A new sequence, prefilled from the next step on. Raises NoFreeSlotError when every
        slot is taken (check `num_free`), InputError / ContextLengthError for a bad prompt."""
        config = config or DecodeConfig()
        target = self.target
        prompt = torch.as_tensor(prompt_ids, dtype=torch.long).flatten().to(target.device)
        if prompt.numel() == 0:
            raise InputError("the prompt is empty; give at least one token")
        if prompt.numel() >= target.max_context:
            raise ContextLengthError(f"the prompt has {prompt.numel()} tokens but the target's context is "
                                     f"{target.max_context}; shorten the prompt")
        if policy is not None and is_tree_policy(policy):
            raise InputError("the batched decoder verifies linear blocks; draft trees run one sequence at a time")
        proposer = copy.copy(self.proposer) if self.proposer is not None else None
        block_size = (config.block_size or self.block_size) if proposer is not None else 1
        stop_ids = frozenset(config.stop_token_ids if config.stop_token_ids is not None else target.eos_token_ids)
        sampler = Sampler.create(config.temperature, config.top_k, config.top_p, config.seed, device=target.device)
        slot = self.cache.acquire()
        # Room for the whole generation now: one growth of the shared storage at admission
        # instead of one per doubling while a long prompt prefills.
        self.cache.reserve(min(prompt.numel() + config.max_new_tokens + block_size, target.max_context))
        sequence = BatchSequence(next(self._ids), [int(t) for t in prompt.tolist()], config,
                                 policy if policy is not None else self.policy, slot=slot)
        sequence._init(prompt, sampler, proposer, block_size, stop_ids)
        self._running.append(sequence)
        return sequence

    def cancel(self, sequence: BatchSequence) -> None:
        """End `sequence` now (finish_reason 'abort' unless it had finished): its slot frees."""
        if sequence in self._running:
            self._leave(sequence, "abort")

    def _leave(self, sequence: BatchSequence, reason: str) -> None:
        sequence.finish_reason = sequence.finish_reason or reason
        self._running.remove(sequence)
        if sequence.slot is not None:
            self.cache.release(sequence.slot)
            sequence.slot = None
        sequence._proposer = None  # its drafter context goes with it

    # ----------------------------------------------------------------- steps
    @torch.inference_mode()
    def step(self) -> list[BatchEvent]:
        """One batched forward for every running sequence -> the events of the sequences
        that produced tokens (in slot order); [] when nothing runs."""
        running = sorted(self._running, key=lambda s: s.slot)
        if not running:
            return []
        target = self.target
        if target.taps != self._taps:
            target.set_taps(self._taps)
        t_step = time.perf_counter()
        decoding = [s for s in running if s._anchor is not None]
        requests = [DraftRequest(s, self._max_drafts(s)) for s in decoding if s._proposer is not None]
        chosen = dict(zip((r.sequence.id for r in requests), self.batch_policy.choose(requests))) if requests else {}

        rows: list[BatchRow] = []
        plans: list[tuple] = []  # per row: (sequence, drafts, draft_probs) or (sequence, None, end)
        wanted = {s.id: min(chosen.get(s.id, 0), self._max_drafts(s)) for s in decoding}
        batched = self._propose_together([s for s in decoding if wanted[s.id] > 0 and s._proposer is not None],
                                         wanted)
        for s in running:
            if s._anchor is None:
                end = min(s._prefilled + self.prefill_chunk, s._prompt.numel())
                rows.append(BatchRow(s.slot, s._prompt[s._prefilled:end],
                                     "last" if end == s._prompt.numel() else "none"))
                plans.append((s, None, end))
                continue
            k = wanted[s.id]
            if s._proposer is not None and k > 0:
                proposal = batched.get(s.id) or s._proposer.propose(s._anchor, s._start, k, s._sampler)
                drafts = proposal.tokens[:k].to(target.device)
                draft_probs = proposal.probs[: drafts.shape[0]] if proposal.probs is not None else None
            else:
                drafts, draft_probs = torch.empty(0, dtype=torch.long, device=target.device), None
            block = torch.cat([torch.tensor([s._anchor], device=target.device), drafts])  # [k + 1]
            rows.append(BatchRow(s.slot, block, "all"))
            plans.append((s, drafts, draft_probs))
        outs = self._forwards(rows)
        if target.device.type == "cuda":
            torch.cuda.synchronize()
        forward_time = time.perf_counter() - t_step
        self.num_steps += 1

        events: list[BatchEvent] = []
        for (s, drafts, extra), row, out in zip(plans, rows, outs):
            if drafts is None:
                event = self._prefilled_chunk(s, extra, out)
            else:
                s.stats.forward_time_s += forward_time
                event = self._verified(s, row.ids, drafts, extra, out)
            if event is not None:
                events.append(event)
                if event.step.finish_reason is not None:
                    self._leave(s, event.step.finish_reason)
        return events

    def _propose_together(self, drafting: list[BatchSequence], wanted: dict[int, int]) -> dict:
        """Proposals of every drafting sequence whose DFlash proposer can share one drafter
        forward (`proposers.dflash.propose_batch`), when there are two or more and
        `batch_drafts` is on -> {sequence id: Proposal}; the others propose alone."""
        together = [s for s in drafting if getattr(s._proposer, "batchable", False)]
        if not self.batch_drafts or len(together) < 2:
            return {}
        proposals = propose_batch([s._proposer for s in together], [s._anchor for s in together],
                                  [s._start for s in together], [wanted[s.id] for s in together],
                                  [s._sampler for s in together])
        self.num_batched_drafts += 1
        return {s.id: p for s, p in zip(together, proposals)}

    def _forwards(self, rows: list[BatchRow]) -> list:
        """The step's rows in one target forward, or two when prompt chunks would pad the
        decode rows (`split_prefill`): the rows of one forward are padded to its longest, so
        a 256-token chunk next to seven 1-token decode rows would compute 8 x 256 positions
        instead of 256 + 7. -> outputs in row order; `last_forwards` lists (rows, tokens)
        per forward."""
        groups = [list(range(len(rows)))]
        if self.row_invariant:  # decode rows together, each prompt chunk alone (TargetModel.forward_batch)
            decode = [i for i, row in enumerate(rows) if row.logits == "all"]
            groups = ([decode] if decode else []) + [[i] for i, row in enumerate(rows) if row.logits != "all"]
        elif self.split_prefill:
            prefill = [i for i, row in enumerate(rows) if row.logits != "all"]
            decode = [i for i, row in enumerate(rows) if row.logits == "all"]
            if prefill and decode and max(rows[i].num_tokens for i in prefill) > \
                    max(rows[i].num_tokens for i in decode):
                groups = [decode, prefill]  # decode rows first: their tokens are not held up by the chunk
        outs: list = [None] * len(rows)
        self.last_forwards = []
        for group in groups:
            part = [rows[i] for i in group]
            invariant = self.row_invariant and not (self.solo_when_alone and len(part) == 1
                                                    and part[0].logits == "all")
            for i, out in zip(group, self.target.forward_batch(self.cache, part, invariant)):
                outs[i] = out
            self.num_forwards += 1
            self.last_forwards.append((len(part), sum(row.num_tokens for row in part)))
            self.rows_per_step.append(len(part))
            self.tokens_per_step.append(sum(row.num_tokens for row in part))
        return outs

    def _max_drafts(self, s: BatchSequence) -> int:
        remaining = s.config.max_new_tokens - s._produced
        return max(0, min(s._block_size - 1, remaining - 1, self.target.max_context - 2 - s._start))

    def _prefilled_chunk(self, s: BatchSequence, end: int, out) -> BatchEvent | None:
        s._prefilled = end
        if s._proposer is not None and out.features is not None:
            s._prefill_features.append(out.features)
        if end < s._prompt.numel():
            return None
        anchor = int(s._sampler.choose(out.logits[0, -1]).item())
        if s._proposer is not None:
            features = s._prefill_features  # [1, chunk, K*H] each; none when the proposer taps no layer
            s._proposer.reset(s._prompt, None if not features else features[0] if len(features) == 1
                              else torch.cat(features, dim=1))
            s._prefill_features = []
        now = time.perf_counter()
        s.stats.time_to_first_token_s = now - s._added_at
        s._decode_from = now
        s._anchor, s._start, s._produced = anchor, s._prompt.numel(), 1
        s.stats.num_new_tokens = 1
        tokens, reason = _truncate([anchor], s._stop_ids, s.config.max_new_tokens)
        if reason is None and s._start + 1 >= self.target.max_context:
            reason = "length"
        s.tokens.extend(tokens)
        return BatchEvent(s, Step(tokens, 0, 0, reason))

    def _verified(self, s: BatchSequence, block: torch.Tensor, drafts: torch.Tensor, draft_probs, out) -> BatchEvent:
        sampler = s._sampler
        k = int(drafts.shape[0])
        logits = out.logits[0]  # [k + 1, V]
        verdict = accept_block(drafts, draft_probs, logits, sampler)
        a = verdict.num_accepted
        self.cache.crop(s.slot, s._start + a + 1)
        if s._proposer is not None:
            features = out.features[:, : a + 1] if out.features is not None else None
            s._proposer.commit(block[: a + 1], features)
            self.batch_policy.observe(s, k, a)
        s.stats.record_step(k, a)
        remaining = s.config.max_new_tokens - s._produced
        tokens, reason = _truncate(drafts[:a].tolist() + [verdict.next_token], s._stop_ids, remaining)
        s._produced += len(tokens)
        s.stats.num_new_tokens = s._produced
        s._start += a + 1
        s._anchor = verdict.next_token
        if reason is None and s._start + 1 >= self.target.max_context:
            reason = "length"
        s.stats.decode_time_s = time.perf_counter() - s._decode_from
        s.tokens.extend(tokens)
        return BatchEvent(s, Step(tokens, k, a, reason))

    # ------------------------------------------------------------ wholesale
    def generate_all(self, prompts: Sequence[Sequence[int]], configs: DecodeConfig | Sequence[DecodeConfig] | None
                     = None) -> list[GenerationResult]:
        """Every prompt to completion, admitted in order as slots free -> results in prompt order."""
        if configs is None or isinstance(configs, DecodeConfig):
            configs = [configs or DecodeConfig()] * len(prompts)
        waiting = list(zip(prompts, configs))
        sequences: list[BatchSequence] = []
        while waiting or self._running:
            while waiting and self.num_free:
                prompt, config = waiting.pop(0)
                sequences.append(self.add(prompt, config))
            self.step()
        return [s.result() for s in sequences]
