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
from dataclasses import dataclass

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


# ------------------------------------------------------------ row-invariant products
# A batched step (hf/batchstep.py) multiplies the rows of several sequences together. With a
# plain product the result of one row depends on how many rows the product has (BLAS takes a
# matrix-vector path for 1 row and different blockings for few and many rows), so the same
# sequence would get different rounding alone and in a batch. Splitting the rows into pieces
# of 2..chunk rows, each multiplied on its own, gives every row the same bits whatever the
# piece size, for a chunk below the BLAS's next blocking change (measured: 15 rows for
# x @ W^T and 32 for (W @ x^T)^T with MKL on AVX-512). `invariant_form` finds, on this
# machine and for the model's own matrix shapes, a form and chunk for which that holds;
# `RowInvariance` carries the choice.

FORMS = ("xwt", "wxt")  # x @ W^T (F.linear's form), (W @ x^T)^T


@dataclass(frozen=True)
class RowInvariance:
    form: str  # one of FORMS
    chunk: int  # most rows per piece (>= 2)

    def describe(self) -> str:
        return f"{'x @ W^T' if self.form == 'xwt' else '(W @ x^T)^T'} in pieces of 2..{self.chunk} rows"


def _pieces(n: int, chunk: int) -> list[int]:
    """Split n >= 2 rows into pieces of 2..chunk rows."""
    sizes = [chunk] * (n // chunk) + ([n % chunk] if n % chunk else [])
    if sizes[-1] == 1:  # never a one-row piece: take a row from the piece before
        sizes[-2:] = [sizes[-2] - 1, 2]
    return sizes


def _product(w: torch.Tensor, x: torch.Tensor, form: str) -> torch.Tensor:
    if form == "xwt":
        return torch.matmul(x, w.transpose(-1, -2))
    return torch.matmul(w, x.transpose(-1, -2)).transpose(-1, -2)


def row_invariant_matmul(w: torch.Tensor, x: torch.Tensor, how: RowInvariance) -> torch.Tensor:
    """w [..., O, K], x [..., C, K] -> [..., C, O] (x @ w^T), each of the C rows computed in a
    piece of 2..how.chunk rows (one row is paired with itself), so its bits do not depend on C."""
    c = x.shape[-2]
    if c == 0:
        return x.new_zeros(*x.shape[:-1], w.shape[-2])
    if c == 1:
        return _product(w, torch.cat([x, x], dim=-2), how.form)[..., :1, :]
    parts = [_product(w, piece, how.form) for piece in x.split(_pieces(c, how.chunk), dim=-2)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)


def attention_bias(visible: torch.Tensor, kv_heads: int, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """visible [B, L, T] bool -> [B, 1, g*L, T] additive mask (0 / -inf) in the query order of
    `row_invariant_attention` (made once per forward, shared by every layer)."""
    b, length, t = visible.shape
    bias = torch.zeros(b, groups, length, t, dtype=dtype, device=visible.device)
    bias.masked_fill_(~visible[:, None], float("-inf"))
    return bias.reshape(b, 1, groups * length, t)


def row_invariant_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor,
                            scaling: float, scores_how: RowInvariance, values_how: RowInvariance,
                            block: int) -> torch.Tensor:
    """Attention whose result for a query depends only on the keys it sees: not on the other
    queries, on how many keys past its own are masked, nor on other rows of the batch.

    query [B, H, L, d], key / value [B, Hk, T, d] (T a multiple of `block`; H = g * Hk, query
    head h uses key head h // g), bias [B, 1, g*L, T] (`attention_bias`) -> [B, L, H, d].
    Scores: Q @ K^T over query pieces (`row_invariant_matmul`); softmax over the last
    dimension (masked keys: -inf, so exactly 0); P @ V summed over key blocks of `block`
    columns in order (a block a query cannot see adds exact zeros), each block's product
    again over query pieces."""
    b, heads, length, d = query.shape
    kv_heads, t = key.shape[1], key.shape[2]
    q = query.reshape(b, kv_heads, heads // kv_heads * length, d)  # head h = j * g + i: rows i * L .. of KV head j
    scores = row_invariant_matmul(key, q, scores_how) * scaling  # [B, Hk, g*L, T]
    probs = torch.softmax(scores + bias, dim=-1)
    out = None
    for start in range(0, t, block):
        values_t = value[..., start: start + block, :].transpose(-1, -2)  # [B, Hk, d, block], a view
        part = row_invariant_matmul(values_t, probs[..., start: start + block], values_how)  # [B, Hk, g*L, d]
        out = part if out is None else out + part
    return out.reshape(b, heads, length, d).transpose(1, 2)


def attention_invariance(head_dim: int, block: int, dtype: torch.dtype, device, seed: int = 1
                         ) -> tuple[RowInvariance, RowInvariance] | None:
    """The row-invariant products for `row_invariant_attention`'s scores and P @ V, checked on
    operands laid out as there (keys [2 * block, d]; V^T blocks as transposed views of V)."""
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(2 * block, head_dim, generator=generator).to(device, dtype)
    values = torch.randn(2 * block, head_dim, generator=generator).to(device, dtype)
    scores = invariant_form([keys])
    values_how = invariant_form([values[:block].transpose(0, 1)], inputs={values.shape[0]: block})
    return (scores, values_how) if scores is not None and values_how is not None else None


def row_invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         how: RowInvariance) -> torch.Tensor:
    """x [..., K], weight [N, K] -> [..., N], each row's result independent of the other rows."""
    out = row_invariant_matmul(weight, x.reshape(-1, x.shape[-1]), how)
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _invariant_up_to(w: torch.Tensor, x: torch.Tensor, form: str, top: int) -> int:
    """Largest c <= top such that every piece size 2..c gives the rows of x the bits they get
    in pieces of 2 (1 if even 2..2 fails, i.e. never)."""
    n = x.shape[0]
    reference = torch.cat([_product(w, x[i: i + 2], form)[:1] for i in range(n - 1)]
                          + [_product(w, x[n - 2:], form)[1:]])
    ok = 1
    for m in range(2, top + 1):
        if not torch.equal(_product(w, x[:m], form), reference[:m]):
            break
        ok = m
    return ok


def invariant_form(weights, candidates=(32, 16, 15, 8, 4), seed: int = 0, inputs=None) -> RowInvariance | None:
    """For each form, the largest chunk in `candidates` that is row-invariant for every one of
    these matrices (one per distinct shape is checked); the first form of FORMS that has one
    (x @ W^T, F.linear's own form and speed, before (W @ x^T)^T, which is several times slower
    for a few rows on some CPUs). None when no form is invariant here."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {}
    for w in weights:
        shapes.setdefault((tuple(w.shape), w.dtype, w.device), w)
    top = max(candidates)
    with torch.inference_mode():
        # inputs {T: K}: rows of K columns cut from rows of T (strided, as probabilities' key blocks)
        xs = {}
        for key, w in shapes.items():
            wide = next((t for t, k in (inputs or {}).items() if k == w.shape[1]), w.shape[1])
            xs[key] = torch.randn(top, wide, generator=generator).to(w.device, w.dtype)[:, : w.shape[1]]
        for form in FORMS:
            worst = top
            for key, w in shapes.items():
                worst = min(worst, _invariant_up_to(w, xs[key], form, worst))
                if worst < 2:
                    break
            fitting = [c for c in candidates if c <= worst]
            if fitting:
                return RowInvariance(form, max(fitting))
    return None


class row_invariant_kernels:
    """Context manager: these nn.Linear modules run `row_invariant_linear` inside the block
    (their own forward, stock or a kernel choice's, is restored after)."""

    def __init__(self, modules, how: RowInvariance):
        self.modules = [m for m in modules if isinstance(m, torch.nn.Linear)]
        self.how = how
        self._saved: list = []

    def __enter__(self):
        how = self.how
        self._saved = [vars(m).get("forward") for m in self.modules]

        def forward(module, x):
            return row_invariant_linear(x, module.weight, module.bias, how)

        for m in self.modules:
            m.forward = types.MethodType(forward, m)
        return self

    def __exit__(self, *exc):
        for m, saved in zip(self.modules, self._saved):
            if saved is None:
                del m.forward
            else:
                m.forward = saved
        return False
