"""The knobs of one generation call (`DecodeConfig`), validated when it is made."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError


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
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if self.block_size is not None and self.block_size < 1:
            raise InputError(f"block size must be >= 1 (got {self.block_size}); "
                             "use 1 for plain autoregressive decoding")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def validate_sampling(temperature: float, top_p: float, top_k: int) -> None:
    if temperature < 0:
        raise InputError(f"temperature must be >= 0 (got {temperature}); use 0 for greedy decoding")
    if not 0.0 < top_p <= 1.0:
        raise InputError(f"top_p must be in (0, 1] (got {top_p}); use 1.0 to disable it")
    if top_k < 0:
        raise InputError(f"top_k must be >= 0 (got {top_k}); use 0 to disable it")
