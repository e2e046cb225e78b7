"""The block-diffusion training objective of DFlash, as pure tensor functions.

For one sequence x_0..x_{S-1} with response mask m and tapped target features f_j:
- anchors p: positions with m[p] and m[p+1] set (p <= S - 2), sampled anew every pass over
  the data; a block may run past the end of the sequence, its positions there unsupervised,
  so the blocks that end a response (the end-of-turn token) are trained too;
- block of anchor p: tokens [x_p, MASK x (B-1)] at positions p..p+B-1;
- attention: a block sees context feature j only if j < p (strictly before its anchor),
  sees its own block bidirectionally, and never another block;
- loss: block position k (1..L, L <= B-1) predicts x_{p+k} (same position, no shift),
  position 0 and non-response tokens excluded, weighted by w_k = exp(-(k-1)/gamma);
  loss = sum(w * CE) / sum(w).

Distillation (optional, weight alpha, temperature T): where the target's distribution at the
label's position is known (its top-k logits, kept at regeneration), a position's loss is
(1 - alpha) * CE + alpha * T^2 * H(p_T, q_T): the cross-entropy of the drafter's tempered
distribution q_T to the target's tempered top-k distribution p_T, both restricted to the
draft vocabulary (equal to KL(p_T || q_T) up to a constant). It teaches the drafter how
sure the target is, which the argmax label throws away.

Labels on text the target did not write (teacher-forced human answers): the label of
position i is then g_i, the target's greedy token given x_<i, and block position k is
supervised only while the block's own tokens agree with it (x_{p+j} = g_{p+j} for
0 < j < k). Every supervised label is then exactly the target's greedy continuation from
the anchor, the sequence decoding must match; on the target's own greedy responses
g = x, and the objective is the plain one above.

The same rule serves sampled answers and greedy answers written by a target in another
dtype and relabelled by the float32 one (`train relabel`): x is the bfloat16 text, g_i the
float32 target's argmax given x_<i, exactly what decoding verification checks after the
context x_<i. A block sees the context only through the target's features of x_<p and its
anchor x_p, both as decoding would have them, so
- k = 1 is always supervised with g_{p+1}, also where g_{p+1} != x_{p+1}: the first draft
  of that block is checked against exactly g_{p+1}, so a position whose label differs from
  the text is a valid example (the very case the relabelling adds);
- at k > 1 the block's label would be the float32 continuation of x_<=p, g_{p+1}, ...;
  while the text follows g (x_{p+j} = g_{p+j}, j < k) that is g_{p+k}, but past a
  difference g_{p+k} is the argmax after the bfloat16 token x_{p+j}, which decoding would
  never have in its context: unknown, so unsupervised;
- anchors after a difference train normally: the context has left the float32 path but is
  still target-like text, and its labels are the float32 target's given it, as for human
  answers.
At 2.6% differing positions (the committed corpus) a block of 16 loses some supervision in
about a third of the anchors, only behind its first difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

GAMMA_BY_BLOCK = {16: 7.0, 10: 5.0, 8: 4.0}


def default_gamma(block_size: int) -> float:
    """The published decay: 7 for B=16, 5 for B=10, 4 for B=8; in between, B * 7 / 16."""
    return GAMMA_BY_BLOCK.get(block_size, max(1.0, block_size * 7.0 / 16.0))


def position_weights(block_size: int, gamma: float | None = None, loss_positions: int | None = None) -> torch.Tensor:
    """[B] weights by block position: 0 at position 0, exp(-(k-1)/gamma) at 1 <= k <= L
    (L = loss_positions, default B - 1: every draft position), 0 beyond L.

    Cutting L saves the LM head and cross-entropy of the unsupervised rows (most of a CPU
    training step) at positions whose decayed weight is small anyway."""
    gamma = default_gamma(block_size) if gamma is None else gamma
    k = torch.arange(block_size, dtype=torch.float32)
    w = torch.exp(-(k - 1).clamp_min(0) / gamma)
    w[0] = 0.0
    if loss_positions is not None:
        w[loss_positions + 1:] = 0.0
    return w


def valid_anchors(loss_mask: torch.Tensor, block_size: int, whole_blocks: bool = True) -> torch.Tensor:
    """loss_mask [S] bool -> [n] positions p with mask[p] & mask[p+1]; with whole_blocks,
    only those whose block ends inside the sequence (p <= S - B), else up to p = S - 2."""
    s = loss_mask.shape[0]
    if s < 2 or (whole_blocks and s < block_size):
        return torch.empty(0, dtype=torch.long)
    ok = loss_mask[:-1] & loss_mask[1:]  # [S-1]: p and p+1 both response tokens
    if whole_blocks:
        ok = ok[: s - block_size + 1]
    return ok.nonzero().flatten()


def sample_anchors(loss_mask: torch.Tensor, block_size: int, max_anchors: int,
                   generator: torch.Generator | None = None, whole_blocks: bool = False) -> torch.Tensor:
    """Up to max_anchors distinct valid anchors (by default up to S - 2), drawn uniformly, sorted."""
    candidates = valid_anchors(loss_mask, block_size, whole_blocks)
    if candidates.numel() > max_anchors:
        pick = torch.randperm(candidates.numel(), generator=generator)[:max_anchors]
        candidates = candidates[pick]
    return candidates.sort().values


@dataclass
class Blocks:
    """Training blocks of one sequence (A anchors, block size B; Q = A * B queries)."""

    ids: torch.Tensor  # [Q] block tokens: anchor then MASK ids
    positions: torch.Tensor  # [Q] absolute positions p..p+B-1 per block
    labels: torch.Tensor  # [Q] x_{p+k}; -100 where not supervised
    weights: torch.Tensor  # [Q] w_k * m[p+k]; 0 where not supervised
    anchors: torch.Tensor  # [A]
    block_size: int


def greedy_consistent(input_ids: torch.Tensor, greedy_ids: torch.Tensor, anchors: torch.Tensor,
                      block_size: int) -> torch.Tensor:
    """[A, B] bool: block position k of anchor p is labelled by the target's greedy
    continuation from p, i.e. x_{p+j} == g_{p+j} for every 0 < j < k (always at k <= 1)."""
    positions = anchors[:, None] + torch.arange(block_size)[None, :]  # [A, B]
    agree = (input_ids[positions] == greedy_ids[positions]).long()  # [A, B]
    agree[:, 0] = 1  # the anchor is given, whoever wrote it
    before = torch.cat([torch.ones_like(agree[:, :1]), agree[:, :-1]], dim=1)  # agreement of j < k
    return before.cumprod(dim=1).bool()


def build_blocks(input_ids: torch.Tensor, loss_mask: torch.Tensor, anchors: torch.Tensor, block_size: int,
                 mask_token_id: int, gamma: float | None = None, loss_positions: int | None = None,
                 greedy_ids: torch.Tensor | None = None) -> Blocks:
    """input_ids, loss_mask [S]; anchors [A] -> Blocks with Q = A * B entries.

    greedy_ids [S] (optional): the target's greedy token at each position given the tokens
    before it; labels then come from it, cut where the block's tokens leave it (module doc).
    Block positions past the end of the sequence are unsupervised."""
    offsets = torch.arange(block_size)
    positions = (anchors[:, None] + offsets[None, :]).flatten()  # [Q]
    past = int(positions.max()) + 1 - input_ids.numel() if positions.numel() else 0
    if past > 0:  # blocks that run past the end: pad with unsupervised, never-read tokens
        input_ids = torch.cat([input_ids, input_ids.new_full((past,), mask_token_id)])
        loss_mask = torch.cat([loss_mask, loss_mask.new_zeros(past)])
        if greedy_ids is not None:
            greedy_ids = torch.cat([greedy_ids, greedy_ids.new_full((past,), mask_token_id)])
    targets = input_ids[positions] if greedy_ids is None else greedy_ids[positions]
    ids = torch.full_like(targets, mask_token_id).view(-1, block_size)
    ids[:, 0] = input_ids[anchors]
    supervised = loss_mask[positions].view(-1, block_size).clone()
    if greedy_ids is not None:
        supervised &= greedy_consistent(input_ids, greedy_ids, anchors, block_size)
    supervised[:, 0] = False
    if loss_positions is not None:
        supervised[:, loss_positions + 1:] = False
    weights = position_weights(block_size, gamma, loss_positions)[None, :] * supervised
    labels = torch.where(supervised.flatten(), targets, torch.full_like(targets, -100))
    return Blocks(ids.flatten(), positions, labels, weights.flatten(), anchors, block_size)


def block_training_mask(anchors: torch.Tensor, context_len: int, block_size: int) -> torch.Tensor:
    """[Q, context_len + Q] bool: block a sees context j < p_a and its own block only."""
    a = anchors.shape[0]
    q = a * block_size
    block_of_query = torch.arange(q) // block_size  # [Q]
    ctx = torch.arange(context_len)[None, :] < anchors[block_of_query][:, None]  # [Q, C]
    own = block_of_query[:, None] == block_of_query[None, :]  # [Q, Q]
    return torch.cat([ctx, own], dim=1)


class VocabSubset:
    """A reduced training vocabulary: the `ids` most frequent target output tokens.

    The loss is computed over these rows of the LM head only (labels outside are not
    supervised), so the drafter never learns to rank the other tokens: the trainer sets
    the same ids as the drafter's draft vocabulary, exported as draft_vocab.json beside
    the published weights and used at decode time (drafter/vocab.py)."""

    def __init__(self, ids: torch.Tensor, vocab_size: int):
        self.ids = ids.long().sort().values  # [N]
        self.to_subset = torch.full((vocab_size,), -100, dtype=torch.long)
        self.to_subset[self.ids] = torch.arange(self.ids.numel())
        self._rows: tuple[tuple, torch.Tensor] | None = None

    def head_rows(self, head_weight: torch.Tensor) -> torch.Tensor:
        """head_weight [V, H] (frozen) -> [N, H]: its rows of the subset, in the dtype the
        active autocast would cast it to. Kept until the head changes: gathering and casting
        the rows once per sequence was a sizeable share of a CPU training step."""
        device = head_weight.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else head_weight.dtype
        key = (head_weight.data_ptr(), tuple(head_weight.shape), head_weight.dtype, head_weight.device,
               head_weight._version, dtype)
        if self._rows is None or self._rows[0] != key:
            rows = head_weight.detach()[self.ids.to(head_weight.device)].to(dtype)
            self._rows = (key, rows)
        return self._rows[1]

    @classmethod
    def most_frequent(cls, token_counts: torch.Tensor, size: int) -> "VocabSubset":
        size = min(size, token_counts.numel())
        return cls(torch.topk(token_counts, size).indices, token_counts.numel())

    def coverage(self, token_counts: torch.Tensor) -> float:
        total = token_counts.sum().item()
        return token_counts[self.ids].sum().item() / total if total else 0.0


@dataclass
class SoftTargets:
    """The target's distribution at each query's label position, as its top-k logits."""

    ids: torch.Tensor  # [Q, k] target vocabulary ids; -1 where unknown
    logits: torch.Tensor  # [Q, k] float
    weight: float = 0.5  # alpha: the distillation share of each position's loss
    temperature: float = 1.0


def block_soft_targets(positions: torch.Tensor, num_prompt_tokens: int, topk_ids: torch.Tensor,
                       topk_logits: torch.Tensor, weight: float, temperature: float = 1.0) -> SoftTargets:
    """positions [Q] (absolute) and a sequence's response top-k ([R, k] each, row j for the
    token at num_prompt_tokens + j) -> SoftTargets [Q, k], unknown outside the response."""
    index = positions - num_prompt_tokens  # [Q] response row of each label position
    known = (index >= 0) & (index < topk_ids.shape[0])
    safe = index.clamp(0, max(0, topk_ids.shape[0] - 1))
    ids = torch.where(known[:, None], topk_ids[safe], torch.full_like(topk_ids[safe], -1))
    return SoftTargets(ids, topk_logits[safe].float(), weight, temperature)


def distillation_loss(logits: torch.Tensor, soft_ids: torch.Tensor, soft_logits: torch.Tensor,
                      temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [n, V'] of the drafter over the loss vocabulary; soft_ids [n, k] the target's
    top-k as indices into that vocabulary (-1: outside it or unknown), soft_logits [n, k].
    Returns (T^2 * H(p_T, q_T) [n], has [n] bool: rows with any known target mass)."""
    valid = soft_ids >= 0  # [n, k]
    has = valid.any(dim=-1)
    target = (soft_logits / temperature).masked_fill(~valid, float("-inf"))
    p = torch.softmax(target, dim=-1).nan_to_num(0.0)  # [n, k]; rows without mass are all zero
    log_q = torch.log_softmax(logits / temperature, dim=-1).gather(1, soft_ids.clamp_min(0))  # [n, k]
    return -(p * log_q).masked_fill(~valid, 0.0).sum(dim=-1) * temperature ** 2, has


def weighted_block_loss(hidden: torch.Tensor, head_weight: torch.Tensor, blocks: Blocks,
                        subset: VocabSubset | None = None, chunk: int = 1024,
                        soft: SoftTargets | None = None) -> tuple[torch.Tensor, dict]:
    """Decayed cross-entropy of the drafter's block outputs, mixed with distillation to the
    target's distribution where `soft` knows it (module doc).

    hidden [Q, H] (after the drafter's final norm); head_weight [V, H] the target's frozen
    LM head. Returns (loss, stats) with stats: weight sum, per-position correct counts
    (argmax over the loss vocabulary) and supervised counts."""
    labels = blocks.labels.to(hidden.device)  # blocks are built on the CPU; the drafter may run on a GPU
    weights = blocks.weights.to(hidden.device)
    if subset is not None:
        labels = torch.where(labels >= 0, subset.to_subset.to(labels.device)[labels.clamp_min(0)], labels)
        weights = weights * (labels >= 0)
        head_weight = subset.head_rows(head_weight)  # [N, H], the frozen head's subset rows
    rows = (weights > 0).nonzero().flatten()
    zero = hidden.sum() * 0.0
    if rows.numel() == 0:
        return zero, {"weight": 0.0, "correct": torch.zeros(blocks.block_size), "count": torch.zeros(blocks.block_size)}
    total = zero
    correct = torch.zeros(blocks.block_size)
    count = torch.zeros(blocks.block_size)
    wsum = weights[rows].sum()
    for start in range(0, rows.numel(), chunk):
        r = rows[start:start + chunk]
        logits = (hidden[r] @ head_weight.T).float()  # [n, V']
        ce = F.cross_entropy(logits, labels[r], reduction="none")  # [n]
        if soft is not None and soft.weight > 0:
            soft_ids = soft.ids[r.to(soft.ids.device)].to(hidden.device)  # [n, k] target ids
            if subset is not None:
                soft_ids = torch.where(soft_ids >= 0, subset.to_subset.to(soft_ids.device)[soft_ids.clamp_min(0)],
                                       soft_ids).clamp_min(-1)  # -100 (outside the subset) -> -1
            kd, has = distillation_loss(logits, soft_ids, soft.logits[r.to(soft.logits.device)].to(hidden.device),
                                        soft.temperature)
            ce = torch.where(has, (1 - soft.weight) * ce + soft.weight * kd, ce)
        total = total + (ce * weights[r]).sum()
        with torch.no_grad():
            pos = r % blocks.block_size
            hit = (logits.argmax(-1) == labels[r]).float()  # on the float logits: faster than a bf16 argmax on CPUs
            correct.index_add_(0, pos.cpu(), hit.cpu())
            count.index_add_(0, pos.cpu(), torch.ones_like(hit).cpu())
    return total / wsum, {"weight": float(wsum), "correct": correct, "count": count}


def acceptance_from_hits(hits: torch.Tensor) -> torch.Tensor:
    """hits [A, B-1] bool (draft k matches the target's token) -> [A] acceptance lengths
    (1 + leading matches), the figure tau averages at decode time."""
    return 1 + hits.long().cumprod(dim=1).sum(dim=1)


def decode_walk(lengths: torch.Tensor, budget: int) -> tuple[int, int]:
    """lengths [n]: the acceptance length at each of n consecutive anchors of one answer (its
    first response token onward) -> (tokens the verify steps kept, verify steps) of decoding
    the answer's first `budget` tokens as `SpeculativeDecoder` does: the prefill gives the first
    token, a step at anchor i keeps lengths[i] tokens (no more than the budget has left) and
    the next step drafts from the last of them, i + lengths[i]; it stops at the budget or where
    the anchors run out. tokens / steps is decoded tau: steps land more often where acceptance
    is short, so it sits below the mean over all anchors when acceptance comes in runs."""
    n = int(lengths.numel())
    position = tokens = steps = 0
    produced = 1  # the prefill's token
    while position < n and produced < budget:
        kept = min(int(lengths[position]), budget - produced)
        produced += kept
        tokens += kept
        steps += 1
        position += kept
    return tokens, steps


def cosine_lr(step: int, total_steps: int, base_lr: float, warmup_frac: float = 0.04, min_ratio: float = 0.0) -> float:
    """Linear warm-up then cosine decay to min_ratio * base_lr."""
    warmup = max(1, int(total_steps * warmup_frac))
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
