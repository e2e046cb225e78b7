"""Batched steps: several sequences' rows in one target forward over per-sequence slot
caches (hf/batchstep.py, hf/slotcache.py, `TargetModel.forward_batch`) give every row the
logits and features of its solo forward; `BatchDecoder` (runtime/batchdecode.py) gives
every sequence the tokens of its solo `SpeculativeDecoder` run while sequences join,
leave, are cancelled, prefill in chunks and outgrow the cache."""

import pytest
import torch

from specflash.errors import InputError
from specflash.hf.batchstep import BatchRow
from specflash.hf.slotcache import NoFreeSlotError
from specflash.hf.target import TargetModel, tree_attention_inputs
from specflash.runtime.batchdecode import BatchDecoder
from specflash.runtime.blockpolicy import FixedBlock
from specflash.runtime.config import DecodeConfig
from specflash.runtime.decode import SpeculativeDecoder
from specflash.runtime.proposers import DFlashProposer
from specflash.runtime.proposers.base import Proposal
from specflash.runtime.treepolicy import FixedTree
from tiny import RandomDrafts, cached_tiny_target, tiny_drafter, tiny_hf_model

TAPS = (0, 2, 5)
EXACT = dict(rtol=0, atol=1e-9)  # float64 tiny models: only summation order differs...
EAGER = dict(rtol=1e-5, atol=1e-5)  # ...but eager attention takes its softmax in float32

# (family, forward, attention)
CASES = [("llama", "lean", "sdpa"), ("qwen2", "lean", "sdpa"), ("qwen3", "lean", "sdpa"),
         ("gemma3", "transformers", "sdpa"), ("llama", "transformers", "sdpa"), ("llama", "lean", "eager"),
         ("gemma3", "transformers", "eager")]
IDS = ["-".join(case) for case in CASES]

def make_target(family: str = "llama", forward: str = "lean", attention: str = "sdpa") -> TargetModel:
    return cached_tiny_target(family, forward, attention, TAPS)


def tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 250, (n,), generator=torch.Generator().manual_seed(seed))


def tolerance(target: TargetModel) -> dict:
    return EAGER if target.config._attn_implementation == "eager" else EXACT


def solo(target: TargetModel, *feeds: torch.Tensor) -> list:
    """The outputs of feeding `feeds` one after another to a fresh one-sequence cache."""
    cache = target.new_cache()
    return [target.forward(feed[None], cache) for feed in feeds]


def assert_same(out, reference, tol, keep=None):
    logits = reference.logits if keep is None else reference.logits[:, keep]
    torch.testing.assert_close(out.logits, logits, **tol)
    torch.testing.assert_close(out.features, reference.features, **tol)


# ------------------------------------------------------------------- forward


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_each_row_gets_the_logits_and_features_of_its_solo_forward(case):
    """Prompts of different lengths prefilled in one batch, then blocks of 1..8 tokens in
    one batch (padded rows, a context longer than Gemma3's sliding window of 8)."""
    target = make_target(*case)
    prompts = [tokens(n, seed) for seed, n in enumerate((20, 3, 11, 1))]
    blocks = [tokens(n, 10 + seed) for seed, n in enumerate((1, 5, 8, 3))]
    cache = target.new_slot_cache(max_slots=4, capacity=64)
    slots = [cache.acquire() for _ in prompts]
    prefill = target.forward_batch(cache, [BatchRow(s, p) for s, p in zip(slots, prompts)])
    assert [cache.length(s) for s in slots] == [20, 3, 11, 1]
    step = target.forward_batch(cache, [BatchRow(s, b) for s, b in zip(slots, blocks)])
    assert [cache.length(s) for s in slots] == [21, 8, 19, 4]
    tol = tolerance(target)
    for prompt, block, first, second in zip(prompts, blocks, prefill, step):
        reference = solo(target, prompt, block)
        assert first.logits.shape == (1, prompt.numel(), target.output_rows)
        assert second.features.shape == (1, block.numel(), len(TAPS) * target.hidden_size)
        assert_same(first, reference[0], tol)
        assert_same(second, reference[1], tol)


def test_logits_last_and_none_keep_only_those_positions():
    target = make_target()
    prompts = [tokens(9, 1), tokens(4, 2), tokens(6, 3)]
    cache = target.new_slot_cache(max_slots=3)
    slots = [cache.acquire() for _ in prompts]
    outs = target.forward_batch(cache, [BatchRow(slots[0], prompts[0], "last"), BatchRow(slots[1], prompts[1], "none"),
                                        BatchRow(slots[2], prompts[2], "all")])
    assert [tuple(o.logits.shape[:2]) for o in outs] == [(1, 1), (1, 0), (1, 6)]
    for prompt, out, keep in zip(prompts, outs, (slice(-1, None), slice(0, 0), slice(None))):
        assert_same(out, solo(target, prompt)[0], EXACT, keep)


def test_a_prompt_fed_in_chunks_equals_the_prompt_in_one_row():
    target = make_target("gemma3", "transformers")
    prompt = tokens(23, 4)
    cache = target.new_slot_cache(max_slots=2)
    slot = cache.acquire()
    features = [target.forward_batch(cache, [BatchRow(slot, chunk, "last")])[0]
                for chunk in (prompt[:5], prompt[5:16], prompt[16:])]
    reference = solo(target, prompt)[0]
    torch.testing.assert_close(features[-1].logits, reference.logits[:, -1:], **EXACT)
    torch.testing.assert_close(torch.cat([f.features for f in features], dim=1), reference.features, **EXACT)


@pytest.mark.parametrize("case", [("llama", "lean", "sdpa"), ("gemma3", "transformers", "sdpa")],
                         ids=["llama-lean", "gemma3-transformers"])
def test_rollback_is_a_length_move_and_rejected_keys_stay_invisible(case):
    """Blocks whose drafts are partly rejected (crop), then the next blocks over the stale
    columns: each row still sees exactly its committed context."""
    target = make_target(*case)
    prompts, blocks, nexts = [tokens(n, s) for s, n in ((1, 14), (2, 6))], [tokens(7, 3), tokens(4, 4)], \
        [tokens(3, 5), tokens(1, 6)]
    kept = [2, 1]  # anchor + 1 accepted draft; anchor only
    cache = target.new_slot_cache(max_slots=2)
    slots = [cache.acquire() for _ in prompts]
    target.forward_batch(cache, [BatchRow(s, p) for s, p in zip(slots, prompts)])
    target.forward_batch(cache, [BatchRow(s, b) for s, b in zip(slots, blocks)])
    for slot, prompt, a in zip(slots, prompts, kept):
        cache.crop(slot, prompt.numel() + a)
    outs = target.forward_batch(cache, [BatchRow(s, n) for s, n in zip(slots, nexts)])
    for prompt, block, a, nxt, out in zip(prompts, blocks, kept, nexts, outs):
        assert_same(out, solo(target, torch.cat([prompt, block[:a]]), nxt)[1], EXACT)


def test_rows_over_slots_in_any_order_and_with_gaps_match():
    """The gather path (slots not consecutive in row order) equals the view path."""
    target = make_target()
    cache = target.new_slot_cache(max_slots=5)
    slots = [cache.acquire() for _ in range(5)]
    cache.release(slots[1])
    cache.release(slots[3])
    order = [4, 0, 2]
    prompts = {s: tokens(5 + 3 * s, s) for s in order}
    blocks = {s: tokens(1 + s, 20 + s) for s in order}
    target.forward_batch(cache, [BatchRow(s, prompts[s]) for s in order])
    outs = target.forward_batch(cache, [BatchRow(s, blocks[s]) for s in order])
    for slot, out in zip(order, outs):
        assert_same(out, solo(target, prompts[slot], blocks[slot])[1], EXACT)


def test_a_reused_slot_sees_nothing_of_its_previous_sequence():
    target = make_target()
    cache = target.new_slot_cache(max_slots=2)
    old, other = cache.acquire(), cache.acquire()
    target.forward_batch(cache, [BatchRow(old, tokens(30, 1)), BatchRow(other, tokens(4, 2))])
    cache.release(old)
    new = cache.acquire()
    assert new == old and cache.length(new) == 0
    prompt, block = tokens(5, 3), tokens(3, 4)
    target.forward_batch(cache, [BatchRow(new, prompt), BatchRow(other, tokens(2, 5))])
    out = target.forward_batch(cache, [BatchRow(new, block)])[0]
    assert_same(out, solo(target, prompt, block)[1], EXACT)


def test_slot_capacity_growth_keeps_every_slots_keys():
    target = make_target("gemma3", "transformers")
    cache = target.new_slot_cache(max_slots=3, capacity=8)
    assert cache.capacity == 8
    slots = [cache.acquire() for _ in range(3)]
    prompts = [tokens(6, 1), tokens(3, 2), tokens(7, 3)]
    target.forward_batch(cache, [BatchRow(s, p) for s, p in zip(slots, prompts)])
    blocks = [tokens(40, 4), tokens(2, 5), tokens(1, 6)]  # 46 positions: 8 -> 64, one copy
    target.forward_batch(cache, [BatchRow(s, b) for s, b in zip(slots, blocks)])
    assert (cache.capacity, cache.grows) == (64, 1)
    nexts = [tokens(2, 7), tokens(3, 8), tokens(1, 9)]
    outs = target.forward_batch(cache, [BatchRow(s, n) for s, n in zip(slots, nexts)])
    for prompt, block, nxt, out in zip(prompts, blocks, nexts, outs):
        assert_same(out, solo(target, prompt, block, nxt)[2], EXACT)


@pytest.mark.parametrize("case", [("llama", "lean", "sdpa"), ("gemma3", "transformers", "sdpa")],
                         ids=["llama-lean", "gemma3-transformers"])
def test_a_tree_row_gives_each_node_its_forward_tree_output_and_keep_path_its_cache(case):
    """A draft tree next to linear rows: node outputs equal `forward_tree`'s on a solo
    cache; after `keep_path` the next step equals the solo step after `keep_cache_path`."""
    target = make_target(*case)
    parents = [-1, 0, 0, 1, 1, 2, 5, 6, 7, 8, 9]  # deeper than Gemma3's window of 8
    depths, ancestors = tree_attention_inputs(parents)
    prompt, nodes, other, after = tokens(20, 1), tokens(len(parents), 2), tokens(9, 3), tokens(2, 4)
    path = [0, 2, 5, 6, 7]
    cache = target.new_slot_cache(max_slots=2)
    tree_slot, other_slot = cache.acquire(), cache.acquire()
    target.forward_batch(cache, [BatchRow(tree_slot, prompt), BatchRow(other_slot, other)])
    out = target.forward_batch(cache, [BatchRow(other_slot, tokens(2, 5)),
                                       BatchRow(tree_slot, nodes, tree=(depths, ancestors))])[1]
    reference_cache = target.new_cache()
    target.forward(prompt[None], reference_cache)
    reference = target.forward_tree(nodes[None], reference_cache, depths, ancestors)
    assert_same(out, reference, EXACT)
    cache.keep_path(tree_slot, prompt.numel(), path)
    target.keep_cache_path(reference_cache, prompt.numel(), path)
    assert cache.length(tree_slot) == target.cache_length(reference_cache) == prompt.numel() + len(path)
    step = target.forward_batch(cache, [BatchRow(tree_slot, after)])[0]
    assert_same(step, target.forward(after[None], reference_cache), EXACT)


def test_bad_rows_and_attention_without_dense_masks_are_refused(monkeypatch):
    target = make_target()
    cache = target.new_slot_cache(max_slots=2)
    slot = cache.acquire()
    with pytest.raises(ValueError, match="at most one row"):
        target.forward_batch(cache, [BatchRow(slot, tokens(2, 0)), BatchRow(slot, tokens(1, 1))])
    with pytest.raises(ValueError, match="not in use"):
        target.forward_batch(cache, [BatchRow(1, tokens(2, 0))])
    with pytest.raises(ValueError, match="depths"):
        target.forward_batch(cache, [BatchRow(slot, tokens(3, 0), tree=tree_attention_inputs([-1, 0]))])
    cache.acquire()
    with pytest.raises(NoFreeSlotError):
        cache.acquire()
    monkeypatch.setattr(target._lean, "attention_implementation", "flash_attention_2")
    with pytest.raises(InputError, match="sdpa or eager"):
        target.forward_batch(cache, [BatchRow(slot, tokens(2, 0))])
    assert cache.length(slot) == 0  # nothing committed by a refused step


# -------------------------------------------------------------------- decoder


class TableOracle:
    """A proposer that knows every prompt's greedy continuation and gets every fourth draft
    position wrong: long accepted runs and rejections mid-block, the same drafts in a solo
    and a batched run (it depends only on the prompt and the position)."""

    name = "table-oracle"
    block_size = 8

    def __init__(self, table: dict, vocab: int):
        self.table, self.vocab, self.reference = table, vocab, None

    @property
    def layer_ids(self):
        return ()

    def reset(self, prompt_ids, features):
        self.reference = self.table[tuple(prompt_ids.tolist())]

    def commit(self, tokens, features):
        pass

    def propose(self, anchor, position, num_tokens, sampler):
        truth = self.reference[position + 1: position + 1 + num_tokens]
        wrong = [(t + 1) % self.vocab if (position + i) % 4 == 3 else t for i, t in enumerate(truth)]
        return Proposal(torch.tensor(wrong, dtype=torch.long))


def prompt_list(lengths, seed=0) -> list[list[int]]:
    return [tokens(n, seed + i).tolist() for i, n in enumerate(lengths)]


def make_proposer(kind: str, target: TargetModel, prompts, max_new: int):
    if kind == "none":
        return None
    if kind == "dflash":
        return DFlashProposer(tiny_drafter(target, block_size=8), target)
    plain = SpeculativeDecoder(target)
    table = {tuple(p): p + plain.generate(p, DecodeConfig(max_new_tokens=max_new, stop_token_ids=())).token_ids
             for p in prompts}
    return TableOracle(table, target.vocab_rows)


def solo_result(target, proposer, prompt, config, policy=None):
    return SpeculativeDecoder(target, proposer, 8, policy).generate(prompt, config)


def run_schedule(decoder: BatchDecoder, jobs, on_step=None) -> list:
    """jobs: (first step it may join at, prompt, config[, policy]); each joins when a slot is
    free. -> the sequences, in job order."""
    sequences: list = [None] * len(jobs)
    step = 0
    while any(s is None or not s.done for s in sequences):
        for i, job in enumerate(jobs):
            if sequences[i] is None and job[0] <= step and decoder.num_free:
                sequences[i] = decoder.add(job[1], job[2], *job[3:])
        if on_step is not None:
            on_step(step, sequences)
        decoder.step()
        step += 1
        assert step < 500
    return sequences


# Sequences join at different steps (max_slots 3 < 5 jobs: some wait for a slot), with
# different block sizes, prompt lengths and lengths, so some leave while others run.
LENGTHS = (3, 25, 11, 40, 7)
MAX_NEW = (20, 33, 5, 17, 26)
BLOCKS = (8, 1, 4, 2, None)
JOINS = (0, 0, 2, 3, 9)
DECODER_CASES = [("llama", "dflash"), ("llama", "none"), ("llama", "oracle"), ("qwen3", "dflash"),
                 ("gemma3", "dflash"), ("gemma3", "oracle")]


@pytest.mark.parametrize("family,kind", DECODER_CASES, ids=["-".join(c) for c in DECODER_CASES])
def test_greedy_tokens_equal_solo_runs_as_sequences_join_and_leave(family, kind):
    target = make_target(family, "transformers" if family == "gemma3" else "lean")
    prompts = prompt_list(LENGTHS)
    proposer = make_proposer(kind, target, prompts, max(MAX_NEW))
    configs = [DecodeConfig(max_new_tokens=m, block_size=b, stop_token_ids=()) for m, b in zip(MAX_NEW, BLOCKS)]
    decoder = BatchDecoder(target, proposer, 8, max_slots=3, prefill_chunk=16)
    sequences = run_schedule(decoder, list(zip(JOINS, prompts, configs)))
    for prompt, config, sequence in zip(prompts, configs, sequences):
        reference = solo_result(target, proposer, prompt, config)
        assert sequence.tokens == reference.token_ids
        assert sequence.finish_reason == reference.finish_reason == "length"
        assert sequence.stats.acceptance_lengths == reference.stats.acceptance_lengths
    assert max(decoder.rows_per_step) == 3 and decoder.cache.num_free == 3
    if kind == "oracle":
        assert max(max(s.stats.acceptance_lengths) for s in sequences) >= 4  # long blocks were accepted


def test_stop_tokens_and_per_sequence_policies_end_each_sequence_as_alone():
    target = make_target()
    prompts = prompt_list((9, 5, 14), seed=7)
    proposer = make_proposer("oracle", target, prompts, 30)
    stops = []
    for prompt in prompts:  # a token each sequence really produces, about halfway
        free = solo_result(target, None, prompt, DecodeConfig(max_new_tokens=30, stop_token_ids=())).token_ids
        stops.append(free[len(free) // 2])
    configs = [DecodeConfig(max_new_tokens=30, stop_token_ids=(stop,)) for stop in stops]
    policies = [RandomDrafts(seed=1), FixedBlock(), RandomDrafts(seed=2)]
    decoder = BatchDecoder(target, proposer, 8, max_slots=3)
    sequences = run_schedule(decoder, [(0, p, c, pol) for p, c, pol in zip(prompts, configs, policies)])
    for prompt, config, seed, sequence in zip(prompts, configs, (1, None, 2), sequences):
        policy = RandomDrafts(seed=seed) if seed is not None else None
        reference = solo_result(target, proposer, prompt, config, policy)
        assert sequence.tokens == reference.token_ids and sequence.finish_reason == "stop"
        assert sequence.stats.acceptance_lengths == reference.stats.acceptance_lengths


def test_a_cancelled_sequence_frees_its_slot_and_the_others_continue_identically():
    target = make_target()
    prompts = prompt_list((12, 6, 20, 8), seed=3)
    proposer = make_proposer("dflash", target, prompts, 24)
    config = DecodeConfig(max_new_tokens=24, stop_token_ids=())
    decoder = BatchDecoder(target, proposer, 8, max_slots=3)
    first = [decoder.add(p, config) for p in prompts[:3]]
    for _ in range(4):
        decoder.step()
    victim = first[1]
    slot = victim.slot
    decoder.cancel(victim)
    assert victim.finish_reason == "abort" and victim.slot is None
    assert decoder.num_free == 1 and not decoder.cache.in_use(slot)
    late = decoder.add(prompts[3], config)  # takes the freed slot over its stale keys
    assert late.slot == slot
    while decoder.running:
        decoder.step()
    for prompt, sequence in zip(prompts[:1] + prompts[2:], [first[0], first[2], late]):
        assert sequence.tokens == solo_result(target, proposer, prompt, config).token_ids
    assert 0 < len(victim.tokens) < 24
    assert victim.tokens == solo_result(target, proposer, prompts[1], config).token_ids[: len(victim.tokens)]


@pytest.mark.parametrize("split", [True, False], ids=["chunks-apart", "one-forward"])
def test_prefill_chunks_interleave_with_decode_rows_and_give_the_same_tokens(monkeypatch, split):
    """A step's prompt chunks run in a forward of their own when they are longer than its
    decode rows (`split_prefill`, the default: decode rows are not padded to a chunk), or
    in the same forward."""
    target = make_target("gemma3", "transformers")
    prompts = prompt_list((6, 45, 30), seed=5)
    proposer = make_proposer("dflash", target, prompts, 16)
    config = DecodeConfig(max_new_tokens=16, block_size=4, stop_token_ids=())  # decode rows of 4 < chunks of 8
    decoder = BatchDecoder(target, proposer, 8, max_slots=3, prefill_chunk=8, split_prefill=split,
                           row_invariant=False)  # (row invariance runs every chunk alone)
    forwards: list[list[tuple[int, str]]] = []
    steps: list[list[tuple[int, str]]] = []  # the rows of each step, whatever forwards ran them
    forward_batch = target.forward_batch

    def recording(cache, rows, row_invariant=False):
        forwards.append([(row.num_tokens, row.logits) for row in rows])
        return forward_batch(cache, rows, row_invariant)

    def on_step(step, sequences):
        steps.append([row for forward in forwards for row in forward])
        forwards.clear()

    monkeypatch.setattr(target, "forward_batch", recording)
    sequences = run_schedule(decoder, [(0, prompts[0], config), (2, prompts[1], config), (3, prompts[2], config)],
                             on_step=on_step)
    on_step(None, None)
    steps = steps[1:]
    for prompt, sequence in zip(prompts, sequences):
        assert sequence.tokens == solo_result(target, proposer, prompt, config).token_ids
    chunks = [n for step in steps for n, logits in step if logits == "none"]
    assert chunks and max(chunks) == 8  # the long prompts went in chunks of 8...
    mixed = [step for step in steps if any(logits == "none" for _, logits in step)
             and any(logits == "all" for _, logits in step)]
    assert len(mixed) >= 5  # ...in the same steps as other sequences' decode rows
    assert max(n for step in steps for n, _ in step) <= 8
    with_chunks = [step for step in steps if any(logits != "all" for _, logits in step)
                   and any(logits == "all" for _, logits in step)]  # the last chunk has logits "last"
    apart = [step for step in with_chunks if max(n for n, logits in step if logits != "all")
             > max(n for n, logits in step if logits == "all")]
    assert decoder.num_forwards == decoder.num_steps + (len(apart) if split else 0)
    assert not split or len(apart) >= 1
    assert len(decoder.rows_per_step) == decoder.num_forwards


def test_slot_capacity_growth_mid_run_keeps_the_tokens():
    """A sequence that joins mid-run with a longer generation grows the shared storage once,
    at its admission (room for its prompt, its tokens and a block), under the running ones."""
    target = make_target()
    prompts = prompt_list((10, 4, 13), seed=9)
    proposer = make_proposer("oracle", target, prompts, 100)
    short = DecodeConfig(max_new_tokens=20, stop_token_ids=())
    long = DecodeConfig(max_new_tokens=100, stop_token_ids=())
    decoder = BatchDecoder(target, proposer, 8, max_slots=3, capacity=16, row_invariant=False)
    sequences = run_schedule(decoder, [(0, prompts[0], short), (0, prompts[1], short), (3, prompts[2], long)])
    assert decoder.cache.capacity == 128 and decoder.cache.grows == 2  # 10 + 20 + 8 -> 64 at the start, 121 -> 128
    for prompt, sequence, config in zip(prompts, sequences, (short, short, long)):
        assert sequence.tokens == solo_result(target, proposer, prompt, config).token_ids


@pytest.mark.parametrize("kind", ["dflash", "none"])
def test_sampled_sequences_with_a_seed_get_their_solo_tokens(kind):
    """Each sequence's sampler draws in the solo loop's order (prefill choice, drafts,
    uniforms, recovered/bonus token), so a seed reproduces the solo run."""
    target = make_target()
    prompts = prompt_list((7, 15, 3), seed=11)
    proposer = make_proposer(kind, target, prompts, 20)
    configs = [DecodeConfig(max_new_tokens=20, temperature=t, top_p=p, seed=s, stop_token_ids=())
               for t, p, s in ((0.8, 0.9, 1), (1.0, 1.0, 2), (0.6, 1.0, 3))]
    decoder = BatchDecoder(target, proposer, 8, max_slots=3, prefill_chunk=5)
    sequences = run_schedule(decoder, [(j, p, c) for j, p, c in zip((0, 1, 4), prompts, configs)])
    for prompt, config, sequence in zip(prompts, configs, sequences):
        reference = solo_result(target, proposer, prompt, config)
        assert sequence.tokens == reference.token_ids
        assert sequence.stats.acceptance_lengths == reference.stats.acceptance_lengths
    assert len({tuple(s.tokens) for s in sequences}) == 3


def test_a_batch_policy_sees_every_drafting_sequence_of_a_step():
    class Budget:
        """Drafts for at most two sequences per step, two drafts each."""

        def __init__(self):
            self.requests, self.observed = [], 0

        def choose(self, requests):
            self.requests.append(len(requests))
            return [min(2, r.max_drafts) if i < 2 else 0 for i, r in enumerate(requests)]

        def observe(self, sequence, num_drafted, num_accepted):
            self.observed += 1

    target = make_target()
    prompts = prompt_list((5, 9, 12), seed=13)
    proposer = make_proposer("oracle", target, prompts, 15)
    config = DecodeConfig(max_new_tokens=15, stop_token_ids=())
    policy = Budget()
    decoder = BatchDecoder(target, proposer, 8, batch_policy=policy, max_slots=3)
    sequences = run_schedule(decoder, [(0, p, config) for p in prompts])
    assert max(policy.requests) == 3 and policy.observed == sum(s.stats.num_steps for s in sequences)
    for prompt, sequence in zip(prompts, sequences):
        assert sequence.tokens == solo_result(target, proposer, prompt, config).token_ids
        assert max(sequence.stats.drafted_per_step) <= 2


def test_generate_all_admits_prompts_as_slots_free():
    target = make_target()
    prompts = prompt_list((4, 8, 6, 10, 5), seed=17)
    config = DecodeConfig(max_new_tokens=6, stop_token_ids=())
    results = BatchDecoder(target, None, max_slots=2).generate_all(prompts, config)
    assert [r.token_ids for r in results] == [solo_result(target, None, p, config).token_ids for p in prompts]


def test_the_decoder_refuses_what_it_cannot_run():
    target = make_target()
    decoder = BatchDecoder(target, None, max_slots=1)
    with pytest.raises(InputError, match="empty"):
        decoder.add([])
    decoder.add([1, 2, 3])
    with pytest.raises(NoFreeSlotError):
        decoder.add([4])
    with pytest.raises(InputError, match="draft trees"):
        BatchDecoder(target, None, policy=FixedTree(4))


# ------------------------------------------------------------- row invariance


def test_row_invariant_rows_get_the_same_bits_alone_and_in_any_batch():
    """float32 (where BLAS blockings change rounding): with row invariance on, a row's
    logits and features are bit-identical alone, next to other rows, padded to a wider
    row, and with its slot anywhere in the cache (each prompt prefilled in a forward of
    its own, as BatchDecoder does)."""
    target = TargetModel(tiny_hf_model("llama", dtype=torch.float32), name="tiny-llama-fp32")
    target.set_taps(TAPS)
    assert target.enable_row_invariance() and target.row_invariant
    contexts = [tokens(n, seed) for n, seed in ((7, 1), (19, 2), (4, 3), (30, 4))]
    blocks = [tokens(n, 10 + i) for i, n in enumerate((1, 5, 3, 8))]

    def run(order, slots_first=0):
        cache = target.new_slot_cache(max_slots=8, capacity=64)
        slots = [cache.acquire() for _ in range(slots_first + len(contexts))][slots_first:]
        for i in order:  # each prompt alone (as BatchDecoder runs them under row invariance)
            target.forward_batch(cache, [BatchRow(slots[i], contexts[i], "none")], True)
        outs = target.forward_batch(cache, [BatchRow(slots[i], blocks[i]) for i in order], True)
        return {i: out for i, out in zip(order, outs)}

    alone = {i: run([i])[i] for i in range(4)}
    for order, first in (([0, 1, 2, 3], 0), ([3, 1], 2), ([2, 0, 3], 1)):
        together = run(order, first)
        for i in order:
            assert torch.equal(together[i].logits, alone[i].logits)
            assert torch.equal(together[i].features, alone[i].features)
    # Without it the same batch differs in the last bits (not asserted: it depends on the BLAS).


def test_row_invariant_positions_get_the_same_bits_at_any_row_width():
    """A block of 6 tokens in one row, or fed 1, 2 and 3 at a time (next to another row):
    every position's logits and features are bit-identical, so drafting more or less
    cannot change a greedy token."""
    target = TargetModel(tiny_hf_model("llama", dtype=torch.float32), name="tiny-llama-fp32")
    target.set_taps(TAPS)
    assert target.enable_row_invariance()
    context, block, other = tokens(300, 5), tokens(6, 6), tokens(40, 7)  # 300 + 6 crosses no key block...

    def feed(sizes, start=300):
        context_here = tokens(start, 5)
        cache = target.new_slot_cache(max_slots=2, capacity=16)
        a, b = cache.acquire(), cache.acquire()
        target.forward_batch(cache, [BatchRow(a, context_here, "none")], True)
        target.forward_batch(cache, [BatchRow(b, other, "none")], True)
        outs, at = [], 0
        for n in sizes:
            out = target.forward_batch(cache, [BatchRow(b, tokens(n, 100 + at)), BatchRow(a, block[at: at + n])],
                                       row_invariant=True)
            outs.append(out[1])
            at += n
        return torch.cat([o.logits for o in outs], dim=1), torch.cat([o.features for o in outs], dim=1)

    for start in (300, 253):  # ...and 253 + 6 does (keys in blocks of KEY_BLOCK = 64)
        whole = feed([6], start)
        for sizes in ([1] * 6, [2, 3, 1], [3, 3]):
            logits, features = feed(sizes, start)
            assert torch.equal(logits, whole[0]) and torch.equal(features, whole[1])
    assert context.numel() == 300


def test_a_target_without_the_lean_forward_is_not_row_invariant():
    target = make_target("gemma3", "transformers")
    assert not target.enable_row_invariance()
    assert not BatchDecoder(target, None, max_slots=2).row_invariant


def test_a_lone_decode_row_runs_the_one_sequence_kernels_and_a_batch_the_invariant_ones(monkeypatch):
    """`solo_when_alone` (the default): a step whose only decode row is one sequence's runs it
    without row invariance (the one-sequence kernels, as fast as the solo loop); two decode
    rows run row-invariant; prompt chunks alone as before. Tokens equal the solo loop's."""
    target = TargetModel(tiny_hf_model("llama", dtype=torch.float32), name="tiny-llama-fp32")
    assert target.enable_row_invariance()
    seen: list[tuple[int, str, bool]] = []
    forward_batch = target.forward_batch

    def recording(cache, rows, row_invariant=False):
        seen.append((len(rows), rows[0].logits, row_invariant))
        return forward_batch(cache, rows, row_invariant)

    monkeypatch.setattr(target, "forward_batch", recording)
    config = DecodeConfig(max_new_tokens=6, stop_token_ids=())
    prompts = [tokens(9, 1).tolist(), tokens(12, 2).tolist()]
    alone = BatchDecoder(target, None, max_slots=2)
    assert alone.solo_when_alone and alone.row_invariant
    lone = alone.generate_all(prompts[:1], config)[0]
    decode = [s for s in seen if s[1] == "all"]
    assert decode and all(rows == 1 and not invariant for rows, _, invariant in decode)
    seen.clear()
    both = BatchDecoder(target, None, max_slots=2).generate_all(prompts, config)
    assert any(rows == 2 and invariant for rows, logits, invariant in seen if logits == "all")
    seen.clear()
    BatchDecoder(target, None, max_slots=2, solo_when_alone=False).generate_all(prompts[:1], config)
    assert all(invariant for _, logits, invariant in seen if logits == "all")
    for prompt, result in zip(prompts, both):
        solo = SpeculativeDecoder(target, None).generate(prompt, config).token_ids
        assert result.token_ids == solo
    assert lone.token_ids == both[0].token_ids


# ------------------------------------------------------------ batched drafting


def test_one_drafter_forward_gives_every_sequence_its_solo_proposal():
    """`propose_batch`: sequences with different context lengths and draft counts get, from
    one drafter forward, the drafts (and sampled probabilities) each gets alone (float64:
    only the summation order can differ)."""
    from specflash.runtime.proposers.dflash import propose_batch
    from specflash.runtime.sampling import Sampler

    target = make_target()
    drafter = tiny_drafter(target, block_size=8)
    lengths, anchors, ks = (5, 17, 9), (3, 44, 120), (1, 7, 4)
    features = [torch.randn(1, n, target.hidden_size * 3, generator=torch.Generator().manual_seed(n),
                            dtype=target.dtype) for n in lengths]

    def fresh(i):
        proposer = DFlashProposer(drafter, target)
        proposer.reset(torch.zeros(lengths[i], dtype=torch.long), features[i])
        return proposer

    for temperature in (0.0, 0.8):
        solo, batch = [], []
        for i in range(3):
            sampler = Sampler.create(temperature, 0, 1.0, 7 + i)
            solo.append(fresh(i).propose(anchors[i], lengths[i], ks[i], sampler))
        proposers = [fresh(i) for i in range(3)]
        assert all(p.batchable for p in proposers)
        batch = propose_batch(proposers, list(anchors), list(lengths), list(ks),
                              [Sampler.create(temperature, 0, 1.0, 7 + i) for i in range(3)])
        for a, b, k in zip(solo, batch, ks):
            assert a.tokens.shape == (k,) and torch.equal(a.tokens, b.tokens)
            if temperature:
                torch.testing.assert_close(a.probs, b.probs, **EXACT)
        assert all(p._cache.length == n for p, n in zip(proposers, lengths))  # contexts were extended


def test_the_decoder_drafts_with_one_drafter_forward_per_step_and_keeps_the_solo_tokens(monkeypatch):
    import specflash.runtime.batchdecode as batchdecode

    target = make_target()
    prompts = prompt_list((6, 21, 13), seed=9)
    proposer = make_proposer("dflash", target, prompts, 12)
    calls = []
    real = batchdecode.propose_batch
    monkeypatch.setattr(batchdecode, "propose_batch", lambda ps, *a: (calls.append(len(ps)), real(ps, *a))[1])
    config = DecodeConfig(max_new_tokens=12, block_size=4, stop_token_ids=())
    decoder = BatchDecoder(target, proposer, 8, max_slots=3)
    results = decoder.generate_all(prompts, config)
    assert calls and max(calls) == 3 and decoder.num_batched_drafts == len(calls)
    for prompt, result in zip(prompts, results):
        assert result.token_ids == solo_result(target, proposer, prompt, config).token_ids
