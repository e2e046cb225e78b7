"""Acceptance rules are pure functions: table tests plus a distribution check of the
rejection sampler on its own."""

import pytest
import torch

from specflash.runtime.acceptance import greedy_accept, rejection_accept

T = lambda *xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731


@pytest.mark.parametrize(
    "drafts, choices, accepted, next_token",
    [
        (T(5, 6, 7), T(5, 6, 7, 8), 3, 8),  # perfect match: bonus token after the last draft
        (T(5, 6, 7), T(9, 6, 7, 8), 0, 9),  # early mismatch: first draft wrong
        (T(5, 6, 7), T(5, 9, 7, 8), 1, 9),  # later drafts that match after a mismatch do not count
        (T(5, 6, 7), T(5, 6, 9, 8), 2, 9),  # mismatch at the last position
        (T(), T(4), 0, 4),  # empty draft: plain decoding step
    ],
)
def test_greedy_accept_table(drafts, choices, accepted, next_token):
    verdict = greedy_accept(drafts, choices)
    assert (verdict.num_accepted, verdict.next_token) == (accepted, next_token)
    assert verdict.acceptance_length == accepted + 1


def test_greedy_accept_rejects_wrong_shapes():
    with pytest.raises(ValueError):
        greedy_accept(T(1, 2), T(1, 2))


def _onehot(i, v=4):
    x = torch.zeros(v)
    x[i] = 1.0
    return x


def test_rejection_accepts_everything_when_target_agrees_with_a_point_mass():
    p = torch.stack([_onehot(1), _onehot(2), _onehot(3)])  # [k+1, V]
    verdict = rejection_accept(T(1, 2), None, p, torch.tensor([0.999, 0.999]))
    assert (verdict.num_accepted, verdict.next_token) == (2, 3)


def test_rejection_never_resamples_a_rejected_point_mass_token():
    p = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.25] * 4])
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        verdict = rejection_accept(T(0), None, p, torch.rand(1, generator=g), g)
        assert verdict.num_accepted == 0 and verdict.next_token in (1, 2)


def test_rejection_with_empty_draft_samples_the_target():
    p = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    verdict = rejection_accept(T(), None, p, torch.empty(0))
    assert (verdict.num_accepted, verdict.next_token) == (0, 2)


def test_rejection_equal_distributions_always_accept():
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])
    p = torch.cat([q, torch.tensor([[0.25] * 4])])
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        drafts = torch.multinomial(q, 1, generator=g).flatten()
        verdict = rejection_accept(drafts, q, p, torch.rand(2, generator=g), g)
        assert verdict.num_accepted == 2


def test_rejection_sampler_output_is_distributed_as_the_target():
    """One draft from q; the first output token (accepted draft or recovered token) must be
    distributed as p, even though q is far from p."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.05, 0.15, 0.3, 0.5])
    target = torch.stack([p, torch.full((4,), 0.25)])
    g = torch.Generator().manual_seed(1234)
    n = 20000
    counts = torch.zeros(4)
    for _ in range(n):
        d = torch.multinomial(q, 1, generator=g)
        verdict = rejection_accept(d, q[None], target, torch.rand(1, generator=g), g)
        first = int(d[0]) if verdict.num_accepted else verdict.next_token
        counts[first] += 1
    tv = 0.5 * (counts / n - p).abs().sum().item()
    assert tv < 0.015, f"total variation {tv:.4f} to the target distribution"
    assert 0.5 * (q - p).abs().sum().item() > 0.4  # the draft really disagrees
