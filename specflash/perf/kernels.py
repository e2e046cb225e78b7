"""Few-row linear kernels for the verify forwards of decoding on the CPU.

Speculative decoding runs the LM head (and every linear) on a handful of rows: 1 token
per plain step, k + 1 per verify step, k per draft. `F.linear(x, W)`, the same product
written as (W @ x^T)^T, and MKL's GEMM against a weight packed once (`PackedWeight`) give
the same result to rounding, but their speed for 2..32 rows depends on the machine: on
some CPUs (MKL on AVX2) (W @ x^T)^T stays close to the cost of reading W once while
F.linear leaves its matrix-vector path and takes several times as long; on AVX-512 / AMX
it is the other way round, and the packed GEMM runs 8 rows in ~1.1x the time of one
(measurements with their machines: docs/performance.md, "Few-row verify kernels"). Which
row counts take which kernel is therefore measured per machine (kernelchoice.py) and set
per module with `use_small_batch_kernel(linear, rows, packed_rows)`. One row always takes
`F.linear`, so plain decoding runs transformers' exact kernels and logits; everything else
(training, prefill, GPUs, non-fp32) goes through `F.linear` unchanged.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

DEFAULT_ROWS = frozenset(range(2, 17))
PACK_ROWS = 16  # the row count MKL packs a weight for; the packed weight then serves any count >= 2


# ------------------------------------------------------------------ packed weights (MKL)
@lru_cache(maxsize=1)
def mkl_packing_available() -> bool:
    """Whether this torch build has MKL's packed GEMM (x86 builds with MKL: `torch.ops.mkl`)."""
    try:
        if not torch.backends.mkl.is_available():
            return False
        w = torch.ones(3, 2)
        pack = torch.ops.mkl._mkl_reorder_linear_weight(w, 2)
        return torch.equal(torch.ops.mkl._mkl_linear(torch.ones(2, 2), pack, w, None, 2), torch.full((2, 3), 2.0))
    except (AttributeError, RuntimeError):
        return False


class PackedWeight:
    """A linear's weight [N, K] (fp32, CPU) packed once in MKL's GEMM layout: `matmul(x)`
    computes x @ W^T (+ bias) for x [M, K], M >= 2, with the weight already in the order
    the GEMM's inner kernel reads it (no per-call packing, one pass over W for all M rows).
    The packed copy costs as much memory as the weight; `packed_weight(module)` makes it on
    first use and keeps it with the module. The same packed weight serves every M (MKL packs
    B independently of it; `invariant_form` and `measure_choice` check the results)."""

    def __init__(self, weight: torch.Tensor, prepack_rows: int = PACK_ROWS):
        self.weight = weight.detach()
        self.pack = torch.ops.mkl._mkl_reorder_linear_weight(self.weight, prepack_rows)
        self.key = (self.weight.data_ptr(), self.weight._version, tuple(self.weight.shape))

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [M, K] -> [M, N]."""
        return torch.ops.mkl._mkl_linear(x.contiguous(), self.pack, self.weight,
                                         bias.detach() if bias is not None else None, x.shape[0])


def packed_weight(linear: torch.nn.Linear) -> PackedWeight:
    """The module's PackedWeight, made on first use and again if its weight changed."""
    weight = linear.weight.detach()
    pack = vars(linear).get("_packed_weight")
    if pack is None or pack.key != (weight.data_ptr(), weight._version, tuple(weight.shape)):
        pack = PackedWeight(weight)
        linear._packed_weight = pack
    return pack


def small_batch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                       rows: frozenset[int] | set[int] = DEFAULT_ROWS, packed_rows: frozenset[int] | set[int] = (),
                       pack: PackedWeight | None = None) -> torch.Tensor:
    """x [..., K], weight [N, K] -> [..., N]; with x's row count in `packed_rows` and a
    `pack` of this weight: MKL's GEMM against the packed weight; in `rows`: (W @ x^T)^T
    (fp32 CPU, no autograd both); else F.linear (one row always: plain decoding keeps
    transformers' exact kernel and logits)."""
    n = x.numel() // max(1, x.shape[-1])
    autograd = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if (n <= 1 or (n not in rows and n not in packed_rows) or autograd or x.device.type != "cpu"
            or x.dtype != torch.float32 or weight.dtype != torch.float32):
        return F.linear(x, weight, bias)
    if n in packed_rows and pack is not None:
        return pack.matmul(x.reshape(n, x.shape[-1]), bias).reshape(*x.shape[:-1], weight.shape[0])
    out = torch.mm(weight, x.reshape(n, x.shape[-1]).t()).t()  # [n, N]
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    packed_rows = self._small_batch_packed_rows
    pack = packed_weight(self) if packed_rows and (x.numel() // max(1, x.shape[-1])) in packed_rows else None
    return small_batch_linear(x, self.weight, self.bias, self._small_batch_rows, packed_rows, pack)


def use_small_batch_kernel(linear: torch.nn.Module, rows=DEFAULT_ROWS, packed_rows=()) -> bool:
    """Route this module's forward through `small_batch_linear` for inputs of these row
    counts ((W @ x^T)^T for `rows`, the packed GEMM for `packed_rows`, which wins where both
    list a count; none: back to the stock forward). True if it is an nn.Linear."""
    if not isinstance(linear, torch.nn.Linear):
        return False
    rows = frozenset(int(r) for r in rows)
    packed_rows = frozenset(int(r) for r in packed_rows) if mkl_packing_available() else frozenset()
    if not rows and not packed_rows:
        if "forward" in vars(linear):
            del linear.forward
        linear._small_batch_rows = None
        linear._small_batch_packed_rows = frozenset()
        return True
    linear._small_batch_rows = rows
    linear._small_batch_packed_rows = packed_rows
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
# x @ W^T and 32 for (W @ x^T)^T with MKL on AVX-512; MKL's GEMM against a packed weight
# gives a row the same bits at every row count from 2 up, at about the cost of one row for
# up to 8). `invariant_form` finds, on this machine and for the model's own matrix shapes, a
# form and chunk for which that holds; `RowInvariance` carries the choice.

FORMS = ("packed", "xwt", "wxt")  # MKL's GEMM on a packed weight (linears only), x @ W^T (F.linear's), (W @ x^T)^T
FORM_NAMES = {"packed": "packed x @ W^T", "xwt": "x @ W^T", "wxt": "(W @ x^T)^T"}


@dataclass(frozen=True)
class RowInvariance:
    form: str  # one of FORMS
    chunk: int  # most rows per piece (>= 2)

    def describe(self) -> str:
        return f"{FORM_NAMES[self.form]} in pieces of 2..{self.chunk} rows"


def _pieces(n: int, chunk: int) -> list[int]:
    """Split n >= 2 rows into pieces of 2..chunk rows."""
    sizes = [chunk] * (n // chunk) + ([n % chunk] if n % chunk else [])
    if sizes[-1] == 1:  # never a one-row piece: take a row from the piece before
        sizes[-2:] = [sizes[-2] - 1, 2]
    return sizes


def _product(w: torch.Tensor, x: torch.Tensor, form: str, pack: PackedWeight | None = None) -> torch.Tensor:
    if form == "packed":  # a 2-D weight with its PackedWeight, x [C, K]
        return pack.matmul(x)
    if form == "xwt":
        return torch.matmul(x, w.transpose(-1, -2))
    return torch.matmul(w, x.transpose(-1, -2)).transpose(-1, -2)


def row_invariant_matmul(w: torch.Tensor, x: torch.Tensor, how: RowInvariance,
                         pack: PackedWeight | None = None) -> torch.Tensor:
    """w [..., O, K], x [..., C, K] -> [..., C, O] (x @ w^T), each of the C rows computed in a
    piece of 2..how.chunk rows (one row is paired with itself), so its bits do not depend on C.
    The "packed" form takes a 2-D w and its `pack`."""
    c = x.shape[-2]
    if c == 0:
        return x.new_zeros(*x.shape[:-1], w.shape[-2])
    if how.form == "packed" and pack is None:
        raise ValueError("the packed row-invariant form needs the weight's PackedWeight")
    if c == 1:
        return _product(w, torch.cat([x, x], dim=-2), how.form, pack)[..., :1, :]
    parts = [_product(w, piece, how.form, pack) for piece in x.split(_pieces(c, how.chunk), dim=-2)]
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
    activations = tuple(f for f in FORMS if f != "packed")  # operands change every call: nothing to pack
    scores = invariant_form([keys], forms=activations)
    values_how = invariant_form([values[:block].transpose(0, 1)], inputs={values.shape[0]: block}, forms=activations)
    return (scores, values_how) if scores is not None and values_how is not None else None


def row_invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         how: RowInvariance, pack: PackedWeight | None = None) -> torch.Tensor:
    """x [..., K], weight [N, K] -> [..., N], each row's result independent of the other rows."""
    out = row_invariant_matmul(weight, x.reshape(-1, x.shape[-1]), how, pack)
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _invariant_up_to(w: torch.Tensor, x: torch.Tensor, form: str, top: int, pack: PackedWeight | None = None) -> int:
    """Largest c <= top such that every piece size 2..c gives the rows of x the bits they get
    in pieces of 2 (1 if even 2..2 fails, i.e. never)."""
    n = x.shape[0]
    reference = torch.cat([_product(w, x[i: i + 2], form, pack)[:1] for i in range(n - 1)]
                          + [_product(w, x[n - 2:], form, pack)[1:]])
    if form == "packed":  # MKL's packed layout reused at other row counts: the values must be right too
        exact = torch.matmul(x, w.transpose(-1, -2))
        if not torch.allclose(reference, exact, rtol=1e-4, atol=1e-4 * float(exact.abs().max())):
            return 1
    ok = 1
    for m in range(2, top + 1):
        if not torch.equal(_product(w, x[:m], form, pack), reference[:m]):
            break
        ok = m
    return ok


def invariant_form(weights, candidates=(32, 16, 15, 8, 4), seed: int = 0, inputs=None,
                   forms=FORMS) -> RowInvariance | None:
    """For each form, the largest chunk in `candidates` that is row-invariant for every one of
    these matrices (one per distinct shape is checked); the first of `forms` that has one:
    the packed GEMM (2-D fp32 CPU weights, where MKL has it: the fastest for a few rows),
    then x @ W^T, F.linear's own form and speed, before (W @ x^T)^T, which is several times
    slower for a few rows on some CPUs. None when no form is invariant here."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {}
    for w in weights:
        shapes.setdefault((tuple(w.shape), w.dtype, w.device), w)
    top = max(candidates)
    packable = mkl_packing_available() and all(
        w.dim() == 2 and w.dtype == torch.float32 and w.device.type == "cpu" for w in shapes.values())
    with torch.inference_mode():
        # inputs {T: K}: rows of K columns cut from rows of T (strided, as probabilities' key blocks)
        xs = {}
        for key, w in shapes.items():
            wide = next((t for t, k in (inputs or {}).items() if k == w.shape[1]), w.shape[1])
            xs[key] = torch.randn(top, wide, generator=generator).to(w.device, w.dtype)[:, : w.shape[1]]
        for form in forms:
            if form == "packed" and not packable:
                continue
            packs = {key: PackedWeight(w) for key, w in shapes.items()} if form == "packed" else {}
            worst = top
            for key, w in shapes.items():
                worst = min(worst, _invariant_up_to(w, xs[key], form, worst, packs.get(key)))
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
            pack = packed_weight(module) if how.form == "packed" else None
            return row_invariant_linear(x, module.weight, module.bias, how, pack)

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
