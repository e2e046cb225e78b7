"""Speculative-decoding statistics, defined once.

- acceptance length of a verify step = accepted drafts + 1 (the recovered or bonus
  token), so plain decoding has acceptance length 1 every step;
- tau = mean acceptance length over the verify steps of a generation;
- per-position acceptance: for draft position i (1-based), drafted[i] counts the steps
  that proposed a token there and accepted[i] the steps that accepted it (a draft
  tree's position is its depth: a tree step "proposed" every depth down to its deepest
  node); drafted_per_step counts every draft verified (a tree's nodes);
- time to first token (TTFT) = prefill plus choosing the first token;
- time per output token (TPOT) = decode-phase wall time (after the first token) divided
  by the tokens produced in that phase; tokens_per_s = 1 / TPOT (decode phase). The first
  step delivers one token in our loop; a runtime that verifies drafts in its first
  forward (e.g. Hugging Face prompt lookup) may deliver several: `first_step_tokens`;
- forward time = decode-phase wall time spent inside the drafter's and the target's
  forwards (measured in the run itself; on CUDA after a synchronize); the rest of the
  decode time is the engine's own overhead.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecStats:
    acceptance_lengths: list[int] = field(default_factory=list)
    drafted_per_step: list[int] = field(default_factory=list)  # drafts verified by each step (0: plain)
    drafted_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    num_new_tokens: int = 0
    time_to_first_token_s: float = 0.0
    decode_time_s: float = 0.0
    first_step_tokens: int = 1  # tokens delivered by the first step (counted in TTFT, not TPOT)
    forward_time_s: float = 0.0  # decode-phase time inside the drafter / target forwards

    def record_step(self, num_drafted: int, num_accepted: int, depth: int | None = None) -> None:
        """A verify step that checked `num_drafted` drafts and accepted `num_accepted`;
        `depth`: the deepest draft position it verified (a draft tree's depth; a linear
        block's is num_drafted, the default)."""
        depth = num_drafted if depth is None else depth
        self.acceptance_lengths.append(num_accepted + 1)
        self.drafted_per_step.append(num_drafted)
        grow = depth - len(self.drafted_per_position)
        if grow > 0:
            self.drafted_per_position.extend([0] * grow)
            self.accepted_per_position.extend([0] * grow)
        for i in range(depth):
            self.drafted_per_position[i] += 1
        for i in range(num_accepted):
            self.accepted_per_position[i] += 1

    @property
    def num_steps(self) -> int:
        return len(self.acceptance_lengths)

    @property
    def tau(self) -> float | None:
        """Mean acceptance length (accepted drafts + 1) per verify step; None if no step."""
        if not self.acceptance_lengths:
            return None
        return sum(self.acceptance_lengths) / len(self.acceptance_lengths)

    @property
    def acceptance_rate_per_position(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted_per_position, self.drafted_per_position)]

    @property
    def tpot_s(self) -> float | None:
        decode_tokens = self.num_new_tokens - self.first_step_tokens
        if decode_tokens <= 0:
            return None
        return self.decode_time_s / decode_tokens

    @property
    def tokens_per_s(self) -> float | None:
        tpot = self.tpot_s
        return 1.0 / tpot if tpot else None

    def histogram(self) -> dict[int, int]:
        """Acceptance length -> number of verify steps with that length."""
        counts: dict[int, int] = {}
        for length in self.acceptance_lengths:
            counts[length] = counts.get(length, 0) + 1
        return dict(sorted(counts.items()))

    def to_dict(self) -> dict:
        return {
            "num_new_tokens": self.num_new_tokens,
            "num_steps": self.num_steps,
            "tau": self.tau,
            "acceptance_lengths": list(self.acceptance_lengths),
            "drafted_per_step": list(self.drafted_per_step),
            "acceptance_histogram": {str(k): v for k, v in self.histogram().items()},
            "drafted_per_position": list(self.drafted_per_position),
            "accepted_per_position": list(self.accepted_per_position),
            "time_to_first_token_s": self.time_to_first_token_s,
            "decode_time_s": self.decode_time_s,
            "tpot_s": self.tpot_s,
            "tokens_per_s": self.tokens_per_s,
            "forward_time_s": self.forward_time_s,
        }
