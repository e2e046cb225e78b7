"""Draft-tree decoding (treedecode.py, treepolicy.py) end to end on tiny random targets:
greedy output equals plain decoding for every family, tree shape and budget; a drafter
whose right token sits at rank 2 or 3 gets accepted through the tree (never through a
linear block); sampling stays distributed as the target's; the auto policy's choices."""

import pytest
import torch
from test_sampling_lossless import (PROMPT, RUNS, VOCAB, chi_square_pvalue,  # noqa: F401 (fixture)
                                    exact_joint_of_tokens_2_and_3, small_target)

from specflash.errors import InputError
from specflash.perf.costmodel import StepCosts
from specflash.runtime.config import DecodeConfig, parse_tree
from specflash.runtime.decode import SpeculativeDecoder
from specflash.runtime.proposers import DFlashProposer, NgramProposer, OracleProposer
from specflash.runtime.treepolicy import AutoTree, EdgeCalibration, FixedTree, best_budget
from tiny import hf_greedy, tiny_drafter

FAMILIES = ("llama", "qwen2", "qwen3", "gemma3")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("budget", (1, 4, 12))
def test_tree_output_equals_plain_decoding_with_a_random_drafter(targets, family, budget):
    target = targets(family)
    prompt = [5, 9, 2, 7, 5, 9, 2, 11, 3, 5, 9]  # repeats: the n-gram branch has matches
    reference = hf_greedy(target, prompt, 40)
    drafter = tiny_drafter(target, block_size=8, seed=3)
    decoder = SpeculativeDecoder(target, DFlashProposer(drafter, target), None, FixedTree(budget))
    result = decoder.generate(prompt, DecodeConfig(max_new_tokens=40, stop_token_ids=()))
    assert result.token_ids == reference
    assert max(result.stats.drafted_per_step) <= budget


@pytest.mark.parametrize("family", ("llama", "gemma3"))
@pytest.mark.parametrize("rank", (2, 3))
def test_tree_accepts_right_tokens_at_rank_two_or_three(targets, family, rank):
    target = targets(family)
    prompt = list(range(3, 15))
    n = 25
    reference = hf_greedy(target, prompt, n)
    oracle = OracleProposer(prompt + reference, target.vocab_rows, truth_rank=rank, block_size=8)
    policy = FixedTree(24, top_k=4, ngram_branches=False)
    result = SpeculativeDecoder(target, oracle, None, policy).generate(
        prompt, DecodeConfig(max_new_tokens=n, stop_token_ids=()))
    assert result.token_ids == reference
    assert result.stats.tau > 2.0  # a linear block of rank-1 guesses would get exactly 1.0


class _TruthLookup(NgramProposer):
    """A prompt lookup that always finds the target's own continuation (a rigged branch)."""

    def __init__(self, reference):
        super().__init__()
        self.reference = reference

    def lookup(self, sequence, num_tokens):
        return self.reference[len(sequence): len(sequence) + num_tokens]


def test_tree_without_a_drafter_follows_the_ngram_branch(targets):
    target = targets("qwen2")
    prompt = list(range(3, 13))
    reference = hf_greedy(target, prompt, 30)
    decoder = SpeculativeDecoder(target, _TruthLookup(prompt + reference), None, FixedTree(8))
    result = decoder.generate(prompt, DecodeConfig(max_new_tokens=30, stop_token_ids=()))
    assert result.token_ids == reference
    assert result.stats.tau > 4.0


@pytest.mark.parametrize("max_new_tokens", (1, 2, 7))
def test_tree_respects_length_limits(targets, max_new_tokens):
    target = targets("qwen3")
    prompt = list(range(3, 15))
    reference = hf_greedy(target, prompt, max_new_tokens)
    oracle = OracleProposer(prompt + reference + [0] * 20, target.vocab_rows, truth_rank=2, block_size=8)
    result = SpeculativeDecoder(target, oracle, None, FixedTree(16, top_k=3)).generate(
        prompt, DecodeConfig(max_new_tokens=max_new_tokens, stop_token_ids=()))
    assert result.token_ids == reference
    assert result.finish_reason == "length"


def test_tree_stops_at_a_stop_token_inside_an_accepted_path(targets):
    target = targets("llama")
    prompt = list(range(3, 15))
    reference = hf_greedy(target, prompt, 30)
    stop = reference[9]
    expected = reference[: reference.index(stop) + 1]
    oracle = OracleProposer(prompt + reference, target.vocab_rows, truth_rank=2, block_size=8)
    result = SpeculativeDecoder(target, oracle, None, FixedTree(16, top_k=3)).generate(
        prompt, DecodeConfig(max_new_tokens=30, stop_token_ids=(stop,)))
    assert result.token_ids == expected
    assert result.finish_reason == "stop"


@pytest.mark.parametrize("budget", (3, 12))
def test_tree_sampling_matches_target_distribution(small_target, budget):  # noqa: F811
    target = small_target
    drafter = tiny_drafter(target, num_layers=1, block_size=4, seed=7)
    decoder = SpeculativeDecoder(target, DFlashProposer(drafter, target), None,
                                 FixedTree(budget, top_k=3, ngram_branches=True))
    counts = torch.zeros(VOCAB, VOCAB)
    accepted = 0
    for seed in range(RUNS):
        result = decoder.generate(PROMPT, DecodeConfig(max_new_tokens=3, temperature=1.0, seed=seed,
                                                       stop_token_ids=()))
        counts[result.token_ids[1], result.token_ids[2]] += 1
        accepted += result.stats.acceptance_lengths[0] > 1 if result.stats.acceptance_lengths else 0
    pvalue = chi_square_pvalue(counts, exact_joint_of_tokens_2_and_3(target, 1.0, 0, 1.0))
    assert pvalue > 1e-3, f"chi-square p = {pvalue:.2e}: output is not distributed as the target"
    assert 0.05 < accepted / RUNS < 0.99  # both the walk and the stop ran often


def costs(verify: dict[int, float], draft: float = 0.010) -> StepCosts:
    return StepCosts(verify, draft)


FLAT_THEN_STEEP = {1: 0.050, 4: 0.050, 8: 0.070, 16: 0.100, 32: 0.200, 33: 0.205}


def test_best_budget_takes_free_nodes_and_stops_where_they_stop_paying():
    expected = 1 + torch.tensor([0.0, 0.6, 0.9, 1.0, 1.05, 1.07, 1.08, 1.085, 1.09], dtype=torch.float64)
    m, _ = best_budget(expected, costs(FLAT_THEN_STEEP), 0.010, 32)
    assert m == 3  # nodes 1..3 are free (t_verify(4) = t_verify(1)); the 4th adds 0.05 for 5 ms more


def test_best_budget_is_zero_when_nothing_pays():
    expected = torch.tensor([1.0, 1.01, 1.02], dtype=torch.float64)
    assert best_budget(expected, costs({1: 0.05, 2: 0.08, 3: 0.1}), 0.0, 32)[0] == 0


def test_auto_tree_skips_the_drafter_when_the_branch_beats_it():
    policy = AutoTree(costs(FLAT_THEN_STEEP, draft=0.030), max_nodes=16)
    weak = torch.tensor([1.0, 1.2, 1.25] + [1.25] * 14, dtype=torch.float64)
    policy.observe_drafter(weak)
    strong_branch = 1 + torch.tensor([0.0, 0.95, 1.9, 2.8, 3.7, 4.5], dtype=torch.float64)
    assert not policy.wants_drafter(strong_branch)
    assert policy.wants_drafter(None) in (True, False)  # no branch: drafter vs plain step (probe-dependent)


def test_auto_tree_probes_a_losing_drafter_with_backoff():
    policy = AutoTree(costs(FLAT_THEN_STEEP, draft=0.030), max_nodes=16, probe_every=2, probe_max=8)
    policy.observe_drafter(torch.ones(17, dtype=torch.float64))  # the drafter never pays
    calls = [policy.wants_drafter(None) for _ in range(30)]
    probes = [i for i, c in enumerate(calls) if c]
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert probes and gaps == sorted(gaps) and max(gaps) == 8


def test_edge_calibration_learns_an_overconfident_drafter():
    calib = EdgeCalibration(prior_weight=1.0, decay=1.0)
    q = torch.tensor([0.9])
    before = float(calib(q))
    for _ in range(50):
        calib.observe([0.9], [False])
    assert float(calib(q)) < before / 5
    assert float(calib(torch.tensor([0.0]))) == 0.0


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("off", None), (None, None), ("8", 8), (3, 3)])
def test_parse_tree_reads_every_setting(value, expected):
    assert parse_tree(value) == expected


@pytest.mark.parametrize("value", ("0", "-2", "big"))
def test_parse_tree_rejects_bad_settings_with_a_message(value):
    with pytest.raises(InputError, match="tree"):
        parse_tree(value)


def test_tree_auto_leaves_plain_decoding_plain(targets):
    from specflash.runtime.treepolicy import make_tree_policy

    assert make_tree_policy("auto", targets("llama"), None) is None


def test_a_fixed_block_size_means_linear_blocks_unless_a_budget_is_given(targets):
    from specflash.runtime.treepolicy import make_tree_policy

    target = targets("llama")
    proposer = DFlashProposer(tiny_drafter(target, block_size=8), target)
    assert make_tree_policy("auto", target, proposer, block_size=4) is None
    assert make_tree_policy(None, target, proposer) is None
    fixed = make_tree_policy(6, target, proposer, block_size=4)
    assert isinstance(fixed, FixedTree) and fixed.budget == 6


@pytest.mark.parametrize("command, expected", [("generate", "auto"), ("demo", "auto"), ("serve", None)])
def test_tree_defaults_per_command(command, expected):
    from specflash.cli import build_parser

    extra = ["--prompt", "x"] if command == "generate" else []
    args = build_parser().parse_args([command, *extra])
    assert args.tree == expected


@pytest.mark.parametrize("graphs", (False, True), ids=("static-eager", "static-replay"))
def test_tree_decode_on_static_steps_equals_plain_decoding(targets, graphs):
    target = targets("qwen3")
    prompt = list(range(3, 15))
    reference = hf_greedy(target, prompt, 30)
    oracle = OracleProposer(prompt + reference, target.vocab_rows, truth_rank=2, block_size=8)
    target.enable_static_steps(graphs=graphs)
    try:
        result = SpeculativeDecoder(target, oracle, None, FixedTree(8, top_k=3)).generate(
            prompt, DecodeConfig(max_new_tokens=30, stop_token_ids=()))
    finally:
        target.disable_static_steps()
    assert result.token_ids == reference
    assert result.stats.tau > 2.0
