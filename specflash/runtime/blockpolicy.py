"""How many drafts each verify step checks: a fixed block, or `auto` from costs and acceptance.

`FixedBlock` verifies every draft the block allows. `AutoBlock` keeps a running estimate
of the conditional acceptance rate at each draft position (recent steps weigh more) and
asks the cost model (`costmodel.best_num_drafts`) for the number of drafts with the most
expected tokens per second, 0 (a plain decoding step, no drafter call) included. When it
has turned speculation off it still probes now and then with a full block, backing off
exponentially while speculation keeps losing, so it notices when the text becomes
predictable again. The choice only changes speed: every step is verified by the target,
so outputs are the same for any policy.
"""

from __future__ import annotations

from ..perf.costmodel import StepCosts, best_num_drafts
from .config import parse_block_size


class FixedBlock:
    name = "fixed"

    def choose(self, max_drafts: int) -> int:
        return max_drafts

    def observe(self, num_drafted: int, num_accepted: int) -> None:
        pass


class AutoBlock:
    """Cost-aware number of drafts per step.

    prior_rate / prior_weight: pseudo-counts per position before anything is observed
    (optimistic enough that speculation is tried first); decay: weight kept by past
    observations at each new speculative step (0.9 ~ the last 10 steps dominate);
    probe_every / probe_max: plain steps before the first probe, and the cap of the
    doubling interval between probes while speculation stays off."""

    name = "auto"

    def __init__(self, costs: StepCosts, max_drafts: int, prior_rate: float = 0.5, prior_weight: float = 1.0,
                 decay: float = 0.9, probe_every: int = 8, probe_max: int = 128):
        if max_drafts < 0:
            raise ValueError("max_drafts must be >= 0")
        self.costs = costs
        self.max_drafts = max_drafts
        self.prior_rate, self.prior_weight, self.decay = prior_rate, prior_weight, decay
        self.probe_every, self.probe_max = probe_every, probe_max
        self.reached = [0.0] * max_drafts  # weighted steps that verified a draft at position i
        self.accepted = [0.0] * max_drafts  # ... and accepted it
        self._plain_steps = 0
        self._interval = probe_every

    def rates(self) -> list[float]:
        """Conditional acceptance estimate per draft position (1-based position = index + 1)."""
        w = self.prior_weight
        return [(a + self.prior_rate * w) / (r + w) for a, r in zip(self.accepted, self.reached)]

    def choose(self, max_drafts: int) -> int:
        max_drafts = min(max_drafts, self.max_drafts)
        if max_drafts <= 0:
            return 0
        k = best_num_drafts(self.rates(), self.costs, max_drafts)
        if k > 0:
            return k
        self._plain_steps += 1
        if self._plain_steps >= self._interval:
            self._plain_steps = 0
            self._interval = min(self._interval * 2, self.probe_max)
            return max_drafts  # a probe: learn about every position at once
        return 0

    def observe(self, num_drafted: int, num_accepted: int) -> None:
        if num_drafted <= 0:
            return
        for i in range(self.max_drafts):
            self.reached[i] *= self.decay
            self.accepted[i] *= self.decay
        # Positions 1..a were accepted; position a + 1 (if drafted) was reached and rejected.
        for i in range(min(num_accepted + 1, num_drafted)):
            self.reached[i] += 1.0
            if i < num_accepted:
                self.accepted[i] += 1.0
        if best_num_drafts(self.rates(), self.costs, self.max_drafts) > 0:
            self._interval = self.probe_every  # speculation pays again: probe promptly next time


def native_block(proposer) -> int:
    """Most tokens per step a proposer's drafts fill: its own block (8 when it has none); 1
    without a proposer (plain decoding)."""
    return 1 if proposer is None else int(getattr(proposer, "block_size", 8))


def make_policy(block_size: int | str | None, target, proposer, log=None) -> tuple[int, FixedBlock | AutoBlock]:
    """Resolve a block-size setting for this target and proposer -> (most tokens per step,
    policy). None: the proposer's own block, all drafts verified; 'auto': that block as the
    ceiling with `AutoBlock` over the cached (or freshly measured) cost model, measured
    under the kernels the target runs now (choose them first); an int: fixed, at most the
    proposer's own block when it has one (a DFlash drafter's)."""
    own = getattr(proposer, "block_size", None)
    block_size = parse_block_size(block_size, limit=own if isinstance(own, int) else None)
    if proposer is None:
        return 1, FixedBlock()
    native = native_block(proposer)
    if block_size is None:
        return native, FixedBlock()
    if block_size == "auto":
        from ..perf.measure import load_or_measure

        costs = load_or_measure(target, proposer, max_tokens=native, log=log)
        return native, AutoBlock(costs, native - 1)
    return int(block_size), FixedBlock()
