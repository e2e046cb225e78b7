"""Sampling is lossless: over many seeds, the tokens speculative decoding produces are
distributed exactly as the target's own (warped) distribution, for a drafter whose
proposals disagree with the target. Checked with a chi-square test at p > 1e-3 on the
joint distribution of the 2nd and 3rd generated tokens (both decided by the first
verify step: accepted drafts, recovered tokens or the bonus token)."""


import pytest
import torch
from scipy.stats import chisquare

from specflash.runtime.config import DecodeConfig
from specflash.runtime.decode import SpeculativeDecoder
from specflash.runtime.proposers import DFlashProposer, NgramProposer
from specflash.runtime.sampling import warp_logits
from tiny import tiny_drafter, tiny_target

VOCAB = 12
PROMPT = [3, 7, 1, 9, 4]
RUNS = 3000


@pytest.fixture(scope="module")
def small_target():
    return tiny_target("qwen3", vocab=VOCAB, layers=3, seed=4)


def exact_joint_of_tokens_2_and_3(target, temperature, top_k, top_p) -> torch.Tensor:
    """[V, V] probability of (t2, t3) under the target alone, marginalising t1."""
    model = target.model

    def next_probs(ids):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        return warp_logits(logits, temperature, top_k, top_p).double()

    joint = torch.zeros(VOCAB, VOCAB, dtype=torch.float64)
    p1 = next_probs(PROMPT)
    for t1 in range(VOCAB):
        if p1[t1] == 0:
            continue
        p2 = next_probs(PROMPT + [t1])
        for t2 in range(VOCAB):
            if p2[t2] == 0:
                continue
            joint[t2] += p1[t1] * p2[t2] * next_probs(PROMPT + [t1, t2])
    return joint


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square goodness of fit, cells with expected count < 5 merged into one."""
    n = counts.sum().item()
    expected = probs.flatten() / probs.sum() * n
    observed = counts.flatten().double()
    big = expected >= 5
    obs = observed[big].tolist() + [observed[~big].sum().item()]
    exp = expected[big].tolist() + [expected[~big].sum().item()]
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    assert sum(observed[expected == 0]) == 0, "produced a token the target gives probability 0"
    return float(chisquare(obs, exp).pvalue)


def sampled_pairs(decoder) -> torch.Tensor:
    """[V, V] counts of (token 2, token 3) over RUNS seeds at temperature 1."""
    counts = torch.zeros(VOCAB, VOCAB)
    for seed in range(RUNS):
        result = decoder.generate(PROMPT, DecodeConfig(max_new_tokens=3, temperature=1.0, seed=seed,
                                                       stop_token_ids=()))
        counts[result.token_ids[1], result.token_ids[2]] += 1
    return counts


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 4, 1.0), (1.0, 0, 0.7)])
def test_dflash_sampling_matches_target_distribution(small_target, temperature, top_k, top_p):
    target = small_target
    drafter = tiny_drafter(target, num_layers=1, block_size=4, seed=7)
    decoder = SpeculativeDecoder(target, DFlashProposer(drafter, target), 4)
    counts = torch.zeros(VOCAB, VOCAB)
    accepted_first_step = 0
    for seed in range(RUNS):
        config = DecodeConfig(max_new_tokens=3, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                              stop_token_ids=())
        result = decoder.generate(PROMPT, config)
        counts[result.token_ids[1], result.token_ids[2]] += 1
        accepted_first_step += result.stats.accepted_per_position[0] if result.stats.accepted_per_position else 0
    exact = exact_joint_of_tokens_2_and_3(target, temperature, top_k, top_p)
    pvalue = chi_square_pvalue(counts, exact)
    assert pvalue > 1e-3, f"chi-square p = {pvalue:.2e}: output is not distributed as the target"
    # The drafter really disagrees with the target: both accept and reject paths ran often.
    rate = accepted_first_step / RUNS
    assert 0.05 < rate < 0.95, f"first-draft acceptance {rate:.2f}"


def test_sampling_stays_lossless_when_the_policy_varies_the_drafts_per_step(small_target):
    """A block policy (auto, or any) may verify 0..B-1 drafts each step: still the target's distribution."""
    from tiny import RandomDrafts

    target = small_target
    drafter = tiny_drafter(target, num_layers=1, block_size=4, seed=7)
    decoder = SpeculativeDecoder(target, DFlashProposer(drafter, target), 4, RandomDrafts(seed=3))
    pvalue = chi_square_pvalue(sampled_pairs(decoder), exact_joint_of_tokens_2_and_3(target, 1.0, 0, 1.0))
    assert pvalue > 1e-3, f"chi-square p = {pvalue:.2e}"


def test_ngram_sampling_matches_target_distribution(small_target):
    """Deterministic proposals (q is a point mass) are lossless too."""
    target = small_target
    decoder = SpeculativeDecoder(target, _FixedProposer([5, 2]), 3)
    pvalue = chi_square_pvalue(sampled_pairs(decoder), exact_joint_of_tokens_2_and_3(target, 1.0, 0, 1.0))
    assert pvalue > 1e-3, f"chi-square p = {pvalue:.2e}"


def test_chi_square_check_detects_a_wrong_distribution(small_target):
    """The check above can fail: greedy-only output is far from the sampled distribution."""
    exact = exact_joint_of_tokens_2_and_3(small_target, 1.0, 0, 1.0)
    wrong = torch.zeros(VOCAB, VOCAB)
    wrong[exact.argmax() // VOCAB, exact.argmax() % VOCAB] = RUNS
    assert chi_square_pvalue(wrong, exact) < 1e-6


def test_same_seed_gives_same_sample(small_target):
    target = small_target
    decoder = SpeculativeDecoder(target, DFlashProposer(tiny_drafter(target, block_size=4), target), 4)
    config = DecodeConfig(max_new_tokens=12, temperature=1.0, seed=42, stop_token_ids=())
    assert decoder.generate(PROMPT, config).token_ids == decoder.generate(PROMPT, config).token_ids


class _FixedProposer(NgramProposer):
    """Always proposes the same tokens (a deterministic, mostly wrong proposer)."""

    def __init__(self, tokens):
        super().__init__()
        self.tokens = tokens

    def propose(self, anchor, position, num_tokens, sampler):
        from specflash.runtime.proposers import Proposal

        return Proposal(torch.tensor(self.tokens[:num_tokens], dtype=torch.long))




def test_sampling_is_lossless_with_a_draft_vocabulary(small_target):
    """Drafts restricted to part of the vocabulary (q = 0 elsewhere): the residual still
    gives the other tokens their exact probability."""
    target = small_target
    drafter = tiny_drafter(target, num_layers=1, block_size=4, seed=7).set_draft_vocab([0, 2, 3, 5, 8, 11])
    decoder = SpeculativeDecoder(target, DFlashProposer(drafter, target), 4)
    pvalue = chi_square_pvalue(sampled_pairs(decoder), exact_joint_of_tokens_2_and_3(target, 1.0, 0, 1.0))
    assert pvalue > 1e-3, f"chi-square p = {pvalue:.2e}"
