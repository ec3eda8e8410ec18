"""LoRA A's gradient read from the FP8 copy of the input (`save_fp8_inputs`, passes/save_fp8.py).

    grad_lora_a = s * gh^T @ x,   x = dequantize(data, scale)   (r, K)

`gh = g @ B` is (M, r), the FP8 copy `data` (M, K) E4M3 with FP32 scales per row (fp8: `(M, 1)`) or per 1 x 128
block (qfp8: `(M, ceil(K/128))`, any strides). Each element is dequantized as `reference.dequantize_input_q` does
(FP32 multiply, one round to bf16) while the tile is in registers, so the bf16 input is never written: the kernel
reads 1 byte an element where the rebuild-then-cuBLAS path writes 2 and reads them back (bench/NOTES.md run 139).

A skinny GEMM: the output is r x K (r = 8..64) and the reduction runs over the M rows. A program owns one
128-wide column tile (one scale column of a 1 x 128 block) and one split of the rows, and computes the tile
transposed, `x^T (128, rows) @ gh (rows, r)`: the 128 columns are the MMA's M side, so Hopper runs it as a
wgmma (r as M would be under its 64-row minimum: mma.sync). The splits' FP32 partials are summed by one torch
add over a (splits, r, K) buffer, so the result does not depend on scheduling (no atomics). FP32 accumulation, as
cuBLAS's bf16 GEMM; the sums run in another order, so the two agree to FP32 rounding, not bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from surogate.kernels.bits import round_bf16
from surogate.kernels.configs import block_r, interpreting
from surogate.recipes.formats import FP8_ACTIVATION_BLOCK

BLOCK_K = FP8_ACTIVATION_BLOCK[1]  # one scale column of a 1 x 128 block per column tile


@dataclass(frozen=True)
class Config:
    """Launch parameters: rows a loop step (`block_m`), warps, pipeline stages, and the programs the grid aims
    for (splits = ceil(programs / column tiles)). The default was the steadiest of bench/grad_lora_fp8.py --sweep
    (run 142, H200: 24 configs at Qwen3-8B's shapes, 1.18x the best per shape on average; 31-152 us, 0.5-1.3 TB/s,
    where cuBLAS reads the bf16 input, twice the bytes, in 20-107 us)."""

    block_m: int = 64
    num_warps: int = 4
    num_stages: int = 2
    programs: int = 264


DEFAULT = Config()


@triton.jit
def _grad_lora_a_fp8_kernel(
    gh_ptr, x_ptr, s_ptr, out_ptr, M, K, R, rows_per_split,
    stride_gm, stride_gr, stride_xm, stride_xk, stride_sm, stride_sg, stride_os, stride_or, stride_ok,
    BLOCK_SCALES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One program: the partial of column tile `pid_k` over the rows of split `pid_s`, as (BLOCK_K, BLOCK_R)."""
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    k_ok = offs_k < K
    r_ok = offs_r < R
    group = pid_k if BLOCK_SCALES else 0  # the tile's scale column: its 1 x 128 block, or the row's one scale
    start = pid_s * rows_per_split
    end = tl.minimum(start + rows_per_split, M)
    acc = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < end
        gh = tl.load(gh_ptr + offs_m[:, None] * stride_gm + offs_r[None, :] * stride_gr,
                     mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        data = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                       mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        scale = tl.load(s_ptr + offs_m * stride_sm + group * stride_sg, mask=m_ok, other=0.0)
        x = data.to(tl.float32) * scale[:, None]  # as dequantize_input_q: one FP32 multiply, one round to bf16
        if UPCAST:  # the interpreter's bf16 tl.dot is wrong and its bf16 cast truncates: round, dot in fp32
            acc += tl.dot(tl.trans(round_bf16(x)), gh.to(tl.float32))
        else:
            acc = tl.dot(tl.trans(x.to(tl.bfloat16)), gh, acc)
    tl.store(out_ptr + pid_s * stride_os + offs_k[:, None] * stride_ok + offs_r[None, :] * stride_or, acc,
             mask=k_ok[:, None] & r_ok[None, :])


def splits_for(m: int, k: int, config: Config = DEFAULT) -> int:
    """Row splits: enough programs for the GPU, each split a whole number of `config.block_m` rows."""
    tiles = triton.cdiv(k, BLOCK_K)
    return max(1, min(triton.cdiv(config.programs, tiles), triton.cdiv(m, config.block_m)))


def grad_lora_a_fp8(gh: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, lora_scale: float,
                    dtype: torch.dtype, config: Config = DEFAULT) -> torch.Tensor:
    """`lora_scale * gh^T @ dequantize(data, scale)` in `dtype` (the master's): gh (M, r) bf16, data (M, K) E4M3,
    scale (M, 1) or (M, ceil(K/128)) FP32. `config`: the launch (`Config`); under the interpreter 16-row steps."""
    m, k = data.shape
    r = gh.shape[1]
    if gh.shape[0] != m or scale.shape[0] != m or scale.shape[1] not in (1, triton.cdiv(k, BLOCK_K)):
        raise ValueError(f"grad_lora_a_fp8: gh {tuple(gh.shape)}, data {tuple(data.shape)}, scale "
                         f"{tuple(scale.shape)} do not fit (want (M, r), (M, K), (M, 1) or (M, ceil(K/128)))")
    block_m = 16 if interpreting() else config.block_m
    splits = splits_for(m, k, config)
    rows = triton.cdiv(triton.cdiv(m, splits), block_m) * block_m
    splits = triton.cdiv(m, rows) if m else 1
    partial = torch.empty((splits, r, k), dtype=torch.float32, device=data.device)
    if m == 0:
        partial.zero_()
    else:
        grid = (triton.cdiv(k, BLOCK_K), splits)
        _grad_lora_a_fp8_kernel[grid](
            gh, data, scale, partial, m, k, r, rows,
            gh.stride(0), gh.stride(1), data.stride(0), data.stride(1), scale.stride(0), scale.stride(1),
            partial.stride(0), partial.stride(1), partial.stride(2),
            BLOCK_SCALES=scale.shape[1] > 1, BLOCK_M=block_m, BLOCK_K=BLOCK_K, BLOCK_R=block_r(r),
            UPCAST=interpreting(), num_warps=config.num_warps, num_stages=config.num_stages)
    total = partial[0] if splits == 1 else partial.sum(0)
    return (total * lora_scale).to(dtype)
