"""The block-diffusion objective: anchors, block layout, same-position labels, decayed
weights, the block attention mask, and agreement with the decoding-time forward."""

import math

import torch

from specflash.train.objective import (
    VocabSubset,
    acceptance_from_hits,
    decode_walk,
    block_training_mask,
    build_blocks,
    cosine_lr,
    default_gamma,
    greedy_consistent,
    position_weights,
    sample_anchors,
    valid_anchors,
    weighted_block_loss,
)
from tiny import tiny_drafter


def test_block_mask_hand_checked():
    # Two blocks of 3 at anchors 2 and 4, six context positions.
    mask = block_training_mask(torch.tensor([2, 4]), context_len=6, block_size=3).int()
    expected = torch.tensor([
        # ctx 0..5          | block a | block b
        [1, 1, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1],
    ])
    assert torch.equal(mask, expected)


def test_labels_are_the_tokens_at_the_same_position():
    ids = torch.arange(100, 120)
    mask = torch.zeros(20, dtype=torch.bool)
    mask[5:] = True
    blocks = build_blocks(ids, mask, torch.tensor([6, 10]), block_size=4, mask_token_id=1)
    assert blocks.ids.tolist() == [106, 1, 1, 1, 110, 1, 1, 1]
    assert blocks.positions.tolist() == [6, 7, 8, 9, 10, 11, 12, 13]
    assert blocks.labels.tolist() == [-100, 107, 108, 109, -100, 111, 112, 113]


def test_greedy_labels_stop_where_the_answer_leaves_the_targets_path():
    """Hand-checked: the answer (human) agrees with the target's greedy tokens at 7 and 8,
    not at 9; labels come from the greedy tokens and end after the first disagreement
    inside the block (the anchor itself may disagree)."""
    ids = torch.arange(100, 120)
    greedy = ids.clone()
    greedy[6] = 55  # the anchor: given, whoever wrote it
    greedy[9] = 77  # the target would have said 77 where the answer says 109
    mask = torch.zeros(20, dtype=torch.bool)
    mask[5:] = True
    consistent = greedy_consistent(ids, greedy, torch.tensor([6]), block_size=6)
    assert consistent.tolist() == [[True, True, True, True, False, False]]
    blocks = build_blocks(ids, mask, torch.tensor([6]), block_size=6, mask_token_id=1, greedy_ids=greedy)
    assert blocks.ids.tolist() == [106, 1, 1, 1, 1, 1]
    assert blocks.labels.tolist() == [-100, 107, 108, 77, -100, -100]
    assert (blocks.weights[4:] == 0).all() and (blocks.weights[1:4] > 0).all()


def test_greedy_labels_equal_to_the_tokens_give_the_plain_objective():
    """On the target's own greedy responses the labelled objective is the plain one."""
    ids = torch.randint(0, 50, (40,))
    mask = torch.zeros(40, dtype=torch.bool)
    mask[8:] = True
    anchors = torch.tensor([8, 13, 20, 24])
    plain = build_blocks(ids, mask, anchors, 8, 3, gamma=2.0, loss_positions=5)
    labelled = build_blocks(ids, mask, anchors, 8, 3, gamma=2.0, loss_positions=5, greedy_ids=ids.clone())
    for name in ("ids", "positions", "labels", "weights"):
        assert torch.equal(getattr(plain, name), getattr(labelled, name))


def test_non_response_tokens_are_not_supervised():
    ids = torch.arange(20)
    mask = torch.zeros(20, dtype=torch.bool)
    mask[4:9] = True  # a response followed by padding-like unsupervised tokens
    blocks = build_blocks(ids, mask, torch.tensor([6]), block_size=5, mask_token_id=0)
    assert blocks.labels.tolist() == [-100, 7, 8, -100, -100]
    assert (blocks.weights[3:] == 0).all() and (blocks.weights[1:3] > 0).all()


def test_weights_decay_from_the_first_draft_position():
    w = position_weights(16)
    assert w[0] == 0 and w[1] == 1
    assert math.isclose(float(w[8]), math.exp(-7 / 7), rel_tol=1e-6)
    assert (default_gamma(16), default_gamma(10), default_gamma(8)) == (7.0, 5.0, 4.0)


def test_anchors_need_p_and_p_plus_one_in_the_response_and_a_full_block():
    mask = torch.tensor([0, 0, 1, 1, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    assert valid_anchors(mask, block_size=3).tolist() == [2, 3, 4, 5]  # p <= 10 - 3, p=6 fails m[7]
    assert valid_anchors(mask, block_size=11).numel() == 0


def test_acceptance_lengths_count_leading_hits():
    hits = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert acceptance_from_hits(hits).tolist() == [3, 1, 5]


def test_decode_walk_drafts_from_where_each_step_ended():
    lengths = torch.tensor([3, 9, 9, 2, 9, 1, 4, 9, 9, 9, 9])
    # anchors 0 -> 3 -> 5 -> 6 -> 10: steps keep 3, 2, 1, 4, 9 tokens; the skipped 9s never count
    assert decode_walk(lengths, budget=100) == (19, 5)


def test_decode_walk_keeps_no_more_than_the_budget_after_the_first_token():
    lengths = torch.tensor([3, 9, 9, 5, 9, 9, 9, 9, 9])
    # the prefill gave token 1; a budget of 6 leaves 5: a step of 3, then 5 cut to the 2 left
    assert decode_walk(lengths, budget=6) == (5, 2)
    assert decode_walk(lengths, budget=1) == (0, 0)


def test_decode_walk_tau_sits_below_the_mean_when_acceptance_comes_in_runs():
    easy, hard = [5] * 40, [1] * 40  # a predictable stretch, then a hard one
    tokens, steps = decode_walk(torch.tensor(easy + hard), budget=1_000)
    assert tokens / steps < sum(easy + hard) / 80  # steps crowd into the hard stretch
    assert (tokens, steps) == (80, 8 + 40)


def test_vocab_subset_maps_labels_and_drops_the_rest():
    counts = torch.tensor([5.0, 0.0, 9.0, 1.0])
    subset = VocabSubset.most_frequent(counts, 2)
    assert subset.ids.tolist() == [0, 2] and subset.to_subset.tolist() == [0, -100, 1, -100]
    assert math.isclose(subset.coverage(counts), 14 / 15)


def test_subset_head_rows_are_cached_until_the_head_changes():
    head = torch.randn(6, 3)
    subset = VocabSubset(torch.tensor([4, 1]), 6)
    rows = subset.head_rows(head)
    assert torch.equal(rows, head[[1, 4]])
    assert subset.head_rows(head) is rows  # gathered once, not per call
    head.mul_(2.0)  # an in-place change to the head invalidates the cache
    assert torch.equal(subset.head_rows(head), head[[1, 4]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert subset.head_rows(head).dtype == torch.bfloat16  # cast once for autocast's matmul
    assert subset.head_rows(head).dtype == torch.float32


def test_subset_loss_is_the_loss_over_the_subset_rows_of_the_head():
    torch.manual_seed(0)
    hidden = torch.randn(8, 5)
    head = torch.randn(7, 5)
    ids = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0, 1, 2])
    blocks = build_blocks(ids, torch.ones(10, dtype=torch.bool), torch.tensor([0, 4]), 4, 6)
    subset = VocabSubset(torch.tensor([1, 2, 3, 5]), 7)  # labels 4, 6 (and 0) fall outside
    loss, stats = weighted_block_loss(hidden, head, blocks, subset)
    labels = subset.to_subset[blocks.labels.clamp_min(0)]
    keep = (blocks.labels >= 0) & (labels >= 0)
    ce = torch.nn.functional.cross_entropy(hidden @ head[subset.ids].T, labels.clamp_min(0), reduction="none")
    w = blocks.weights * keep
    assert torch.allclose(loss, (ce * w).sum() / w.sum())
    assert stats["count"].sum() == keep.sum()


def test_cosine_schedule_warms_up_then_decays():
    lrs = [cosine_lr(s, 100, 1.0, warmup_frac=0.1) for s in range(100)]
    assert lrs[0] == 0.1 and lrs[9] == 1.0 and lrs[-1] < 0.01
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_training_forward_equals_decoding_forward(targets):
    """The masked all-blocks-at-once training forward gives each block exactly what the
    decoding-time forward (context cache + one block) gives it."""
    target = targets("qwen3")
    drafter = tiny_drafter(target, block_size=4)
    target.set_taps(drafter.target_layer_ids)
    ids = torch.randint(0, 250, (30,), generator=torch.Generator().manual_seed(3))
    features = target.forward(ids[None, :-1]).features  # [1, 29, F]
    mask = torch.ones(30, dtype=torch.bool)
    anchors = torch.tensor([3, 11, 20, 26])
    blocks = build_blocks(ids, mask, anchors, 4, drafter.mask_token_id)
    with torch.no_grad():
        train_hidden = drafter(target.embed_raw(blocks.ids[None]), blocks.positions[None], features,
                               torch.arange(29)[None], None,
                               block_training_mask(anchors, 29, 4)[None, None])[0]
        for a, p in enumerate(anchors.tolist()):
            cache = drafter.new_cache()
            block = blocks.ids[a * 4:(a + 1) * 4]
            decode_hidden = drafter(target.embed_raw(block[None]), torch.arange(p, p + 4)[None],
                                    features[:, :p], torch.arange(p)[None], cache)[0]
            assert torch.allclose(train_hidden[a * 4:(a + 1) * 4], decode_hidden, atol=1e-10)


def test_loss_is_weighted_mean_of_cross_entropy():
    torch.manual_seed(0)
    hidden = torch.randn(8, 5, dtype=torch.float64)
    head = torch.randn(7, 5, dtype=torch.float64)
    ids = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0, 1, 2])
    blocks = build_blocks(ids, torch.ones(10, dtype=torch.bool), torch.tensor([0, 4]), 4, 6)
    loss, stats = weighted_block_loss(hidden, head, blocks)
    ce = torch.nn.functional.cross_entropy(hidden @ head.T, blocks.labels.clamp_min(0), reduction="none")
    expected = (ce * blocks.weights).sum() / blocks.weights.sum()
    assert torch.allclose(loss, expected)
    assert stats["count"].tolist() == [0, 2, 2, 2]


def test_loss_positions_supervise_only_the_first_l_drafts():
    ids = torch.arange(20)
    mask = torch.ones(20, dtype=torch.bool)
    blocks = build_blocks(ids, mask, torch.tensor([2, 9]), block_size=5, mask_token_id=0, gamma=2.0,
                          loss_positions=2)
    labels = blocks.labels.view(2, 5)
    assert labels[:, 1:3].tolist() == [[3, 4], [10, 11]]
    assert (labels[:, 0] == -100).all() and (labels[:, 3:] == -100).all()
    w = blocks.weights.view(2, 5)
    assert (w[:, 3:] == 0).all() and torch.allclose(w[0, 1:3], position_weights(5, 2.0)[1:3])
    assert (position_weights(5, 2.0, loss_positions=2)[3:] == 0).all()


def test_training_anchors_reach_the_end_of_the_response():
    mask = torch.tensor([0, 0, 1, 1, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    assert valid_anchors(mask, block_size=3, whole_blocks=False).tolist() == [2, 3, 4, 5, 8]  # up to S - 2
    drawn = sample_anchors(mask, block_size=4, max_anchors=99)
    assert drawn.tolist() == [2, 3, 4, 5, 8]


def test_a_block_past_the_end_supervises_only_the_tokens_that_exist():
    ids = torch.arange(10, 20)
    mask = torch.ones(10, dtype=torch.bool)
    mask[:3] = False
    blocks = build_blocks(ids, mask, torch.tensor([7, 8]), block_size=4, mask_token_id=99)
    labels = blocks.labels.view(2, 4)
    assert labels[0].tolist() == [-100, 18, 19, -100]  # anchor 7: positions 8, 9 exist, 10 does not
    assert labels[1].tolist() == [-100, 19, -100, -100]  # anchor 8 predicts the last token (end of turn)
    assert blocks.positions.view(2, 4)[1].tolist() == [8, 9, 10, 11]
    assert (blocks.weights.view(2, 4)[labels < 0] == 0).all()
    greedy = build_blocks(ids, mask, torch.tensor([8]), 4, 99, greedy_ids=ids.clone())
    assert greedy.labels.tolist() == [-100, 19, -100, -100]


def test_distillation_is_smallest_when_the_drafter_matches_the_targets_distribution():
    from specflash.train.objective import distillation_loss

    g = torch.Generator().manual_seed(0)
    soft_logits = torch.randn(4, 5, generator=g)
    soft_ids = torch.stack([torch.randperm(12, generator=g)[:5] for _ in range(4)])
    matching = torch.full((4, 12), -1e4)
    matching.scatter_(1, soft_ids, soft_logits)
    best, has = distillation_loss(matching, soft_ids, soft_logits, temperature=1.0)
    p = torch.softmax(soft_logits, -1)
    assert has.all() and torch.allclose(best, -(p * p.log()).sum(-1), atol=1e-5)  # H(p, p): p's entropy
    for _ in range(5):
        other, _ = distillation_loss(torch.randn(4, 12, generator=g) * 3, soft_ids, soft_logits, 1.0)
        assert (other > best).all()


def test_distillation_ignores_ids_outside_the_draft_vocabulary_and_unknown_rows():
    from specflash.train.objective import distillation_loss

    logits = torch.randn(2, 6)
    ids = torch.tensor([[0, 3, -1], [-1, -1, -1]])
    values = torch.tensor([[2.0, 1.0, 50.0], [1.0, 2.0, 3.0]])
    loss, has = distillation_loss(logits, ids, values, temperature=2.0)
    p = torch.softmax(values[0, :2] / 2.0, -1)
    q = torch.log_softmax(logits[0] / 2.0, -1)[[0, 3]]
    assert has.tolist() == [True, False]
    assert torch.isclose(loss[0], -(p * q).sum() * 4.0) and loss[1] == 0


def test_block_loss_mixes_distillation_only_where_the_distribution_is_known():
    from specflash.train.objective import SoftTargets, block_soft_targets

    ids = torch.arange(20, 40)
    mask = torch.zeros(20, dtype=torch.bool)
    mask[6:] = True
    blocks = build_blocks(ids, mask, torch.tensor([6, 12]), block_size=4, mask_token_id=1)
    hidden = torch.randn(8, 16)
    head = torch.randn(64, 16)
    topk_ids = torch.stack([ids[6:], (ids[6:] + 1) % 64], dim=1)  # [14, 2]: response token, then another
    topk_logits = torch.tensor([[3.0, 1.0]]).repeat(14, 1)
    soft = block_soft_targets(blocks.positions, 6, topk_ids, topk_logits, weight=0.0)
    assert soft.ids[1].tolist() == topk_ids[1].tolist() and soft.ids[0].tolist() == topk_ids[0].tolist()
    plain, _ = weighted_block_loss(hidden, head, blocks)
    assert torch.isclose(weighted_block_loss(hidden, head, blocks, soft=soft)[0], plain)
    mixed, _ = weighted_block_loss(hidden, head, blocks, soft=SoftTargets(soft.ids, soft.logits, 0.5))
    assert not torch.isclose(mixed, plain)
    unknown = SoftTargets(torch.full_like(soft.ids, -1), soft.logits, 0.5)
    assert torch.isclose(weighted_block_loss(hidden, head, blocks, soft=unknown)[0], plain)
