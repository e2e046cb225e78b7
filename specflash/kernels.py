"""Kernel choice for the small-batch linear layers of decoding on the CPU.

Speculative decoding runs the LM head (and every linear) on a handful of rows: 1 token
per plain step, k + 1 per verify step, k per draft. With the MKL build of PyTorch on an
AVX2 machine, `F.linear(x, W)` for 2..16 rows takes up to 2-3x as long as for one row
(it leaves the GEMV path), while the same product written as (W @ x^T)^T stays close to
the cost of reading W once. Measured on the 2-core AMD EPYC VM (49152 x 576 LM head of
SmolLM2-135M, fp32, 2 threads, weights cold in cache): 2 rows 19.7 vs 7.2 ms, 4 rows 21.9
vs 7.3 ms, 8 rows 21.5 vs 13.6 ms; the decoder's own linears (576-1536 wide) gain at 2-4
rows and lose at 5-8 (docs/performance.md). So the target routes its LM head for 2..16
rows and its decoder linears for 2..4 rows (`TargetModel`); one row always takes
`F.linear`, so plain decoding runs transformers' exact kernels and logits.

`use_small_batch_kernel(linear, max_rows)` re-routes one `nn.Linear` module's forward; it
applies only to fp32 CPU inputs of 2..max_rows rows without autograd, and everything else
(plain steps, training, prefill, GPUs) goes through `F.linear` unchanged.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

DEFAULT_MAX_ROWS = 16


def small_batch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                       max_rows: int = DEFAULT_MAX_ROWS) -> torch.Tensor:
    """x [..., K], weight [N, K] -> [..., N]; (W @ x^T)^T for 2..max_rows fp32 CPU rows, else
    F.linear (one row included: plain decoding keeps transformers' exact kernel and logits)."""
    rows = x.numel() // max(1, x.shape[-1])
    autograd = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if (rows <= 1 or rows > max_rows or autograd or x.device.type != "cpu" or x.dtype != torch.float32
            or weight.dtype != torch.float32):
        return F.linear(x, weight, bias)
    out = torch.mm(weight, x.reshape(rows, x.shape[-1]).t()).t()  # [rows, N]
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return small_batch_linear(x, self.weight, self.bias, self._small_batch_rows)


def use_small_batch_kernel(linear: torch.nn.Module, max_rows: int = DEFAULT_MAX_ROWS) -> bool:
    """Route this module's forward through `small_batch_linear` (True if it is an nn.Linear)."""
    if not isinstance(linear, torch.nn.Linear):
        return False
    linear._small_batch_rows = int(max_rows)
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
