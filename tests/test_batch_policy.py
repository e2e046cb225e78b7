"""Load-aware speculation (runtime/batchpolicy.py) with given costs: the draft budget
shrinks as the batch grows and reaches 0 when no draft pays, the sequences most likely to
be accepted draft first, the plan is the brute-force best, and one request alone gets
exactly `auto`'s choice. Batched forward costs are measured and cached like the solo ones;
the server's engine uses the policy with `--block-size auto`."""

import itertools
import json
import random

import pytest

from specflash.perf.costmodel import BatchCosts, StepCosts
from specflash.perf.measure import batch_sizes, load_or_measure_batch, measure_batch_costs
from specflash.runtime.batchdecode import BatchDecoder, DraftRequest
from specflash.runtime.batchpolicy import LoadAwarePolicy, SequenceRates, gains, plan_drafts
from specflash.runtime.blockpolicy import AutoBlock
from specflash.runtime.config import DecodeConfig
from specflash.runtime.proposers import DFlashProposer
from tiny import tiny_drafter, tiny_target

MAX_DRAFTS = 7


def cpu_like_costs(max_rows: int = 16) -> BatchCosts:
    """A forward costs a fixed 50 ms plus 2 ms per token it computes (rows x width): a
    few more tokens are nearly free next to the fixed cost, a full batch is not."""
    forward = {(b, w): 0.050 + 0.002 * b * w for b in (1, 2, 4, 8, 16) if b <= max_rows for w in (1, 2, 4, 8)}
    return BatchCosts(forward)


STEP = StepCosts({1: 0.052, 2: 0.054, 4: 0.058, 8: 0.066}, draft=0.005)


class Seq:
    """A stand-in for a BatchSequence: an id and a block policy."""

    _ids = itertools.count()

    def __init__(self, policy=None):
        self.id = next(self._ids)
        self.policy = policy if policy is not None else AutoBlock(STEP, MAX_DRAFTS)


def requests(n: int, rates=None):
    out = []
    for i in range(n):
        policy = AutoBlock(STEP, MAX_DRAFTS)
        if rates is not None:  # a history that makes its estimate rates[i] at every position
            policy.reached = [1000.0] * MAX_DRAFTS
            policy.accepted = [1000.0 * rates[i]] * MAX_DRAFTS
        out.append(DraftRequest(Seq(policy), MAX_DRAFTS))
    return out


def test_the_draft_budget_shrinks_as_the_batch_grows():
    budgets, per_sequence = [], []
    for b in (2, 4, 8, 16):
        policy = LoadAwarePolicy(cpu_like_costs(), STEP, MAX_DRAFTS, min_gain=0.0)
        plan = policy.choose(requests(b, [0.7] * b))
        budgets.append(sum(plan))
        per_sequence.append(sum(plan) / b)
    assert per_sequence == sorted(per_sequence, reverse=True) and per_sequence[0] > per_sequence[-1]
    assert budgets[0] > 0 and budgets[-1] == 0  # a full batch: no draft pays for its share of the forward


def test_the_sequences_most_likely_to_be_accepted_draft_first():
    rates = [0.2, 0.9, 0.5, 0.95, 0.1, 0.6, 0.85, 0.3]
    policy = LoadAwarePolicy(cpu_like_costs(), STEP, MAX_DRAFTS, min_gain=0.0)
    plan = policy.choose(requests(8, rates))
    drafting = {i for i, k in enumerate(plan) if k > 0}
    assert 0 < len(drafting) < 8
    assert min(rates[i] for i in drafting) > max(rates[i] for i in range(8) if i not in drafting)


def test_the_plan_is_the_best_of_every_choice():
    """Brute force over all k_i in 0..3 for 3 sequences: the plan's expected tokens per
    second is the best (the greedy per width is exact when the draft cost is flat)."""
    rng = random.Random(0)
    for _ in range(200):
        b, limit = 3, 3
        tables = [gains([rng.random() ** 0.5 for _ in range(limit)], limit) for _ in range(b)]
        fixed, per_token, draft = rng.uniform(0.01, 0.1), rng.uniform(0.0005, 0.01), rng.uniform(0.0, 0.02)

        def forward(w):
            return fixed + per_token * b * w

        def rate(ks):
            return (b + sum(t[k] for t, k in zip(tables, ks))) / (forward(1 + max(ks)) + draft * sum(k > 0 for k in ks))

        best = max(rate(ks) for ks in itertools.product(range(limit + 1), repeat=b))
        assert rate(plan_drafts(tables, forward, lambda k: draft if k > 0 else 0.0)) == pytest.approx(best, rel=1e-9)


def test_drafting_must_beat_no_drafts_by_the_margin():
    """A plan that drafts must promise `min_gain` more tokens per second than no drafts:
    a small predicted gain (inside the cost model's error) keeps speculation off."""
    tables = [gains([0.6] * 3, 3) for _ in range(4)]

    def forward(w):
        return 0.100 + 0.004 * (w - 1)

    def draft(k):
        return 0.007 if k > 0 else 0.0

    plan = plan_drafts(tables, forward, draft)
    drafted = (4 + sum(t[k] for t, k in zip(tables, plan))) / (forward(1 + max(plan)) + sum(map(draft, plan)))
    gain = drafted / (4 / forward(1)) - 1
    assert sum(plan) > 0 and gain > 0
    assert sum(plan_drafts(tables, forward, draft, min_gain=gain * 1.01)) == 0
    assert plan_drafts(tables, forward, draft, min_gain=gain * 0.99) == plan


def test_one_drafter_forward_for_all_makes_drafting_pay_at_a_larger_batch():
    """With the drafter's cost per step (one forward for every drafting sequence) instead of
    one call per sequence, drafting pays at a batch where separate calls do not."""
    separate = BatchCosts(cpu_like_costs().forward)
    together = BatchCosts(cpu_like_costs().forward, drafts={1: 0.005, 2: 0.006, 4: 0.008, 8: 0.012, 16: 0.02})
    step = StepCosts({1: 0.052, 2: 0.054}, draft=0.012)
    b = 8
    plans = [LoadAwarePolicy(costs, step, MAX_DRAFTS, min_gain=0.0).choose(requests(b, [0.6] * b))
             for costs in (separate, together)]
    assert sum(plans[0]) < sum(plans[1])
    assert sum(k > 0 for k in plans[1]) == b
    assert together.drafts_s(0) == 0.0 and together.drafts_s(3) == pytest.approx(0.007)
    assert separate.drafts_s(3) is None


def test_one_request_alone_gets_autos_choice_probes_included():
    policy = LoadAwarePolicy(cpu_like_costs(), STEP, MAX_DRAFTS, min_gain=0.0)
    for rate in (0.9, 0.5, 0.02):
        alone, reference = requests(1, [rate])[0], requests(1, [rate])[0].sequence.policy
        choices = [policy.choose([alone])[0] for _ in range(40)]
        assert choices == [reference.choose(MAX_DRAFTS) for _ in range(40)]
    assert 0 in choices and MAX_DRAFTS in choices  # speculation off, with a probe now and then


def test_each_sequence_learns_its_own_rates_from_the_server_wide_prior():
    policy = LoadAwarePolicy(cpu_like_costs(), STEP, MAX_DRAFTS, prior_weight=4.0)
    shared = AutoBlock(STEP, MAX_DRAFTS)
    good, bad = Seq(shared), Seq(shared)
    assert policy.rates(good) == pytest.approx(shared.rates())
    for _ in range(20):
        policy.observe(good, 3, 3)
        policy.observe(bad, 3, 0)
    assert policy.rates(good)[0] > 0.75 > 0.25 > policy.rates(bad)[0]
    assert shared.reached[0] > 0  # every observation also updates the server-wide estimate
    rates = SequenceRates(3)
    rates.observe(3, 1)
    assert rates.reached == [1.0, 1.0, 0.0] and rates.accepted == [1.0, 0.0, 0.0]


def test_batched_costs_interpolate_in_rows_and_width_and_round_trip():
    costs = cpu_like_costs()
    assert costs.forward_s(4, 2) == pytest.approx(0.050 + 0.002 * 8)
    assert costs.forward_s(3, 1) == pytest.approx((costs.forward_s(2, 1) + costs.forward_s(4, 1)) / 2)
    assert costs.forward_s(4, 3) == pytest.approx(0.050 + 0.002 * 12)
    assert costs.forward_s(32, 1) == pytest.approx(0.050 + 0.002 * 32)  # extrapolated
    assert BatchCosts.from_dict(json.loads(json.dumps(costs.to_dict()))) == costs
    with pytest.raises(ValueError):
        BatchCosts({(2, 1): 0.1})


def test_batched_costs_are_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECFLASH_COST_CACHE", str(tmp_path))
    target = tiny_target("llama")
    proposer = DFlashProposer(tiny_drafter(target, block_size=4), target)
    sizes = batch_sizes(3, 4)
    assert sizes == {1: [1, 2, 3, 4], 2: [1, 2, 3, 4], 3: [1, 2, 4]}
    costs = measure_batch_costs(target, proposer, max_rows=3, max_tokens=4, context=16, repeats=2)
    assert set(costs.forward) == {(b, w) for b, ws in sizes.items() for w in ws}
    assert set(costs.drafts) == {1, 2, 3}  # one drafter forward for 1, 2, 3 drafting sequences
    assert BatchCosts.from_dict(json.loads(json.dumps(costs.to_dict()))) == costs
    first = load_or_measure_batch(target, proposer, max_rows=3, max_tokens=4)
    assert len(list(tmp_path.glob("batch-*.json"))) == 1 or first.noisy
    monkeypatch.setattr("specflash.perf.measure.measure_batch_costs", lambda *a, **k: pytest.fail("measured twice"))
    if not first.noisy:
        assert load_or_measure_batch(target, proposer, max_rows=3, max_tokens=4) == first


def test_the_batch_decoder_with_the_load_aware_policy_keeps_the_solo_tokens():
    from specflash.runtime.decode import SpeculativeDecoder

    target = tiny_target("llama")
    proposer = DFlashProposer(tiny_drafter(target, block_size=8), target)
    prompts = [[5, 6, 7], [9, 8, 7, 6, 5, 4], [42] * 5, [17, 18]]
    config = DecodeConfig(max_new_tokens=12, stop_token_ids=())
    policy = LoadAwarePolicy(cpu_like_costs(4), STEP, 7)
    decoder = BatchDecoder(target, proposer, 8, AutoBlock(STEP, 7), policy, max_slots=4)
    results = decoder.generate_all(prompts, config)
    for prompt, result in zip(prompts, results):
        solo = SpeculativeDecoder(target, proposer, 8, AutoBlock(STEP, 7)).generate(prompt, config)
        assert result.token_ids == solo.token_ids
