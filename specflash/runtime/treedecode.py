"""One verify step over a draft tree: gather candidates, build the tree, verify it in one
target forward, walk it, keep the accepted path.

The decode loop (decode.py) runs this instead of its linear block when it is given a tree
policy (treepolicy.py). Per step:
  1. the prompt-lookup branch: what followed the last occurrence of the current suffix
     (proposers/ngram.py), with edge probabilities from its calibration by depth;
  2. if the policy wants it, one drafter forward (the same one a linear block takes) read
     as the top-k candidates at each depth, their probabilities calibrated;
  3. `build_tree` merges both best-first under the policy's node budget; the policy picks
     how many of the best nodes to verify (every prefix of the order is a tree);
  4. the target verifies the tree in one forward (`TargetModel.forward_tree`: each node
     sees the cached context and its own ancestors); a chain runs the ordinary block
     forward, exactly as linear decoding does;
  5. the walk (`accept_greedy_tree` / `accept_sampled_tree`) picks the accepted path, the
     target's cache keeps exactly that path (`keep_cache_path`), the proposers are told the
     path's tokens and features, and the calibrations learn from every edge whose parent
     was accepted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..hf.target import TargetModel
from .proposers.ngram import NgramProposer
from .sampling import Sampler
from .tree import DraftTree, accept_greedy_tree, accept_sampled_tree, build_tree, expected_tokens_by_budget


@dataclass
class VerifyResult:
    """What one verify step decided (a draft tree's here, a linear block's in decode.py)."""

    accepted: list[int]  # accepted draft tokens, in order
    next_token: int  # the recovered or bonus token
    num_drafts: int  # drafts verified (a tree's nodes after the root)
    depth: int  # the deepest draft position verified
    drafted: bool  # the proposer was called
    forward_s: float = 0.0  # time inside the drafter's and the target's forwards


class TreeStepper:
    """The tree steps of one generation. `proposer` is a DFlash proposer (its `candidates`
    feed the tree), an n-gram proposer (its continuation is the only branch) or None (only
    the policy's own prompt-lookup branch); `policy` is a FixedTree / AutoTree, shared
    across generations (its calibrations keep learning)."""

    def __init__(self, target: TargetModel, proposer, policy):
        self.target = target
        self.policy = policy
        self.drafter = proposer if hasattr(proposer, "candidates") else None
        if isinstance(proposer, NgramProposer):
            self.ngram = proposer
        else:
            self.ngram = NgramProposer() if policy.ngram_branches else None

    def reset(self, prompt_ids: torch.Tensor, features: torch.Tensor | None) -> None:
        if self.drafter is not None:
            self.drafter.reset(prompt_ids, features)
        if self.ngram is not None:
            self.ngram.reset(prompt_ids, None)

    def commit(self, tokens: torch.Tensor, features: torch.Tensor | None) -> None:
        if self.drafter is not None:
            self.drafter.commit(tokens, features)
        if self.ngram is not None:
            self.ngram.commit(tokens, None)

    def _branch(self, anchor: int, max_depth: int) -> list[int]:
        if self.ngram is None or max_depth <= 0:
            return []
        depth = min(max_depth, len(self.policy.branch.reached))
        return self.ngram.lookup(self.ngram.history + [int(anchor)], depth)

    @torch.inference_mode()
    def step(self, anchor: int, start: int, cache, max_depth: int, sampler: Sampler) -> VerifyResult:
        """The anchor sits at absolute position `start` (the cache holds 0..start-1); no
        draft goes deeper than `max_depth` (the length and context limits)."""
        policy, target = self.policy, self.target
        branch = self._branch(anchor, max_depth)
        branch_probs = policy.branch.rates(len(branch))
        branch_expected = None
        if branch:
            reach = torch.tensor(branch_probs, dtype=torch.float64).cumprod(0)
            branch_expected = torch.cat([torch.ones(1, dtype=torch.float64), 1 + reach.cumsum(0)])  # [len + 1]
        drafted = self.drafter is not None and max_depth > 0 and policy.wants_drafter(branch_expected)
        forward_s = 0.0
        if drafted:
            depth = min(policy.candidate_depth(self.drafter.block_size - 1), max_depth)
            t0 = time.perf_counter()
            candidates, q = self.drafter.candidates(anchor, start, depth, policy.top_k)  # [D, K] each
            candidates, q = candidates.cpu(), q.cpu().to(torch.float64)
            forward_s += time.perf_counter() - t0
            probs = policy.edges(q)  # [D, K] calibrated
            if branch and hasattr(policy, "drafter_curve"):
                own = build_tree(anchor, candidates, probs, policy.max_nodes, max_depth=max_depth)
                policy.observe_drafter(expected_tokens_by_budget(own))
        else:
            candidates = torch.empty(0, 0, dtype=torch.long)
            q = probs = torch.empty(0, 0, dtype=torch.float64)
        branches = [(branch, branch_probs)] if branch else []
        tree = build_tree(anchor, candidates, probs, policy.max_nodes, branches, max_depth=max_depth)
        if drafted and not branch and hasattr(policy, "drafter_curve"):
            policy.observe_drafter(expected_tokens_by_budget(tree))
        tree = tree.truncated(policy.choose(expected_tokens_by_budget(tree), drafted))
        if drafted:
            policy.observe_depth(tree.max_depth)

        path, next_token, features, verify_s = self._verify(tree, start, cache, sampler)
        self.commit(tree.tokens[path].to(target.device), features)
        self._learn(tree, path, candidates, q, branch)
        accepted = tree.tokens[path[1:]].tolist()
        return VerifyResult(accepted, next_token, tree.num_drafts, tree.max_depth, drafted, forward_s + verify_s)

    def _verify(self, tree: DraftTree, start: int, cache, sampler: Sampler):
        """One target forward over the tree -> (accepted path, next token, the path's tapped
        features, the forward's seconds)."""
        target = self.target
        ids = tree.tokens[None].to(target.device)  # [1, n]
        chain = tree.is_chain()
        t0 = time.perf_counter()
        if chain:  # the ordinary block forward: bit-identical to linear decoding
            out = target.forward(ids, cache)
        else:
            out = target.forward_tree(ids, cache, tree.depths.to(target.device),
                                      tree.ancestor_mask().to(target.device))
        logits = out.logits[0]  # [n, V]
        if target.device.type == "cuda":
            torch.cuda.synchronize(target.device)
        verify_s = time.perf_counter() - t0
        if sampler.greedy:
            verdict = accept_greedy_tree(tree, logits.argmax(dim=-1).cpu())
        else:
            verdict = accept_sampled_tree(tree, sampler.probs(logits).cpu(), sampler.generator)
        path = verdict.path
        if chain:
            target.crop_cache(cache, start + len(path))
        else:
            target.keep_cache_path(cache, start, path)
        features = out.features[:, path] if out.features is not None else None  # [1, len(path), K*H]
        return path, verdict.next_token, features, verify_s

    def _learn(self, tree: DraftTree, path: list[int], candidates: torch.Tensor, q: torch.Tensor,
               branch: list[int]) -> None:
        """Update the calibrations with every edge whose parent was accepted."""
        on_path = set(path)
        parents, depths, tokens = tree.parents.tolist(), tree.depths.tolist(), tree.tokens.tolist()
        drafter_q: dict[tuple[int, int], float] = {}
        for d in range(candidates.shape[0]):
            for token, prob in zip(candidates[d].tolist(), q[d].tolist()):
                drafter_q.setdefault((d + 1, token), prob)
        seen_q, seen_ok = [], []
        for i in range(1, len(tokens)):
            if parents[i] in on_path:
                prob = drafter_q.get((depths[i], tokens[i]), 0.0)
                if prob > 0:
                    seen_q.append(prob)
                    seen_ok.append(i in on_path)
        self.policy.edges.observe(seen_q, seen_ok)
        if branch:  # the branch's nodes in the (possibly truncated) tree, root-first
            node, in_tree = 0, 0
            for token in branch:
                child = next((c for c in tree.children(node) if tokens[c] == token), None)
                if child is None:
                    break
                node, in_tree = child, in_tree + 1
            accepted = 0
            for token, kept in zip(branch, tokens_of(path[1:], tokens)):
                if token != kept:
                    break
                accepted += 1
            self.policy.branch.observe(min(in_tree, accepted + 1), accepted)


def tokens_of(nodes: list[int], tokens: list[int]) -> list[int]:
    return [tokens[i] for i in nodes]
