"""Prompt-lookup (n-gram) proposer: copy what followed the last time the current
suffix appeared in the prompt or the output. No model, no features."""

from __future__ import annotations

import torch

from ..sampling import Sampler
from .base import Proposal


class NgramProposer:
    name = "ngram"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self._history: list[int] = []

    @property
    def layer_ids(self) -> tuple[int, ...]:
        return ()

    @property
    def history(self) -> list[int]:
        """The prompt and every committed token so far."""
        return self._history

    def reset(self, prompt_ids: torch.Tensor, features: torch.Tensor | None) -> None:
        self._history = [int(t) for t in prompt_ids.tolist()]

    def commit(self, tokens: torch.Tensor, features: torch.Tensor | None) -> None:
        self._history.extend(int(t) for t in tokens.tolist())

    def lookup(self, sequence: list[int], num_tokens: int) -> list[int]:
        """The tokens that followed the most recent earlier match of the longest suffix
        (max_ngram down to min_ngram tokens) of `sequence`; [] when nothing matches."""
        n_total = len(sequence)
        for n in range(min(self.max_ngram, n_total - 1), self.min_ngram - 1, -1):
            suffix = sequence[n_total - n:]
            # Scan right to left for an earlier occurrence with at least one follower.
            for start in range(n_total - n - 1, -1, -1):
                if sequence[start:start + n] == suffix:
                    follow = sequence[start + n:start + n + num_tokens]
                    if follow:
                        return follow
        return []

    def propose(self, anchor: int, position: int, num_tokens: int, sampler: Sampler) -> Proposal:
        tokens = self.lookup(self._history + [int(anchor)], num_tokens) if num_tokens > 0 else []
        return Proposal(torch.tensor(tokens, dtype=torch.long))
