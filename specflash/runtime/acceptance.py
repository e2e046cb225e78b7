"""Acceptance rules: pure functions over tensors, no model access.

Words used here (as in vLLM's rejection sampler):
- draft tokens: the k tokens a proposer put after the anchor, d_1..d_k.
- accepted: the longest prefix of drafts the target agrees with (a tokens, 0 <= a <= k).
- recovered token: on a rejection at draft i, the token drawn in its place from the
  normalised residual max(0, p_i - q_i).
- bonus token: when all k drafts are accepted, one more token drawn from the target's
  distribution after the last draft.
Either way every verify step yields a accepted drafts plus exactly one new token (the
recovered or bonus token), so the acceptance length of a step is a + 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Acceptance:
    """Outcome of one verify step: `num_accepted` drafts kept, then `next_token`."""

    num_accepted: int
    next_token: int

    @property
    def acceptance_length(self) -> int:
        return self.num_accepted + 1


def greedy_accept(draft_tokens: torch.Tensor, target_choices: torch.Tensor) -> Acceptance:
    """Greedy verification.

    draft_tokens:   [k]     d_1..d_k
    target_choices: [k + 1] the target's argmax after the anchor, d_1, ..., d_k
    Accept d_i while d_i == target_choices[i - 1]; the next token is the target's
    choice right after the last accepted draft.
    """
    k = draft_tokens.shape[0]
    if target_choices.shape[0] != k + 1:
        raise ValueError(f"need k + 1 = {k + 1} target choices, got {target_choices.shape[0]}")
    matches = (draft_tokens == target_choices[:k]).to(torch.int64)  # [k]
    num_accepted = int(matches.cumprod(dim=0).sum().item()) if k else 0
    return Acceptance(num_accepted, int(target_choices[num_accepted].item()))


def rejection_accept(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    uniforms: torch.Tensor,
    generator: torch.Generator | None = None,
) -> Acceptance:
    """Speculative (rejection) sampling; the output is distributed exactly as the target.

    draft_tokens: [k]         d_i, drawn from q_i
    draft_probs:  [k, V]      q_i; None means each d_i was proposed deterministically
                              (a point mass, q_i(d_i) = 1), e.g. prompt lookup
    target_probs: [k + 1, V]  p_i after the anchor, d_1, ..., d_k
    uniforms:     [k]         U(0, 1) draws, one per draft
    Accept d_i with probability min(1, p_i(d_i) / q_i(d_i)); on the first rejection draw
    the recovered token from norm(max(0, p_i - q_i)); if all are accepted draw the
    bonus token from p_{k+1}.
    """
    k = draft_tokens.shape[0]
    if target_probs.shape[0] != k + 1:
        raise ValueError(f"need k + 1 = {k + 1} target distributions, got {target_probs.shape[0]}")
    if k:
        rows = torch.arange(k, device=draft_tokens.device)
        p_draft = target_probs[rows, draft_tokens]  # [k]
        q_draft = draft_probs[rows, draft_tokens] if draft_probs is not None else torch.ones_like(p_draft)
        accepted_mask = (uniforms * q_draft < p_draft).to(torch.int64)  # u < p/q, q > 0 for a drawn token
        num_accepted = int(accepted_mask.cumprod(dim=0).sum().item())
    else:
        num_accepted = 0
    p = target_probs[num_accepted]  # [V]
    if num_accepted == k:
        dist = p
    else:
        if draft_probs is not None:
            residual = (p - draft_probs[num_accepted]).clamp_min(0.0)
        else:
            residual = p.clone()
            residual[draft_tokens[num_accepted]] = 0.0
        total = residual.sum()
        # total == 0 only if p == q (then a rejection has probability 0); fall back to p.
        dist = residual / total if total > 0 else p
    next_token = int(torch.multinomial(dist, 1, generator=generator).item())
    return Acceptance(num_accepted, next_token)


def accept_block(drafts: torch.Tensor, draft_probs: torch.Tensor | None, logits: torch.Tensor,
                 sampler) -> Acceptance:
    """The rule a verify step's sampler calls for: `greedy_accept` at temperature 0, else
    `rejection_accept` with the sampler's warped distributions and its own draws.

    drafts [k]; draft_probs [k, V] or None; logits [k + 1, V] the target's after the anchor
    and each draft; sampler a `sampling.Sampler`."""
    if sampler.greedy:
        return greedy_accept(drafts, logits.argmax(dim=-1))
    uniforms = sampler.uniform((drafts.shape[0],), device=logits.device)
    return rejection_accept(drafts, draft_probs, sampler.probs(logits), uniforms, sampler.generator)
