"""The drafter's context cache: incremental drafting equals a fresh forward over the
whole context, and the block's own K/V are never kept; every cache grows by the one
capacity rule."""

import torch

from specflash.hf.batchcache import BufferedLayer
from specflash.hf.cache import ContextKVCache, grown_capacity
from specflash.hf.staticsteps import Slot, SlotPool, StaticKV
from specflash.runtime.proposers import DFlashProposer
from specflash.runtime.sampling import Sampler
from tiny import tiny_drafter


def test_incremental_context_equals_full_recompute(targets):
    target = targets("qwen3")
    drafter = tiny_drafter(target, block_size=6)
    target.set_taps(drafter.target_layer_ids)
    ids = torch.randint(0, 250, (1, 40), generator=torch.Generator().manual_seed(2))
    features = target.forward(ids).features  # [1, 40, K*H]
    block = target.embed_raw(torch.tensor([[7] + [drafter.mask_token_id] * 5]))
    positions = torch.arange(40, 46)[None]
    with torch.no_grad():
        fresh = drafter(block, positions, features, torch.arange(40)[None])  # no cache
        cache = drafter.new_cache(capacity=8)  # forces growth
        for lo, hi in ((0, 17), (17, 18), (18, 33), (33, 40)):
            drafter(target.embed_raw(torch.tensor([[1, 2]])), torch.arange(hi, hi + 2)[None],
                          features[:, lo:hi], torch.arange(lo, hi)[None], cache)
            assert cache.length == hi  # only context is cached, never the 2 block tokens
        incremental = drafter(block, positions, None, None, cache)
    assert cache.length == 40
    assert torch.allclose(fresh, incremental, atol=1e-10)


def test_proposer_keeps_only_committed_context(targets):
    target = targets("llama")
    drafter = tiny_drafter(target, block_size=8)
    proposer = DFlashProposer(drafter, target)
    target.set_taps(drafter.target_layer_ids)
    prompt = torch.arange(10, 22)
    out = target.forward(prompt[None])
    proposer.reset(prompt, out.features)
    sampler = Sampler.create()
    proposal = proposer.propose(anchor=5, position=12, num_tokens=7, sampler=sampler)
    assert len(proposal) == 7 and proposal.probs is None
    assert proposer._cache.length == 12
    block = torch.tensor([5, 6, 7])
    proposer.commit(block, target.forward(block[None]).features)
    proposer.propose(anchor=9, position=15, num_tokens=3, sampler=sampler)
    assert proposer._cache.length == 15


def test_every_cache_grows_by_the_one_capacity_rule():
    assert [grown_capacity(n, 3) for n in (1, 3, 4, 13)] == [3, 3, 6, 24]
    context = ContextKVCache(1, 1, 1, 2, torch.float32, "cpu", capacity=3)
    context.reserve(13)
    batched = BufferedLayer(capacity=3)
    batched.update(torch.zeros(2, 1, 13, 2), torch.zeros(2, 1, 13, 2))
    assert context.capacity == batched.capacity == grown_capacity(13, 3) == 24
    static = StaticKV(SlotPool(lambda c: Slot(1, 1, 2, c, torch.float32, torch.device("cpu"))), 13, maximum=4096)
    static.reserve(300)
    assert static.capacity == grown_capacity(300, 256, 4096) == 512
