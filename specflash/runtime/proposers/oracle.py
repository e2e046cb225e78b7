"""Oracle proposer (a testing and measuring aid): proposes a known continuation, each
token right with a set probability, so acceptance can be fixed without a trained drafter.

With p_correct=1 and the target's own greedy continuation every full block is
accepted (tau = block size); with p_correct=0 every draft is wrong (tau = 1).
"""

from __future__ import annotations

import torch

from ..sampling import Sampler
from .base import Proposal


class OracleProposer:
    name = "oracle"

    def __init__(self, reference: list[int], vocab_size: int, p_correct: float = 1.0, seed: int = 0):
        """reference: the full expected sequence, prompt followed by the continuation."""
        if not 0.0 <= p_correct <= 1.0:
            raise ValueError(f"p_correct must be in [0, 1], got {p_correct}")
        self.reference = [int(t) for t in reference]
        self.vocab_size = vocab_size
        self.p_correct = p_correct
        self._rng = torch.Generator().manual_seed(seed)

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
