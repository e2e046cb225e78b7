"""Oracle proposer (a testing and measuring aid): proposes a known continuation, each
token right with a set probability, so acceptance can be fixed without a trained drafter.

With p_correct=1 and the target's own greedy continuation every full block is
accepted (tau = block size); with p_correct=0 every draft is wrong (tau = 1). As a draft
tree's source (`candidates`) it ranks the right token `truth_rank`-th at every depth, so a
tree that verifies the second or third choices finds it while a linear block never does.
"""

from __future__ import annotations

import torch

from ..sampling import Sampler
from .base import Proposal


class OracleProposer:
    name = "oracle"

    def __init__(self, reference: list[int], vocab_size: int, p_correct: float = 1.0, seed: int = 0,
                 truth_rank: int = 1, block_size: int = 16):
        """reference: the full expected sequence, prompt followed by the continuation;
        truth_rank: where `candidates` puts the right token (1 = first)."""
        if not 0.0 <= p_correct <= 1.0:
            raise ValueError(f"p_correct must be in [0, 1], got {p_correct}")
        self.reference = [int(t) for t in reference]
        self.vocab_size = vocab_size
        self.p_correct = p_correct
        self._rng = torch.Generator().manual_seed(seed)
        self.truth_rank = truth_rank
        self.block_size = block_size

    @property
    def layer_ids(self) -> tuple[int, ...]:
        return ()

    def reset(self, prompt_ids: torch.Tensor, features: torch.Tensor | None) -> None:
        pass

    def commit(self, tokens: torch.Tensor, features: torch.Tensor | None) -> None:
        pass

    def propose(self, anchor: int, position: int, num_tokens: int, sampler: Sampler) -> Proposal:
        truth = self.reference[position + 1: position + 1 + num_tokens]
        tokens = []
        for token in truth:
            right = torch.rand((), generator=self._rng).item() < self.p_correct
            tokens.append(token if right else (token + 1) % self.vocab_size)
        return Proposal(torch.tensor(tokens, dtype=torch.long))

    def candidates(self, anchor: int, position: int, depth: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [depth, top_k], probs [depth, top_k]): wrong tokens except at rank
        `truth_rank`, which holds the right token with probability p_correct; probabilities
        halve with the rank."""
        truth = self.reference[position + 1: position + 1 + depth]
        tokens = torch.zeros(len(truth), top_k, dtype=torch.long)
        for d, token in enumerate(truth):
            right = torch.rand((), generator=self._rng).item() < self.p_correct
            row = [(token + 1 + j) % self.vocab_size for j in range(top_k)]
            if right and self.truth_rank <= top_k:
                row[self.truth_rank - 1] = token
            tokens[d] = torch.tensor(row)
        probs = (0.5 ** torch.arange(1, top_k + 1, dtype=torch.float64)).expand(len(truth), top_k).clone()
        return tokens, probs
