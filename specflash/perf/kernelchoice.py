"""Which linear kernel each few-token verify takes on this machine: measured, not assumed.

A verify forward of n = 2..16 tokens multiplies n rows by every weight matrix. Three exact
ways to do it differ a lot by machine: `F.linear` (transformers' own), (W @ x^T)^T and MKL's
GEMM against weights packed once (kernels.py; where torch has MKL: the packed copies cost
the weights' memory once more). The same routing that makes verifies faster on one CPU can make them about
twice as slow on another (AVX2 against AVX-512 / AMX; measurements in docs/performance.md,
"Few-row verify kernels"). So the routing is chosen per machine by timing whole target forwards of n tokens after a
cached context under each candidate (`CANDIDATES`), interleaved, medians; per n the fastest
is kept, and sizes between the measured ones take the choice of the measured size below.
The choice is cached beside the cost model (same machine / model / dtype / threads key; a
measurement whose repeats spread widely, i.e. another process was busy, is used for the run
but not cached) and applied with `TargetModel.set_kernel_choice`. One-token steps always take `F.linear`, so
plain decoding runs transformers' exact kernels whatever is chosen.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from dataclasses import dataclass, field

import torch

from .kernels import mkl_packing_available

# candidate -> (LM head routed, decoder linears routed, packed) for a verify of n tokens:
# routed linears take (W @ x^T)^T, or with `packed` MKL's GEMM on packed weights
CANDIDATES: dict[str, tuple[bool, bool, bool]] = {
    "stock": (False, False, False),
    "head": (True, False, False),
    "head+decoder": (True, True, False),
    "packed": (True, True, True),
}


def candidates() -> dict[str, tuple[bool, bool, bool]]:
    """The candidates this torch build can run (the packed GEMM needs MKL)."""
    return {name: c for name, c in CANDIDATES.items() if not c[2] or mkl_packing_available()}


@dataclass(frozen=True)
class KernelChoice:
    """Row counts (tokens per forward) whose linears take (W @ x^T)^T (head_rows,
    decoder_rows) or MKL's packed GEMM (packed_rows: every linear) instead of F.linear."""

    head_rows: frozenset[int] = frozenset()
    decoder_rows: frozenset[int] = frozenset()
    measured: dict = field(default_factory=dict, compare=False, hash=False)  # n -> {candidate: median s}
    noisy: bool = field(default=False, compare=False)  # repeats spread widely: another process was busy
    packed_rows: frozenset[int] = frozenset()

    def describe(self) -> str:
        """Short form for reports and cache keys, e.g. 'head 2-16, decoder 2-4', 'packed 2-16' or 'stock'."""
        parts = []
        for name, rows in (("packed", self.packed_rows), ("head", self.head_rows - self.packed_rows),
                           ("decoder", self.decoder_rows - self.packed_rows)):
            if rows:
                parts.append(f"{name} {_ranges(sorted(rows))}")
        return ", ".join(parts) or "stock"

    def to_dict(self) -> dict:
        return {"head_rows": sorted(self.head_rows), "decoder_rows": sorted(self.decoder_rows),
                "packed_rows": sorted(self.packed_rows), "measured": {str(n): v for n, v in self.measured.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "KernelChoice":
        packed = frozenset(int(n) for n in data.get("packed_rows", ()))
        if packed and not mkl_packing_available():  # a cache file from another torch build
            raise ValueError("this torch build has no packed GEMM")
        return cls(frozenset(int(n) for n in data["head_rows"]), frozenset(int(n) for n in data["decoder_rows"]),
                   {int(n): v for n, v in data.get("measured", {}).items()}, packed_rows=packed)


STOCK = KernelChoice()
# The routing that measured best on an AVX2 CPU, used before choices were measured per machine.
AVX2_DEFAULT = KernelChoice(frozenset(range(2, 17)), frozenset(range(2, 5)))


def _ranges(values: list[int]) -> str:
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(out)


def pick(timings: dict[int, dict[str, float]], max_tokens: int, noisy: bool = False) -> KernelChoice:
    """Per measured size n the fastest candidate; sizes 2..max_tokens between measured ones
    take the choice of the largest measured size below them. timings: n -> {candidate: s}."""
    best = {n: min(t, key=t.get) for n, t in timings.items()}
    head, decoder, packed = set(), set(), set()
    sizes = sorted(best)
    for n in range(2, max_tokens + 1):
        below = [m for m in sizes if m <= n]
        if not below:
            continue
        route_head, route_decoder, route_packed = CANDIDATES[best[below[-1]]]
        if route_head:
            head.add(n)
        if route_decoder:
            decoder.add(n)
        if route_packed:
            packed.add(n)
    return KernelChoice(frozenset(head), frozenset(decoder), dict(timings), noisy, frozenset(packed))


def measure_choice(target, max_tokens: int = 16, context: int = 256, repeats: int = 5, seed: int = 0,
                   noise_limit: float = 0.5) -> KernelChoice:
    """Time target forwards of n tokens (n in the cost model's sizes, 2..max_tokens) after a
    `context`-token cache under each candidate routing, round-robin; pick per n. `noisy`
    when some repeats spread by more than `noise_limit` (interquartile range / median)."""
    from .measure import default_sizes, relative_spread, timed

    device = target.device
    context = max(1, min(context, target.max_context - 2 * max_tokens - 2))
    generator = torch.Generator().manual_seed(seed)
    high = target.vocab_rows
    saved = target.kernel_choice
    cache = target.new_cache()
    try:
        target.set_kernel_choice(STOCK)
        target.forward(torch.randint(0, high, (1, context), generator=generator).to(device), cache, logits_to_keep=1)
        sizes = [n for n in default_sizes(max_tokens) if n >= 2]
        blocks = {n: torch.randint(0, high, (1, n), generator=generator).to(device) for n in sizes}
        every = frozenset(sizes)
        choices = {name: KernelChoice(every if h else frozenset(), every if d else frozenset(),
                                      packed_rows=every if p else frozenset())
                   for name, (h, d, p) in candidates().items()}

        def run(n: int) -> None:
            target.forward(blocks[n], cache)
            target.crop_cache(cache, context)

        times: dict[int, dict[str, list[float]]] = {n: {name: [] for name in choices} for n in sizes}
        for rep in range(repeats + 1):  # the first round warms up
            for name, choice in choices.items():
                target.set_kernel_choice(choice)
                for n in sizes:
                    elapsed = timed(lambda n=n: run(n), device)
                    if rep:
                        times[n][name].append(elapsed)
    finally:
        target.set_kernel_choice(saved)
    medians = {n: {name: statistics.median(t) for name, t in per.items()} for n, per in times.items()}
    noisy = any(relative_spread(t) > noise_limit for per in times.values() for t in per.values())
    return pick(medians, max_tokens, noisy)


def choice_key(target, max_tokens: int) -> str:
    """What the choice depends on: model shape, device, dtype, threads, torch, CPU."""
    from .machine import machine_info

    parts = {
        "target": str(getattr(target, "name", "")), "layers": target.num_layers, "hidden": target.hidden_size,
        "device": str(target.device), "dtype": str(target.dtype), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "cpu": machine_info()["cpu"], "forward": target.forward_path,
        "max_tokens": max_tokens, "candidates": sorted(candidates()),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def choose_kernels(target, max_tokens: int = 16, refresh: bool = False, log=None) -> KernelChoice:
    """The kernel choice for this target and machine (CPU fp32 only; measured once per
    machine on first use, then cached); the caller hands it to the target with
    `TargetModel.set_kernel_choice`. SPECFLASH_KERNELS=stock keeps transformers' kernels
    for every size."""
    from .measure import cached_measurement, costs_dir

    if os.environ.get("SPECFLASH_KERNELS", "").lower() == "stock" or target.device.type != "cpu" \
            or target.dtype != torch.float32:
        return STOCK
    path = costs_dir() / f"kernels-{choice_key(target, max_tokens)}.json"
    choice = cached_measurement(
        path, lambda: measure_choice(target, max_tokens), KernelChoice.from_dict, refresh, log,
        "choosing verify kernels for this machine (once per model and machine) ...",
        "warning: the machine was busy while verify kernels were chosen (timings spread widely); using the "
        "choice for this run only, not caching it")
    return choice
