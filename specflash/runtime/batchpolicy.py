"""Load-aware speculation: how many drafts each sequence of a batched step verifies.

A batched step (batchdecode.py) runs one target forward for B decoding sequences, every
row padded to the longest, and one drafter forward for all n drafting sequences (DFlash;
other proposers: one call per drafting sequence). Verifying k_i drafts for sequence i costs

    step = t_forward(B, 1 + max_i k_i) + t_drafts(n)                      (BatchCosts)
         = t_forward(B, 1 + max_i k_i) + sum_{i: k_i > 0} t_draft(k_i)     (one call each: StepCosts)

and delivers on average sum_i E_i[tokens | k_i] = B + sum_i gain_i(k_i) tokens, gain_i(k) =
a_i1 + a_i1 a_i2 + ... (costmodel.expected_tokens - 1, from sequence i's acceptance
estimate). `LoadAwarePolicy` picks the k_i with the most expected tokens per second of the
whole step: for each width w (1 + the most drafts of any row), it hands drafts to the
sequences with the highest expected gain first, each as long as it raises the step's
tokens per second (its extra tokens pay for its drafter call and its share of the wider
forward), and keeps the best width. When the batch is small a forward of a few more
tokens costs little next to its fixed cost, and every sequence that drafts well drafts;
as the batch fills the machine, a wider forward costs nearly its full size, so fewer
sequences draft, fewer tokens each, and none when no draft pays.

With one sequence the choice is its own block policy's (`AutoBlock` for `--block-size
auto`, probes included), so a lone request decodes exactly as `auto` does.

Acceptance: each sequence keeps decayed counts per draft position (as `AutoBlock`),
starting from the server-wide estimate (its block policy's rates when it has them, which
every verify step updates) at the weight of `prior_weight` observations, so a new request
starts from what the drafter has shown on the others and soon follows its own text.
The choice changes speed only: every draft is verified by the target.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..perf.costmodel import BatchCosts, StepCosts


class SequenceRates:
    """Decayed (reached, accepted) counts per draft position of one sequence."""

    def __init__(self, positions: int, decay: float = 0.9):
        self.reached = [0.0] * positions
        self.accepted = [0.0] * positions
        self.decay = decay

    def rates(self, prior: Sequence[float], weight: float) -> list[float]:
        return [(a + p * weight) / (r + weight) for a, r, p in zip(self.accepted, self.reached, prior)]

    def observe(self, num_drafted: int, num_accepted: int) -> None:
        if num_drafted <= 0:
            return
        self.reached = [r * self.decay for r in self.reached]
        self.accepted = [a * self.decay for a in self.accepted]
        for i in range(min(num_accepted + 1, num_drafted, len(self.reached))):
            self.reached[i] += 1.0
            if i < num_accepted:
                self.accepted[i] += 1.0


def gains(rates: Sequence[float], max_drafts: int) -> list[float]:
    """[gain(0), gain(1), ...]: expected accepted drafts when verifying k drafts."""
    out, reach = [0.0], 1.0
    for k in range(max_drafts):
        reach *= rates[k] if k < len(rates) else 0.0
        out.append(out[-1] + reach)
    return out


def plan_drafts(gain_tables: Sequence[Sequence[float]], forward_s, draft_s, min_gain: float = 0.0,
                drafts_s=None) -> list[int]:
    """The drafts per sequence with the most expected tokens per second of the whole step.

    gain_tables[i][k]: expected accepted drafts of sequence i when it verifies k drafts
    (k up to its own limit); forward_s(width): one forward of all B rows padded to `width`
    tokens; draft_s(k): one drafter call for k drafts. For each width w, sequences are
    taken in order of their expected gain at min(w - 1, own limit) and kept while they
    raise the rate; the best width wins (ties: the narrower). A plan that drafts at all
    must beat drafting nothing by the fraction `min_gain` (the model's margin of error).
    drafts_s(n), when given: one drafter forward for all n drafting sequences, instead of
    draft_s(k_i) per drafting sequence."""
    b = len(gain_tables)
    best, best_rate = [0] * b, b / forward_s(1) * (1 + min_gain)
    widest = 1 + max((len(g) - 1 for g in gain_tables), default=0)
    for width in range(2, widest + 1):
        ks = [min(width - 1, len(g) - 1) for g in gain_tables]
        order = sorted((i for i in range(b) if ks[i] > 0), key=lambda i: -gain_tables[i][ks[i]])
        tokens, seconds = float(b), forward_s(width)
        chosen = [0] * b
        rate = None
        for n, i in enumerate(order):
            extra = drafts_s(n + 1) - drafts_s(n) if drafts_s is not None else draft_s(ks[i])
            t2, s2 = tokens + gain_tables[i][ks[i]], seconds + extra
            if rate is not None and t2 / s2 <= rate:
                break
            tokens, seconds, chosen[i] = t2, s2, ks[i]
            rate = tokens / seconds
        if rate is not None and rate > best_rate * (1 + 1e-12):
            best, best_rate = chosen, rate
    return best


class LoadAwarePolicy:
    """The batch policy of a server with `--block-size auto` (module docstring).

    batch_costs: measured batched forwards (`perf.measure.load_or_measure_batch`);
    step_costs: the solo cost model, for the drafter's call (`StepCosts.draft_s`);
    max_drafts: the most drafts one row verifies; prior_weight: observations the server-
    wide estimate counts for in a new sequence's; decay: weight kept per verify step;
    min_gain: with two or more sequences, drafting must promise this fraction more tokens
    per second than not drafting (default 0.1: at 8 requests the model's predicted +2% for
    drafting measured -8%, SmolLM2-135M on the Intel Xeon VM)."""

    name = "load-aware"

    def __init__(self, batch_costs: BatchCosts, step_costs: StepCosts, max_drafts: int,
                 prior_weight: float = 4.0, decay: float = 0.9, prior_rate: float = 0.5, min_gain: float = 0.1):
        self.min_gain = min_gain
        self.batch_costs = batch_costs
        self.step_costs = step_costs
        self.max_drafts = max_drafts
        self.prior_weight, self.decay, self.prior_rate = prior_weight, decay, prior_rate
        self._rates: dict[int, SequenceRates] = {}
        self.last_plan: list[int] = []  # drafts chosen per request at the last step (for tests and logs)

    def _prior(self, sequence) -> list[float]:
        policy_rates = getattr(sequence.policy, "rates", None)
        rates = list(policy_rates()) if callable(policy_rates) else []
        return (rates + [self.prior_rate] * self.max_drafts)[: self.max_drafts]

    def rates(self, sequence) -> list[float]:
        own = self._rates.get(sequence.id)
        prior = self._prior(sequence)
        return prior if own is None else own.rates(prior, self.prior_weight)

    def choose(self, requests) -> list[int]:
        self._forget_gone(requests)
        if len(requests) == 1:  # one request: exactly its own policy (auto), probes included
            r = requests[0]
            self.last_plan = [r.sequence.policy.choose(r.max_drafts) if r.max_drafts > 0 else 0]
            return self.last_plan
        b = len(requests)
        tables = [gains(self.rates(r.sequence), min(r.max_drafts, self.max_drafts)) for r in requests]
        together = self.batch_costs.drafts_s if self.batch_costs.drafts else None
        self.last_plan = plan_drafts(tables, lambda w: self.batch_costs.forward_s(b, w), self.step_costs.draft_s,
                                     self.min_gain, together)
        return self.last_plan

    def observe(self, sequence, num_drafted: int, num_accepted: int) -> None:
        sequence.policy.observe(num_drafted, num_accepted)  # the server-wide estimate
        if num_drafted > 0:
            self._rates.setdefault(sequence.id, SequenceRates(self.max_drafts, self.decay)).observe(
                num_drafted, num_accepted)

    def _forget_gone(self, requests) -> None:
        if len(self._rates) > 4 * max(len(requests), 1) + 16:  # sequences that left: drop their counts
            live = {r.sequence.id for r in requests}
            self._rates = {i: r for i, r in self._rates.items() if i in live}
