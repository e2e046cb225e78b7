"""DFlash proposer: one drafter forward proposes a whole block.

Block = [anchor, MASK x k] at positions p..p+k, embedded with the target's embedding
rows (times the drafter's `input_embedding_scale`). Context features of every committed
token are fused and appended to the drafter's context cache lazily, at the next
propose; the block's own K/V are never cached. Block position i predicts the token at
p + i (same position, no shift). A drafter with a draft vocabulary proposes only its
tokens, through those rows of the target's LM head (drafter/vocab.py).
"""

from __future__ import annotations

import torch

from ...drafter.model import DFlashDrafter
from ...drafter.vocab import DraftHead
from ...hf.cache import grown_capacity
from ...hf.staticsteps import StaticDraftSteps, StaticKV
from ...hf.target import TargetModel
from ..sampling import Sampler
from .base import Proposal


class DFlashProposer:
    name = "dflash"

    def __init__(self, drafter: DFlashDrafter, target: TargetModel, static_steps: StaticDraftSteps | None = None):
        """static_steps: the drafter's fixed-shape (CUDA-graph) steps, made once by whoever
        builds the proposer (`loading.dflash_proposer`); shallow copies of this proposer (the
        server's per-request ones) share them and replay the same captured graphs. None:
        the drafter runs on its dynamic context cache."""
        self.drafter = drafter.eval()
        self.target = target
        self._cache = None
        self._pending: list[torch.Tensor] = []
        self._head = DraftHead(self.drafter, target)
        self._static = static_steps

    @property
    def layer_ids(self) -> tuple[int, ...]:
        return self.drafter.target_layer_ids

    @property
    def block_size(self) -> int:
        return self.drafter.block_size

    @property
    def graph_error(self) -> str | None:
        """Why the drafter's CUDA graphs were turned off, if a capture failed."""
        return self._static.graph_error if self._static is not None else None

    def reset(self, prompt_ids: torch.Tensor, features: torch.Tensor | None) -> None:
        if features is None:
            raise ValueError("the DFlash proposer needs the target's tapped features")
        capacity = grown_capacity(prompt_ids.shape[0] + 2 * self.block_size)
        self._cache = None  # the last sequence's static context goes back to the pool before a new one is taken
        if self._static is not None:
            self._cache = self._static.new_context(capacity)
        else:
            self._cache = self.drafter.new_cache(capacity=capacity)
        self._pending = [features]

    def commit(self, tokens: torch.Tensor, features: torch.Tensor | None) -> None:
        if features is not None and features.shape[1]:
            self._pending.append(features)

    def _take_pending(self, position: int) -> torch.Tensor:
        """The features committed since the last proposal [1, c, K*H_t], checked to end just
        before the anchor at `position`."""
        drafter, cache = self.drafter, self._cache
        if not self._pending:  # nothing committed since the last proposal (a repeated call)
            pending = torch.zeros((1, 0, drafter.fc.in_features), dtype=drafter.fc.weight.dtype,
                                  device=self.target.device)
        else:
            pending = self._pending[0] if len(self._pending) == 1 else torch.cat(self._pending, dim=1)
        self._pending = []
        n_ctx = pending.shape[1]
        if cache.length + n_ctx != position:
            raise RuntimeError(f"drafter context out of sync: {cache.length} cached + {n_ctx} pending "
                               f"!= anchor position {position}")
        return pending

    @property
    def drafts_together(self) -> bool:
        """Whether this proposer's generations can draft in `propose_batch` (dynamic context
        caches, no CUDA-graph steps, and a drafter whose blocks see everything)."""
        return self._static is None and self.drafter.blocks_see_everything

    @property
    def batchable(self) -> bool:
        """Whether this proposer can draft in `propose_batch` now (`drafts_together`, with a
        generation started)."""
        return self.drafts_together and self._cache is not None

    def _draft_hidden(self, anchor: int, position: int, num_tokens: int) -> torch.Tensor:
        """One drafter forward for the block after `anchor` (at `position`) -> the hidden
        states [num_tokens, H] of its first num_tokens drafts."""
        drafter, target, cache = self.drafter, self.target, self._cache
        device = target.device
        pending = self._take_pending(position)
        # The drafter always fills its whole training block (bidirectional attention makes a
        # shorter block a different input); the caller gets the first num_tokens drafts.
        wanted = num_tokens
        num_tokens = max(num_tokens, drafter.block_size - 1)
        ids = torch.full((1, num_tokens + 1), drafter.mask_token_id, dtype=torch.long, device=device)
        ids[0, 0] = anchor
        if isinstance(cache, StaticKV):
            hidden = self._static.forward(ids, position, pending, cache)
        else:
            positions = torch.arange(position, position + num_tokens + 1, device=device)[None]  # [1, k+1]
            feature_positions = torch.arange(cache.length, position, device=device)[None]  # [1, c]
            embeds = drafter.embed_block(ids, target.embed_raw)  # [1, k+1, H]
            hidden = drafter(embeds, positions, pending.to(embeds.dtype), feature_positions, cache)
        return hidden[0, 1:wanted + 1].to(target.dtype)  # [k, H]

    def _proposal(self, hidden: torch.Tensor, sampler: Sampler) -> Proposal:
        if sampler.greedy:
            return Proposal(self._head.greedy(hidden))
        probs = sampler.probs(self._head.logits(hidden))  # [k, V]
        return Proposal(sampler.sample(probs), probs)

    @torch.inference_mode()
    def propose(self, anchor: int, position: int, num_tokens: int, sampler: Sampler) -> Proposal:
        hidden = self._draft_hidden(anchor, position, num_tokens)  # [k, H]
        return self._proposal(hidden, sampler)

    @torch.inference_mode()
    def candidates(self, anchor: int, position: int, depth: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The same one drafter forward as `propose`, read as a draft tree's raw material:
        the drafter's `top_k` tokens at each of the first `depth` block positions, best
        first, with its probabilities -> (tokens [depth, top_k], probs [depth, top_k])."""
        hidden = self._draft_hidden(anchor, position, depth)  # [depth, H]
        return self._head.top_candidates(hidden, top_k)


@torch.inference_mode()
def propose_batch(proposers: list[DFlashProposer], anchors: list[int], positions: list[int],
                  num_tokens: list[int], samplers: list[Sampler]) -> list[Proposal]:
    """Several sequences' proposals from ONE drafter forward (the batched server's step):
    each proposer's new context goes into its own cache, then every block (the drafter's
    full training block each, as `propose` runs it) attends to its own context in
    `DFlashDrafter.forward_blocks`. The proposers share one drafter and target and are all
    `batchable`. Drafts can differ from `propose`'s in the last bits of the drafter's
    arithmetic (other shapes), which changes speed only: every draft is verified."""
    first = proposers[0]
    drafter, target = first.drafter, first.target
    device = target.device
    block = drafter.block_size
    caches = []
    for proposer, position in zip(proposers, positions):
        pending = proposer._take_pending(position)
        cache = proposer._cache
        positions_c = torch.arange(cache.length, position, device=device)[None]  # [1, c]
        drafter.extend_context(pending.to(drafter.fc.weight.dtype), positions_c, cache)
        caches.append(cache)
    ids = torch.full((len(proposers), block), drafter.mask_token_id, dtype=torch.long, device=device)
    ids[:, 0] = torch.tensor(anchors, dtype=torch.long, device=device)
    start = torch.tensor(positions, dtype=torch.long, device=device)
    block_positions = start[:, None] + torch.arange(block, device=device)[None, :]  # [B, q]
    hidden = drafter.forward_blocks(drafter.embed_block(ids, target.embed_raw), block_positions, caches)  # [B, q, H]
    hidden = hidden.to(target.dtype)
    if all(sampler.greedy for sampler in samplers):  # one LM-head product for every sequence's drafts
        rows = torch.cat([hidden[i, 1: k + 1] for i, k in enumerate(num_tokens)])  # [sum k, H]
        tokens = first._head.greedy(rows).split(list(num_tokens))
        return [Proposal(t) for t in tokens]
    return [p._proposal(hidden[i, 1: k + 1], sampler)
            for i, (p, k, sampler) in enumerate(zip(proposers, num_tokens, samplers))]
