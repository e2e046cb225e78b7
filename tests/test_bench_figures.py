"""Benchmark figures on hand-made traces: tau, histogram, per-position rate, TPOT,
speedup and the same-output check, each against numbers worked out by hand."""

import pytest

from specflash.bench import figures
from specflash.runtime.metrics import SpecStats


def trace(steps, num_new_tokens, decode_time_s, ttft=0.5, first_step_tokens=1):
    """steps: (drafted, accepted) per verify step."""
    stats = SpecStats(num_new_tokens=num_new_tokens, decode_time_s=decode_time_s, time_to_first_token_s=ttft,
                      first_step_tokens=first_step_tokens)
    for drafted, accepted in steps:
        stats.record_step(drafted, accepted)
    return stats


@pytest.fixture
def two_requests():
    # request A: 2 steps, accepted 3 and 0 of 3 drafts -> lengths 4, 1 (tau 2.5); 1 + 5 tokens
    a = trace([(3, 3), (3, 0)], num_new_tokens=6, decode_time_s=1.0)
    # request B: 4 steps, accepted 1, 1, 0, 2 of 3 -> lengths 2, 2, 1, 3 (tau 2.0); 1 + 8 tokens
    b = trace([(3, 1), (3, 1), (3, 0), (3, 2)], num_new_tokens=9, decode_time_s=4.0)
    return a, b


def test_tau_is_the_mean_over_requests_of_each_requests_mean(two_requests):
    fig = figures.summarize(two_requests, has_drafts=True)
    assert fig["tau"] == pytest.approx((2.5 + 2.0) / 2)  # not the pooled 13 / 6
    assert figures.summarize(two_requests, has_drafts=False)["tau"] is None


def test_histogram_pools_every_verify_step(two_requests):
    fig = figures.summarize(two_requests, has_drafts=True)
    assert fig["acceptance_histogram"] == {"1": 2, "2": 2, "3": 1, "4": 1}


def test_per_position_rate_pools_drafted_and_accepted(two_requests):
    fig = figures.summarize(two_requests, has_drafts=True)
    # position 1 accepted in A1, B1, B2, B4 of 6 steps; position 2 in A1, B4; position 3 in A1
    assert fig["acceptance_rate_per_position"] == pytest.approx([4 / 6, 2 / 6, 1 / 6])
    assert fig["drafted_per_position"] == [6, 6, 6]


def test_tpot_excludes_the_first_token_and_spread_is_over_requests(two_requests):
    fig = figures.summarize(two_requests, has_drafts=True)
    assert two_requests[0].tpot_s == pytest.approx(1.0 / 5)
    assert two_requests[1].tpot_s == pytest.approx(4.0 / 8)
    assert fig["tpot_s"] == pytest.approx((0.2 + 0.5) / 2)
    assert fig["tokens_per_s"] == pytest.approx(1 / 0.35)
    assert fig["tpot_s_spread"] == pytest.approx({"min": 0.2, "median": 0.35, "max": 0.5})
    assert fig["time_to_first_token_s"] == pytest.approx(0.5)
    assert fig["prompts"] == 2


def test_a_first_step_that_delivers_several_tokens_counts_in_ttft_not_tpot():
    stats = trace([], num_new_tokens=10, decode_time_s=1.4, first_step_tokens=3)
    assert stats.tpot_s == pytest.approx(1.4 / 7)


def test_speedup_is_baseline_tpot_over_method_tpot():
    assert figures.speedup(0.1, 0.05) == pytest.approx(2.0)
    assert figures.speedup(0.1, 0.2) == pytest.approx(0.5)
    assert figures.speedup(None, 0.2) is None


def test_first_mismatch_finds_the_first_differing_token():
    assert figures.first_mismatch([1, 2, 3], [1, 2, 3]) is None
    assert figures.first_mismatch([1, 9, 3], [1, 2, 3]) == 1
    assert figures.first_mismatch([1, 2], [1, 2, 3]) == 2


def test_efficiency_is_the_forwards_share_of_the_decode_time():
    from specflash.bench.figures import efficiency

    a = SpecStats(drafted_per_step=[3, 3], decode_time_s=2.0, forward_time_s=1.5)
    b = SpecStats(drafted_per_step=[0, 1], decode_time_s=1.0, forward_time_s=0.9)
    assert efficiency([a, b]) == pytest.approx(2.4 / 3.0)
    # Other runtimes do not time their forwards: no figure rather than a made-up one.
    assert efficiency([SpecStats(drafted_per_step=[1], decode_time_s=1.0)]) is None
