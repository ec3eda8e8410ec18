"""The LoRA term as more steps of the base GEMM's reduction: one cuBLAS GEMM for the whole op (issue 19).

    y  = x W^T + s (x A^T) B^T = [x | h] [W | sB]^T      with h  = x A^T (M, r)
    dx = g W   + s (g B) A     = [g | gh] [W ; sA]       with gh = g B   (M, r)

cuBLAS runs the base GEMM faster than our persistent Triton kernel on Hopper (no warp specialization on
Triton 3.6), but has no LoRA epilogue: as a second GEMM into the output (`addmm_`) the LoRA term costs a
read and a write of the whole output. Widened by r, the reduction carries the LoRA term itself: r / K more
MMA work (0.4% at K = 4096, r = 16), no pass over the output.

That needs the operands stored wide. The frozen weight is stored once with `spare` more columns and rows
(`reserve`: [W | sB] is the first N rows, [W ; sA] the first K columns of the same buffer). The activation
(the input, or the gradient in the dgrad) arrives in a buffer with spare columns: in a compiled model its
producer writes it there (`cat([x, zeros])`, which Inductor builds by computing x straight into its slice:
passes/producer.py for the input, ops/lora_linear.py's backward for the gradient), handed to the op as
`input_q` / `grad_output_q`. The op writes h (gh) into the activation's spare columns and sB (sA) into the
weight's, every call: the LoRA factors change each step. Those columns belong to no other tensor.
"""

from __future__ import annotations

import torch

# Spare columns come in steps of 8: bf16 row strides stay 16-byte aligned (cuBLAS, TMA).
SPARE_STEP = 8

# Buffers made by `reserve`, by their storage's address: (their size in bytes, rows of the weight view, spare).
# Checked against the storage a weight lives in, which a view keeps alive (the buffer's Python object may be
# gone: `param.data = reserve(...)` keeps only the storage). A freed buffer's address taken by another tensor
# matches only if that tensor is again an (N, K) view at offset 0 with row stride K + spare of a storage of
# exactly this size: another `reserve` of the same shape, which overwrites the entry with the same values.
_RESERVED: dict[int, tuple[int, int, int]] = {}


def spare_for(rank: int) -> int:
    """The spare columns (and rows) a LoRA term of `rank` needs: `rank` rounded up to SPARE_STEP."""
    return -(-rank // SPARE_STEP) * SPARE_STEP


def reserve(weight: torch.Tensor, spare: int) -> torch.Tensor:
    """`weight` (N, K) copied into a zeroed (N + spare, K + spare) buffer; returns the (N, K) view of it.

    The caller keeps the view (a module's weight); the buffer lives as long as it does. `reserved_spare`
    recognizes the view (only the whole view: a slice of its rows has other rows after it, not spare)."""
    if weight.dim() != 2 or spare <= 0 or spare % SPARE_STEP:
        raise ValueError(f"reserve takes a 2-D weight and a positive multiple of {SPARE_STEP} spare columns; got "
                         f"shape {tuple(weight.shape)}, spare {spare}")
    n, k = weight.shape
    buffer = weight.new_zeros((n + spare, k + spare))
    buffer[:n, :k] = weight
    storage = buffer.untyped_storage()
    _RESERVED[storage.data_ptr()] = (storage.nbytes(), n, spare)
    return buffer[:n, :k]


def reserved_spare(weight: torch.Tensor) -> int:
    """The spare columns and rows `reserve` left after `weight` (N, K), or 0 when `weight` is not such a view
    (another tensor, a slice of one, a copy after `.to()` / `.contiguous()`)."""
    if weight.dim() != 2 or weight.storage_offset() != 0 or weight.stride(1) != 1:
        return 0
    storage = weight.untyped_storage()
    entry = _RESERVED.get(storage.data_ptr())
    if entry is None:
        return 0
    nbytes, n, spare = entry
    k = weight.shape[1]
    if storage.nbytes() != nbytes or weight.shape[0] != n or weight.stride(0) != k + spare \
            or nbytes != (n + spare) * (k + spare) * weight.element_size():
        return 0
    return spare


def wide_scratch(n: int, k: int, spare: int, device: torch.device, dtype: torch.dtype = torch.bfloat16):
    """An (N, K) view of a fresh (N + spare, K + spare) buffer: a dequantized weight's scratch, stored wide."""
    return torch.empty((n + spare, k + spare), device=device, dtype=dtype)[:n, :k]


def activation_spare(wide: torch.Tensor | None, operand: torch.Tensor) -> int:
    """The spare columns of `wide`, an activation stored wide for `operand` (..., D): (..., D + spare) with
    `operand`'s leading dims, or 0 (None, or not such a tensor)."""
    if wide is None or wide.dtype != operand.dtype or wide.device != operand.device:
        return 0
    d = operand.shape[-1]
    if wide.shape[:-1] != operand.shape[:-1] or wide.shape[-1] <= d:
        return 0
    return wide.shape[-1] - d


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    if t2.stride(-1) != 1:
        raise ValueError("a wide activation must have unit stride along its columns")
    return t2


def _weight_wide(weight: torch.Tensor, cols: int, rows: int) -> torch.Tensor:
    """`weight` (N, K) seen with `cols` more columns and `rows` more rows of its buffer."""
    n, k = weight.shape
    return weight.as_strided((n + rows, k + cols), (weight.stride(0), 1))


def output(x_wide: torch.Tensor, k: int, weight: torch.Tensor, hidden: torch.Tensor, up: torch.Tensor,
           bias: torch.Tensor | None, lora_scale: float) -> torch.Tensor:
    """`x W^T + lora_scale * hidden @ up^T (+ bias)` as one GEMM: x = x_wide[:, :k] (M, K), weight (N, K)
    with spare columns (`reserved_spare` / `wide_scratch`), hidden (M, r), up = lora_b (N, r). Writes
    hidden into x_wide's spare columns and lora_scale * up into the weight's."""
    xw = _rows(x_wide)
    r = hidden.shape[-1]
    n = weight.shape[0]
    xw[:, k:k + r].copy_(hidden.reshape(-1, r))
    w = _weight_wide(weight, r, 0)
    torch.mul(up, lora_scale, out=w[:, k:k + r])
    a, b = xw[:, :k + r], w[:, :k + r].t()
    out = a @ b if bias is None else torch.addmm(bias.to(a.dtype), a, b)
    assert out.shape[1] == n
    return out


def grad_input(g_wide: torch.Tensor, n: int, weight: torch.Tensor, gh: torch.Tensor, lora_a: torch.Tensor,
               lora_scale: float) -> torch.Tensor:
    """`g W + lora_scale * gh @ lora_a` as one GEMM: g = g_wide[:, :n] (M, N), weight (N, K) with spare rows,
    gh = g @ lora_b (M, r), lora_a (r, K). Writes gh into g_wide's spare columns and lora_scale * lora_a into
    the weight's spare rows."""
    gw = _rows(g_wide)
    r = gh.shape[-1]
    k = weight.shape[1]
    gw[:, n:n + r].copy_(gh)
    w = _weight_wide(weight, 0, r)
    torch.mul(lora_a, lora_scale, out=w[n:n + r])
    return gw[:, :n + r] @ w[:n + r, :k]
