"""An oracle proposer gets every full block accepted; an always-wrong one gets tau 1 and
leaves the output unchanged."""

import pytest

from specflash.runtime.config import DecodeConfig
from specflash.runtime.decode import SpeculativeDecoder
from specflash.runtime.proposers import OracleProposer
from tiny import hf_greedy


@pytest.mark.parametrize("block_size", (2, 4, 16))
def test_oracle_gets_every_full_block_accepted(targets, block_size):
    target = targets("qwen3")
    prompt = list(range(3, 15))
    n = 3 * block_size + 1  # first token + three full blocks
    reference = hf_greedy(target, prompt, n)
    decoder = SpeculativeDecoder(target, OracleProposer(prompt + reference, target.vocab_rows), block_size)
    result = decoder.generate(prompt, DecodeConfig(max_new_tokens=n, stop_token_ids=()))
    assert result.token_ids == reference
    assert result.stats.acceptance_lengths == [block_size] * 3
    assert result.stats.tau == block_size
    assert result.stats.accepted_per_position == result.stats.drafted_per_position == [3] * (block_size - 1)


@pytest.mark.parametrize("block_size", (2, 4, 16))
def test_always_wrong_proposer_gives_tau_one_and_same_output(targets, block_size):
    target = targets("llama")
    prompt = list(range(5, 25))
    reference = hf_greedy(target, prompt, 30)
    wrong = OracleProposer(prompt + reference, target.vocab_rows, p_correct=0.0)
    result = SpeculativeDecoder(target, wrong, block_size).generate(
        prompt, DecodeConfig(max_new_tokens=30, stop_token_ids=()))
    assert result.token_ids == reference
    assert result.stats.tau == 1.0
    assert sum(result.stats.accepted_per_position) == 0
    assert sum(result.stats.drafted_per_position) > 0


def test_block_size_one_is_plain_decoding(targets):
    target = targets("gemma3")
    prompt = list(range(40, 50))
    reference = hf_greedy(target, prompt, 20)
    oracle = OracleProposer(prompt + reference, target.vocab_rows)
    result = SpeculativeDecoder(target, oracle, 1).generate(prompt, DecodeConfig(max_new_tokens=20,
                                                                                   stop_token_ids=()))
    assert result.token_ids == reference
    assert result.stats.acceptance_lengths == [1] * 19
    assert result.stats.drafted_per_position == []
