"""How methods turn what a runtime reports into SpecStats: the z-lab runtime's acceptance
lengths into per-position counts, Hugging Face streamer chunks into TTFT / TPOT / tau."""

import pytest
import torch

from specflash.bench.methods import HFMethod, ZlabMethod, _Arrivals
from specflash.bench.runner import _compare_drafts
from specflash.runtime.config import DecodeConfig


class FakeRuntime:
    def __init__(self, answer):
        self.answer = answer
        self.requests = []

    def generate(self, request):
        self.requests.append(request)
        return self.answer


def test_zlab_acceptance_lengths_become_steps_with_the_drafts_the_runtime_made():
    method = object.__new__(ZlabMethod)
    method.block_size, method.stop_token_ids = 4, [2]
    # 1 prefill token + steps of 2, 4, 1, 3 tokens = 11; max 11 new tokens
    method.runtime = FakeRuntime({"token_ids": list(range(11)), "time_to_first_token_s": 0.3,
                                  "decode_time_s": 2.0, "acceptance_lengths": [2, 4, 1, 3], "drafts": None})
    run = method.run([5, 6, 7], DecodeConfig(max_new_tokens=11))
    stats = run.stats
    assert stats.acceptance_lengths == [2, 4, 1, 3]
    # drafted per step: min(3, 11 - produced) with produced 1, 3, 7, 8 -> 3, 3, 3, 3;
    # accepted 1, 3, 0, 2 -> position 1 in three steps, position 2 in two, position 3 in one
    assert stats.drafted_per_position == [4, 4, 4]
    assert stats.accepted_per_position == [3, 2, 1]
    assert stats.tpot_s == pytest.approx(2.0 / 10)
    assert method.runtime.requests[0]["stop_token_ids"] == [2]


def test_streamer_chunks_give_ttft_tpot_and_acceptance_lengths(monkeypatch):
    clock = iter([1.0, 1.5, 1.7, 2.1])
    monkeypatch.setattr("specflash.bench.methods.time.perf_counter", lambda: next(clock))
    arrivals = _Arrivals()
    arrivals.put(torch.tensor([[1, 2, 3]]))  # the prompt, ignored
    for chunk in ([7, 8], [9], [10, 11, 12]):
        arrivals.put(torch.tensor([chunk]))
    assert arrivals.chunks == [(1.0, 2), (1.5, 1), (1.7, 3)]


def test_hf_method_builds_stats_from_the_streamer(targets):
    target = targets("llama")
    ids = [3, 17, 42, 9, 3, 17]
    config = DecodeConfig(max_new_tokens=8, stop_token_ids=(0,))  # prompt lookup needs a stop token
    plain = HFMethod("hf", target).run(ids, config)
    lookup = HFMethod("hf-ngram", target, lookup_tokens=3).run(ids, config)
    assert plain.token_ids == lookup.token_ids and 1 < len(plain.token_ids) <= 8
    assert plain.stats.acceptance_lengths == [] and plain.stats.first_step_tokens == 1
    assert sum(lookup.stats.acceptance_lengths) == len(lookup.token_ids)
    assert lookup.stats.first_step_tokens == lookup.stats.acceptance_lengths[0]
    assert plain.stats.tpot_s > 0 and plain.stats.time_to_first_token_s > 0


def test_draft_comparison_counts_equal_blocks_on_their_common_prefix():
    ours = [[1, 2, 3], [4, 5], [6]]
    theirs = [[1, 2, 3], [4, 9], [6, 7], [8]]
    assert _compare_drafts(ours, theirs) == {"blocks_specflash": 3, "blocks_zlab": 4, "blocks_compared": 3,
                                             "blocks_equal": 2}


def test_tokens_past_max_new_tokens_are_dropped_and_counted():
    from types import SimpleNamespace

    def generate(ids, streamer, max_new_tokens, **kwargs):  # overshoots by 2, in chunks of 1 and 9
        new = torch.arange(100, 100 + max_new_tokens + 2)[None]
        streamer.put(ids)
        streamer.put(new[:, :1])
        streamer.put(new[:, 1:])
        return torch.cat([ids, new], dim=1)

    from contextlib import nullcontext

    target = SimpleNamespace(set_taps=lambda taps: None, eos_token_ids=(2,), device=torch.device("cpu"),
                             model=SimpleNamespace(generate=generate), stock_kernels=nullcontext)
    run = HFMethod("hf-ngram", target, lookup_tokens=7).run([5, 6], DecodeConfig(max_new_tokens=8))
    assert run.token_ids == list(range(100, 108)) and run.tokens_past_limit == 2
    assert run.stats.num_new_tokens == 8 and run.stats.acceptance_lengths == [1, 9]


def test_the_hf_baseline_runs_transformers_as_shipped(targets):
    """Our few-row LM-head kernel speeds up our loop only, never the `generate` baseline."""
    from specflash.perf.kernelchoice import AVX2_DEFAULT, STOCK
    from specflash.perf.kernels import uses_small_batch_kernel

    target = targets("llama")
    target.set_kernel_choice(AVX2_DEFAULT)  # a machine where the routed kernel was chosen
    assert uses_small_batch_kernel(target._head)
    seen = []
    original = target.model.generate

    def generate(*args, **kwargs):
        seen.append(uses_small_batch_kernel(target._head))
        return original(*args, **kwargs)

    target.model.generate = generate
    try:
        HFMethod("hf", target).run([5, 6, 7], DecodeConfig(max_new_tokens=4))
    finally:
        del target.model.generate
    assert seen == [False] and uses_small_batch_kernel(target._head)
    target.set_kernel_choice(STOCK)
