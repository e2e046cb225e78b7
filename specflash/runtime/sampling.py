"""Logits -> probabilities and token choice.

One `Sampler` per generation call holds the temperature / top-k / top-p settings and an
explicit `torch.Generator`, so a seed fixes every random choice of the call. Greedy
(temperature 0) is an explicit branch: argmax of the raw logits, no probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import validate_sampling


def warp_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Probabilities after temperature, top-k and top-p (nucleus) filtering.

    logits: [..., V] -> probs [..., V] (float32, rows sum to 1). temperature must be > 0.
    top-k keeps the k highest logits (ties at the boundary all kept); top-p keeps the
    smallest set of most likely tokens whose mass reaches top_p (the token crossing
    the threshold is kept).
    """
    scores = logits.float() / temperature  # [..., V]
    vocab = scores.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]  # [..., 1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # [..., V]
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        keep_sorted = mass_before < top_p  # the first token is always kept
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = probs * keep
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


@dataclass
class Sampler:
    """Sampling settings of one call plus its random generator."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        validate_sampling(self.temperature, self.top_p, self.top_k)

    @classmethod
    def create(cls, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               seed: int | None = None, device: torch.device | str = "cpu") -> "Sampler":
        generator = torch.Generator(device=device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(int(seed))
        return cls(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., V] logits -> [..., V] probabilities under this sampler's settings."""
        return warp_logits(logits, self.temperature, self.top_k, self.top_p)

    def sample(self, probs: torch.Tensor) -> torch.Tensor:
        """[..., V] probabilities -> [...] token ids drawn with this sampler's generator."""
        flat = probs.reshape(-1, probs.shape[-1])
        drawn = torch.multinomial(flat, 1, generator=self.generator)  # [N, 1]
        return drawn.view(probs.shape[:-1])

    def uniform(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator, device=device)

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., V] logits -> [...] token ids: argmax when greedy, else a sample."""
        if self.greedy:
            return logits.argmax(dim=-1)
        return self.sample(self.probs(logits))
