"""Static KV caches and fixed-shape steps (the CUDA-graph path, staticsteps.py) keep
decoding exact: greedy output equals Hugging Face generate for every family the lean
forward supports, block size, drafts-per-step policy, stop and length limit; the drafter's
fixed-shape step computes what its dynamic forward computes; caches that outgrow their
bucket move and stay exact; slots are reused, never shared by live sequences; a failed
graph capture falls back to eager steps; both step functions trace as one graph (what a
CUDA graph capture needs). On a CPU `graphs=True` runs the same steps on the same static
buffers without capturing ("static-replay"); the capture itself needs a GPU."""

import copy
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from specflash.runtime.config import DecodeConfig
from specflash.runtime.decode import SpeculativeDecoder
from specflash.errors import InputError
from specflash.runtime.proposers import DFlashProposer, OracleProposer
from specflash.hf.cache import grown_capacity
from specflash.hf.staticsteps import CapturedStep
from specflash.runtime.loading import dflash_proposer, setup_static_steps
from tiny import hf_greedy, policy_for, tiny_drafter, tiny_target

LEAN_FAMILIES = ("llama", "qwen2", "qwen3")
MAX_NEW = 37


def _prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, 250, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@contextmanager
def static_steps(target, graphs: bool):
    target.enable_static_steps(graphs=graphs)
    try:
        yield target.static_steps
    finally:
        target.disable_static_steps()


@pytest.mark.parametrize("family", LEAN_FAMILIES)
@pytest.mark.parametrize("graphs", (False, True), ids=("static-eager", "static-replay"))
@pytest.mark.parametrize("block_size", (2, 4, 16))
@pytest.mark.parametrize("policy", ("fixed", "auto", "random"))
def test_static_steps_dflash_greedy_matches_hf_generate(targets, family, graphs, block_size, policy):
    target = targets(family)
    prompt = _prompt(7 if block_size != 4 else 40, seed=block_size)
    reference = hf_greedy(target, prompt, MAX_NEW)
    with static_steps(target, graphs) as static:
        decoder = SpeculativeDecoder(target, dflash_proposer(tiny_drafter(target), target), block_size,
                                     policy_for(policy, block_size))
        result = decoder.generate(prompt, DecodeConfig(max_new_tokens=MAX_NEW, stop_token_ids=()))
        assert static.mode == ("static-replay" if graphs else "static-eager")
    assert result.token_ids == reference


@pytest.mark.parametrize("family", LEAN_FAMILIES)
@pytest.mark.parametrize("graphs", (False, True), ids=("static-eager", "static-replay"))
@pytest.mark.parametrize("max_new", (1, 5, 21))
def test_static_steps_full_acceptance_and_rollback_match_hf_generate(targets, family, graphs, max_new):
    target = targets(family)
    prompt = _prompt(11, seed=max_new)
    reference = hf_greedy(target, prompt, max_new)
    half_right = prompt + [t if i % 3 else (t + 1) % 250 for i, t in enumerate(reference)]  # rejected blocks too
    with static_steps(target, graphs):
        for oracle in (prompt + reference, half_right):
            decoder = SpeculativeDecoder(target, OracleProposer(oracle, target.vocab_rows), 16)
            result = decoder.generate(prompt, DecodeConfig(max_new_tokens=max_new, stop_token_ids=()))
            assert result.token_ids == reference


@pytest.mark.parametrize("graphs", (False, True), ids=("static-eager", "static-replay"))
def test_static_steps_stop_token_matches_hf_generate(targets, graphs):
    target = targets("qwen3")
    prompt = _prompt(9, seed=3)
    free = hf_greedy(target, prompt, MAX_NEW)
    stop = free[len(free) // 2]
    reference = hf_greedy(target, prompt, MAX_NEW, eos=[stop])
    with static_steps(target, graphs):
        decoder = SpeculativeDecoder(target, OracleProposer(prompt + free, target.vocab_rows), 8)
        result = decoder.generate(prompt, DecodeConfig(max_new_tokens=MAX_NEW, stop_token_ids=(stop,)))
    assert result.token_ids == reference and result.finish_reason == "stop"


def test_fixed_shape_drafter_step_computes_the_dynamic_drafters_hidden_states(targets):
    """The padded, fixed-shape drafter step (context rows padded to the block, static
    context, masked) gives the dynamic forward's hidden states at every step of a decode
    that accepts and rejects drafts (float64)."""
    target = targets("llama")
    drafter = tiny_drafter(target, block_size=8, layer_types=("sliding_attention", "full_attention"),
                           sliding_window=5)
    prompt = _prompt(30, seed=4)
    reference = hf_greedy(target, prompt, 40)
    oracle = prompt + [t if i % 4 else (t + 1) % 250 for i, t in enumerate(reference)]

    def record(proposer):
        seen = []
        greedy = proposer._head.greedy
        proposer._head.greedy = lambda hidden: (seen.append(hidden.clone()), greedy(hidden))[1]
        return seen

    class Guided(OracleProposer):  # oracle tokens, but the drafter runs every step
        def __init__(self, inner):
            super().__init__(oracle, target.vocab_rows)
            self.inner = inner

        @property
        def layer_ids(self):
            return self.inner.layer_ids

        def reset(self, prompt_ids, features):
            self.inner.reset(prompt_ids, features)

        def commit(self, tokens, features):
            self.inner.commit(tokens, features)

        def propose(self, anchor, position, num_tokens, sampler):
            self.inner.propose(anchor, position, num_tokens, sampler)
            return super().propose(anchor, position, num_tokens, sampler)

    runs = {}
    for graphs in (None, True):
        if graphs is None:
            proposer = DFlashProposer(drafter, target)
            seen = record(proposer)
            result = SpeculativeDecoder(target, Guided(proposer), 8).generate(
                prompt, DecodeConfig(max_new_tokens=40, stop_token_ids=()))
        else:
            with static_steps(target, graphs):
                proposer = dflash_proposer(drafter, target)
                seen = record(proposer)
                result = SpeculativeDecoder(target, Guided(proposer), 8).generate(
                    prompt, DecodeConfig(max_new_tokens=40, stop_token_ids=()))
                assert proposer._static is not None
        assert result.token_ids == reference
        runs[graphs] = seen
    assert len(runs[None]) == len(runs[True]) > 5
    for dynamic, fixed in zip(runs[None], runs[True]):
        torch.testing.assert_close(fixed, dynamic, rtol=0, atol=1e-10)


def test_caches_that_outgrow_their_bucket_move_and_stay_exact():
    target = tiny_target("qwen3", max_positions=1024)
    drafter = tiny_drafter(target, block_size=16)
    prompt = _prompt(200, seed=9)
    max_new = 330  # target hint 546 -> bucket 1024; drafter context 232 -> 256, then 512, then 1024
    reference = SpeculativeDecoder(target).generate(prompt, DecodeConfig(max_new_tokens=max_new,
                                                                         stop_token_ids=())).token_ids
    with static_steps(target, True) as static:
        proposer = dflash_proposer(drafter, target)
        oracle = OracleProposer(prompt + reference, target.vocab_rows)

        class Both(OracleProposer):
            layer_ids = proposer.layer_ids

            def reset(self, prompt_ids, features):
                proposer.reset(prompt_ids, features)

            def commit(self, tokens, features):
                proposer.commit(tokens, features)

            def propose(self, anchor, position, num_tokens, sampler):
                proposer.propose(anchor, position, num_tokens, sampler)
                return oracle.propose(anchor, position, num_tokens, sampler)

        steps = SpeculativeDecoder(target, Both(prompt, target.vocab_rows), 16).steps(
            prompt, DecodeConfig(max_new_tokens=max_new, stop_token_ids=()))
        tokens = []
        for step in steps:
            tokens += step.tokens
        context = proposer._cache
        assert context.slot.capacity == 1024 and context.length > 512
        assert proposer._static.pool.num_slots == 3  # 256, 512, 1024: the outgrown ones are free again
        assert not any(s.in_use for s in proposer._static.pool._slots[256])
        # the target's cache, grown by hand from the smallest bucket
        cache = target.new_cache(capacity=1)
        assert cache.capacity == 256
        target.forward(torch.tensor([prompt]), cache)
        for i in range(0, 120, 8):
            target.forward(torch.tensor([reference[i: i + 8]]), cache)
        assert cache.capacity == 512 and static.pool.num_slots >= 2
    assert tokens == reference


def test_slots_are_reused_by_later_requests_and_never_shared_by_live_ones(targets):
    target = targets("llama")
    config = DecodeConfig(max_new_tokens=20, stop_token_ids=())
    prompts = [_prompt(10, seed=1), _prompt(12, seed=2)]
    references = [hf_greedy(target, p, 20) for p in prompts]
    with static_steps(target, True) as static:
        decoder = SpeculativeDecoder(target, dflash_proposer(tiny_drafter(target), target), 4)
        for _ in range(2):
            assert decoder.generate(prompts[0], config).token_ids == references[0]
        assert static.pool.num_slots == 1
        # two live sequences, stepped in turn, each with a shallow copy of the proposer (as the server does)
        copies = [copy.copy(decoder.proposer) for _ in prompts]
        runs = [SpeculativeDecoder(target, proposer, 4).steps(p, config) for proposer, p in zip(copies, prompts)]
        outputs = [[], []]
        live = [True, True]
        while any(live):
            for i, run in enumerate(runs):
                if live[i]:
                    step = next(run, None)
                    if step is None:
                        live[i] = False
                    else:
                        outputs[i] += step.tokens
        assert outputs == references
        assert static.pool.num_slots == 2
        # the copies share the drafter's steps (one set of graphs); the base proposer's finished
        # sequence keeps its context slot until its next reset, each live copy holds its own
        assert all(c._static is decoder.proposer._static for c in copies)
        assert decoder.proposer._static.pool.num_slots == 3


def test_the_fixed_shape_drafter_step_runs_the_drafters_own_forward(targets, monkeypatch):
    """One forward per network: the static (CUDA-graph) drafter step calls
    `DFlashDrafter.forward` over a static context, padded steps and eager ones alike."""
    target = targets("qwen3")
    drafter = tiny_drafter(target, block_size=4)
    forward = type(drafter).forward
    caches = []

    def spy(self, *args, **kwargs):
        caches.append(type(args[4] if len(args) > 4 else kwargs.get("cache")).__name__)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(drafter), "forward", spy)
    prompt = _prompt(9, seed=8)
    with static_steps(target, True):
        SpeculativeDecoder(target, dflash_proposer(drafter, target), 4).generate(
            prompt, DecodeConfig(max_new_tokens=12, stop_token_ids=()))
    assert len(caches) > 2 and set(caches) == {"StaticContext"}


def test_sampling_through_static_steps_draws_the_dynamic_paths_tokens(targets):
    target = targets("qwen2")
    prompt = _prompt(9, seed=6)
    config = DecodeConfig(max_new_tokens=30, stop_token_ids=(), temperature=1.0, seed=7)
    drafter = tiny_drafter(target)
    dynamic = SpeculativeDecoder(target, DFlashProposer(drafter, target), 4).generate(prompt, config)
    with static_steps(target, True):
        fixed = SpeculativeDecoder(target, dflash_proposer(drafter, target), 4).generate(prompt, config)
    assert fixed.token_ids == dynamic.token_ids


def test_both_step_functions_trace_as_one_graph(targets):
    """No host sync, no data-dependent Python in a step: what CUDA graph capture needs
    (checked here by tracing each step whole, without graph breaks)."""
    from specflash.hf.staticsteps import StaticDraftSteps

    target = targets("qwen3")
    drafter = tiny_drafter(target, block_size=8)
    torch._dynamo.reset()
    with static_steps(target, True) as static, torch.inference_mode():
        target.set_taps(drafter.target_layer_ids)
        cache = target.new_cache(64)
        target.forward(torch.tensor([[1, 2, 3, 4, 5]]), cache)
        step = static._make_step(cache.slot, 4, target.taps)
        step.inputs[0].copy_(torch.tensor([[5, 6, 7, 8]]))
        step.inputs[1].copy_(torch.arange(5, 9))
        eager = [t.clone() for t in step.fn()]
        traced = torch.compile(step.fn, fullgraph=True, backend="eager")()
        for a, b in zip(traced, eager):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        draft = StaticDraftSteps(drafter, target)
        draft_step = draft._make_step(draft.new_context(64).slot)
        assert torch.compile(draft_step.fn, fullgraph=True, backend="eager")()[0].shape == (1, 8, target.hidden_size)
        target.set_taps(())
    torch._dynamo.reset()


def test_a_failed_graph_capture_falls_back_to_eager_steps(targets, monkeypatch):
    target = targets("llama")
    prompt = _prompt(8, seed=12)
    reference = hf_greedy(target, prompt, 20)

    def failing_capture(self):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    monkeypatch.setattr(CapturedStep, "_capture", failing_capture)
    with static_steps(target, True) as static:
        make = static._make_step

        def graphed(*args):  # as on CUDA: the step asks for a capture
            step = make(*args)
            step.graphs = True
            return step

        static._make_step = graphed
        result = SpeculativeDecoder(target, OracleProposer(prompt + reference, target.vocab_rows), 4).generate(
            prompt, DecodeConfig(max_new_tokens=20, stop_token_ids=()))
        assert result.token_ids == reference
        assert static.graph_error.startswith("RuntimeError: CUDA error") and static.mode == "static-eager"


def test_static_steps_need_the_lean_forward_and_say_so(targets, monkeypatch):
    gemma = targets("gemma3")
    with pytest.raises(InputError, match="static-steps off"):
        setup_static_steps(gemma, "on")
    said = []
    assert setup_static_steps(gemma, "auto", say=said.append) == "dynamic"  # CPU: auto is off
    assert setup_static_steps(targets("llama"), "off") == "dynamic"
    with pytest.raises(InputError, match="must be one of"):
        setup_static_steps(gemma, "sometimes")
    llama = targets("llama")
    llama._lean_forward()
    monkeypatch.setattr(llama, "config", SimpleNamespace(_attn_implementation="flash_attention_2"))
    with pytest.raises(InputError, match="sdpa or eager attention"):
        llama.enable_static_steps()
    assert llama.static_steps is None


def test_capacity_buckets_are_powers_of_two_within_the_context():
    assert grown_capacity(1, 256, 4096) == 256 and grown_capacity(257, 256, 4096) == 512
    assert grown_capacity(3000, 256, 3000) == 3000
    with pytest.raises(ValueError):
        grown_capacity(5000, 256, 4096)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_replays_decode_like_the_eager_steps():
    """On a GPU: steps really captured and replayed give the eager path's tokens (float32)."""
    target = tiny_target("llama", dtype=torch.float32)
    target.model.to("cuda")
    drafter = tiny_drafter(target).to("cuda")
    prompt = _prompt(12, seed=5)
    config = DecodeConfig(max_new_tokens=40, stop_token_ids=())
    reference = SpeculativeDecoder(target).generate(prompt, config).token_ids
    half_right = prompt + [t if i % 3 else (t + 1) % 250 for i, t in enumerate(reference)]
    with static_steps(target, True) as static:
        assert static.mode == "cuda-graphs"
        for proposer in (OracleProposer(half_right, target.vocab_rows), dflash_proposer(drafter, target)):
            for _ in range(2):  # the second run replays graphs captured by the first
                assert SpeculativeDecoder(target, proposer, 8).generate(prompt, config).token_ids == reference
        assert static.graph_error is None
        captured = [s for slot in static.pool._slots.values() for sl in slot for s in sl.steps.values()]
        assert captured and all(s.graph is not None for s in captured)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_tree_steps_decode_like_the_eager_steps():
    """On a GPU: draft-tree verify steps captured per node count and replayed give plain
    decoding's tokens (float32), and no capture failed."""
    from specflash.runtime.treepolicy import FixedTree

    target = tiny_target("llama", dtype=torch.float32)
    target.model.to("cuda")
    prompt = _prompt(12, seed=5)
    config = DecodeConfig(max_new_tokens=40, stop_token_ids=())
    reference = SpeculativeDecoder(target).generate(prompt, config).token_ids
    oracle = OracleProposer(prompt + reference, target.vocab_rows, truth_rank=2, block_size=8)
    with static_steps(target, True) as static:
        assert static.mode == "cuda-graphs"
        for _ in range(2):  # the second run replays graphs captured by the first
            result = SpeculativeDecoder(target, oracle, None, FixedTree(6, top_k=3)).generate(prompt, config)
            assert result.token_ids == reference
        assert static.graph_error is None and static.tree_graph_error is None
