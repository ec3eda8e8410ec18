"""Triton dequantizers to bf16 (or fp32): NF4 with double quantization, NVFP4 and block FP8.

Bit-exact with `reference.py` (and, for NF4, with bitsandbytes): every product is one
correctly rounded fp32 multiply followed by one round to nearest even into bf16, done with
integer arithmetic (`bits.round_bf16`) because the CPU interpreter's bf16 cast truncates.
The NF4 absmax is `code[q] * scale + offset` as two roundings, like bitsandbytes; Triton
would contract that into one FMA, so the multiply goes through `_mul_rn` (PTX `mul.rn.f32`,
which ptxas never fuses).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from surogate.compat import triton_interpreting
from surogate.kernels.bits import bytes_metadata, e2m1_value, fp8_value, pack_bf16x2, round_bf16
from surogate.kernels.qtensor import nf4_offset_per_group
from surogate.recipes.formats import FP8_WEIGHT_BLOCK, NF4_BLOCK, NF4_DOUBLE_QUANT_BLOCK, NF4_VALUES, NVFP4_BLOCK

_OUT_DTYPES = {torch.bfloat16: True, torch.float32: False}  # dtype -> ROUND_BF16 constexpr


def _out_flag(dtype: torch.dtype) -> bool:
    if dtype not in _OUT_DTYPES:
        raise ValueError(f"dequantize writes bfloat16 or float32, got {dtype}")
    return _OUT_DTYPES[dtype]


@triton.jit
def _mul_rn(a, b, INTERPRET: tl.constexpr):
    """a * b rounded once, never contracted into a following add (an FMA would round once for both)."""
    if INTERPRET:
        return a * b
    else:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)


@triton.jit
def _store_out(ptr, v, mask, ROUND_BF16: tl.constexpr):
    if ROUND_BF16:
        tl.store(ptr, round_bf16(v).to(tl.bfloat16), mask=mask)
    else:
        tl.store(ptr, v, mask=mask)


# ----------------------------------------------------------------------------------------------
# NF4 (bitsandbytes layout): flattened, blocks of 64, element 2i in the high nibble.
# ----------------------------------------------------------------------------------------------

@triton.jit(launch_metadata=bytes_metadata("dequantize_nf4", 2.6))
def _dequantize_nf4_kernel(
    packed_ptr, absmax_ptr, absmax_q_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr,
    nf4_ptr, out_ptr, n, n_bytes,
    BLOCKSIZE: tl.constexpr, DQ_BLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    ROUND_BF16: tl.constexpr, INTERPRET: tl.constexpr, BLOCKS: tl.constexpr,
):
    """One program: BLOCKS quantization blocks, as a (BLOCKS, BLOCKSIZE / 2) tile of packed bytes. Each block's
    absmax is loaded once (when DOUBLE_QUANT, absmax = code[absmax_q] * absmax_scale[block // DQ_BLOCK] +
    absmax_offset[block // DQ_BLOCK]), not once per byte: per-byte loads of it made the kernel issue-bound at ~40% of HBM bandwidth.
    bf16 out (ROUND_BF16): `out_ptr` is the output as int32 words, one per packed byte, its two bf16 values
    packed in registers (element 2i in the low half; one `cvt.rn.bf16x2.f32` on the GPU), so the tile is stored as it was loaded, with no
    interleave through shared memory; fp32 out: the values interleaved (join + reshape). The tile's mask is on
    bytes (`n_bytes` = ceil(n / 2)), whose divisibility Triton sees, so loads and stores are vectorized."""
    HALF: tl.constexpr = BLOCKSIZE // 2
    blk = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    byte_idx = blk[:, None] * HALF + tl.arange(0, HALF)[None, :]
    bmask = byte_idx < n_bytes
    byte = tl.load(packed_ptr + byte_idx, mask=bmask, other=0).to(tl.int32)
    # The 16 values gathered from shared memory (`tl.gather`: one 32-bit address a value), not from global
    # memory (a 64-bit address, two instructions, a value).
    table = tl.load(nf4_ptr + tl.arange(0, 16))
    hi_val = tl.reshape(tl.gather(table, tl.reshape(byte >> 4, (BLOCKS * HALF,)), 0), (BLOCKS, HALF))
    lo_val = tl.reshape(tl.gather(table, tl.reshape(byte & 15, (BLOCKS * HALF,)), 0), (BLOCKS, HALF))
    kmask = blk * BLOCKSIZE < n
    if DOUBLE_QUANT:
        q = tl.load(absmax_q_ptr + blk, mask=kmask, other=0).to(tl.int32)
        code = tl.load(absmax_code_ptr + q)
        s = tl.load(absmax_scale_ptr + blk // DQ_BLOCK, mask=kmask, other=0.0)
        absmax = _mul_rn(code, s, INTERPRET) + tl.load(absmax_offset_ptr + blk // DQ_BLOCK, mask=kmask, other=0.0)
    else:
        absmax = tl.load(absmax_ptr + blk, mask=kmask, other=0.0)
    hi = hi_val * absmax[:, None]
    lo = lo_val * absmax[:, None]
    if ROUND_BF16:
        tl.store(out_ptr + byte_idx, pack_bf16x2(hi, lo, INTERPRET), mask=bmask)
    else:
        vals = tl.reshape(tl.join(hi, lo), (BLOCKS, BLOCKSIZE))  # element 2i, then 2i+1
        out_idx = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
        tl.store(out_ptr + out_idx, vals, mask=out_idx < n)


def get_dequantize_nf4_configs(arch: str | None = None, blocksize: int = NF4_BLOCK) -> dict:
    """Elementwise: 8K outputs per program (4 KB of packed input), 4 warps: the best of 1-8K x 4/8 warps on
    the H200 at 4096 x 12288 (3.0 TB/s, bench/NOTES.md run 83; 64 and 32 blocks within 2%)."""
    return dict(BLOCKS=max(1, 8192 // blocksize), num_warps=4)


_NF4_TABLES: dict[torch.device, torch.Tensor] = {}


def _nf4_table(device: torch.device) -> torch.Tensor:
    """The 16 NF4 values on `device`, made once (a host->device copy per call costs ~10 us)."""
    table = _NF4_TABLES.get(device)
    if table is None:
        table = _NF4_TABLES[device] = torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)
    return table


def dequantize_nf4(packed: torch.Tensor, absmax_q: torch.Tensor | None, absmax_scale: torch.Tensor | None,
                   absmax_offset: torch.Tensor | None, absmax_code: torch.Tensor | None, shape,
                   absmax: torch.Tensor | None = None, blocksize: int = NF4_BLOCK,
                   dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """NF4 -> `dtype` of `shape`, equal to bitsandbytes' `dequantize_4bit`.

    Double-quantized: give absmax_q, absmax_scale, absmax_offset, absmax_code (the `nf4` weight
    list order; the offset one per 256-code group as weight lists hold it, or bitsandbytes' scalar).
    Plain: give `absmax` (fp32, one per block) and None for the four.
    """
    shape = tuple(shape)
    n = 1
    for d in shape:
        n *= d
    if blocksize < 2 or blocksize & (blocksize - 1):
        raise ValueError(f"NF4 blocksize must be a power of two >= 2 (bitsandbytes uses 64), got {blocksize}")
    if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
        raise ValueError(f"packed must be uint8 with ceil({n}/2) elements for shape {shape}, "
                         f"got {packed.dtype} with {packed.numel()}")
    double = absmax is None
    if double and any(t is None for t in (absmax_q, absmax_scale, absmax_offset, absmax_code)):
        raise ValueError("give either absmax (plain NF4) or all of absmax_q, absmax_scale, absmax_offset, absmax_code")
    device = packed.device
    round_bf16 = _out_flag(dtype)
    if round_bf16:  # whole int32 words: one bf16 more when n is odd, not part of the result
        words = torch.empty(n + (n & 1), device=device, dtype=dtype)
        out, out_arg = words[:n].view(shape), words.view(torch.int32)
    else:
        out = out_arg = torch.empty(shape, device=device, dtype=dtype)
    if n == 0:
        return out
    dummy = _nf4_table(device)  # stands in for the pointers the chosen branch never reads
    cfg = get_dequantize_nf4_configs(None, blocksize)
    _dequantize_nf4_kernel[(triton.cdiv(triton.cdiv(n, blocksize), cfg["BLOCKS"]),)](
        packed.contiguous(), dummy if double else absmax.float().contiguous(),
        absmax_q.contiguous() if double else dummy, absmax_code.float().contiguous() if double else dummy,
        absmax_scale.float().contiguous() if double else dummy,
        nf4_offset_per_group(absmax_offset.float(), absmax_scale.numel()) if double else dummy,
        _nf4_table(device), out_arg, n, (n + 1) // 2,
        BLOCKSIZE=blocksize, DQ_BLOCK=NF4_DOUBLE_QUANT_BLOCK, DOUBLE_QUANT=double,
        ROUND_BF16=round_bf16, INTERPRET=triton_interpreting(), **cfg)
    return out


# ----------------------------------------------------------------------------------------------
# NVFP4: packed (M, Kp/2) low nibble first, E4M3 scale per 16, FP32 tensor scale.
# ----------------------------------------------------------------------------------------------

@triton.jit(launch_metadata=bytes_metadata("dequantize_nvfp4", 2.5625))
def _dequantize_nvfp4_kernel(
    packed_ptr, bscale_ptr, tscale_ptr, out_ptr, M, K, stride_pm, stride_bm, stride_om,
    ROUND_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program: BLOCK_M rows x BLOCK_K output columns; value = e2m1 * (block_scale * tensor_scale)."""
    NB: tl.constexpr = BLOCK_K // 16
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1) * BLOCK_K
    rmask = rows < M
    pcols = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    byte = tl.load(packed_ptr + rows.to(tl.int64)[:, None] * stride_pm + pcols[None, :],
                   mask=rmask[:, None] & (pcols < stride_pm)[None, :], other=0).to(tl.int32)
    codes = tl.reshape(tl.join(byte & 15, byte >> 4), (BLOCK_M, NB, 16))
    bcols = k0 // 16 + tl.arange(0, NB)
    bcode = tl.load(bscale_ptr + rows.to(tl.int64)[:, None] * stride_bm + bcols[None, :],
                    mask=rmask[:, None] & (bcols < stride_bm)[None, :], other=0).to(tl.int32)
    scale = fp8_value(bcode, 3, 7) * tl.load(tscale_ptr)
    mag = e2m1_value(codes & 7) * scale[:, :, None]
    # The sign goes in as a bit: on the GPU `where(neg, -mag, mag) * scale` gave +0 for code 8 (-0).
    val = (mag.to(tl.int32, bitcast=True) | ((codes & 8) << 28)).to(tl.float32, bitcast=True)
    val = tl.reshape(val, (BLOCK_M, BLOCK_K))
    cols = k0 + tl.arange(0, BLOCK_K)
    _store_out(out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :], val,
               rmask[:, None] & (cols < K)[None, :], ROUND_BF16)


def get_dequantize_nvfp4_configs(arch: str | None, K: int) -> dict:
    """16 x 256 output tiles (16 scale blocks a row), smaller for short rows."""
    return dict(BLOCK_M=16, BLOCK_K=min(256, max(16, triton.next_power_of_2(K))), num_warps=4)


def dequantize_nvfp4(packed: torch.Tensor, block_scale: torch.Tensor, tensor_scale: torch.Tensor, shape=None,
                     dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """NVFP4 (packed (..., Kp/2), block_scale (..., Kp/16), tensor_scale ()) -> `dtype` of `shape`
    (default (..., Kp)); `shape[-1]` may be the unpadded K."""
    kp = packed.shape[-1] * 2
    shape = tuple(shape) if shape is not None else (*packed.shape[:-1], kp)
    K = shape[-1]
    if packed.dtype != torch.uint8 or block_scale.shape[-1] * NVFP4_BLOCK != kp or not (kp - 16 < K <= kp):
        raise ValueError(f"NVFP4 layout mismatch: packed {tuple(packed.shape)} {packed.dtype}, "
                         f"block_scale {tuple(block_scale.shape)}, shape {shape}; expected uint8 (..., Kp/2), "
                         f"(..., Kp/16) with Kp = K rounded up to 16")
    p2 = packed.reshape(-1, kp // 2).contiguous()
    b2 = block_scale.reshape(-1, kp // NVFP4_BLOCK).contiguous().view(torch.uint8)
    M = p2.shape[0]
    out = torch.empty((M, K), device=packed.device, dtype=dtype)
    if M and K:
        cfg = get_dequantize_nvfp4_configs(None, K)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(K, cfg["BLOCK_K"]))
        _dequantize_nvfp4_kernel[grid](
            p2, b2, tensor_scale.float().reshape(1), out, M, K, p2.stride(0), b2.stride(0), out.stride(0),
            ROUND_BF16=_out_flag(dtype), **cfg)
    return out.view(shape)


# ----------------------------------------------------------------------------------------------
# Block FP8: data (M, K) e4m3/e5m2, FP32 scale per (bm x bk) block.
# ----------------------------------------------------------------------------------------------

@triton.jit(launch_metadata=bytes_metadata("dequantize_fp8_block", 3))
def _dequantize_fp8_block_kernel(
    q_ptr, scale_ptr, out_ptr, M, K, stride_qm, stride_sm, stride_om,
    BM: tl.constexpr, BK: tl.constexpr, TILE_M: tl.constexpr, TILE_K: tl.constexpr,
):
    rows = tl.program_id(0) * TILE_M + tl.arange(0, TILE_M)
    cols = tl.program_id(1) * TILE_K + tl.arange(0, TILE_K)
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    q = tl.load(q_ptr + rows.to(tl.int64)[:, None] * stride_qm + cols[None, :], mask=mask, other=0.0)
    s = tl.load(scale_ptr + (rows // BM).to(tl.int64)[:, None] * stride_sm + (cols // BK)[None, :],
                mask=mask, other=0.0)
    _store_out(out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :], q.to(tl.float32) * s, mask,
               True)


def get_dequantize_fp8_block_configs(arch: str | None = None) -> dict:
    """32 x 128 tiles: one scale column per tile."""
    return dict(TILE_M=32, TILE_K=128, num_warps=4)


def dequantize_fp8_block(data: torch.Tensor, scale: torch.Tensor,
                         block: tuple[int, int] = FP8_WEIGHT_BLOCK) -> torch.Tensor:
    """Block FP8 (data (M, K), scale (ceil(M/bm), ceil(K/bk))) -> bf16 (M, K), value = data * scale."""
    bm, bk = block
    d2 = data.reshape(-1, data.shape[-1]).contiguous()
    s2 = scale.reshape(-1, scale.shape[-1]).float().contiguous()
    M, K = d2.shape
    if data.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise ValueError(f"block FP8 data must be float8_e4m3fn or float8_e5m2, got {data.dtype}")
    if tuple(s2.shape) != (triton.cdiv(M, bm), triton.cdiv(K, bk)):
        raise ValueError(f"scale shape {tuple(scale.shape)} does not match data {tuple(data.shape)} "
                         f"with {bm}x{bk} blocks; expected {(triton.cdiv(M, bm), triton.cdiv(K, bk))}")
    out = torch.empty((M, K), device=data.device, dtype=torch.bfloat16)
    if M and K:
        cfg = get_dequantize_fp8_block_configs()
        grid = (triton.cdiv(M, cfg["TILE_M"]), triton.cdiv(K, cfg["TILE_K"]))
        _dequantize_fp8_block_kernel[grid](d2, s2, out, M, K, d2.stride(0), s2.stride(0), out.stride(0),
                                           BM=bm, BK=bk, **cfg)
    return out.view(data.shape)
