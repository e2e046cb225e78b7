"""The proposer interface: what the decode loop asks of any way of guessing tokens.

The loop calls, per generation:
  reset(prompt_ids, features)       once, after the target's prefill
  propose(anchor, position, k, s)   before each verify step: up to k tokens to follow
                                    `anchor`, which sits at absolute `position`
  commit(tokens, features)          after each verify step: the tokens now in the target's
                                    cache (the anchor plus the accepted drafts) with their
                                    tapped target features
A proposer never sees acceptance rules, and the loop never sees how proposals are made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from ..sampling import Sampler


@dataclass
class Proposal:
    """Draft tokens and, when they were sampled, the distributions they came from.

    tokens: [k] long (k may be smaller than asked, even 0)
    probs:  [k, V] the draft distribution q_i each token was drawn from; None when the
            tokens were chosen deterministically (rejection sampling then treats q_i as a
            point mass on the proposed token)
    """

    tokens: torch.Tensor
    probs: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


@runtime_checkable
class Proposer(Protocol):
    name: str

    @property
    def layer_ids(self) -> tuple[int, ...]:
        """Target layers whose hidden states this proposer needs (empty: none)."""
        ...

    def reset(self, prompt_ids: torch.Tensor, features: torch.Tensor | None) -> None:
        """prompt_ids [s]; features [1, s, K*H] or None."""
        ...

    def propose(self, anchor: int, position: int, num_tokens: int, sampler: Sampler) -> Proposal:
        ...

    def commit(self, tokens: torch.Tensor, features: torch.Tensor | None) -> None:
        """tokens [n] just committed to the target cache; features [1, n, K*H] or None."""
        ...
