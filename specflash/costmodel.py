"""Step costs of speculative decoding and the number of drafts that pays best.

A verify step that checks k drafts costs

    step(k) = t_draft * [k > 0] + t_verify(k + 1)

(the drafter proposes its whole block in one forward whatever k is; k = 0 is a plain
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
    its median time; `draft` is one proposer call for a full block."""

    verify: dict[int, float]
    draft: float
    context: int = 0  # cached tokens in front of the measured forwards

    def __post_init__(self):
        if not self.verify or 1 not in self.verify:
            raise ValueError("verify costs need at least the 1-token forward")

    def verify_s(self, tokens: int) -> float:
        """Cost of a `tokens`-token target forward, linear between measured sizes and
        extrapolated from the last two beyond them."""
        sizes = sorted(self.verify)
        if tokens in self.verify:
            return self.verify[tokens]
        lo = max((s for s in sizes if s < tokens), default=sizes[0])
        hi = min((s for s in sizes if s > tokens), default=None)
        if hi is None:
            if len(sizes) == 1:
                return self.verify[lo]
            a, b = sizes[-2], sizes[-1]
            slope = (self.verify[b] - self.verify[a]) / (b - a)
            return self.verify[b] + slope * (tokens - b)
        frac = (tokens - lo) / (hi - lo)
        return self.verify[lo] + frac * (self.verify[hi] - self.verify[lo])

    def step_s(self, num_drafts: int) -> float:
        return (self.draft if num_drafts > 0 else 0.0) + self.verify_s(num_drafts + 1)

    def to_dict(self) -> dict:
        return {"verify": {str(k): v for k, v in sorted(self.verify.items())}, "draft": self.draft,
                "context": self.context}

    @classmethod
    def from_dict(cls, data: dict) -> StepCosts:
        return cls({int(k): float(v) for k, v in data["verify"].items()}, float(data["draft"]),
                   int(data.get("context", 0)))


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


def _median_time(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def default_sizes(max_tokens: int) -> list[int]:
    sizes = {1, 2, 3, 4, 6, 8, 12, 16, 24, 32, max_tokens}
    return sorted(s for s in sizes if s <= max_tokens)


@torch.inference_mode()
def measure_costs(target, proposer=None, max_tokens: int = 16, context: int = 256, repeats: int = 7,
                  warmup: int = 2, seed: int = 0) -> StepCosts:
    """Time target forwards of 1..max_tokens tokens after `context` cached tokens, and one
    proposer call for a full block (max_tokens - 1 drafts) at the same position."""
    from .sampling import Sampler

    device = target.device
    context = max(1, min(context, target.max_context - 2 * max_tokens - 2))
    generator = torch.Generator().manual_seed(seed)
    high = min(target.vocab_rows, len(target.tokenizer) if target.tokenizer is not None else target.vocab_rows)
    prompt = torch.randint(0, high, (context,), generator=generator).to(device)
    target.set_taps(proposer.layer_ids if proposer is not None else ())
    cache = target.new_cache()
    out = target.forward(prompt[None], cache, logits_to_keep=1)
    verify: dict[int, float] = {}
    for n in default_sizes(max_tokens):
        block = torch.randint(0, high, (1, n), generator=generator).to(device)

        def run(block=block):
            target.forward(block, cache)
            target.crop_cache(cache, context)

        for _ in range(warmup):
            run()
        verify[n] = _median_time(run, repeats, device)
    draft = 0.0
    if proposer is not None and max_tokens > 1:
        sampler = Sampler.create(0.0, 0, 1.0, seed, device=device)
        proposer.reset(prompt, out.features)
        anchor = int(prompt[-1])

        def propose():
            proposer.propose(anchor, context, max_tokens - 1, sampler)

        for _ in range(warmup):
            propose()
        draft = _median_time(propose, repeats, device)
    return StepCosts(verify, draft, context)


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
    }
    if target.device.type == "cuda":
        parts["gpu"] = torch.cuda.get_device_name(target.device)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def load_or_measure(target, proposer=None, max_tokens: int = 16, refresh: bool = False,
                    log=None) -> StepCosts:
    """The cached cost model for this target / proposer / machine, measured on first use."""
    path = costs_dir() / f"{cost_key(target, proposer, max_tokens)}.json"
    if path.exists() and not refresh:
        try:
            return StepCosts.from_dict(json.loads(path.read_text()))
        except (ValueError, KeyError, json.JSONDecodeError):
            pass  # a damaged cache file is measured again
    if log is not None:
        log(f"measuring step costs for {getattr(target, 'name', 'target')} (once per model and machine) ...")
    costs = measure_costs(target, proposer, max_tokens=max_tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(costs.to_dict(), indent=1) + "\n")
    os.replace(tmp, path)
    return costs


__all__ = ["StepCosts", "best_num_drafts", "engine_efficiency", "expected_tokens", "load_or_measure",
           "measure_costs", "modeled_time_s"]
