"""The knobs of one generation call (`DecodeConfig`), validated when it is made, and the
checks the command line, the pipeline, the block policy and the benchmark share: of a
decode-time block size (`parse_block_size`), of the sampling knobs (`validate_sampling`)
and of a count (`at_least`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import InputError


MAX_TEMPERATURE = 1e30  # logits / T must stay finite in float32 (T > 3.4e38 is inf there)


@dataclass(frozen=True)
class DecodeConfig:
    """Knobs of one generation call.

    temperature 0 means greedy; top_k 0 and top_p 1.0 disable those filters.
    block_size: verify width (anchor + block_size - 1 drafts); 1 = plain decoding.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    block_size: int | None = None
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        validate_sampling(self.temperature, self.top_p, self.top_k)
        at_least("max_new_tokens", self.max_new_tokens, 1)
        parse_block_size(self.block_size, auto=False)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def validate_sampling(temperature: float, top_p: float, top_k: int) -> None:
    if not math.isfinite(temperature) or temperature > MAX_TEMPERATURE:
        raise InputError(f"temperature must be a finite number <= {MAX_TEMPERATURE:g} (got {temperature}); "
                         "0 is greedy, 1 the model's own distribution")
    if temperature < 0:
        raise InputError(f"temperature must be >= 0 (got {temperature}); use 0 for greedy decoding")
    if not 0.0 < top_p <= 1.0:
        raise InputError(f"top_p must be in (0, 1] (got {top_p}); use 1.0 to disable it")
    if top_k < 0:
        raise InputError(f"top_k must be >= 0 (got {top_k}); use 0 to disable it")


def at_least(name: str, value: int, minimum: int) -> int:
    """`value` when it is >= `minimum`, else an InputError naming it: the one check of a
    count (max_new_tokens here, the commands' --num-prompts, --max-concurrency, ...)."""
    if value < minimum:
        raise InputError(f"{name} must be >= {minimum} (got {value})")
    return value


def parse_block_size(value: str | int | None, limit: int | None = None, auto: bool = True) -> int | str | None:
    """A decode-time block size (tokens one step verifies: anchor + drafts), checked once
    for every way it comes in (`--block-size`, `Pipeline.load`, `make_policy`,
    `DecodeConfig.block_size`, bench's NAME@B): None (the default) as it is, 'auto' (when
    `auto` allows it), or an integer >= 1 (1 = plain decoding), at most `limit` (the
    drafter's own block, once it is known). Raises InputError saying what to pass."""
    if value is None:
        return None
    if auto and isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    either = " or 'auto'" if auto else ""
    try:
        number = int(value)
    except (TypeError, ValueError):
        choices = "'auto' or an integer >= 1" if auto else "an integer >= 1"
        raise InputError(f"block size must be {choices} (got {value!r})") from None
    if number < 1:
        raise InputError(f"block size must be >= 1 (got {number}); use 1 for plain decoding{either}")
    if limit is not None and number > limit:
        raise InputError(f"block size {number} is larger than the drafter's block size {limit}; "
                         f"use 1..{limit}{either}")
    return number


def parse_tree(value: str | int | None) -> int | str | None:
    """A draft-tree setting (`--tree`, `Pipeline.load(tree=)`, bench's dflash-tree@N): None or
    'off' (linear blocks: None), 'auto' (a cost-aware node budget per step) or an integer
    >= 1 (that many drafts per step). Raises InputError saying what to pass."""
    if value is None:
        return None
    if isinstance(value, str):
        key = value.strip().lower()
        if key in ("off", "none", "no"):
            return None
        if key == "auto":
            return "auto"
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InputError(f"tree must be 'auto', 'off' or a node budget >= 1 (got {value!r})") from None
    if number < 1:
        raise InputError(f"a tree's node budget must be >= 1 (got {number}); use 'off' for linear blocks")
    return number
