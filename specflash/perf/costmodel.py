"""Step costs of speculative decoding and the number of drafts that pays best.

A verify step that checks k drafts costs

    step(k) = t_draft(k) * [k > 0] + t_verify(k + 1)

(the drafter runs its whole block in one forward whatever k is, but the LM head only over
the k drafts the step verifies, so t_draft grows a little with k; k = 0 is a plain
decoding step). With a_i = P(draft i accepted | drafts 1..i-1 accepted), the step
delivers on average

    E[tokens | k] = 1 + sum_{i=1..k} a_1 * ... * a_i

tokens (the accepted drafts plus the recovered or bonus token), so the number of drafts
that maximises expected tokens per second is argmax_k E[tokens | k] / step(k).

Everything here is pure arithmetic over measured times; measure.py takes the
measurements (`load_or_measure`: once per target / proposer / machine, cached as JSON under
`$SPECFLASH_HOME/costs/`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StepCosts:
    """Measured seconds: `verify` maps tokens fed to one target forward (incl. LM head) to
    its median time; `draft` is one proposer call for a full block; `drafts`, when
    measured, maps the number of drafts asked of the proposer to its median time."""

    verify: dict[int, float]
    draft: float
    context: int = 0  # cached tokens in front of the measured forwards
    noisy: bool = False  # the timings spread widely: the machine was busy while measuring
    drafts: dict[int, float] | None = None

    def __post_init__(self):
        if not self.verify or 1 not in self.verify:
            raise ValueError("verify costs need at least the 1-token forward")

    def verify_s(self, tokens: int) -> float:
        """Cost of a `tokens`-token target forward, linear between measured sizes and
        extrapolated from the last two beyond them."""
        return interpolate(self.verify, tokens)

    def draft_s(self, num_drafts: int) -> float:
        """Cost of one proposer call asked for `num_drafts` drafts (0 for none)."""
        if num_drafts <= 0:
            return 0.0
        if not self.drafts:
            return self.draft
        return min(interpolate(self.drafts, num_drafts), max(self.drafts.values()))

    def step_s(self, num_drafts: int) -> float:
        return self.draft_s(num_drafts) + self.verify_s(num_drafts + 1)

    def to_dict(self) -> dict:
        data = {"verify": {str(k): v for k, v in sorted(self.verify.items())}, "draft": self.draft,
                "context": self.context, "noisy": self.noisy}
        if self.drafts:
            data["drafts"] = {str(k): v for k, v in sorted(self.drafts.items())}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> StepCosts:
        drafts = data.get("drafts")
        return cls({int(k): float(v) for k, v in data["verify"].items()}, float(data["draft"]),
                   int(data.get("context", 0)), bool(data.get("noisy", False)),
                   {int(k): float(v) for k, v in drafts.items()} if drafts else None)


def interpolate(values: dict[int, float], n: int) -> float:
    """values at measured sizes -> value at n: linear between sizes, extrapolated from the
    last two beyond them, the first one below them."""
    sizes = sorted(values)
    if n in values:
        return values[n]
    lo = max((s for s in sizes if s < n), default=sizes[0])
    hi = min((s for s in sizes if s > n), default=None)
    if hi is None:
        if len(sizes) == 1:
            return values[lo]
        a, b = sizes[-2], sizes[-1]
        slope = (values[b] - values[a]) / (b - a)
        return values[b] + slope * (n - b)
    if n < lo:
        return values[lo]
    frac = (n - lo) / (hi - lo)
    return values[lo] + frac * (values[hi] - values[lo])


def expected_tokens(accept: Sequence[float], num_drafts: int) -> float:
    """E[tokens delivered] by a step verifying `num_drafts` drafts; accept[i] is the
    conditional acceptance rate of draft i + 1 (positions beyond the list count as 0)."""
    total, reach = 1.0, 1.0
    for i in range(num_drafts):
        reach *= accept[i] if i < len(accept) else 0.0
        total += reach
    return total


def best_num_drafts(accept: Sequence[float], costs: StepCosts, max_drafts: int) -> int:
    """The k in 0..max_drafts with the most expected tokens per second (ties: fewer drafts)."""
    best_k, best_rate = 0, 1.0 / costs.step_s(0)
    total, reach = 1.0, 1.0
    for k in range(1, max_drafts + 1):
        reach *= accept[k - 1] if k - 1 < len(accept) else 0.0
        total += reach
        rate = total / costs.step_s(k)
        if rate > best_rate * (1 + 1e-12):
            best_k, best_rate = k, rate
    return best_k


def modeled_time_s(costs: StepCosts, drafts_per_step: Sequence[int]) -> float:
    """Time the forwards alone would take for these steps (the ideal of engine efficiency)."""
    return sum(costs.step_s(k) for k in drafts_per_step)


def engine_efficiency(costs: StepCosts, drafts_per_step: Sequence[int], decode_time_s: float) -> float | None:
    """Ideal time (bare forwards, from the cost model) / measured decode time.

    For a fixed block B this is the achieved tokens/s over tau / (t_draft + t_verify(B)):
    everything the engine does beside the two forwards (Python, cache bookkeeping,
    sampling, host syncs, stop checks) lowers it."""
    if not drafts_per_step or decode_time_s <= 0:
        return None
    return modeled_time_s(costs, drafts_per_step) / decode_time_s


# ------------------------------------------------------------------ batched steps
@dataclass(frozen=True)
class BatchCosts:
    """Measured seconds of one batched target forward (`TargetModel.forward_batch`) of
    `rows` sequences' rows, each padded to `width` tokens (the longest row: 1 + the most
    drafts any row of the step verifies): `forward[(rows, width)]` -> median time.

    A batched step that verifies k_i drafts for sequence i costs
        t_forward(B, 1 + max_i k_i) + t_drafts(n)      (n sequences draft, one drafter forward)
    or, without `drafts` (a proposer that drafts one sequence at a time),
        t_forward(B, 1 + max_i k_i) + sum_{i: k_i > 0} t_draft(k_i).
    `drafts[n]`: one batched drafter call for n sequences (each its full block)."""

    forward: dict[tuple[int, int], float]
    context: int = 0  # cached tokens per sequence in front of the measured forwards
    noisy: bool = False
    drafts: dict[int, float] | None = None

    def drafts_s(self, sequences: int) -> float | None:
        """One drafter forward for `sequences` drafting sequences (0 for none; None when not
        measured: the proposer drafts one at a time)."""
        if not self.drafts:
            return None
        return 0.0 if sequences <= 0 else max(interpolate(self.drafts, sequences), 0.0)

    def __post_init__(self):
        if (1, 1) not in self.forward:
            raise ValueError("batched costs need at least the one-row, one-token forward")

    def forward_s(self, rows: int, width: int) -> float:
        """Cost of a forward of `rows` rows of `width` tokens: per measured row count, linear
        in the width (`interpolate`), then linear between the measured row counts (beyond
        the largest: extrapolated from the last two)."""
        by_rows: dict[int, dict[int, float]] = {}
        for (b, w), t in self.forward.items():
            by_rows.setdefault(b, {})[w] = t
        at = {b: interpolate(widths, width) for b, widths in by_rows.items()}
        return max(interpolate(at, rows), 0.0)

    def to_dict(self) -> dict:
        data = {"forward": {f"{b}x{w}": t for (b, w), t in sorted(self.forward.items())},
                "context": self.context, "noisy": self.noisy}
        if self.drafts:
            data["drafts"] = {str(n): t for n, t in sorted(self.drafts.items())}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> BatchCosts:
        forward = {}
        for key, t in data["forward"].items():
            b, w = key.split("x")
            forward[(int(b), int(w))] = float(t)
        drafts = {int(n): float(t) for n, t in data["drafts"].items()} if data.get("drafts") else None
        return cls(forward, int(data.get("context", 0)), bool(data.get("noisy", False)), drafts)
