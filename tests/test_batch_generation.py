"""Batched generation for training data: the preallocated KV cache, the copy-free
grouped-query decode attention, and rows leaving the batch when they finish."""

from collections import Counter

import pytest
import torch
from transformers import DynamicCache

from specflash.hf.batchcache import buffered_cache, select_rows
from specflash.hf.gqa_attention import grouped_query_attention
from specflash.hf.target import TargetModel
from specflash.train import regenerate as regen
from specflash.train.regenerate import RegenConfig, generate_batch
from tiny import hf_greedy, tiny_target


def _padded_batch(lengths, vocab=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), width), generator=g)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, width - n:] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp_min(0)


def _decode(target, cache, ids, mask, positions, steps):
    """Prefill then `steps` greedy steps; logits of every step [b, steps + 1, V]."""
    out = target.forward(ids, cache, logits_to_keep=1, attention_mask=mask, position_ids=positions)
    logits, pos = [out.logits], positions[:, -1:]
    for _ in range(steps):
        nxt = logits[-1][:, -1].argmax(-1)[:, None]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = pos + 1
        logits.append(target.forward(nxt, cache, logits_to_keep=1, attention_mask=mask, position_ids=pos).logits)
    return torch.cat(logits, 1)


@pytest.fixture(scope="module")
def target():
    return tiny_target("llama")  # float64, 4 query heads over 2 KV heads


def test_buffered_cache_gives_the_same_logits_as_dynamic_cache(target):
    batch = _padded_batch([5, 9, 3])
    expected = _decode(target, DynamicCache(), *batch, steps=12)
    got = _decode(target, buffered_cache(target.num_layers, capacity=4), *batch, steps=12)  # grows twice
    assert torch.equal(got, expected)


def test_select_rows_keeps_the_same_rows_as_batch_select_indices():
    ours, theirs = buffered_cache(2, capacity=8), DynamicCache()
    g = torch.Generator().manual_seed(0)
    for n in (3, 1, 1):
        k, v = torch.randn(4, 2, n, 8, generator=g), torch.randn(4, 2, n, 8, generator=g)
        for layer in range(2):
            ours.update(k, v, layer)
            theirs.update(k, v, layer)
    keep = torch.tensor([3, 1])
    select_rows(ours, keep)
    theirs.batch_select_indices(keep)
    for a, b in zip(ours.layers, theirs.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    k = torch.randn(2, 2, 1, 8, generator=g)
    assert ours.update(k, k, 0)[0].shape == (2, 2, 6, 8)  # still appends after the copy


def test_gqa_decode_attention_matches_transformers_sdpa(target):
    batch = _padded_batch([7, 2, 11, 4], seed=1)
    expected = _decode(target, DynamicCache(), *batch, steps=6)
    with grouped_query_attention(target.model):
        got = _decode(target, DynamicCache(), *batch, steps=6)
    assert target.model.config._attn_implementation == "sdpa"  # restored
    assert torch.allclose(got, expected, atol=1e-10, rtol=0)


def test_finished_rows_leave_the_batch_and_outputs_stay_greedy(target, monkeypatch):
    prompts = [[5 + i, 17, 3 * i + 1, 40 + i][: 2 + i % 3] for i in range(10)]
    free = [hf_greedy(target, p, 20) for p in prompts]
    # An end token the rows reach at different steps, so some finish early.
    stop = Counter(t for out in free for t in set(out[1:12])).most_common(1)[0][0]
    monkeypatch.setattr(TargetModel, "eos_token_ids", property(lambda self: (stop,)))
    calls = []
    real = regen.select_rows
    monkeypatch.setattr(regen, "select_rows", lambda cache, keep: (calls.append(len(keep)), real(cache, keep)))
    target.set_taps((1, 3))
    try:
        heard = []
        results = generate_batch(target, prompts, RegenConfig(max_new_tokens=20), on_step=heard.append)
        assert calls, "no row left the batch: the test did not exercise compaction"
        assert sum(heard) == sum(len(r[0]) for r in results)  # the progress bar's count is exact
        for prompt, (response, reason, features, _topk, _greedy) in zip(prompts, results):
            expected = hf_greedy(target, prompt, 20, eos=[stop])
            assert response == expected
            assert reason == ("stop" if stop in expected else "length")
            fed = torch.tensor([prompt + response[:-1]])
            teacher = target.forward(fed).features[0]
            assert features.shape == teacher.shape
            assert torch.allclose(features.double(), teacher, atol=2e-2, rtol=1e-2)
    finally:
        target.set_taps(())
