"""The LoRA term (and the bias) added into a cuBLAS GEMM's output in place: `out += bias + s * H @ U^T`.

Where cuBLAS runs the base GEMM (kernels/cublas.py: qfp8's block-scaled GEMMs on sm_90, the routes of its
rules), the LoRA term cannot ride in that GEMM's epilogue, so it is one more pass over the output. cuBLAS's own
`addmm_` (beta = 1, a reduction of only r) streams that pass at 1.7-2.6 TB/s on the H200: 53.6 ms of a
Qwen3-8B qfp8 step (bench/results/profile_8b_h200_b83e5d0.md, its `badd` kernels). Here one program reads an
output tile once, adds the bias and the rank-r product of its rows of H (M, r) and U (N, r), summed in FP32
(one MMA step: r <= 128 fits one K block), and writes the tile back rounded once to the output's dtype, as
`addmm_` does.

H and U are read in the output's dtype (the factors the forward cast, the dgrad's gh), so the products are
exact in FP32 and only the order of the r-term sum can differ from cuBLAS's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from surogate.compat import triton_interpreting
from surogate.kernels.bits import round_bf16

MAX_RANK = 128  # one K block of the MMA; a larger rank takes the addmm_ path


@dataclass(frozen=True)
class Config:
    """Launch settings: the output tile and warps. Small tiles (8 KiB of bf16), many programs in flight: run 144's
    sweep (bench/lora_add.py --sweep) found 32 x 128 with 4 warps the fastest at 7 of Qwen3-8B's 8 shapes, 2.6-3.7
    TB/s, 1.1-1.2x the 64 x 256 tile's rate."""

    block_m: int = 32
    block_n: int = 128
    num_warps: int = 4


DEFAULT = Config()


def _metadata(grid, kernel, args):
    """Name and bytes moved for profilers: the output read and written, H and U read."""
    m, n, r = args["M"], args["N"], args["R"]
    size = args["out_ptr"].element_size()
    return {"name": f"{kernel.name} M={m} N={n} r={r}", "bytes": (2 * m * n + (m + n) * r) * size}


@triton.jit(launch_metadata=_metadata)
def _lora_add_kernel(
    out_ptr, h_ptr, u_ptr, bias_ptr, M, N, R, scale,
    stride_om, stride_hm, stride_hr, stride_un, stride_ur,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Program (pid_m, pid_n): out[rows, cols] = round(out + bias[cols] + scale * H[rows] @ U[cols]^T), in FP32."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in, col_in = rows < M, cols < N
    mask = row_in[:, None] & col_in[None, :]
    ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    acc = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    if HAS_LORA:
        k = tl.arange(0, BLOCK_R)
        k_in = k < R
        h = tl.load(h_ptr + rows.to(tl.int64)[:, None] * stride_hm + k[None, :] * stride_hr,
                    mask=row_in[:, None] & k_in[None, :], other=0.0)
        u = tl.load(u_ptr + cols.to(tl.int64)[None, :] * stride_un + k[:, None] * stride_ur,
                    mask=k_in[:, None] & col_in[None, :], other=0.0)
        if INTERPRET:  # the interpreter's bf16 tl.dot is wrong: the same exact products in FP32
            acc += scale * tl.dot(h.to(tl.float32), u.to(tl.float32))
        else:
            acc += scale * tl.dot(h, u)
    if INTERPRET:  # the interpreter's cast truncates; round to nearest even as the GPU's cast does
        acc = round_bf16(acc)
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def block_r(rank: int) -> int:
    """The MMA's K block for rank `rank`: a power of two, at least 16 (the MMA's smallest K)."""
    return max(16, triton.next_power_of_2(rank))


def takes(out: torch.Tensor, hidden: torch.Tensor | None) -> bool:
    """Whether the kernel runs this add: a bf16 output, row-major, a rank up to `MAX_RANK` (fp16 and FP32
    outputs, other layouts and larger ranks keep `addmm_`)."""
    return (out.dtype == torch.bfloat16 and out.dim() == 2 and out.stride(1) == 1
            and (hidden is None or (hidden.dtype == out.dtype and hidden.shape[-1] <= MAX_RANK)))


def lora_add_(out: torch.Tensor, hidden: torch.Tensor | None, up: torch.Tensor | None, bias: torch.Tensor | None,
              lora_scale: float, config: Config = DEFAULT) -> torch.Tensor:
    """`out (M, N) += bias + lora_scale * hidden (M, r) @ up (N, r)^T` in place (either term may be None); returns
    `out`. The caller checks `takes` first; `up` may be a strided view (the dgrad's lora_a^T)."""
    if not takes(out, hidden):
        raise ValueError(f"lora_add_ takes a row-major bf16 (M, N) output and a rank up to {MAX_RANK} in its dtype, "
                         f"got {tuple(out.shape)} {out.dtype} strides {out.stride()}; use addmm_ for the others")
    m, n = out.shape
    has_lora = hidden is not None
    r = hidden.shape[-1] if has_lora else 1
    if has_lora and (up.shape != (n, r) or up.dtype != out.dtype or hidden.shape[0] != m):
        raise ValueError(f"lora_add_: hidden {tuple(hidden.shape)} / up {tuple(up.shape)} {up.dtype} do not fit "
                         f"an output {tuple(out.shape)} {out.dtype}; want (M, r) and (N, r) in the output's dtype")
    if not m or not n or (not has_lora and bias is None):
        return out
    h = hidden if has_lora else out
    u = up if has_lora else out
    grid = (triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n))
    _lora_add_kernel[grid](
        out, h, u, bias if bias is not None else out, m, n, r, float(lora_scale),
        out.stride(0), h.stride(0), h.stride(1), u.stride(0), u.stride(1),
        HAS_LORA=has_lora, HAS_BIAS=bias is not None, INTERPRET=triton_interpreting(),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_R=block_r(r), num_warps=config.num_warps)
    return out
