"""The cost model picks the number of drafts with the most expected tokens per second
(checked against brute force and simulation), turns speculation off when acceptance is
near zero, and `AutoBlock` learns from acceptance, probes while off, and backs off."""

import json
import random

import pytest

from specflash.runtime.blockpolicy import AutoBlock, FixedBlock, make_policy, parse_block_size
from specflash.perf.costmodel import StepCosts, best_num_drafts, engine_efficiency, expected_tokens, modeled_time_s
from specflash.perf.measure import load_or_measure, measure_costs, non_decreasing, relative_spread
from specflash.errors import InputError
from specflash.runtime.proposers import DFlashProposer
from tiny import tiny_drafter


def _random_costs(rng: random.Random, max_tokens: int) -> StepCosts:
    verify, t = {}, rng.uniform(0.5, 2.0)
    for n in sorted({1, 2, 4, 8, max_tokens}):
        verify[n] = t
        t += rng.uniform(0.0, 0.5) * n  # non-decreasing, any slope
    draft = rng.uniform(0.0, 1.5)
    drafts = None
    if max_tokens > 2 and rng.random() < 0.5:  # per-k draft costs, growing with k
        drafts = {1: rng.uniform(0.0, draft), max_tokens - 1: draft}
    return StepCosts(verify, draft=draft, drafts=drafts)


def test_best_num_drafts_matches_brute_force():
    rng = random.Random(0)
    for _ in range(500):
        max_drafts = rng.randint(1, 15)
        costs = _random_costs(rng, max_drafts + 1)
        accept = [rng.random() ** rng.choice((0.2, 1.0, 3.0)) for _ in range(max_drafts)]
        rates = [expected_tokens(accept, k) / costs.step_s(k) for k in range(max_drafts + 1)]
        chosen = best_num_drafts(accept, costs, max_drafts)
        assert rates[chosen] == pytest.approx(max(rates), rel=1e-9)


def test_expected_tokens_matches_simulation():
    rng = random.Random(1)
    accept = [0.9, 0.7, 0.5, 0.95]
    for k in range(5):
        total = 0
        for _ in range(40_000):
            n = 1
            for i in range(k):
                if rng.random() >= accept[i]:
                    break
                n += 1
            total += n
        assert total / 40_000 == pytest.approx(expected_tokens(accept, k), abs=0.02)


def test_speculation_turns_off_when_acceptance_is_near_zero():
    costs = StepCosts({1: 30e-3, 4: 45e-3, 16: 75e-3}, draft=8e-3)
    assert best_num_drafts([0.02] * 15, costs, 15) == 0
    assert best_num_drafts([0.95] * 15, costs, 15) > 0
    # Verifying is free (a GPU-like curve): drafting pays even at modest acceptance.
    flat = StepCosts({1: 10e-3, 16: 10.5e-3}, draft=1e-3)
    assert best_num_drafts([0.3] * 15, flat, 15) > 0


def test_verify_cost_interpolates_and_extrapolates():
    costs = StepCosts({1: 1.0, 4: 2.5, 8: 4.5}, draft=0.5)
    assert costs.verify_s(2) == pytest.approx(1.5)
    assert costs.verify_s(12) == pytest.approx(6.5)
    assert costs.step_s(0) == 1.0 and costs.step_s(3) == pytest.approx(3.0)
    assert StepCosts.from_dict(json.loads(json.dumps(costs.to_dict()))) == costs


def test_verify_costs_are_fitted_non_decreasing():
    rng = random.Random(2)
    for _ in range(200):
        raw = {n: rng.uniform(0.1, 3.0) for n in (1, 2, 3, 4, 6, 8, 12, 16)}
        fitted = non_decreasing(raw)
        values = [fitted[n] for n in sorted(fitted)]
        assert values == sorted(values)
        assert sum(values) == pytest.approx(sum(raw.values()))  # pooling keeps the total (least squares)
    steady = {1: 1.0, 4: 1.2, 16: 2.0}
    assert non_decreasing(steady) == steady
    assert non_decreasing({1: 1.0, 2: 3.0, 4: 1.0}) == {1: 1.0, 2: 2.0, 4: 2.0}


def test_busy_machine_timings_are_flagged_noisy():
    assert relative_spread([1.0, 1.01, 0.99, 1.0, 1.02]) < 0.1
    assert relative_spread([1.0, 5.0, 1.1, 9.0, 0.9, 6.0]) > 0.5


def test_efficiency_is_modeled_time_over_measured_time():
    costs = StepCosts({1: 1.0, 16: 3.0}, draft=1.0)
    steps = [15, 15, 0, 15]
    assert modeled_time_s(costs, steps) == pytest.approx(13.0)
    assert engine_efficiency(costs, steps, 26.0) == pytest.approx(0.5)
    assert engine_efficiency(costs, [], 1.0) is None


def test_auto_block_learns_to_speculate_and_to_stop():
    costs = StepCosts({1: 1.0, 16: 2.0}, draft=0.2)
    policy = AutoBlock(costs, 15)
    for _ in range(30):
        policy.observe(15, 15)  # every draft accepted
    assert policy.choose(15) == 15
    for _ in range(60):
        policy.observe(policy.choose(15) or 15, 0)  # nothing accepted any more
    assert policy.choose(15) == 0


def test_auto_block_probes_while_off_and_backs_off():
    costs = StepCosts({1: 1.0, 16: 3.0}, draft=0.5)
    policy = AutoBlock(costs, 15, probe_every=4, probe_max=16)
    for _ in range(80):
        policy.observe(15, 0)
    picks = []
    for _ in range(60):
        k = policy.choose(15)
        picks.append(k)
        policy.observe(k, 0)
    probes = [i for i, k in enumerate(picks) if k > 0]
    assert picks.count(0) > 40 and len(probes) >= 3
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert gaps == sorted(gaps) and gaps[-1] > gaps[0]  # the interval grows while probes keep failing
    assert max(gaps) <= 16 + 1


def test_auto_block_never_exceeds_the_room_left():
    policy = AutoBlock(StepCosts({1: 1.0, 16: 1.0}, draft=0.0), 15)
    for room in (0, 1, 3, 15):
        assert 0 <= policy.choose(room) <= room


def test_parse_block_size_accepts_auto_and_positive_integers():
    assert parse_block_size("auto") == "auto" and parse_block_size("8") == 8 and parse_block_size(None) is None
    for bad in ("0", "-3", "big"):
        with pytest.raises(InputError):
            parse_block_size(bad)


def test_measure_costs_times_every_size_and_the_drafter(targets):
    target = targets("llama")
    proposer = DFlashProposer(tiny_drafter(target, block_size=8), target)
    costs = measure_costs(target, proposer, max_tokens=8, context=20, repeats=3, warmup=1)
    assert set(costs.verify) == {1, 2, 3, 4, 6, 8} and costs.draft > 0
    values = [costs.verify[n] for n in sorted(costs.verify)]
    assert values[0] > 0 and values == sorted(values)
    assert set(costs.drafts) == {1, 2, 3, 4, 6, 7} and costs.draft == costs.drafts[7]
    assert StepCosts.from_dict(costs.to_dict()) == costs


def test_draft_cost_depends_on_the_number_of_drafts():
    costs = StepCosts({1: 1.0, 16: 2.0}, draft=0.5, drafts={1: 0.1, 4: 0.2, 15: 0.5})
    assert costs.draft_s(0) == 0.0 and costs.draft_s(1) == 0.1 and costs.draft_s(15) == 0.5
    assert abs(costs.draft_s(2) - (0.1 + 0.1 / 3)) < 1e-12
    assert costs.draft_s(20) == 0.5  # never above the full block
    assert abs(costs.step_s(2) - (costs.draft_s(2) + costs.verify_s(3))) < 1e-12
    # Without per-k figures (an older cache file) every step pays the full-block draft.
    assert StepCosts({1: 1.0}, draft=0.5).draft_s(3) == 0.5


def test_best_num_drafts_uses_per_k_draft_costs():
    # Verifying is almost free, but the drafter's cost grows fast with k: few drafts win.
    costs = StepCosts({1: 1.0, 16: 1.0}, draft=3.0, drafts={1: 0.05, 2: 0.1, 15: 3.0})
    assert best_num_drafts([0.9] * 15, costs, 15) <= 4


def test_steady_costs_are_cached_and_noisy_ones_are_not(targets, tmp_path, monkeypatch):
    import specflash.perf.measure as measure

    monkeypatch.setenv("SPECFLASH_COST_CACHE", str(tmp_path))
    target = targets("llama")
    proposer = DFlashProposer(tiny_drafter(target, block_size=8), target)
    calls = []
    outcome = {"noisy": False}

    def fake_measure(*args, **kwargs):
        calls.append(1)
        return StepCosts({1: 1.0, 8: 2.0}, 0.5, 20, outcome["noisy"])

    monkeypatch.setattr(measure, "measure_costs", fake_measure)
    first = load_or_measure(target, proposer, max_tokens=8)
    assert load_or_measure(target, proposer, max_tokens=8) == first and len(calls) == 1  # read back
    assert len(list(tmp_path.glob("*.json"))) == 1
    size, policy = make_policy("auto", target, proposer)
    assert size == 8 and isinstance(policy, AutoBlock) and policy.costs == first
    assert isinstance(make_policy(4, target, proposer)[1], FixedBlock)
    assert make_policy("auto", target, None)[0] == 1
    # A busy machine: measured twice, used, never cached.
    outcome["noisy"] = True
    other = DFlashProposer(tiny_drafter(target, block_size=4), target)
    warnings = []
    costs = load_or_measure(target, other, max_tokens=4, log=warnings.append)
    assert costs.noisy and len(calls) == 3 and "busy" in warnings[-1]
    assert len(list(tmp_path.glob("*.json"))) == 1
