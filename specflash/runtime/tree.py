"""Draft trees: build one from a drafter pass (plus prompt-lookup branches), mask it, walk it.

Pure tensors and Python, no model access. Words used here:
- node: one token position of the tree. Node 0 is the root: the anchor token, the last
  token the target has already committed. Every other node is a draft token.
- depth: the number of edges from the root; a DFlash block position 1..D is a depth.
- edge probability: the (caller-calibrated) probability that the target accepts a node's
  token given that it accepted the node's parent.
- score: the product of edge probabilities from the root to a node, read as the
  probability that the node is accepted. The root's score is 1.
- budget: how many draft nodes (root excluded) the target verifies in one forward.
- branch: a path from the root proposed outside the drafter, e.g. a prompt-lookup
  (n-gram) continuation, with an edge probability per token. A node lies on a branch
  when its path from the root equals the branch's first tokens.

A tree is built best-first: the node with the highest score among the candidates not yet
taken is added next, so nodes are stored in that order. Since a child never outscores its
parent, parents come before children and every prefix of the node list is itself a tree:
verifying fewer drafts is a slice. The target verifies the whole tree in one forward with
`ancestor_mask` (each node attends to the prefix and to its own ancestors); the walks then
pick the accepted path.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DraftTree:
    """A rooted tree of draft tokens in best-first order (see the module docstring).

    tokens:  [n] long     node 0 is the root (the anchor token, depth 0)
    parents: [n] long     parents[0] == -1, parents[i] < i for i >= 1
    depths:  [n] long     depths[0] == 0, depths[i] == depths[parents[i]] + 1
    scores:  [n] float64  scores[0] == 1.0; product of edge probabilities root..i
    scores[1:] is non-increasing and every prefix of the nodes is a valid tree.
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor
    scores: torch.Tensor

    def __post_init__(self) -> None:
        n = self.tokens.shape[0] if self.tokens.dim() == 1 else -1
        if n < 1:
            raise ValueError(f"a draft tree needs 1-D tokens with the root, got shape {tuple(self.tokens.shape)}")
        for name in ("parents", "depths", "scores"):
            shape = tuple(getattr(self, name).shape)
            if shape != (n,):
                raise ValueError(f"{name} has shape {shape}, expected ({n},)")

    def __len__(self) -> int:
        """Number of nodes, root included."""
        return self.tokens.shape[0]

    @property
    def num_drafts(self) -> int:
        """Number of draft nodes (root excluded)."""
        return len(self) - 1

    @property
    def max_depth(self) -> int:
        """Depth of the deepest node (0 for a root-only tree)."""
        return int(self.depths.max().item())

    def ancestor_mask(self) -> torch.Tensor:
        """[n, n] bool: [i, j] is True iff node j is node i or one of its ancestors."""
        parents = self.parents.tolist()
        n = len(parents)
        lineage = [[0]]  # lineage[i]: node indices root..i
        rows: list[int] = [0]
        cols: list[int] = [0]
        for i in range(1, n):
            line = lineage[parents[i]] + [i]
            lineage.append(line)
            rows.extend([i] * len(line))
            cols.extend(line)
        mask = torch.zeros(n, n, dtype=torch.bool)  # [n, n]
        mask[torch.tensor(rows), torch.tensor(cols)] = True
        return mask.to(self.tokens.device)

    def children(self, node: int) -> list[int]:
        """Indices of the node's children, in stored (best-first) order."""
        return [i for i, p in enumerate(self.parents.tolist()) if p == node]

    def path(self, node: int) -> list[int]:
        """Node indices from the root to `node`, both included."""
        if not 0 <= node < len(self):
            raise IndexError(f"node {node} is not in a tree of {len(self)} nodes")
        parents = self.parents.tolist()
        out = [node]
        while parents[out[-1]] >= 0:
            out.append(parents[out[-1]])
        return out[::-1]

    def truncated(self, num_drafts: int) -> DraftTree:
        """The tree of the first num_drafts + 1 nodes (a valid tree by the order invariant).

        A num_drafts at or above the tree's own keeps every node.
        """
        if num_drafts < 0:
            raise ValueError(f"num_drafts must be >= 0, got {num_drafts}")
        m = num_drafts + 1
        return DraftTree(self.tokens[:m], self.parents[:m], self.depths[:m], self.scores[:m])

    def is_chain(self) -> bool:
        """True iff every node has at most one child (the tree is one linear block)."""
        if len(self) <= 2:
            return True
        return int(torch.bincount(self.parents[1:], minlength=len(self)).max().item()) <= 1

    @classmethod
    def chain(
        cls,
        anchor: int,
        drafts: Sequence[int] | torch.Tensor,
        probs: Sequence[float] | torch.Tensor | None = None,
    ) -> DraftTree:
        """The linear block anchor, d_1..d_k: node i's parent is i - 1.

        probs: [k] edge probabilities; the scores are their cumulative product (all 1.0
        when None).
        """
        drafts = torch.as_tensor(drafts, dtype=torch.long).reshape(-1).cpu()  # [k]
        k = drafts.shape[0]
        tokens = torch.cat([torch.tensor([int(anchor)], dtype=torch.long), drafts])  # [k + 1]
        if probs is None:
            edge = torch.ones(k, dtype=torch.float64)  # [k]
        else:
            edge = torch.as_tensor(probs, dtype=torch.float64).reshape(-1).cpu()  # [k]
            if edge.shape[0] != k:
                raise ValueError(f"need {k} edge probabilities, got {edge.shape[0]}")
        scores = torch.cat([torch.ones(1, dtype=torch.float64), edge.cumprod(0)])  # [k + 1]
        steps = torch.arange(k + 1, dtype=torch.long)  # [k + 1]
        return cls(tokens, steps - 1, steps.clone(), scores)


def _check_probs(values: list[float], what: str) -> None:
    for p in values:
        if not 0.0 <= p <= 1.0:  # also rejects NaN
            raise ValueError(f"{what} must lie in [0, 1], got {p}")


def build_tree(
    anchor: int,
    candidates: torch.Tensor,
    probs: torch.Tensor,
    budget: int,
    branches: Sequence[tuple[Sequence[int], Sequence[float]]] = (),
    max_depth: int | None = None,
) -> DraftTree:
    """Grow a draft tree best-first by score until `budget` drafts or no candidate is left.

    anchor:     the root token (already committed).
    candidates: [D, K] long     the drafter's top-K tokens at depths 1..D, the same
                                whatever the path (one drafter pass); D or K may be 0.
    probs:      [D, K] float    their edge probabilities, calibrated, in [0, 1].
    budget:     the most draft nodes to add (root excluded), >= 0.
    branches:   (tokens, edge_probs) paths from the root, e.g. prompt-lookup
                continuations; a branch may be longer than D.
    max_depth:  no node deeper than this; default max(D, longest branch).

    The children of a node at depth d are the drafter candidates at depth d + 1 (when
    d + 1 <= D) plus the token d + 1 of every branch the node lies on. A token proposed
    more than once is one child whose edge probability is the largest proposal, and it
    lies on every branch that proposed it, so siblings never share a token. Edges of
    probability 0 are never added (a branch's zero-probability token can still be reached
    as a drafter candidate, and the branch then continues below it). Ties in score go to
    the shallower node, then the lower candidate rank (a drafter candidate's column in
    `candidates`; a branch-only child ranks after all K of them, by branch index, so
    drafter before branches), then the earlier parent: the same inputs always give the
    same tree.

    Lazy frontier: a node's children are sorted by edge probability once, when the node is
    added, and only its best child is pushed; adding a child pushes its next sibling. The
    frontier thus always holds the best remaining child of every node, which is all a
    best-first pop needs.
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    if candidates.dim() != 2 or tuple(probs.shape) != tuple(candidates.shape):
        raise ValueError(
            f"candidates and probs must both be [D, K], got {tuple(candidates.shape)} and {tuple(probs.shape)}"
        )
    cand_rows: list[list[int]] = candidates.tolist()
    prob_rows: list[list[float]] = probs.double().tolist()
    num_depths = len(cand_rows)
    for row in prob_rows:
        _check_probs(row, "drafter probabilities")
    branch_tokens: list[list[int]] = []
    branch_probs: list[list[float]] = []
    for toks, bps in branches:
        toks = [int(t) for t in (toks.tolist() if isinstance(toks, torch.Tensor) else toks)]
        bps = [float(p) for p in (bps.tolist() if isinstance(bps, torch.Tensor) else bps)]
        if len(toks) != len(bps):
            raise ValueError(f"a branch has {len(toks)} tokens but {len(bps)} edge probabilities")
        _check_probs(bps, "branch probabilities")
        branch_tokens.append(toks)
        branch_probs.append(bps)
    if max_depth is None:
        max_depth = max([num_depths] + [len(t) for t in branch_tokens])
    elif max_depth < 0:
        raise ValueError(f"max_depth must be >= 0, got {max_depth}")

    # A child proposal: (edge prob, rank, token, branches it lies on); rank K + b for a
    # token only branch b proposed.
    num_ranks = candidates.shape[1]
    drafter_kids: dict[int, list[tuple[float, int, int, tuple[int, ...]]]] = {}

    def drafter_children(depth: int) -> list[tuple[float, int, int, tuple[int, ...]]]:
        # The drafter's proposals at `depth` (1-based), best first, deduplicated, none of prob 0.
        if depth not in drafter_kids:
            seen: set[int] = set()
            kids = []
            ranked = sorted(enumerate(zip(prob_rows[depth - 1], cand_rows[depth - 1])), key=lambda r: (-r[1][0], r[0]))
            for rank, (p, tok) in ranked:
                if p > 0.0 and tok not in seen:
                    seen.add(tok)
                    kids.append((p, rank, tok, ()))
            drafter_kids[depth] = kids
        return drafter_kids[depth]

    def children_of(depth: int, on_branches: tuple[int, ...]) -> list[tuple[float, int, int, tuple[int, ...]]]:
        # The sorted child proposals of a node at `depth` lying on `on_branches`.
        base = drafter_children(depth + 1) if depth < num_depths else []
        proposals = [b for b in on_branches if len(branch_tokens[b]) > depth]
        if not proposals:
            return base
        merged = {kid[2]: list(kid) for kid in base}
        for b in proposals:
            tok, p = branch_tokens[b][depth], branch_probs[b][depth]
            kid = merged.get(tok)
            if kid is None:
                merged[tok] = [p, num_ranks + b, tok, (b,)]
            else:
                kid[0] = max(kid[0], p)
                kid[3] = kid[3] + (b,)
        kids = [tuple(kid) for kid in merged.values() if kid[0] > 0.0]
        kids.sort(key=lambda kid: (-kid[0], kid[1]))
        return kids

    tokens = [int(anchor)]
    parents = [-1]
    depths = [0]
    scores = [1.0]
    kids_of: list[list[tuple[float, int, int, tuple[int, ...]]]] = []
    # Frontier entry: (-score, depth, rank, parent, sibling index). A parent has one entry in
    # the frontier at a time, so the sibling index is never compared.
    frontier: list[tuple[float, int, int, int, int]] = []

    def expand(node: int, on_branches: tuple[int, ...]) -> None:
        kids = children_of(depths[node], on_branches) if depths[node] < max_depth else []
        kids_of.append(kids)
        if kids:
            p, rank, _, _ = kids[0]
            heapq.heappush(frontier, (-scores[node] * p, depths[node] + 1, rank, node, 0))

    expand(0, tuple(b for b, toks in enumerate(branch_tokens) if toks))
    while frontier and len(tokens) <= budget:
        neg_score, depth, _, parent, sibling = heapq.heappop(frontier)
        _, _, tok, on_branches = kids_of[parent][sibling]
        node = len(tokens)
        tokens.append(tok)
        parents.append(parent)
        depths.append(depth)
        scores.append(-neg_score)
        if sibling + 1 < len(kids_of[parent]):
            p, rank, _, _ = kids_of[parent][sibling + 1]
            heapq.heappush(frontier, (-scores[parent] * p, depth, rank, parent, sibling + 1))
        expand(node, on_branches)

    return DraftTree(
        torch.tensor(tokens, dtype=torch.long),
        torch.tensor(parents, dtype=torch.long),
        torch.tensor(depths, dtype=torch.long),
        torch.tensor(scores, dtype=torch.float64),
    )


@dataclass(frozen=True)
class TreeAcceptance:
    """Outcome of verifying a tree: the accepted `path` of nodes, then `next_token`.

    path: accepted node indices, root first (the root is always there).
    next_token: the target's token after the last accepted node (recovered or bonus).
    """

    path: list[int]
    next_token: int

    @property
    def num_accepted(self) -> int:
        """Accepted drafts (root excluded)."""
        return len(self.path) - 1

    @property
    def acceptance_length(self) -> int:
        """Tokens this step emits: the accepted drafts plus next_token."""
        return self.num_accepted + 1


def _child_by_token(tree: DraftTree) -> list[dict[int, int]]:
    # For each node: {child token: child index}. Siblings have distinct tokens.
    table: list[dict[int, int]] = [{} for _ in range(len(tree))]
    for i, (p, tok) in enumerate(zip(tree.parents.tolist(), tree.tokens.tolist())):
        if p >= 0:
            table[p].setdefault(tok, i)
    return table


def accept_greedy_tree(tree: DraftTree, target_choices: torch.Tensor) -> TreeAcceptance:
    """Greedy verification of a tree.

    target_choices: [n] the target's argmax at each node (its token after that node's path).
    From the root, move to the child whose token is the target's choice at the current
    node while there is one; next_token is the target's choice at the last node reached.
    For a chain this is `acceptance.greedy_accept`.
    """
    if tuple(target_choices.shape) != (len(tree),):
        raise ValueError(f"need {len(tree)} target choices, got shape {tuple(target_choices.shape)}")
    choices = target_choices.tolist()
    kids = _child_by_token(tree)
    path = [0]
    while choices[path[-1]] in kids[path[-1]]:
        path.append(kids[path[-1]][choices[path[-1]]])
    return TreeAcceptance(path, int(choices[path[-1]]))


def accept_sampled_tree(
    tree: DraftTree, target_probs: torch.Tensor, generator: torch.Generator | None = None
) -> TreeAcceptance:
    """Sampled verification of a tree; the output is distributed exactly as the target's.

    target_probs: [n, V] the target's processed (temperature / top-k / top-p) distribution
                  at each node; `generator` must live on its device.
    At the current node draw x ~ target_probs[current]; if a child has token x move there
    and draw again, else stop with next_token = x. Every emitted token is thus drawn from
    the target's distribution given the text before it (the drafts only decide which
    draws are already verified), so the emitted text has exactly the target's distribution.
    """
    if target_probs.dim() != 2 or target_probs.shape[0] != len(tree):
        raise ValueError(f"need [{len(tree)}, V] target probabilities, got shape {tuple(target_probs.shape)}")
    kids = _child_by_token(tree)
    path = [0]
    while True:
        x = int(torch.multinomial(target_probs[path[-1]], 1, generator=generator).item())
        child = kids[path[-1]].get(x)
        if child is None:
            return TreeAcceptance(path, x)
        path.append(child)


def expected_tokens_by_budget(tree: DraftTree) -> torch.Tensor:
    """[n] float64: entry m = 1 + sum(scores[1:m+1]), the expected tokens a step delivers
    when it verifies the first m drafts, reading each score as the probability that its
    node is accepted (plus the one recovered / bonus token)."""
    drafts = tree.scores[1:].to(torch.float64)  # [n - 1]
    return torch.cat([torch.zeros(1, dtype=torch.float64, device=drafts.device), drafts.cumsum(0)]) + 1.0
