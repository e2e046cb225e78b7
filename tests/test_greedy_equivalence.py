"""At temperature 0 speculative output equals plain greedy decoding (HF generate), token
for token, on every supported family, block size, prompt length and stop condition, and
for every way of choosing how many drafts a step verifies (fixed, auto, arbitrary)."""

import pytest
import torch

from specflash.runtime.config import DecodeConfig
from specflash.runtime.decode import SpeculativeDecoder
from specflash.runtime.proposers import DFlashProposer, NgramProposer, OracleProposer
from tiny import FAMILIES, hf_greedy, policy_for, tiny_drafter

POLICIES = ("fixed", "auto", "random")

BLOCK_SIZES = (1, 2, 4, 16)
PROMPT_LENGTHS = (1, 7, 40)
MAX_NEW = 37  # not a multiple of any block size: the limit falls mid-block


def _prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, 250, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("prompt_length", PROMPT_LENGTHS)
@pytest.mark.parametrize("policy", POLICIES)
def test_dflash_greedy_matches_hf_generate(targets, family, block_size, prompt_length, policy):
    target = targets(family)
    prompt = _prompt(prompt_length, seed=prompt_length)
    reference = hf_greedy(target, prompt, MAX_NEW)
    drafter = tiny_drafter(target, block_size=16)
    decoder = SpeculativeDecoder(target, DFlashProposer(drafter, target), block_size,
                                 policy_for(policy, block_size))
    result = decoder.generate(prompt, DecodeConfig(max_new_tokens=MAX_NEW, stop_token_ids=()))
    assert result.token_ids == reference
    assert result.finish_reason == "length"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("block_size", (2, 4, 16))
@pytest.mark.parametrize("policy", POLICIES)
def test_stop_token_output_matches_hf_generate(targets, family, block_size, policy):
    target = targets(family)
    prompt = _prompt(9, seed=3)
    free = hf_greedy(target, prompt, MAX_NEW)
    stop = free[len(free) // 2]  # a token the target really produces
    reference = hf_greedy(target, prompt, MAX_NEW, eos=[stop])
    assert reference[-1] == stop and len(reference) < MAX_NEW
    oracle = OracleProposer(prompt + free, target.vocab_rows)  # long accepted blocks cross the stop token
    for proposer in (oracle, DFlashProposer(tiny_drafter(target), target)):
        decoder = SpeculativeDecoder(target, proposer, block_size, policy_for(policy, block_size))
        result = decoder.generate(prompt, DecodeConfig(max_new_tokens=MAX_NEW, stop_token_ids=(stop,)))
        assert result.token_ids == reference
        assert result.finish_reason == "stop"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("max_new", (1, 2, 5, 16, 21))
@pytest.mark.parametrize("policy", POLICIES)
def test_max_new_tokens_mid_block_with_full_acceptance(targets, family, max_new, policy):
    target = targets(family)
    prompt = _prompt(11, seed=max_new)
    reference = hf_greedy(target, prompt, max_new)
    decoder = SpeculativeDecoder(target, OracleProposer(prompt + reference, target.vocab_rows), 16,
                                 policy_for(policy, 16))
    result = decoder.generate(prompt, DecodeConfig(max_new_tokens=max_new, stop_token_ids=()))
    assert result.token_ids == reference
    assert len(result.token_ids) == max_new


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy", POLICIES)
def test_ngram_greedy_matches_hf_generate(targets, family, policy):
    target = targets(family)
    prompt = _prompt(30, seed=5) * 2  # repetition gives prompt lookup something to find
    reference = hf_greedy(target, prompt, MAX_NEW)
    decoder = SpeculativeDecoder(target, NgramProposer(), 6, policy_for(policy, 6))
    result = decoder.generate(prompt, DecodeConfig(max_new_tokens=MAX_NEW, stop_token_ids=()))
    assert result.token_ids == reference


def test_sliding_attention_drafter_output_matches_greedy(targets):
    target = targets("qwen3")
    drafter = tiny_drafter(target, num_layers=3, layer_types=("sliding_attention", "full_attention",
                                                                "sliding_attention"), sliding_window=4)
    prompt = _prompt(20, seed=8)
    reference = hf_greedy(target, prompt, MAX_NEW)
    result = SpeculativeDecoder(target, DFlashProposer(drafter, target), 8).generate(
        prompt, DecodeConfig(max_new_tokens=MAX_NEW, stop_token_ids=()))
    assert result.token_ids == reference


def test_context_limit_stops_with_length(targets):
    from tiny import tiny_target

    target = tiny_target("llama", max_positions=32)
    prompt = _prompt(20, seed=1)
    result = SpeculativeDecoder(target, DFlashProposer(tiny_drafter(target), target), 8).generate(
        prompt, DecodeConfig(max_new_tokens=100, stop_token_ids=()))
    assert len(prompt) + len(result.token_ids) == 32
    assert result.finish_reason == "length"
    assert result.token_ids == hf_greedy(target, prompt, 12)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy", POLICIES)
def test_draft_vocabulary_drafter_matches_hf_generate_and_proposes_only_its_tokens(targets, family, policy):
    from specflash.runtime.sampling import Sampler

    target = targets(family)
    prompt = _prompt(7, seed=11)
    vocab = list(range(0, target.vocab_rows, 3))  # a third of the tokens, most of the target's outputs outside
    drafter = tiny_drafter(target, block_size=8).set_draft_vocab(vocab)
    proposer = DFlashProposer(drafter, target)
    decoder = SpeculativeDecoder(target, proposer, 8, policy_for(policy, 8))
    result = decoder.generate(prompt, DecodeConfig(max_new_tokens=MAX_NEW, stop_token_ids=()))
    assert result.token_ids == hf_greedy(target, prompt, MAX_NEW)
    drafts = proposer.propose(result.token_ids[-1], len(prompt) + len(result.token_ids) - 1, 7,
                              Sampler.create(0.0, 0, 1.0, 0))
    assert set(drafts.tokens.tolist()) <= set(vocab)
