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

`measure_costs` times the bare forwards once per target / proposer / machine (cached as
JSON under `$SPECFLASH_HOME/costs/`); `expected_tokens` and `best_num_drafts` are pure.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch


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


# ------------------------------------------------------------------ measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def default_sizes(max_tokens: int) -> list[int]:
    sizes = {1, 2, 3, 4, 6, 8, 12, 16, 24, 32, max_tokens}
    return sorted(s for s in sizes if s <= max_tokens)


def non_decreasing(values: dict[int, float]) -> dict[int, float]:
    """Least-squares non-decreasing fit over sorted keys (pool adjacent violators): a
    longer forward never costs less, whatever noise the timings caught."""
    keys = sorted(values)
    blocks: list[list[float]] = []  # [sum, count]
    for k in keys:
        blocks.append([values[k], 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    fitted: list[float] = []
    for total, count in blocks:
        fitted += [total / count] * int(count)
    return dict(zip(keys, fitted))


def relative_spread(times: list[float]) -> float:
    """Interquartile range / median of repeated timings (0 = perfectly steady)."""
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return (q[2] - q[0]) / max(q[1], 1e-12)


@torch.inference_mode()
def measure_costs(target, proposer=None, max_tokens: int = 16, context: int = 256, repeats: int = 7,
                  warmup: int = 2, seed: int = 0, noise_limit: float = 0.5) -> StepCosts:
    """Time target forwards of 1..max_tokens tokens after `context` cached tokens, and
    proposer calls for 1..max_tokens - 1 drafts at the same position.

    Sizes are timed round-robin (a burst of other work hits all alike), medians taken, and
    verify costs made non-decreasing in the number of tokens. `noisy` is set when the
    repeats of some size spread by more than `noise_limit` (interquartile range / median):
    another process was competing for the cores."""
    from .sampling import Sampler

    device = target.device
    context = max(1, min(context, target.max_context - 2 * max_tokens - 2))
    generator = torch.Generator().manual_seed(seed)
    high = min(target.vocab_rows, len(target.tokenizer) if target.tokenizer is not None else target.vocab_rows)
    prompt = torch.randint(0, high, (context,), generator=generator).to(device)
    target.set_taps(proposer.layer_ids if proposer is not None else ())
    cache = target.new_cache()
    out = target.forward(prompt[None], cache, logits_to_keep=1)
    jobs = {}
    for n in default_sizes(max_tokens):
        block = torch.randint(0, high, (1, n), generator=generator).to(device)

        def run(block=block):
            target.forward(block, cache)
            target.crop_cache(cache, context)

        jobs[n] = run
    if proposer is not None and max_tokens > 1:
        sampler = Sampler.create(0.0, 0, 1.0, seed, device=device)
        proposer.reset(prompt, out.features)
        anchor = int(prompt[-1])
        for k in default_sizes(max_tokens - 1):
            jobs[("draft", k)] = lambda k=k: proposer.propose(anchor, context, k, sampler)
    for _ in range(warmup):
        for fn in jobs.values():
            fn()
    times: dict = {key: [] for key in jobs}
    for _ in range(repeats):
        for key, fn in jobs.items():
            times[key].append(_timed(fn, device))
    noisy = any(relative_spread(t) > noise_limit for t in times.values())
    verify = non_decreasing({n: statistics.median(t) for n, t in times.items() if isinstance(n, int)})
    drafts = non_decreasing({key[1]: statistics.median(t) for key, t in times.items() if isinstance(key, tuple)})
    draft = drafts[max(drafts)] if drafts else 0.0
    return StepCosts(verify, draft, context, noisy, drafts or None)


# -------------------------------------------------------------------- caching
def costs_dir() -> Path:
    """`$SPECFLASH_COST_CACHE`, default `$SPECFLASH_HOME/costs`."""
    env = os.environ.get("SPECFLASH_COST_CACHE")
    if env:
        return Path(env).expanduser()
    from .models.resolve import specflash_home

    return specflash_home() / "costs"


def cost_key(target, proposer, max_tokens: int) -> str:
    """Everything a measurement depends on: model, proposer, device, dtype, threads, machine."""
    from .bench.machine import machine_info

    drafter = getattr(proposer, "drafter", None)
    parts = {
        "target": str(getattr(target, "name", "")), "target_layers": target.num_layers,
        "hidden": target.hidden_size, "proposer": getattr(proposer, "name", "none"),
        "drafter": json.dumps(drafter.config.to_dict(), sort_keys=True, default=str) if drafter is not None else "",
        "device": str(target.device), "dtype": str(target.dtype), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": platform.machine(), "cpu": machine_info()["cpu"],
        "max_tokens": max_tokens,
        # The few-row kernel choice changes verify costs (kernelchoice.py).
        "kernels": target.kernel_choice.describe() if hasattr(target, "kernel_choice") else "stock",
        # The lean forward (leanforward.py) runs the same kernels with less overhead.
        "forward": getattr(target, "forward_path", "transformers"),
        "steps": getattr(target, "step_mode", "dynamic"),  # static KV cache / CUDA graphs (staticsteps.py)
    }
    if target.device.type == "cuda":
        parts["gpu"] = torch.cuda.get_device_name(target.device)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def cached_measurement(path: Path, measure, from_dict, refresh: bool = False, log=None,
                       start_message: str = "", busy_message: str = ""):
    """A measurement cached as JSON at `path`: read it, else `measure()` (once more if the
    result is `noisy`); a result still noisy (another process was busy) is returned for this
    run only, never cached. SPECFLASH_REFRESH_COSTS=1 (or `refresh`) measures again. The
    result needs `noisy` and `to_dict()`; `from_dict` reads the cached form back."""
    refresh = refresh or os.environ.get("SPECFLASH_REFRESH_COSTS", "") not in ("", "0")
    if path.exists() and not refresh:
        try:
            return from_dict(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):
            pass  # a damaged cache file is measured again
    if log is not None:
        log(start_message)
    result = measure()
    if result.noisy:
        result = measure()  # one more try
    if result.noisy:
        if log is not None:
            log(busy_message)
        return result
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    os.replace(tmp, path)
    return result


def load_or_measure(target, proposer=None, max_tokens: int = 16, refresh: bool = False,
                    log=None) -> StepCosts:
    """The cached cost model for this target / proposer / machine, measured on first use
    (set SPECFLASH_REFRESH_COSTS=1, or pass refresh, to measure again)."""
    path = costs_dir() / f"{cost_key(target, proposer, max_tokens)}.json"
    return cached_measurement(
        path, lambda: measure_costs(target, proposer, max_tokens=max_tokens), StepCosts.from_dict, refresh, log,
        f"measuring step costs for {getattr(target, 'name', 'target')} (once per model and machine) ...",
        "warning: the machine was busy while step costs were measured (timings spread widely); using them for "
        "this run only, not caching them")


__all__ = ["StepCosts", "best_num_drafts", "engine_efficiency", "expected_tokens", "load_or_measure",
           "measure_costs", "modeled_time_s"]
