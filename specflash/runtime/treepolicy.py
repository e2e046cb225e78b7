"""How large a draft tree each step verifies: a fixed node budget, or `auto` from the
measured step costs and calibrated acceptance.

Words as in tree.py. A tree's nodes come in best-first order, so its first m drafts are a
tree too; when every node's score is the probability that the target accepts it (given
that its parent was accepted, multiplied down the path),

    E[tokens | m] = 1 + (sum of the first m scores)         (tree.expected_tokens_by_budget)

A drafter's probabilities are not acceptance probabilities (a weak drafter is
over-confident), so the edges are calibrated from what verification has shown so far:
- `EdgeCalibration` maps a drafter probability q to the rate at which edges with a
  similar q were accepted when their parent was (bins over q, recent steps weigh more,
  the prior is q itself);
- `BranchCalibration` keeps the conditional acceptance rate of a prompt-lookup branch by
  depth along the branch (a branch has no probabilities of its own).

`FixedTree(N)` calls the drafter every step and verifies the best N drafts. `AutoTree`
decides per step
  1. whether to call the drafter at all: the drafter's expected tokens per second (a
     running average of its own tree's E[tokens | m] curve, over the steps that called it)
     against the best rate this step's prompt-lookup branch gives alone (a plain step when
     there is none); while the drafter loses to a plain step it is still probed now and
     then, backing off exponentially, so it is noticed when the text becomes predictable;
  2. how many drafts to verify: argmax_m E[tokens | m] / (t_draft + t_verify(m + 1)), m = 0..max_nodes
     (t_draft = 0 when the drafter was not called).
The choice changes speed only: every node is verified by the target.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..perf.costmodel import StepCosts

DEFAULT_TOP_K = 8  # drafter candidates per depth a tree may branch into
DEFAULT_MAX_NODES = 32  # the largest auto budget (drafts per step, root excluded)
Q_BINS = (0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.85, 0.95, 1.0)  # upper edges of the q bins


class EdgeCalibration:
    """P(a drafter edge is accepted | its parent was) as a function of the drafter's
    probability q: per q bin, decayed counts of (reached, accepted) with `prior_weight`
    pseudo-observations at the bin's own mean q."""

    def __init__(self, prior_weight: float = 4.0, decay: float = 0.998):
        self.edges = torch.tensor(Q_BINS, dtype=torch.float64)
        lower = torch.cat([torch.zeros(1, dtype=torch.float64), self.edges[:-1]])
        self.prior = (lower + self.edges) / 2  # [bins]
        self.prior_weight, self.decay = prior_weight, decay
        self.reached = torch.zeros(len(Q_BINS), dtype=torch.float64)
        self.accepted = torch.zeros(len(Q_BINS), dtype=torch.float64)

    def rates(self) -> torch.Tensor:
        """[bins] calibrated acceptance rate of each q bin."""
        w = self.prior_weight
        return (self.accepted + self.prior * w) / (self.reached + w)

    def bins(self, q: torch.Tensor) -> torch.Tensor:
        return torch.bucketize(q.to(torch.float64).clamp(0, 1), self.edges).clamp_max(len(Q_BINS) - 1)

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        """q [...] drafter probabilities -> [...] calibrated acceptance rates (0 stays 0)."""
        rates = self.rates()[self.bins(q)]
        return torch.where(q > 0, rates, torch.zeros_like(rates))

    def observe(self, q: Sequence[float], accepted: Sequence[bool]) -> None:
        """Edges whose parent was accepted this step: their drafter probability and outcome."""
        if not len(q):
            return
        self.reached *= self.decay
        self.accepted *= self.decay
        bins = self.bins(torch.tensor(list(q), dtype=torch.float64))
        self.reached.index_add_(0, bins, torch.ones(len(q), dtype=torch.float64))
        self.accepted.index_add_(0, bins, torch.tensor([float(a) for a in accepted], dtype=torch.float64))


class BranchCalibration:
    """P(a prompt-lookup branch's token at depth d is accepted | depth d - 1 was), per depth.

    Priors: `prior_rate` at depth 1 (whether the text repeats here at all), `deeper_prior`
    below it (once a copy has started it tends to go on: prompt lookup on our eval sets
    measured conditional rates of 0.8-1.0 past the first token). A depth is only observed when
    a step verifies it, so a pessimistic prior there would never be corrected."""

    def __init__(self, max_depth: int, prior_rate: float = 0.5, prior_weight: float = 1.0, decay: float = 0.95,
                 deeper_prior: float = 0.8):
        self.prior_rate, self.prior_weight, self.decay = prior_rate, prior_weight, decay
        self.deeper_prior = deeper_prior
        self.reached = [0.0] * max_depth
        self.accepted = [0.0] * max_depth

    def rates(self, length: int) -> list[float]:
        """The edge probabilities of a branch of `length` tokens (depths 1..length)."""
        w = self.prior_weight
        out = []
        for d in range(length):
            r, a = (self.reached[d], self.accepted[d]) if d < len(self.reached) else (0.0, 0.0)
            prior = self.prior_rate if d == 0 else self.deeper_prior
            out.append((a + prior * w) / (r + w))
        return out

    def observe(self, num_reached: int, num_accepted: int) -> None:
        """A branch was verified: its depths 1..num_reached were reached (their parents were
        accepted) and 1..num_accepted accepted."""
        if num_reached <= 0:
            return
        for d in range(len(self.reached)):
            self.reached[d] *= self.decay
            self.accepted[d] *= self.decay
        for d in range(min(num_reached, len(self.reached))):
            self.reached[d] += 1.0
            if d < num_accepted:
                self.accepted[d] += 1.0


def best_budget(expected: torch.Tensor, costs: StepCosts, draft_s: float, max_nodes: int) -> tuple[int, float]:
    """expected [n]: E[tokens | m] for m = 0..n-1 -> (the m <= max_nodes with the most expected
    tokens per second, that rate), a step costing draft_s + t_verify(m + 1); ties: fewer nodes."""
    best_m, best_rate = 0, float(expected[0]) / (draft_s + costs.verify_s(1))
    for m in range(1, min(int(expected.shape[0]) - 1, max_nodes) + 1):
        rate = float(expected[m]) / (draft_s + costs.verify_s(m + 1))
        if rate > best_rate * (1 + 1e-12):
            best_m, best_rate = m, rate
    return best_m, best_rate


class FixedTree:
    """The drafter every step, the best `budget` drafts verified (`--tree N`)."""

    name = "tree"

    def __init__(self, budget: int, top_k: int = DEFAULT_TOP_K, ngram_branches: bool = True,
                 max_branch_depth: int = 16):
        if budget < 1:
            raise ValueError("a tree budget must be >= 1 draft")
        self.budget = budget
        self.max_nodes = budget
        self.top_k = top_k
        self.ngram_branches = ngram_branches
        self.edges = EdgeCalibration()
        self.branch = BranchCalibration(max_branch_depth)

    def wants_drafter(self, branch_expected: torch.Tensor | None) -> bool:
        return True

    def candidate_depth(self, block_depth: int) -> int:
        """Depths to read candidates at (the drafter's LM head runs over that many rows):
        no tree of `budget` drafts goes deeper than `budget`."""
        return min(block_depth, self.budget)

    def observe_depth(self, depth: int) -> None:
        pass

    def choose(self, expected: torch.Tensor, drafted: bool) -> int:
        """expected [n] E[tokens | m] of this step's tree -> drafts to verify."""
        return min(self.budget, int(expected.shape[0]) - 1)

    def observe_drafter(self, drafter_expected: torch.Tensor) -> None:
        pass


class AutoTree(FixedTree):
    """Cost-aware: whether to call the drafter and how many drafts to verify, per step.

    decay: weight kept by the drafter's running E[tokens | m] curve at each new drafted step;
    probe_every / probe_max: drafter-less steps (while a plain step beats the drafter)
    before the first probe, and the cap of the doubling interval between probes."""

    name = "tree-auto"

    def __init__(self, costs: StepCosts, max_nodes: int = DEFAULT_MAX_NODES, top_k: int = DEFAULT_TOP_K,
                 ngram_branches: bool = True, max_branch_depth: int = 16, decay: float = 0.8,
                 probe_every: int = 8, probe_max: int = 128, draft_depth: int = 15):
        super().__init__(max_nodes, top_k, ngram_branches, max_branch_depth)
        self.costs = costs
        self.draft_s = costs.draft_s(draft_depth)  # one drafter call read at draft_depth positions
        self.decay = decay
        self.probe_every, self.probe_max = probe_every, probe_max
        self.drafter_curve: torch.Tensor | None = None  # running E[tokens | m] of the drafter's own tree
        self._depths: list[int] = []  # depths of the last trees the drafter fed
        self._idle = 0
        self._interval = probe_every

    def drafter_rate(self) -> float:
        """The drafter's expected tokens per second at its best budget (inf before any step:
        try it first)."""
        if self.drafter_curve is None:
            return float("inf")
        return best_budget(self.drafter_curve, self.costs, self.draft_s, self.max_nodes)[1]

    def wants_drafter(self, branch_expected: torch.Tensor | None) -> bool:
        """branch_expected [n]: E[tokens | m] of this step's prompt-lookup branch alone (None:
        no branch, a plain step is the alternative)."""
        plain = torch.ones(1, dtype=torch.float64)
        alone = branch_expected if branch_expected is not None else plain
        rate_alone = best_budget(alone, self.costs, 0.0, self.max_nodes)[1]
        if self.drafter_rate() > rate_alone:
            self._idle, self._interval = 0, self.probe_every
            return True
        if branch_expected is not None and rate_alone > best_budget(plain, self.costs, 0.0, 0)[1]:
            return False  # the branch is the better bet this step; the drafter is not written off
        self._idle += 1
        if self._idle >= self._interval:
            self._idle = 0
            self._interval = min(self._interval * 2, self.probe_max)
            return True  # a probe
        return False

    def candidate_depth(self, block_depth: int) -> int:
        """Two deeper than the deepest of the last 16 drafted trees (all of the block at
        first), so the drafter's LM head skips rows no tree has reached lately."""
        if len(self._depths) < 4:
            return block_depth
        return min(block_depth, max(self._depths) + 2)

    def observe_depth(self, depth: int) -> None:
        self._depths = (self._depths + [depth])[-16:]

    def choose(self, expected: torch.Tensor, drafted: bool) -> int:
        draft_s = self.draft_s if drafted else 0.0
        return best_budget(expected, self.costs, draft_s, self.max_nodes)[0]

    def observe_drafter(self, drafter_expected: torch.Tensor) -> None:
        """drafter_expected [n]: E[tokens | m] of this step's drafter-only tree (calibrated)."""
        curve = torch.ones(self.max_nodes + 1, dtype=torch.float64)
        n = min(int(drafter_expected.shape[0]), self.max_nodes + 1)
        curve[:n] = drafter_expected[:n].to(torch.float64)
        curve[n:] = curve[n - 1]
        if self.drafter_curve is None:
            self.drafter_curve = curve
        else:
            self.drafter_curve = self.decay * self.drafter_curve + (1 - self.decay) * curve


def is_tree_policy(policy) -> bool:
    """Whether the decode loop verifies draft trees under this policy."""
    return isinstance(policy, FixedTree)


def make_tree_policy(tree: int | str | None, target, proposer, log=None,
                     block_size: int | str | None = None) -> FixedTree | None:
    """Resolve a `--tree` setting (see `config.parse_tree`) for this target and proposer:
    None for linear blocks (also without a proposer: plain decoding stays plain, and for
    'auto' beside a fixed integer `block_size`: a fixed block asks for linear blocks); an
    int: `FixedTree`; 'auto': `AutoTree` over the cached (or freshly measured) cost model,
    verify sizes up to its largest budget (choose the verify kernels first: they change
    the costs)."""
    from .config import parse_tree

    tree = parse_tree(tree)
    if tree is None or proposer is None or (tree == "auto" and isinstance(block_size, int)):
        return None
    branch_depth = max(2, int(getattr(proposer, "block_size", 16))) if proposer is not None else 16
    if tree != "auto":
        return FixedTree(int(tree), max_branch_depth=branch_depth)
    from ..perf.measure import load_or_measure

    costs = load_or_measure(target, proposer, max_tokens=max(DEFAULT_MAX_NODES + 1, branch_depth), log=log)
    return AutoTree(costs, max_branch_depth=branch_depth, draft_depth=max(1, branch_depth - 1))
