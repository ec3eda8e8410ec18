"""Shared `@triton.jit` bit helpers: stored codes to fp32 values, fp32 to bf16, launch metadata.

The quantizers (`quantize.py`), the dequantizers (`dequantize.py`) and the fused GEMM prologues
(`lora_linear.py`) read the same codes; decoding them here gives each format one definition of its
bits on the Triton side, the twin of the plain-torch decoders in `qtensor.py`. No helper rounds
through a hardware float cast (the CPU interpreter's fp32->fp8/bf16 casts truncate), so each gives
the same bits on the GPU and under TRITON_INTERPRET=1.

This module imports only Triton: the kernel modules import it, never the other way round.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["bytes_metadata", "e2m1_unpack_rows", "e2m1_value", "fp8_value", "nf4_value", "pack_bf16x2", "round_bf16"]


def bytes_metadata(name: str, bytes_per_element: float):
    """A `launch_metadata` function for a memory-bound kernel: its name, its `M x K` (or `n`) and the
    bytes it moves (elements x `bytes_per_element`), so profiles name the work (STYLE.md 3)."""
    def fn(grid, kernel, args):
        n = args.get("M", 1) * args.get("K", args.get("n", 0))
        return {"name": f"{name} [{args.get('M', '')}x{args.get('K', args.get('n', ''))}]",
                "bytes": int(n * bytes_per_element)}
    return fn


@triton.jit
def fp8_value(code, MANT: tl.constexpr, BIAS: tl.constexpr):
    """The fp32 value of an E4M3/E5M2 byte held in int32; 0x7f / 0xff (E4M3 NaN) -> NaN.

    Built from the bits, not by a cast: it decodes the E4M3 block scales of NVFP4. Only E4M3 scales
    are decoded this way; E5M2 Inf/NaN codes are not special-cased.
    """
    mag = code & 0x7F
    e = mag >> MANT
    m = mag & ((1 << MANT) - 1)
    normal = ((e + (127 - BIAS)) << 23) | (m << (23 - MANT))
    val = tl.where(e > 0, normal.to(tl.float32, bitcast=True),
                   m.to(tl.float32) * (1.0 / (1 << (BIAS - 1 + MANT))))
    val = tl.where(mag == 0x7F, float("nan"), val)
    return tl.where((code & 0x80) != 0, -val, val)


@triton.jit
def round_bf16(v):
    """fp32 -> the nearest-even bf16 value, still in fp32 (so the final cast is exact everywhere).

    The interpreter's fp32->bf16 cast truncates; rounding on the integer bits matches torch's cast.
    """
    bits = v.to(tl.int32, bitcast=True)
    r = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return tl.where(v != v, v, r.to(tl.float32, bitcast=True))


@triton.jit
def pack_bf16x2(low, high, INTERPRET: tl.constexpr):
    """Two fp32 tensors -> one int32 word each of their nearest-even bf16 values, `low` in the low half.

    On the GPU it is one `cvt.rn.bf16x2.f32` a word (sm_80+): the NF4 dequantize spent ~15 integer
    instructions a word rounding and packing on the bits, a third of its SASS (bench/NOTES.md run 82).
    Under the interpreter (whose bf16 cast truncates) the same bits come from `round_bf16`.
    """
    if INTERPRET:
        lo_bits = (round_bf16(low).to(tl.int32, bitcast=True) >> 16) & 0xFFFF
        hi_bits = (round_bf16(high).to(tl.int32, bitcast=True) >> 16) & 0xFFFF
        return lo_bits | (hi_bits << 16)
    else:
        # cvt.rn.bf16x2.f32 d, a, b puts a in the upper half and b in the lower.
        return tl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $2, $1;", "=r,r,r", [low, high], dtype=tl.int32,
                                         is_pure=True, pack=1)


@triton.jit
def e2m1_value(code):
    """fp32 magnitude of an E2M1 code 0..7: {0, .5, 1, 1.5, 2, 3, 4, 6}, from its exponent and
    mantissa bits (no table load; the NVFP4 quantizer, dequantizer and GEMM prologue share it)."""
    e = code >> 1
    m = (code & 1).to(tl.float32)
    return tl.where(e == 0, 0.5 * m, (1.0 + 0.5 * m) * (1 << tl.maximum(e - 1, 0)).to(tl.float32))


@triton.jit
def nf4_value(c):
    """NF4 code 0..15 -> fp32 value (`NF4_VALUES`) by a 4-level select tree on its bits: no loads (a
    table gather inside the pipelined K loop was 8x slower on the H100, bench/NOTES.md run 2)."""
    b0 = (c & 1) != 0
    b1 = (c & 2) != 0
    b2 = (c & 4) != 0
    lo0 = tl.where(b0, -0.6961928009986877, -1.0)
    lo1 = tl.where(b0, -0.39491748809814453, -0.5250730514526367)
    lo2 = tl.where(b0, -0.18477343022823334, -0.28444138169288635)
    lo3 = tl.where(b0, 0.0, -0.09105003625154495)
    hi0 = tl.where(b0, 0.16093020141124725, 0.07958029955625534)
    hi1 = tl.where(b0, 0.33791524171829224, 0.24611230194568634)
    hi2 = tl.where(b0, 0.5626170039176941, 0.44070982933044434)
    hi3 = tl.where(b0, 1.0, 0.7229568362236023)
    lo = tl.where(b2, tl.where(b1, lo3, lo2), tl.where(b1, lo1, lo0))
    hi = tl.where(b2, tl.where(b1, hi3, hi2), tl.where(b1, hi1, hi0))
    return tl.where((c & 8) != 0, hi, lo)


@triton.jit
def e2m1_unpack_rows(packed, scale, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """[ROWS, BLOCK_K/2] packed E2M1 (low nibble first) x [ROWS, BLOCK_K/16] E4M3 -> fp32 [ROWS, BLOCK_K].

    The NVFP4 GEMM's operands decoded in registers, for where `tl.dot_scaled` cannot run them (the
    interpreter reads its scales as E8M0).
    """
    p = packed.to(tl.int32)
    codes = tl.reshape(tl.join(p & 15, p >> 4), (ROWS, BLOCK_K))
    mag = e2m1_value(codes & 7)
    val = tl.where((codes & 8) != 0, -mag, mag)
    val = tl.reshape(val, (ROWS, BLOCK_K // 16, 16)) * scale.to(tl.float32)[:, :, None]
    return tl.reshape(val, (ROWS, BLOCK_K))
