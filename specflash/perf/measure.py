"""Measuring step costs on this machine, and caching measurements.

`measure_costs` times bare target forwards of 1..B tokens after a cached context and
proposer calls, round-robin, medians; `load_or_measure` caches the result as JSON under
`$SPECFLASH_COST_CACHE` (default `$SPECFLASH_HOME/costs/`) keyed by everything it depends
on (model, proposer, device, dtype, threads, CPU, kernels, forward path, step mode).
`cached_measurement` is the read / measure / retry-when-noisy / atomic-write logic shared
with the kernel choice (kernelchoice.py). `measure_batch_costs` / `load_or_measure_batch`
do the same for batched forwards of 1..max_rows rows (`BatchCosts`, the server's
load-aware speculation).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from ..paths import specflash_home
from .costmodel import BatchCosts, StepCosts


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
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


def time_round_robin(jobs: dict, warmup: int, repeats: int, device: torch.device) -> dict:
    """Run every job `warmup` times untimed, then `repeats` rounds of one timed call each,
    in turn (drift hits all jobs alike) -> {key: [seconds per call]}."""
    for _ in range(warmup):
        for fn in jobs.values():
            fn()
    times: dict = {key: [] for key in jobs}
    for _ in range(repeats):
        for key, fn in jobs.items():
            times[key].append(timed(fn, device))
    return times


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
    from ..runtime.sampling import Sampler

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
    times = time_round_robin(jobs, warmup, repeats, device)
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
    return specflash_home() / "costs"


def cost_key(target, proposer, max_tokens: int) -> str:
    """Everything a measurement depends on: model, proposer, device, dtype, threads, machine."""
    from .machine import machine_info

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


# ------------------------------------------------------------- batched forwards
def batch_sizes(max_rows: int, max_tokens: int) -> dict[int, list[int]]:
    """Row counts to time (1, 2, 4, ... and max_rows) -> the row widths timed at each: every
    few-token size where one or two rows run, 1, 2, 4, 8, ... and max_tokens beyond."""
    rows = sorted({r for r in (1, 2, 4, 8, 16, 32, 64) if r <= max_rows} | {max_rows})
    fine = [w for w in default_sizes(max_tokens) if w <= 16] + ([max_tokens] if max_tokens > 16 else [])
    coarse = sorted({w for w in (1, 2, 4, 8, 16, 32) if w <= max_tokens} | {max_tokens})
    return {r: sorted(set(fine if r <= 2 else coarse)) for r in rows}


@torch.inference_mode()
def measure_batch_costs(target, proposer=None, max_rows: int = 8, max_tokens: int = 16, context: int = 256,
                        repeats: int = 5, warmup: int = 1, seed: int = 0, noise_limit: float = 0.5,
                        row_invariant: bool = False) -> BatchCosts:
    """Time `forward_batch` (row-invariant or not) over B rows of w tokens each, every
    sequence `context` tokens into its slot (sizes from `batch_sizes`), round-robin,
    medians, non-decreasing in w."""
    from ..hf.batchstep import BatchRow

    device = target.device
    context = max(1, min(context, target.max_context - 2 * max_tokens - 2))
    generator = torch.Generator().manual_seed(seed)
    high = min(target.vocab_rows, len(target.tokenizer) if target.tokenizer is not None else target.vocab_rows)
    target.set_taps(proposer.layer_ids if proposer is not None else ())
    sizes = batch_sizes(max_rows, max_tokens)
    cache = target.new_slot_cache(max_slots=max(sizes), capacity=context + max_tokens)
    slots = [cache.acquire() for _ in range(max(sizes))]
    prompt = torch.randint(0, high, (context,), generator=generator).to(device)
    target.forward_batch(cache, [BatchRow(slots[0], prompt, "none")])
    for slot in slots[1:]:  # every sequence holds the same context: the cost does not depend on the tokens
        for kv in cache.keys + cache.values:
            kv[slot, :, :context] = kv[slots[0], :, :context]
        cache.advance(slot, context)
    jobs = {}
    for b, widths in sizes.items():
        for w in widths:
            blocks = [torch.randint(0, high, (w,), generator=generator).to(device) for _ in range(b)]

            def run(b=b, blocks=blocks):
                target.forward_batch(cache, [BatchRow(slots[i], blocks[i]) for i in range(b)], row_invariant)
                for i in range(b):
                    cache.crop(slots[i], context)

            jobs[(b, w)] = run
    jobs.update(_batched_draft_jobs(target, proposer, sorted(sizes), context, generator))
    times = time_round_robin(jobs, warmup, repeats, device)
    noisy = any(relative_spread(t) > noise_limit for t in times.values())
    forward = {}
    for b in sizes:
        fitted = non_decreasing({w: statistics.median(t) for (rows, w), t in times.items() if rows == b})
        forward.update({(b, w): t for w, t in fitted.items()})
    drafts = non_decreasing({n: statistics.median(t) for (kind, n), t in times.items() if kind == "drafts"})
    return BatchCosts(forward, context, noisy, drafts or None)


def _batched_draft_jobs(target, proposer, counts: list[int], context: int, generator) -> dict:
    """Timing jobs ("drafts", n): one batched drafter call for n sequences, each with
    `context` tokens of context (none when the proposer drafts one sequence at a time)."""
    if not getattr(proposer, "drafts_together", False):  # one drafter forward for several sequences?
        return {}
    import copy

    from ..runtime.proposers.dflash import propose_batch
    from ..runtime.sampling import Sampler

    drafter = proposer.drafter
    high = target.vocab_rows
    proposers = []
    for _ in range(max(counts)):
        p = copy.copy(proposer)
        features = torch.randn(1, context, drafter.fc.in_features, generator=generator)
        p.reset(torch.zeros(context, dtype=torch.long), features.to(target.device, target.dtype))
        proposers.append(p)
    anchor = int(torch.randint(0, high, (1,), generator=generator))
    greedy = Sampler.create(0.0, 0, 1.0, 0, device=target.device)
    return {("drafts", n): (lambda n=n: propose_batch(proposers[:n], [anchor] * n, [context] * n, [1] * n,
                                                       [greedy] * n)) for n in counts}


def load_or_measure_batch(target, proposer=None, max_rows: int = 8, max_tokens: int = 16, refresh: bool = False,
                          log=None, row_invariant: bool = False) -> BatchCosts:
    """The cached batched-forward costs for this target / proposer / machine (as
    `load_or_measure`), measured on first use."""
    kernels = ""
    if row_invariant:  # the row-invariant products chosen on this machine change the costs
        how = target.describe_row_invariance() if hasattr(target, "describe_row_invariance") else ""
        kernels = "-inv-" + hashlib.sha256(how.encode()).hexdigest()[:8]
    if getattr(proposer, "drafts_together", False):
        kernels += "-drafts"  # the batched drafter's costs are measured too
    path = costs_dir() / f"batch-{cost_key(target, proposer, max_tokens)}-{max_rows}{kernels}.json"
    return cached_measurement(
        path, lambda: measure_batch_costs(target, proposer, max_rows=max_rows, max_tokens=max_tokens,
                                          row_invariant=row_invariant),
        BatchCosts.from_dict, refresh, log,
        f"measuring batched forward costs for {getattr(target, 'name', 'target')}, 1..{max_rows} rows "
        "(once per model and machine) ...",
        "warning: the machine was busy while batched forward costs were measured; using them for this run only, "
        "not caching them")
