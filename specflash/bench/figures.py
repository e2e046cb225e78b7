"""How `specflash bench` combines per-request figures into per-method, per-dataset ones.

Per-request figures are `metrics.SpecStats` (acceptance length, tau, histogram,
per-position acceptance, TTFT, TPOT: defined once there). Over the requests of one
method on one dataset:
- tau = mean over requests of the request's tau (the published protocol); reported
  only for methods that draft tokens (None otherwise);
- acceptance histogram and per-position acceptance rate: pooled over every verify step
  of every request;
- TPOT = mean over requests of the request's TPOT, with its spread (min / median / max);
  tokens_per_s = 1 / mean TPOT; TTFT = mean over requests;
- speedup = baseline mean TPOT / method mean TPOT on the same dataset;
- mismatches = requests whose tokens differ from the baseline's (temperature 0 only);
- efficiency (our loop only) = the time the bare forwards of every step took, measured
  in the run itself (drafter call + target verify forward per step, `SpecStats.forward_time_s`)
  summed over requests / the measured decode time summed over requests: for a fixed block
  B it is achieved tokens/s over tau / (t_draft + t_verify(B)) with the run's own per-step
  costs, and 1 - efficiency is the share of everything else (Python, cache bookkeeping,
  sampling, acceptance, stop checks). Measuring in-run keeps the figure honest on a
  machine whose speed drifts between the cost-model measurement and the run;
  `efficiency_model` is the same ratio with the forwards' times taken from the cached
  cost model (`costmodel`: t_draft(k) + t_verify(k + 1) per step).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from ..runtime.metrics import SpecStats


def pool(stats: Sequence[SpecStats]) -> SpecStats:
    """One SpecStats holding every verify step of `stats` (for pooled histogram / rates)."""
    pooled = SpecStats()
    for s in stats:
        pooled.acceptance_lengths.extend(s.acceptance_lengths)
        grow = len(s.drafted_per_position) - len(pooled.drafted_per_position)
        if grow > 0:
            pooled.drafted_per_position.extend([0] * grow)
            pooled.accepted_per_position.extend([0] * grow)
        for i, (d, a) in enumerate(zip(s.drafted_per_position, s.accepted_per_position)):
            pooled.drafted_per_position[i] += d
            pooled.accepted_per_position[i] += a
        pooled.num_new_tokens += s.num_new_tokens
    return pooled


def spread(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"min": None, "median": None, "max": None}
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def efficiency(stats: Sequence[SpecStats]) -> float | None:
    """Engine efficiency over requests from the run's own forward timings (module docstring);
    None for methods that do not time their forwards (other runtimes)."""
    timed = [s for s in stats if s.drafted_per_step and s.forward_time_s > 0]
    actual = sum(s.decode_time_s for s in timed)
    return sum(s.forward_time_s for s in timed) / actual if timed and actual > 0 else None


def model_efficiency(stats: Sequence[SpecStats], costs) -> float | None:
    """Engine efficiency with the forwards' times from the cost model; None without one."""
    if costs is None:
        return None
    from ..perf.costmodel import modeled_time_s

    ideal = sum(modeled_time_s(costs, s.drafted_per_step) for s in stats)
    actual = sum(s.decode_time_s for s in stats if s.drafted_per_step)
    return ideal / actual if actual > 0 else None


def summarize(stats: Sequence[SpecStats], has_drafts: bool, costs=None) -> dict:
    """The figures of one method on one dataset (see the module docstring)."""
    tpots = [s.tpot_s for s in stats if s.tpot_s is not None]
    taus = [s.tau for s in stats if s.tau is not None]
    pooled = pool(stats)
    mean_tpot = _mean(tpots)
    return {
        "prompts": len(stats),
        "tau": _mean(taus) if has_drafts else None,
        "efficiency": efficiency(stats),
        "efficiency_model": model_efficiency(stats, costs),
        "drafts_per_step": (statistics.fmean(pool_steps) if (pool_steps := [k for s in stats for k in
                                                                             s.drafted_per_step]) else None)
        if has_drafts else None,
        "tpot_s": mean_tpot,
        "tpot_s_spread": spread(tpots),
        "tokens_per_s": 1.0 / mean_tpot if mean_tpot else None,
        "time_to_first_token_s": _mean([s.time_to_first_token_s for s in stats]),
        "new_tokens": pooled.num_new_tokens,
        "acceptance_histogram": {str(k): v for k, v in pooled.histogram().items()} if has_drafts else {},
        "acceptance_rate_per_position": pooled.acceptance_rate_per_position if has_drafts else [],
        "drafted_per_position": list(pooled.drafted_per_position) if has_drafts else [],
    }


def speedup(baseline_tpot_s: float | None, method_tpot_s: float | None) -> float | None:
    """Baseline mean TPOT / method mean TPOT (> 1: the method is faster)."""
    if not baseline_tpot_s or not method_tpot_s:
        return None
    return baseline_tpot_s / method_tpot_s


def first_mismatch(tokens: Sequence[int], reference: Sequence[int]) -> int | None:
    """Index of the first differing token (a length difference counts); None if equal."""
    for i, (a, b) in enumerate(zip(tokens, reference)):
        if a != b:
            return i
    return None if len(tokens) == len(reference) else min(len(tokens), len(reference))
