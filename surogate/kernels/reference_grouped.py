"""Plain-torch twin of the grouped LoRA linear: the experts of a mixture-of-experts block.

A MoE block runs one small linear per expert on the tokens routed to it. Sorted by expert, the
tokens form E contiguous groups, and the whole block is one "grouped" linear:

    out[t] = Q(x[t]) @ W[e(t)]^T + s * (x[t] @ A[e(t)]^T) @ B[e(t)]^T     for t in group e(t)

with the frozen expert weights `W (E, N, K)` in a quantized format and per-expert LoRA factors
`A (E, r, K)`, `B (E, N, r)` (FP32 masters). This module defines what the Triton kernels of
`kernels/grouped.py` compute, by the rule "each group is one dense LoRA linear": for every
expert it calls the dense reference's per-format GEMM functions (`reference_linear`) on that
group's rows, and the LoRA terms are written with the dense reference's formulas, so the grouped
reference equals a loop of `lora_linear_ref` / `lora_linear_backward_ref` over the experts
bit for bit (tests/test_kernels_grouped.py checks it). Nothing about a format is re-implemented.

Contract (docs/moe.md):
- `input (T, K)`: tokens sorted by expert; `offsets (E+1,)` int32 with `offsets[0] == 0`,
  non-decreasing, `offsets[E] == T`: group e is rows `offsets[e]:offsets[e+1]`; a group may be empty.
- Gathered input (`rows (S,)` int32 or int64): the grouped rows are `input[rows]`, so `input` is the
  unsorted tokens `(T, K)` and row s of the grouped GEMM reads token `rows[s]` (top-k routing: S = T*k,
  a token in k groups). Then `offsets[E] == S`, and everything per row (output, lora_hidden,
  grad_output, grad_input) has S rows. By definition equal to passing `input[rows]` without `rows`;
  the kernels read through the index instead of copying (docs/moe.md).
- `weight`: the grouped weight list: the dense list of `weight_format` (docs/internals.md,
  `variants.WEIGHT_LISTS`) of every expert, each tensor stacked along a new leading dim E
  (`stack_expert_weights`). So `expert_weight(weight, e)` is exactly expert e's dense list.
  nf4: `[packed (E, N*K/2) u8, absmax_q (E, N*K/64) u8, absmax_scale (E, ceil(N*K/64/256)) f32,
  absmax_offset (E, ceil(N*K/64/256)) f32, absmax_code (E, 256) f32]`: each expert double-quantized on
  its own (its offset repeated per 256-code group, as in a dense list).
  fp8_block: `[data (E, N, K) e4m3, block_scale (E, ceil(N/128), ceil(K/128)) f32]`.
- No bias (GPT-OSS's expert biases, the only ones, are added by `SurogateExperts` around the op, a gather
  and an add that the compiler fuses) and no separate LoRA input: PEFT refuses dropout on a targeted
  parameter (`ParamWrapper`), since x cannot be factored out.
- Compute: "bf16" (weights dequantized, bf16 operands) and "fp8" (every FP8 activation scale is
  per row or per 1x128 block, so the groups do not change it). "nvfp4" is refused: its activation
  tensor scale is an amax over the whole tensor, and whether that is per group or over all tokens
  has not been decided (docs/moe.md).

This is also what a future `surogate::grouped_lora_linear` op would run on the CPU. It reads the
offsets on the host (`tolist()`), which the Triton launcher does not do.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch

from surogate.kernels.reference_linear import (  # the dense reference's per-format GEMMs: one definition
    dgrad_base,
    forward_base,
    quantize_weight_ref,
)
from surogate.kernels.variants import WEIGHT_LISTS
from surogate.kernels.variants import weight_format_of as _weight_format
from surogate.recipes.recipe import Compute, WeightFormat

__all__ = ["check_offsets", "check_rows", "expert_weight", "grouped_lora_linear_backward_ref",
           "grouped_lora_linear_ref", "grouped_out_features", "quantize_grouped_weight_ref",
           "stack_expert_weights"]

GROUPED_COMPUTES = (Compute.BF16, Compute.FP8)


def stack_expert_weights(lists: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """E dense weight lists of one format -> the grouped list (each tensor stacked along dim 0)."""
    if not lists:
        raise ValueError("need at least one expert's weight list")
    if len({len(t) for t in lists}) != 1:
        raise ValueError("every expert's weight list must have the same format")
    return [torch.stack(list(ts)) for ts in zip(*lists)]


def expert_weight(weight: Sequence[torch.Tensor], e: int) -> list[torch.Tensor]:
    """Expert e's dense weight list (views) out of a grouped list."""
    return [t[e] for t in weight]


def quantize_grouped_weight_ref(weight: torch.Tensor, weight_format: str | WeightFormat,
                                quantize: Callable[[torch.Tensor, str], list[torch.Tensor]] | None = None
                                ) -> list[torch.Tensor]:
    """The grouped weight list of a frozen `(E, N, K)` expert stack, each expert quantized on its own.

    Per expert, not over the stack: FP8 128x128 blocks must not straddle two experts when N is not a
    multiple of 128, and an NF4 expert then decodes with nothing from its neighbours. `quantize`
    (default `quantize_weight_ref`; the Triton `quantize.quantize_weight` on a GPU) makes one list.
    """
    fmt = _weight_format(weight_format)
    if weight.dim() != 3:
        raise ValueError(f"an expert weight stack is (E, N, K); got shape {tuple(weight.shape)}")
    quantize = quantize or quantize_weight_ref
    return stack_expert_weights([quantize(weight[e], fmt) for e in range(weight.shape[0])])


def grouped_out_features(weight: Sequence[torch.Tensor], weight_format: str | WeightFormat, k: int) -> int:
    """N of a grouped weight list (NF4 stores each expert flat: N*K/2 bytes, K a multiple of 64)."""
    fmt = _weight_format(weight_format)
    want = WEIGHT_LISTS[fmt]
    if len(weight) != len(want):
        raise ValueError(f"weight_format {fmt.value!r} takes {len(want)} stacked tensors {want} "
                         f"(docs/moe.md), got {len(weight)}; build it with quantize_grouped_weight_ref")
    if fmt is WeightFormat.NF4:
        if k % 64:
            raise ValueError(f"NF4 experts need K divisible by 64 (one absmax block per row segment); got {k}")
        return weight[0].shape[1] * 2 // k
    return weight[0].shape[1]


def check_offsets(offsets: torch.Tensor, num_experts: int, tokens: int, what: str = "T") -> list[int]:
    """Validate the group boundaries (host side, so this syncs on a GPU); return them as ints.
    `tokens` is the number of grouped rows (`what`: T, or S = len(rows) for a gathered input)."""
    if offsets.dtype != torch.int32 or offsets.shape != (num_experts + 1,):
        raise ValueError(f"offsets must be int32 ({num_experts + 1},) = (E+1,); got {offsets.dtype} "
                         f"{tuple(offsets.shape)}")
    bounds = offsets.tolist()
    if bounds[0] != 0 or bounds[-1] != tokens or any(a > b for a, b in itertools.pairwise(bounds)):
        raise ValueError(f"offsets must start at 0, not decrease and end at {what}={tokens}; got {bounds}")
    return bounds


def _check_lora(lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, e: int, n: int, k: int) -> bool:
    if (lora_a is None) != (lora_b is None):
        raise ValueError("pass both lora_a and lora_b, or neither (plain grouped linear)")
    if lora_a is None:
        return False
    if lora_a.dim() != 3 or lora_b.dim() != 3 or lora_a.shape[0] != e or lora_b.shape[0] != e \
            or lora_a.shape[2] != k or lora_b.shape[1] != n or lora_a.shape[1] != lora_b.shape[2]:
        raise ValueError(f"lora_a must be (E={e}, r, K={k}) and lora_b (E={e}, N={n}, r); got "
                         f"{tuple(lora_a.shape)} and {tuple(lora_b.shape)}")
    return True


def _grouped_compute(compute: str | Compute, what: str) -> Compute:
    c = Compute(compute)
    if c not in GROUPED_COMPUTES:
        raise ValueError(f"grouped {what} compute {c.value!r} is not defined: NVFP4's activation tensor scale "
                         f"(per group or over all tokens?) is open (docs/moe.md); use bf16 or fp8")
    return c


def check_rows(rows: torch.Tensor | None, tokens: int) -> int | None:
    """Validate a gather index (host side: reads its values); return S = len(rows), or None without one."""
    if rows is None:
        return None
    if rows.dtype not in (torch.int32, torch.int64) or rows.dim() != 1:
        raise ValueError(f"rows must be a 1-D int32 or int64 index (S,) into the T={tokens} input rows; got "
                         f"{rows.dtype} {tuple(rows.shape)}")
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= tokens):
        raise ValueError(f"rows must index the input's T={tokens} rows: values in [0, {tokens}); got "
                         f"[{int(rows.min())}, {int(rows.max())}]")
    return rows.shape[0]


def _group_rows(input: torch.Tensor, rows: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor:
    """Rows lo:hi of the grouped input: a slice, or with `rows` that group's gathered tokens only."""
    return input[lo:hi] if rows is None else input[rows[lo:hi]]


def _mm(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """a @ b_t.T with FP32 operands and accumulation (as `reference_linear._mm`)."""
    return a.float() @ b_t.float().t()


def _checked_groups(input: torch.Tensor, offsets: torch.Tensor, weight: Sequence[torch.Tensor], fmt: WeightFormat,
                    lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, rows: torch.Tensor | None
                    ) -> tuple[int, int, int, int, bool, list[int]]:
    """(E, S grouped rows, N, K, has LoRA, group bounds) after every check of the arguments."""
    t, k = input.shape
    e_count = weight[0].shape[0]
    n = grouped_out_features(weight, fmt, k)
    has_lora = _check_lora(lora_a, lora_b, e_count, n, k)
    s_rows = check_rows(rows, t)
    s = t if s_rows is None else s_rows
    bounds = check_offsets(offsets, e_count, s, "T" if rows is None else "S = len(rows)")
    return e_count, s, n, k, has_lora, bounds


def grouped_lora_linear_ref(
    input: torch.Tensor,
    offsets: torch.Tensor,
    weight: Sequence[torch.Tensor],
    weight_format: str | WeightFormat,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    lora_scale: float,
    forward: str | Compute = "bf16",
    *,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (output (S, N) in the input dtype, lora_hidden (S, r), saved for the backward).

    Per group e: `output = bf16(Q(x) @ Q(W_e)^T + s * bf16(x @ A_e^T) @ B_e^T)`, FP32 products
    and accumulation, as `lora_linear_ref` on that group. S = T, or with `rows` S = len(rows) and
    x = `input[rows]` (gathered one group at a time here).
    """
    fmt, fwd = _weight_format(weight_format), _grouped_compute(forward, "forward")
    e_count, t, n, k, has_lora, bounds = _checked_groups(input, offsets, weight, fmt, lora_a, lora_b, rows)
    dtype = input.dtype
    r = lora_a.shape[1] if has_lora else 0
    out = torch.empty((t, n), dtype=dtype, device=input.device)
    hidden = torch.empty((t, r), dtype=dtype, device=input.device)
    for e in range(e_count):
        lo, hi = bounds[e], bounds[e + 1]
        if lo == hi:
            continue
        x = _group_rows(input, rows, lo, hi)
        acc = forward_base(x, expert_weight(weight, e), fmt, n, fwd)
        if has_lora:
            h = _mm(x, lora_a[e].to(dtype)).to(dtype)
            acc = acc + lora_scale * _mm(h, lora_b[e].to(dtype))
            hidden[lo:hi] = h
        out[lo:hi] = acc.to(dtype)
    return out, hidden


def grouped_lora_linear_backward_ref(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    offsets: torch.Tensor,
    weight: Sequence[torch.Tensor],
    weight_format: str | WeightFormat,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    lora_hidden: torch.Tensor | None,
    lora_scale: float,
    grad_input: str | Compute = "bf16",
    *,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """-> (grad_input (S, K), grad_lora_a (E, r, K), grad_lora_b (E, N, r)); no base-weight grad.

    Per group e, with `t = bf16(g @ B_e)`: `grad_lora_b[e] = s * g^T @ hidden`, `grad_lora_a[e] =
    s * t^T @ x` (FP32, then the factors' dtype), `grad_input = bf16(Q(g) @ Q(W_e) + s * t @ A_e)`.
    An expert that got no token gets zero LoRA gradients. With `rows`, x = `input[rows]` and
    grad_input stays per grouped row, (S, K): the caller sums it into the tokens (`index_add_`).
    """
    fmt, dgrad = _weight_format(weight_format), _grouped_compute(grad_input, "grad_input")
    e_count, t, n, k, has_lora, bounds = _checked_groups(input, offsets, weight, fmt, lora_a, lora_b, rows)
    dtype = input.dtype
    dx = torch.empty((t, k), dtype=dtype, device=input.device)
    grad_a = torch.zeros_like(lora_a) if has_lora else None
    grad_b = torch.zeros_like(lora_b) if has_lora else None
    for e in range(e_count):
        lo, hi = bounds[e], bounds[e + 1]
        if lo == hi:
            continue
        g, x = grad_output[lo:hi].to(dtype), _group_rows(input, rows, lo, hi)
        acc = dgrad_base(g, expert_weight(weight, e), fmt, k, dgrad)
        if has_lora:
            a, b = lora_a[e].to(dtype), lora_b[e].to(dtype)
            h = _mm(x, a).to(dtype) if lora_hidden is None else lora_hidden[lo:hi].to(dtype)
            tg = (g.float() @ b.float()).to(dtype)
            grad_b[e] = (lora_scale * (g.float().t() @ h.float())).to(lora_b.dtype)
            grad_a[e] = (lora_scale * (tg.float().t() @ x.float())).to(lora_a.dtype)
            acc = acc + lora_scale * (tg.float() @ a.float())
        dx[lo:hi] = acc.to(dtype)
    return dx, grad_a, grad_b
