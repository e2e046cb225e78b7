"""Few-row linear kernels for the verify forwards of decoding on the CPU.

Speculative decoding runs the LM head (and every linear) on a handful of rows: 1 token
per plain step, k + 1 per verify step, k per draft. `F.linear(x, W)` and the same product
written as (W @ x^T)^T give the same result to rounding, but their speed for 2..16 rows
depends on the machine: on some CPUs (MKL on AVX2) the second stays close to the cost of
reading W once while F.linear leaves its matrix-vector path and takes several times as
long; on others (AVX-512 / AMX) it is the other way round (measurements with their
machines: docs/performance.md, "Few-row verify kernels"). Which row counts take which
kernel is therefore measured per machine (kernelchoice.py) and set per module with
`use_small_batch_kernel(linear, rows)`. One row always takes `F.linear`, so plain decoding
runs transformers' exact kernels and logits; everything else (training, prefill, GPUs,
non-fp32) goes through `F.linear` unchanged.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

DEFAULT_ROWS = frozenset(range(2, 17))


def small_batch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                       rows: frozenset[int] | set[int] = DEFAULT_ROWS) -> torch.Tensor:
    """x [..., K], weight [N, K] -> [..., N]; (W @ x^T)^T when x has a row count in `rows`
    (fp32 CPU, no autograd), else F.linear (one row always: plain decoding keeps
    transformers' exact kernel and logits)."""
    n = x.numel() // max(1, x.shape[-1])
    autograd = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if (n <= 1 or n not in rows or autograd or x.device.type != "cpu" or x.dtype != torch.float32
            or weight.dtype != torch.float32):
        return F.linear(x, weight, bias)
    out = torch.mm(weight, x.reshape(n, x.shape[-1]).t()).t()  # [n, N]
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return small_batch_linear(x, self.weight, self.bias, self._small_batch_rows)


def use_small_batch_kernel(linear: torch.nn.Module, rows=DEFAULT_ROWS) -> bool:
    """Route this module's forward through `small_batch_linear` for inputs of these row
    counts (no rows: back to the stock forward). True if it is an nn.Linear."""
    if not isinstance(linear, torch.nn.Linear):
        return False
    rows = frozenset(int(r) for r in rows)
    if not rows:
        if "forward" in vars(linear):
            del linear.forward
        linear._small_batch_rows = None
        return True
    linear._small_batch_rows = rows
    linear.forward = types.MethodType(_forward, linear)
    return True


def uses_small_batch_kernel(linear: torch.nn.Module | None) -> bool:
    return (isinstance(linear, torch.nn.Module) and "forward" in vars(linear)
            and getattr(linear, "_small_batch_rows", None) is not None)


class stock_kernels:
    """Context manager: these modules run their stock `nn.Linear.forward` inside the block
    (e.g. so a Hugging Face `generate` baseline measures transformers as shipped)."""

    def __init__(self, *modules: torch.nn.Module):
        self.modules = [m for m in modules if uses_small_batch_kernel(m)]

    def __enter__(self):
        for m in self.modules:
            del m.forward
        return self

    def __exit__(self, *exc):
        for m in self.modules:
            m.forward = types.MethodType(_forward, m)
        return False
