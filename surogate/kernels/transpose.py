"""A K-major copy of a 1-byte (FP8) weight for the block-FP8 dgrad.

Hopper's FP8 wgmma reads both operands K-major, and dgrad reduces over the weight's rows, so
`grad_input_fp8_block` needs W^T in memory. qfp8 keeps no cached transpose (that would double
the weight bytes it exists to save), so one is made per call. `w.t().contiguous()` on a 1-byte
dtype runs torch's generic strided copy: 0.72 ms for the 8B gate/up weight on an H100, 70% of
the GEMM it feeds (bench/results/gemm_configs.md). Tiles here are read and written along rows,
with the transpose through shared memory (`tl.trans`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _transpose_bytes_kernel(x_ptr, y_ptr, R, C, stride_xr, stride_yr, TILE_R: tl.constexpr, TILE_C: tl.constexpr):
    """y[c, r] = x[r, c] for one TILE_R x TILE_C tile of bytes."""
    rows = tl.program_id(0) * TILE_R + tl.arange(0, TILE_R)
    cols = tl.program_id(1) * TILE_C + tl.arange(0, TILE_C)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    tile = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xr + cols[None, :], mask=mask, other=0)
    out = y_ptr + cols.to(tl.int64)[:, None] * stride_yr + rows[None, :]
    tl.store(out, tl.trans(tile), mask=tl.trans(mask))


def get_transpose_bytes_configs(arch: str | None = None) -> dict:
    """128 x 128 bytes a program (16 KB through shared memory), 4 warps."""
    return dict(TILE_R=128, TILE_C=128, num_warps=4)


def transpose_fp8(w: torch.Tensor) -> torch.Tensor:
    """(R, C) 1-byte tensor -> its (C, R) contiguous transpose, same dtype."""
    if w.dim() != 2 or w.element_size() != 1:
        raise ValueError(f"transpose_fp8 takes a 2-D tensor of 1-byte elements (FP8 / uint8), got "
                         f"{tuple(w.shape)} {w.dtype}")
    if w.stride(1) != 1:
        w = w.contiguous()
    R, C = w.shape
    out = torch.empty((C, R), dtype=w.dtype, device=w.device)
    if R and C:
        cfg = get_transpose_bytes_configs()
        grid = (triton.cdiv(R, cfg["TILE_R"]), triton.cdiv(C, cfg["TILE_C"]))
        _transpose_bytes_kernel[grid](w.view(torch.uint8), out.view(torch.uint8), R, C, w.stride(0), out.stride(0),
                                      **cfg)
    return out
