"""The per-machine kernel choice (kernelchoice.py): per verify size the fastest measured
candidate, sizes between measured ones take the one below, the choice is cached per
machine and model, made by the loading steps before step costs are measured (the block
policy never touches kernels), and never changes outputs."""

import pytest
import torch

from specflash.runtime.config import DecodeConfig
from specflash.runtime.decode import SpeculativeDecoder
from specflash.perf.kernelchoice import AVX2_DEFAULT, STOCK, KernelChoice, choose_kernels, pick
from specflash.perf.kernels import uses_small_batch_kernel
from specflash.runtime.proposers import DFlashProposer
from tiny import hf_greedy, tiny_drafter, tiny_model_folder, tiny_target


def test_pick_takes_the_fastest_candidate_per_size_and_fills_the_gaps():
    timings = {2: {"stock": 3.0, "head": 1.0, "head+decoder": 2.0},
               4: {"stock": 1.0, "head": 2.0, "head+decoder": 3.0},
               8: {"stock": 3.0, "head": 2.0, "head+decoder": 1.0}}
    choice = pick(timings, max_tokens=10)
    assert choice.head_rows == {2, 3, 8, 9, 10}  # 3 takes 2's choice, 5-7 take 4's (stock)
    assert choice.decoder_rows == {8, 9, 10}
    assert choice.describe() == "head 2-3,8-10, decoder 8-10"
    assert KernelChoice.from_dict(choice.to_dict()) == choice


def test_stock_and_the_avx2_default_describe_themselves():
    assert STOCK.describe() == "stock"
    assert AVX2_DEFAULT.describe() == "head 2-16, decoder 2-4"


def test_pick_routes_sizes_where_the_packed_gemm_wins_to_it():
    timings = {2: {"stock": 1.0, "head": 2.0, "head+decoder": 3.0, "packed": 1.5},
               4: {"stock": 3.0, "head": 2.0, "head+decoder": 3.0, "packed": 1.0}}
    choice = pick(timings, max_tokens=6)
    assert choice.packed_rows == {4, 5, 6} and choice.head_rows == {4, 5, 6} and choice.decoder_rows == {4, 5, 6}
    assert choice.describe() == "packed 4-6"
    if kc_packing():
        assert KernelChoice.from_dict(choice.to_dict()) == choice


def kc_packing() -> bool:
    from specflash.perf.kernels import mkl_packing_available

    return mkl_packing_available()


def test_choice_is_measured_once_then_read_from_the_cache(monkeypatch, tmp_path):
    import specflash.perf.kernelchoice as kc

    monkeypatch.setenv("SPECFLASH_COST_CACHE", str(tmp_path))
    real = kc.measure_choice  # steady by decree: sub-millisecond tiny forwards jitter on a shared machine
    monkeypatch.setattr(kc, "measure_choice", lambda t, m: real(t, m, noise_limit=float("inf")))
    target = tiny_target("llama", dtype=torch.float32)
    first = choose_kernels(target, max_tokens=8)
    assert set(first.measured) == {2, 3, 4, 6, 8}
    assert all(set(t) == set(kc.candidates()) for t in first.measured.values())
    assert {"stock", "head", "head+decoder"} <= set(kc.candidates())
    assert target.kernel_choice == STOCK  # chosen, not applied: the caller hands it to the target
    monkeypatch.setattr(kc, "measure_choice", lambda *a, **k: pytest.fail("measured again"))
    assert choose_kernels(target, max_tokens=8) == first


def test_stock_switch_and_non_fp32_targets_keep_transformers_kernels(monkeypatch, targets):
    monkeypatch.setenv("SPECFLASH_KERNELS", "stock")
    target = tiny_target("llama", dtype=torch.float32)
    assert choose_kernels(target) == STOCK
    monkeypatch.delenv("SPECFLASH_KERNELS")
    assert choose_kernels(targets("qwen3")) == STOCK  # float64 test target: nothing to choose
    assert not any(uses_small_batch_kernel(m) for m in targets("qwen3").model.modules())


def test_any_kernel_choice_keeps_greedy_output(monkeypatch):
    """fp32 target: every row count routed, none routed, or the AVX2 default: same tokens."""
    target = tiny_target("qwen2", dtype=torch.float32)
    drafter = tiny_drafter(target)
    prompt = torch.randint(0, 250, (9,), generator=torch.Generator().manual_seed(3)).tolist()
    reference = hf_greedy(target, prompt, 30)
    everything = KernelChoice(frozenset(range(2, 17)), frozenset(range(2, 17)))
    packed = KernelChoice(frozenset(range(2, 17)), frozenset(range(2, 17)), packed_rows=frozenset(range(2, 17)))
    for choice in (STOCK, AVX2_DEFAULT, everything, packed):
        target.set_kernel_choice(choice)
        result = SpeculativeDecoder(target, DFlashProposer(drafter, target), 8).generate(
            prompt, DecodeConfig(max_new_tokens=30, stop_token_ids=()))
        assert result.token_ids == reference


def test_pipeline_load_chooses_the_kernels_before_measuring_costs(monkeypatch, tmp_path):
    import specflash.perf.kernelchoice as kc
    import specflash.perf.measure as measure
    from specflash.runtime.pipeline import Pipeline

    monkeypatch.setenv("SPECFLASH_COST_CACHE", str(tmp_path))
    real_choice, real_costs = kc.measure_choice, measure.measure_costs
    monkeypatch.setattr(kc, "measure_choice", lambda t, m: real_choice(t, m, repeats=1, noise_limit=float("inf")))
    seen = []

    def spy(t, *args, **kwargs):
        seen.append(t.kernel_choice)
        return real_costs(t, *args, **kwargs)

    monkeypatch.setattr(measure, "measure_costs", spy)
    folder = tiny_model_folder(tmp_path / "tiny")
    pipe = Pipeline.load(str(folder), draft="random", block_size="auto", static_steps="off")
    assert pipe.block_policy == "tree-auto"  # the default: a cost-aware draft tree, costs measured too
    assert seen and seen[0] is pipe.target.kernel_choice and seen[0].measured  # measured, then costs under it


def test_make_policy_leaves_the_targets_kernels_alone(monkeypatch, tmp_path):
    from specflash.runtime.blockpolicy import make_policy

    monkeypatch.setenv("SPECFLASH_COST_CACHE", str(tmp_path))
    monkeypatch.setattr("specflash.perf.kernelchoice.measure_choice", lambda *a, **k: pytest.fail("kernels measured"))
    target = tiny_target("llama", dtype=torch.float32)
    size, policy = make_policy("auto", target, DFlashProposer(tiny_drafter(target, block_size=4), target))
    assert (size, policy.name) == (4, "auto") and target.kernel_choice == STOCK


def test_a_noisy_choice_is_used_but_not_cached(monkeypatch, tmp_path):
    import specflash.perf.kernelchoice as kc

    monkeypatch.setenv("SPECFLASH_COST_CACHE", str(tmp_path))
    target = tiny_target("llama", dtype=torch.float32)
    noisy = KernelChoice(frozenset({2}), frozenset(), {2: {"stock": 2.0, "head": 1.0, "head+decoder": 3.0}}, True)
    calls = []
    monkeypatch.setattr(kc, "measure_choice", lambda *a, **k: (calls.append(1), noisy)[1])
    said = []
    assert choose_kernels(target, max_tokens=4, log=said.append) == noisy
    assert len(calls) == 2 and any("busy" in m for m in said)  # measured twice, then used uncached
    assert not list(tmp_path.glob("kernels-*.json"))
