"""Small-batch linear kernel choice: same results as F.linear, applied only where meant."""

import torch
import torch.nn.functional as F

from specflash.perf.kernels import small_batch_linear, stock_kernels, use_small_batch_kernel, uses_small_batch_kernel


def test_small_batch_linear_matches_f_linear_for_every_row_count():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(300, 64, generator=g), torch.randn(300, generator=g)
    for rows in (1, 2, 3, 5, 16, 17, 40):
        x = torch.randn(1, rows, 64, generator=g)
        torch.testing.assert_close(small_batch_linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_one_row_is_bit_identical_to_f_linear():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(1000, 96, generator=g)
    x = torch.randn(1, 1, 96, generator=g)
    assert torch.equal(small_batch_linear(x, w), F.linear(x, w))


def test_gradients_flow_through_the_stock_path():
    w = torch.randn(8, 4, requires_grad=True)
    x = torch.randn(2, 4, requires_grad=True)
    small_batch_linear(x, w).sum().backward()
    assert w.grad is not None and x.grad is not None


def test_module_routing_and_stock_kernels_context():
    linear = torch.nn.Linear(16, 32)
    x = torch.randn(3, 16)
    expected = F.linear(x, linear.weight, linear.bias)
    assert use_small_batch_kernel(linear) and uses_small_batch_kernel(linear)
    with torch.no_grad():
        torch.testing.assert_close(linear(x), expected)
        with stock_kernels(linear):
            assert not uses_small_batch_kernel(linear)
            torch.testing.assert_close(linear(x), expected)
    assert uses_small_batch_kernel(linear)
    assert not use_small_batch_kernel(torch.nn.Identity())


def test_target_routes_few_row_linears_and_one_row_steps_stay_exact(targets):
    from specflash.perf.kernelchoice import AVX2_DEFAULT, STOCK

    target = targets("qwen3")
    assert not any(uses_small_batch_kernel(m) for m in target.model.modules())  # stock until chosen
    target.set_kernel_choice(AVX2_DEFAULT)
    routed = [m for m in target.model.modules() if uses_small_batch_kernel(m)]
    assert target._head in routed and len(routed) > 1  # the LM head and the decoder's linears
    ids = torch.tensor([[5, 9, 2]])  # 3 rows: the head and the decoder linears both take the routed kernel
    with torch.no_grad():
        with target.stock_kernels():
            assert not any(uses_small_batch_kernel(m) for m in routed)
            stock = target.model(ids).logits
            stock_one = target.model(ids[:, :1]).logits
        fast = target.model(ids).logits
        fast_one = target.model(ids[:, :1]).logits
    assert all(uses_small_batch_kernel(m) for m in routed)
    assert torch.equal(fast_one, stock_one)  # a plain decoding step: transformers' exact kernels
    torch.testing.assert_close(fast, stock, rtol=1e-5, atol=1e-5)
    target.set_kernel_choice(STOCK)
    assert not any(uses_small_batch_kernel(m) for m in target.model.modules())


def test_routing_takes_only_the_chosen_row_counts(monkeypatch):
    import specflash.perf.kernels as kernels

    routed_rows = []
    real_mm = torch.mm
    monkeypatch.setattr(kernels.torch, "mm", lambda a, b: (routed_rows.append(b.shape[1]), real_mm(a, b))[1])
    linear = torch.nn.Linear(16, 8)
    assert use_small_batch_kernel(linear, {2, 5})
    with torch.no_grad():
        for rows in (1, 2, 3, 5, 6):
            x = torch.randn(rows, 16)
            torch.testing.assert_close(linear(x), F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)
        assert routed_rows == [2, 5]
        use_small_batch_kernel(linear, ())  # no rows: back to the stock forward
        assert not uses_small_batch_kernel(linear)
        linear(torch.randn(2, 16))
    assert routed_rows == [2, 5]


# ------------------------------------------------------------ MKL's packed GEMM
needs_mkl = __import__("pytest").mark.skipif(
    not __import__("specflash.perf.kernels", fromlist=["x"]).mkl_packing_available(),
    reason="this torch build has no MKL packed GEMM")


@needs_mkl
def test_packed_gemm_matches_f_linear_at_every_row_count_from_two():
    from specflash.perf.kernels import PackedWeight

    g = torch.Generator().manual_seed(4)
    w, b = torch.randn(300, 64, generator=g), torch.randn(300, generator=g)
    pack = PackedWeight(w)  # packed once, for 16 rows
    for rows in (2, 3, 7, 16, 17, 40):
        x = torch.randn(rows, 64, generator=g)
        torch.testing.assert_close(pack.matmul(x, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(small_batch_linear(x, w, b, (), {rows}, pack), F.linear(x, w, b),
                                   rtol=1e-5, atol=1e-5)


@needs_mkl
def test_packed_routing_takes_the_packed_rows_and_one_row_stays_f_linear(monkeypatch):
    import specflash.perf.kernels as kernels

    calls = []
    real = kernels.PackedWeight.matmul
    monkeypatch.setattr(kernels.PackedWeight, "matmul", lambda self, x, bias=None: (calls.append(x.shape[0]),
                                                                                    real(self, x, bias))[1])
    linear = torch.nn.Linear(16, 8)
    assert use_small_batch_kernel(linear, (), {2, 4}) and uses_small_batch_kernel(linear)
    with torch.no_grad():
        one = torch.randn(1, 16)
        assert torch.equal(linear(one), F.linear(one, linear.weight, linear.bias))
        for rows in (2, 3, 4):
            x = torch.randn(rows, 16)
            torch.testing.assert_close(linear(x), F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)
    assert calls == [2, 4]


@needs_mkl
def test_a_packed_weight_is_made_again_when_the_weight_changes():
    from specflash.perf.kernels import packed_weight

    linear = torch.nn.Linear(16, 8)
    first = packed_weight(linear)
    assert packed_weight(linear) is first
    with torch.no_grad():
        linear.weight.mul_(2)
    second = packed_weight(linear)
    assert second is not first
    x = torch.randn(3, 16)
    torch.testing.assert_close(second.matmul(x, linear.bias), F.linear(x, linear.weight, linear.bias).detach(),
                               rtol=1e-5, atol=1e-5)


@needs_mkl
def test_packed_pieces_give_a_row_the_same_bits_at_any_row_count():
    from specflash.perf.kernels import PackedWeight, RowInvariance, invariant_form, row_invariant_linear

    g = torch.Generator().manual_seed(5)
    w = torch.randn(200, 96, generator=g)
    how = invariant_form([w])
    assert how is not None and how.form == "packed"  # the first form where MKL has it
    pack = PackedWeight(w)
    x = torch.randn(40, 96, generator=g)
    alone = torch.cat([row_invariant_linear(x[i: i + 1], w, None, how, pack) for i in range(40)])
    for count in (2, 5, 17, 40):
        assert torch.equal(row_invariant_linear(x[:count], w, None, how, pack), alone[:count])
    assert RowInvariance("packed", 16).describe() == "packed x @ W^T in pieces of 2..16 rows"
