"""The LoRA factors in the compute dtype, and the persistent kernel's U^T, made by one launch.

The optimizer keeps FP32 masters; every LoRA linear's forward reads `lora_a` (r, K) and `lora_b` (N, r) in the
input's dtype, and on the persistent route (kernels/persistent.py) U^T = (lora_scale * lora_b)^T as an (r, N)
row-major TMA operand. Those were three ATen kernels of a few hundred KB each (two `.to()` and
`lora_linear.lora_up_rows`), each costing about a launch: 1,152 `bfloat16_copy` and 576 strided multiplies of
a Qwen3-8B bf16 step on the H200 (bench/results/profile_8b_h200.md). Here one grid covers both factors: its
first programs cast [BLOCK_R, BLOCK_C] tiles of A, the rest [BLOCK_C, BLOCK_R] tiles of B, each of which also
writes its U^T tile transposed.

Bits (tests/test_lora_factors.py, torch.equal): the casts round to nearest even as `Tensor.to` does; U^T is
`float(b_cast) * lora_scale` in FP32 (the scale read as FP32) rounded once, as ATen multiplies a bf16 tensor
by a Python scalar in `lora_up_rows`. The plain-torch twin is those three calls.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from surogate.kernels.bits import round_bf16

# Elements of one program's tile: 16 KB of FP32 read, a few hundred programs at the 8B shapes.
_TILE_ELEMENTS = 4096


def _factors_metadata(grid, kernel, args):
    """Name, shapes and bytes moved for profilers (STYLE.md 3): each factor read once and written once in
    the compute dtype, U^T written once more."""
    r, k, n = args["R"], args["K"], args["N"]
    read = r * k * args["a_ptr"].element_size() + n * r * args["b_ptr"].element_size()
    written = (r * k + n * r * (2 if args["WRITE_UT"] else 1)) * args["a_out_ptr"].element_size()
    return {"name": f"{kernel.name} r={r} K={k} N={n}", "bytes": read + written}


@triton.jit
def _rounded(v, dtype: tl.constexpr):
    """`v` in `dtype`, rounded to nearest even as torch's cast; bf16 by `round_bf16`, whose bits the
    interpreter keeps (its own fp32 -> bf16 cast truncates)."""
    if dtype == tl.bfloat16:
        return round_bf16(v.to(tl.float32)).to(dtype)
    else:
        return v.to(dtype)


@triton.jit(launch_metadata=_factors_metadata)
def _lora_factors_kernel(
    a_ptr, b_ptr, a_out_ptr, b_out_ptr, ut_ptr,
    R, K, N, stride_a0, stride_a1, stride_b0, stride_b1, up_t_scale,
    WRITE_UT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Programs [0, cdiv(K, BLOCK_C)) cast A's columns, the next cdiv(N, BLOCK_C) B's rows (and write U^T).

    Outputs are contiguous: a_out (R, K), b_out (N, R), ut (R, N). U^T is scaled from the rounded b_out,
    not from the master, as `lora_up_rows(lora_b.to(dtype), lora_scale)` does.
    """
    pid = tl.program_id(0)
    a_programs = tl.cdiv(K, BLOCK_C)
    ranks = tl.arange(0, BLOCK_R)
    # The branches name their values apart: a value both assign must have one type, and the tiles differ.
    if pid < a_programs:
        cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
        a_mask = (ranks < R)[:, None] & (cols < K)[None, :]
        a = tl.load(a_ptr + ranks[:, None] * stride_a0 + cols.to(tl.int64)[None, :] * stride_a1, mask=a_mask)
        tl.store(a_out_ptr + ranks[:, None] * K + cols[None, :], _rounded(a, a_out_ptr.dtype.element_ty),
                 mask=a_mask)
    else:
        rows = (pid - a_programs) * BLOCK_C + tl.arange(0, BLOCK_C)
        b_mask = (rows < N)[:, None] & (ranks < R)[None, :]
        b = tl.load(b_ptr + rows.to(tl.int64)[:, None] * stride_b0 + ranks[None, :] * stride_b1, mask=b_mask)
        b = _rounded(b, b_out_ptr.dtype.element_ty)
        tl.store(b_out_ptr + rows.to(tl.int64)[:, None] * R + ranks[None, :], b, mask=b_mask)
        if WRITE_UT:
            ut = _rounded(b.to(tl.float32) * up_t_scale, ut_ptr.dtype.element_ty)
            tl.store(ut_ptr + ranks[:, None] * N + rows[None, :], tl.trans(ut), mask=tl.trans(b_mask))


def get_lora_factors_configs(rank: int) -> dict:
    """The tile of a LoRA `rank`: all its ranks (padded to a power of two) by `_TILE_ELEMENTS / BLOCK_R`
    columns, 4 warps, on every arch: the kernel moves a few MB at most and is bound by its launch."""
    block_r = triton.next_power_of_2(rank)
    return {"BLOCK_R": block_r, "BLOCK_C": max(16, _TILE_ELEMENTS // block_r), "num_warps": 4}


def lora_factors(lora_a: torch.Tensor, lora_b: torch.Tensor, dtype: torch.dtype,
                 up_t_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(lora_a, lora_b) in `dtype`, contiguous, and with `up_t_scale` U^T (r, N) row-major with that scale
    folded in (`lora_up_rows(lora_b.to(dtype), up_t_scale)`: the persistent kernel's LoRA operand), else None.

    `lora_a` (r, K) and `lora_b` (N, r) may have any strides and floating dtype (FP32 masters, or bf16)."""
    (r, k), n = lora_a.shape, lora_b.shape[0]
    if lora_b.shape[1] != r:
        raise ValueError(f"lora_a {tuple(lora_a.shape)} and lora_b {tuple(lora_b.shape)} have different ranks")
    a_out = torch.empty((r, k), dtype=dtype, device=lora_a.device)
    b_out = torch.empty((n, r), dtype=dtype, device=lora_b.device)
    ut = None if up_t_scale is None else torch.empty((r, n), dtype=dtype, device=lora_b.device)
    if r == 0 or k + n == 0:
        return a_out, b_out, ut
    cfg = get_lora_factors_configs(r)
    grid = (triton.cdiv(k, cfg["BLOCK_C"]) + triton.cdiv(n, cfg["BLOCK_C"]),)
    _lora_factors_kernel[grid](
        lora_a, lora_b, a_out, b_out, b_out if ut is None else ut,
        r, k, n, lora_a.stride(0), lora_a.stride(1), lora_b.stride(0), lora_b.stride(1),
        1.0 if up_t_scale is None else float(up_t_scale), WRITE_UT=ut is not None, **cfg)
    return a_out, b_out, ut
