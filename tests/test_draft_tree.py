"""Draft trees are pure: hand-drawn trees, a brute-force check of best-first building,
the greedy walk against the chain rule, and a chi-square test of the sampled walk."""

import itertools

import pytest
import torch
from scipy.stats import chisquare

from specflash.runtime.acceptance import greedy_accept
from specflash.runtime.tree import (
    DraftTree,
    accept_greedy_tree,
    accept_sampled_tree,
    build_tree,
    expected_tokens_by_budget,
)

L = lambda *xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731


def _random_inputs(seed: int, depth: int = 6, k: int = 4, vocab: int = 50):
    g = torch.Generator().manual_seed(seed)
    candidates = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(depth)])  # [D, K]
    probs = torch.rand(depth, k, generator=g, dtype=torch.float64)  # [D, K], unsorted on purpose
    return candidates, probs


def _assert_valid(tree: DraftTree) -> None:
    parents, depths, scores = tree.parents.tolist(), tree.depths.tolist(), tree.scores.tolist()
    assert parents[0] == -1 and depths[0] == 0 and scores[0] == 1.0
    assert tree.scores.dtype == torch.float64
    for i in range(1, len(tree)):
        assert 0 <= parents[i] < i
        assert depths[i] == depths[parents[i]] + 1
        assert 0.0 < scores[i] <= scores[parents[i]]


def _token_paths(tree: DraftTree) -> list[tuple[int, ...]]:
    tokens = tree.tokens.tolist()
    return [tuple(tokens[j] for j in tree.path(i)[1:]) for i in range(1, len(tree))]


def _hand_drawn_six_node_tree() -> DraftTree:
    #        0 (anchor 10)
    #       / \
    #   1 (11)  2 (12)
    #    / \
    # 3 (13) 4 (14)
    #   |
    # 5 (15)
    return DraftTree(
        tokens=L(10, 11, 12, 13, 14, 15),
        parents=L(-1, 0, 0, 1, 1, 3),
        depths=L(0, 1, 1, 2, 2, 3),
        scores=torch.tensor([1.0, 0.6, 0.3, 0.4, 0.1, 0.05], dtype=torch.float64),
    )


def test_chain_tree_matches_greedy_accept():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        k = int(torch.randint(0, 6, (1,), generator=g))
        drafts = torch.randint(0, 3, (k,), generator=g)  # tiny vocab: frequent matches
        choices = torch.randint(0, 3, (k + 1,), generator=g)
        tree = DraftTree.chain(7, drafts)
        assert tree.is_chain() and tree.num_drafts == k
        expected = greedy_accept(drafts, choices)
        got = accept_greedy_tree(tree, choices)
        assert (got.num_accepted, got.next_token) == (expected.num_accepted, expected.next_token)
        assert got.path == list(range(expected.num_accepted + 1))
        assert got.acceptance_length == expected.acceptance_length


def test_chain_scores_are_cumulative_products():
    tree = DraftTree.chain(1, [2, 3, 4], [0.5, 0.4, 1.0])
    assert tree.tokens.tolist() == [1, 2, 3, 4]
    assert tree.parents.tolist() == [-1, 0, 1, 2]
    assert tree.depths.tolist() == [0, 1, 2, 3]
    assert tree.scores.tolist() == pytest.approx([1.0, 0.5, 0.2, 0.2])
    assert DraftTree.chain(1, torch.tensor([2, 3])).scores.tolist() == [1.0, 1.0, 1.0]
    _assert_valid(tree)


def test_nodes_are_in_best_first_order():
    for seed in range(5):
        candidates, probs = _random_inputs(seed)
        tree = build_tree(0, candidates, probs, budget=40, branches=[([1, 2, 3, 4, 5, 6, 7, 8], [0.9] * 8)])
        scores = tree.scores[1:]
        assert bool((scores[1:] <= scores[:-1]).all())


def test_nodes_are_the_highest_scoring_paths():
    # Brute force: enumerate every path of the full DDTree (K^1 + K^2 + K^3 paths), score it,
    # and compare the best `budget` of them with the lazily built tree.
    depth, k = 3, 3
    for seed in range(5):
        candidates, probs = _random_inputs(seed, depth=depth, k=k)
        scored = []
        for length in range(1, depth + 1):
            for ranks in itertools.product(range(k), repeat=length):
                score = 1.0
                for d, r in enumerate(ranks):
                    score *= float(probs[d, r])
                scored.append((score, tuple(int(candidates[d, r]) for d, r in enumerate(ranks))))
        scored.sort(key=lambda s: -s[0])
        for budget in (1, 5, 12, len(scored)):
            tree = build_tree(0, candidates, probs, budget)
            assert _token_paths(tree) == [path for _, path in scored[:budget]]
            assert tree.scores[1:].tolist() == pytest.approx([score for score, _ in scored[:budget]])


def test_every_prefix_is_a_valid_tree():
    candidates, probs = _random_inputs(1)
    tree = build_tree(0, candidates, probs, budget=30, branches=[([9, 8, 7], [0.95, 0.9, 0.9])])
    for m in range(tree.num_drafts + 1):
        prefix = tree.truncated(m)
        assert prefix.num_drafts == m
        _assert_valid(prefix)
        assert prefix.ancestor_mask().equal(tree.ancestor_mask()[: m + 1, : m + 1])
    assert len(tree.truncated(tree.num_drafts + 10)) == len(tree)


def test_budget_is_respected():
    candidates, probs = _random_inputs(2, depth=4, k=3)
    full = 3 + 9 + 27 + 81
    for budget in (0, 1, 7, 32, full, full + 50):
        tree = build_tree(0, candidates, probs, budget)
        assert tree.num_drafts == min(budget, full)
        assert len(tree) == tree.num_drafts + 1
    assert build_tree(5, candidates, probs, 0).tokens.tolist() == [5]


def test_siblings_have_distinct_tokens():
    # Duplicate tokens within a drafter row and across branches must still give distinct siblings.
    candidates = L(3, 3, 4, 5).repeat(4, 1)  # [4, 4]
    probs = torch.tensor([0.5, 0.6, 0.3, 0.2], dtype=torch.float64).repeat(4, 1)  # [4, 4]
    branches = [([4, 5, 6], [0.7, 0.7, 0.7]), ([4, 9], [0.8, 0.2]), ([3], [0.1])]
    tree = build_tree(0, candidates, probs, budget=100, branches=branches)
    _assert_valid(tree)
    for node in range(len(tree)):
        kids = [int(tree.tokens[c]) for c in tree.children(node)]
        assert len(kids) == len(set(kids))


def test_branch_merges_with_drafter_candidate():
    # The drafter proposes 7 (p 0.5) then 8 (p 0.4); a branch proposes 7 (p 0.9) then 9 (p 0.6).
    candidates = L(7, 8).reshape(2, 1)  # [2, 1]
    probs = torch.tensor([[0.5], [0.4]], dtype=torch.float64)
    tree = build_tree(1, candidates, probs, budget=10, branches=[([7, 9], [0.9, 0.6])])
    assert _token_paths(tree) == [(7,), (7, 9), (7, 8)]
    assert tree.scores.tolist() == pytest.approx([1.0, 0.9, 0.54, 0.36])
    assert tree.children(0) == [1]  # one node for 7, not two

    # A drafter proposal stronger than the branch keeps the drafter's probability.
    tree = build_tree(1, candidates, probs, budget=10, branches=[([7], [0.2])])
    assert _token_paths(tree) == [(7,), (7, 8)]
    assert tree.scores.tolist() == pytest.approx([1.0, 0.5, 0.2])

    # Two branches sharing a prefix: one node for the prefix, lying on both branches.
    tree = build_tree(1, torch.empty(0, 0, dtype=torch.long), torch.empty(0, 0), budget=10,
                      branches=[([4, 5], [0.3, 1.0]), ([4, 6], [0.6, 0.5])])
    assert _token_paths(tree) == [(4,), (4, 5), (4, 6)]
    assert tree.scores.tolist() == pytest.approx([1.0, 0.6, 0.6, 0.3])


def test_branch_longer_than_drafter_depth():
    candidates = L(2, 3).reshape(2, 1)  # [2, 1]
    probs = torch.tensor([[0.9], [0.9]], dtype=torch.float64)
    branch = [2, 3, 4, 5, 6]
    tree = build_tree(1, candidates, probs, budget=10, branches=[(branch, [0.8] * 5)])
    assert tree.max_depth == 5
    assert tuple(branch) in _token_paths(tree)
    deepest = int(tree.depths.argmax())
    assert tree.tokens[tree.path(deepest)].tolist() == [1] + branch
    # Past depth D only the branch continues: the node at depth 3 has exactly one child.
    at_three = int((tree.depths == 3).nonzero()[0])
    assert len(tree.children(at_three)) == 1
    # An explicit max_depth cuts the branch.
    assert build_tree(1, candidates, probs, 10, [(branch, [0.8] * 5)], max_depth=3).max_depth == 3


def test_no_drafter_only_branches():
    empty_c, empty_p = torch.empty(0, 0, dtype=torch.long), torch.empty(0, 0)
    tree = build_tree(1, empty_c, empty_p, budget=10, branches=[([5, 6, 7], [0.5, 0.5, 0.5]), ([8], [0.4])])
    assert _token_paths(tree) == [(5,), (8,), (5, 6), (5, 6, 7)]
    assert tree.scores.tolist() == pytest.approx([1.0, 0.5, 0.4, 0.25, 0.125])
    assert build_tree(1, empty_c, empty_p, budget=10).tokens.tolist() == [1]
    # K = 0 with D > 0 behaves like no drafter.
    tree = build_tree(1, torch.empty(3, 0, dtype=torch.long), torch.empty(3, 0), 10, [([5], [0.5])])
    assert _token_paths(tree) == [(5,)]


def test_zero_probability_edges_are_skipped():
    candidates = L(4, 5, 6, 7).reshape(2, 2)  # [2, 2]
    probs = torch.tensor([[0.5, 0.0], [0.0, 0.3]], dtype=torch.float64)
    tree = build_tree(1, candidates, probs, budget=100, branches=[([8, 9], [0.0, 0.9])])
    assert _token_paths(tree) == [(4,), (4, 7)]
    assert 5 not in tree.tokens.tolist() and 8 not in tree.tokens.tolist()
    # A branch token of probability 0 is still reached when the drafter proposes it, and the
    # branch continues below it.
    tree = build_tree(1, L(8).reshape(1, 1), torch.tensor([[0.5]]), 10, [([8, 9], [0.0, 0.9])])
    assert _token_paths(tree) == [(8,), (8, 9)]
    assert tree.scores.tolist() == pytest.approx([1.0, 0.5, 0.45])


def test_max_depth_is_respected():
    candidates, probs = _random_inputs(3, depth=6, k=3)
    for limit in (0, 1, 2, 4):
        tree = build_tree(0, candidates, probs, budget=60, max_depth=limit)
        assert int(tree.depths.max()) <= limit
        assert tree.max_depth == limit


def test_ancestor_mask_of_hand_drawn_six_node_tree():
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 0, 1, 0, 0, 0],
            [1, 1, 0, 1, 0, 0],
            [1, 1, 0, 0, 1, 0],
            [1, 1, 0, 1, 0, 1],
        ],
        dtype=torch.bool,
    )
    mask = _hand_drawn_six_node_tree().ancestor_mask()
    assert mask.dtype == torch.bool
    assert mask.equal(expected)


def test_tree_queries_on_hand_drawn_six_node_tree():
    tree = _hand_drawn_six_node_tree()
    assert len(tree) == 6 and tree.num_drafts == 5 and tree.max_depth == 3
    assert tree.children(0) == [1, 2] and tree.children(1) == [3, 4] and tree.children(5) == []
    assert tree.path(0) == [0] and tree.path(5) == [0, 1, 3, 5] and tree.path(2) == [0, 2]
    assert not tree.is_chain()
    assert tree.truncated(1).is_chain() and not tree.truncated(2).is_chain()


def test_greedy_walk_follows_target_choices():
    candidates = L(11, 12, 13, 14).reshape(2, 2)  # [2, 2]
    probs = torch.tensor([[0.6, 0.3], [0.7, 0.2]], dtype=torch.float64)
    tree = build_tree(10, candidates, probs, budget=6)
    # Best first: 11 (.6), 11-13 (.42), 12 (.3), 12-13 (.21), 11-14 (.12), 12-14 (.06).
    assert _token_paths(tree) == [(11,), (11, 13), (12,), (12, 13), (11, 14), (12, 14)]
    # The target wants 12 after the anchor (the rank-2 child), then 14 (rank 2 again), then 77.
    choices = L(12, 0, 0, 14, 0, 0, 77)
    verdict = accept_greedy_tree(tree, choices)
    assert verdict.path == [0, 3, 6] and verdict.next_token == 77
    assert verdict.num_accepted == 2 and verdict.acceptance_length == 3
    # The rank-1 path, stopped by a choice that matches no child.
    verdict = accept_greedy_tree(tree, L(11, 99, 13, 0, 0, 0, 0))
    assert verdict.path == [0, 1] and verdict.next_token == 99
    verdict = accept_greedy_tree(tree, L(42, 13, 0, 0, 0, 0, 0))
    assert verdict.path == [0] and verdict.next_token == 42 and verdict.num_accepted == 0


# The sampled-walk tree: anchor 0 with children 1 and 2; node 1 (token 1) has child 3 (token 3).
_SAMPLED_TREE = DraftTree(L(0, 1, 2, 3), L(-1, 0, 0, 1), L(0, 1, 1, 2), torch.tensor([1.0, 0.5, 0.3, 0.2]).double())
_TARGET = torch.tensor(
    [
        [0.1, 0.4, 0.3, 0.2],  # after the anchor
        [0.25, 0.25, 0.1, 0.4],  # after token 1
        [0.5, 0.1, 0.2, 0.2],  # after token 2
        [0.3, 0.3, 0.2, 0.2],  # after tokens 1, 3
    ]
)
_DRAWS = 20000


def _emitted(tree: DraftTree, verdict) -> list[int]:
    return [int(tree.tokens[i]) for i in verdict.path[1:]] + [verdict.next_token]


def _first_two_token_pvalues(walk) -> list[float]:
    # p-values of: first token ~ _TARGET[0]; second | first 1 ~ _TARGET[1]; second | first 2 ~ _TARGET[2].
    g = torch.Generator().manual_seed(1234)
    first = torch.zeros(4)
    second = {1: torch.zeros(4), 2: torch.zeros(4)}
    for _ in range(_DRAWS):
        tokens = walk(g)
        first[tokens[0]] += 1
        if tokens[0] in second:
            second[tokens[0]][tokens[1]] += 1
    pvalues = []
    for observed, row in ((first, 0), (second[1], 1), (second[2], 2)):
        expected = _TARGET[row] / _TARGET[row].sum() * observed.sum()
        pvalues.append(float(chisquare(observed.numpy(), expected.numpy()).pvalue))
    return pvalues


def test_sampled_walk_is_distributed_as_target():
    def walk(g):
        return _emitted(_SAMPLED_TREE, accept_sampled_tree(_SAMPLED_TREE, _TARGET, generator=g))

    pvalues = _first_two_token_pvalues(walk)
    assert min(pvalues) > 1e-3, pvalues


def test_chi_square_catches_a_biased_walk():
    # A classic bug: first accept the best child with probability p(child), and on a rejection
    # walk on as usual, drawing from p itself instead of the residual. The best child's token
    # then comes out too often.
    by_token = {0: {1: 1, 2: 2}, 1: {3: 3}, 2: {}, 3: {}}  # node -> {child token: child}
    best = {0: 1, 1: 3}  # node -> its best child's token

    def biased_walk(g):
        node, out = 0, []
        while True:
            if node in best and float(torch.rand(1, generator=g)) < float(_TARGET[node, best[node]]):
                token = best[node]
            else:
                token = int(torch.multinomial(_TARGET[node], 1, generator=g))
            out.append(token)
            if token not in by_token[node]:
                return out
            node = by_token[node][token]

    pvalues = _first_two_token_pvalues(biased_walk)
    assert pvalues[0] < 1e-6, pvalues


def test_expected_tokens_by_budget():
    tree = DraftTree.chain(1, [2, 3, 4], [0.5, 0.5, 0.5])
    assert expected_tokens_by_budget(tree).tolist() == pytest.approx([1.0, 1.5, 1.75, 1.875])
    candidates, probs = _random_inputs(4)
    tree = build_tree(0, candidates, probs, budget=25)
    curve = expected_tokens_by_budget(tree)
    assert curve.dtype == torch.float64 and curve.shape == (len(tree),)
    for m in range(len(tree)):
        assert float(curve[m]) == pytest.approx(1.0 + float(tree.scores[1 : m + 1].sum()))
    assert expected_tokens_by_budget(DraftTree.chain(1, [])).tolist() == [1.0]


def test_deterministic_ties():
    candidates = L(5, 6, 7, 8).reshape(2, 2)  # [2, 2]
    probs = torch.full((2, 2), 0.5, dtype=torch.float64)
    branches = [([9], [0.5])]
    tree = build_tree(1, candidates, probs, budget=20, branches=branches)
    # Equal scores: shallower first, then lower rank (drafter columns 0, 1, then branch 0),
    # then the earlier parent.
    # The branch-only node 9 still gets the drafter's depth-2 candidates as children.
    assert _token_paths(tree) == [(5,), (6,), (9,), (5, 7), (6, 7), (9, 7), (5, 8), (6, 8), (9, 8)]
    again = build_tree(1, candidates.clone(), probs.clone(), budget=20, branches=branches)
    for a, b in zip((tree.tokens, tree.parents, tree.depths, tree.scores),
                    (again.tokens, again.parents, again.depths, again.scores)):
        assert a.equal(b)


def test_invalid_inputs_are_rejected():
    candidates, probs = _random_inputs(0, depth=2, k=2)
    with pytest.raises(ValueError):
        build_tree(0, candidates, probs, budget=-1)
    with pytest.raises(ValueError):
        build_tree(0, candidates, probs[:1], budget=4)
    with pytest.raises(ValueError):
        build_tree(0, candidates, probs * 3, budget=4)
    with pytest.raises(ValueError):
        build_tree(0, candidates, probs, budget=4, branches=[([1, 2], [0.5])])
    with pytest.raises(ValueError):
        accept_greedy_tree(DraftTree.chain(1, [2]), L(1))
    with pytest.raises(ValueError):
        DraftTree(L(1, 2), L(-1), L(0, 1), torch.ones(2, dtype=torch.float64))
