"""Triton quantizers: FP8 (tensor / row / block scaled) and NVFP4, plus CUDA weight preparation.

Every kernel here equals its plain-torch twin in `reference_formats.py` bit for bit. To get there on
both the GPU and the CPU interpreter (whose fp32->fp8/bf16 casts round wrongly), no kernel
relies on a hardware float cast to round: `_fp8_code` / `_e2m1_code` build the bytes with
integer arithmetic (round to nearest even, saturate), and divisions use `div_rn` (Triton's
plain `/` is the approximate `div.full.f32` on NVIDIA).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from surogate.compat import triton_interpreting
from surogate.kernels.bits import bytes_metadata, e2m1_value, fp8_value
from surogate.recipes.formats import (
    FP4_E2M1_MAX,
    FP8_ACTIVATION_BLOCK,
    FP8_E4M3_MAX,
    FP8_E5M2_MAX,
    FP8_WEIGHT_BLOCK,
    NVFP4_BLOCK,
    Element,
)

# ----------------------------------------------------------------------------------------------
# Enums -> constexprs, in one place.
# ----------------------------------------------------------------------------------------------

_FP8: dict[Element, dict] = {
    # FP8_MAX: saturation bound; MANT: mantissa bits; BIAS: exponent bias.
    Element.FP8_E4M3: dict(FP8_MAX=FP8_E4M3_MAX, MANT=3, BIAS=7),
    Element.FP8_E5M2: dict(FP8_MAX=FP8_E5M2_MAX, MANT=2, BIAS=15),
}
_FP8_DTYPE = {Element.FP8_E4M3: torch.float8_e4m3fn, Element.FP8_E5M2: torch.float8_e5m2}
_ELEMENT_NAMES = {"e4m3": Element.FP8_E4M3, "fp8_e4m3": Element.FP8_E4M3,
                  "e5m2": Element.FP8_E5M2, "fp8_e5m2": Element.FP8_E5M2}


def fp8_element(element: "str | Element") -> Element:
    """`"e4m3"`, `"e5m2"` (or the `Element`) -> the `Element`; anything else is an error that lists them."""
    if isinstance(element, Element):
        if element in _FP8:
            return element
    elif isinstance(element, str) and element.lower() in _ELEMENT_NAMES:
        return _ELEMENT_NAMES[element.lower()]
    raise ValueError(f"FP8 element must be 'e4m3' or 'e5m2' (or Element.FP8_E4M3 / FP8_E5M2), got {element!r}")


def fp8_constexprs(element: "str | Element") -> dict:
    """The constexpr kwargs (FP8_MAX, MANT, BIAS) that `_fp8_code` takes for `element`."""
    return dict(_FP8[fp8_element(element)])


# ----------------------------------------------------------------------------------------------
# Bit-exact rounding helpers of the quantizers (the decoders they share live in bits.py).
# ----------------------------------------------------------------------------------------------

@triton.jit
def _fp8_code(v, FP8_MAX: tl.constexpr, MANT: tl.constexpr, BIAS: tl.constexpr):
    """The FP8 byte (int32 0..255) of fp32 `v`: saturate to +-FP8_MAX, round to nearest even.

    NaN -> 0x7f (what torch gives on CUDA, where NaNs are canonical); -0 and negatives that round
    to zero keep the sign bit.
    """
    bits = v.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = tl.minimum(tl.abs(v), FP8_MAX)
    ab = a.to(tl.int32, bitcast=True)
    SHIFT: tl.constexpr = 23 - MANT
    # Normal range: rebias the exponent, then round the mantissa (a carry moves into the exponent).
    t = ab - ((127 - BIAS) << 23)
    normal = (t + ((1 << (SHIFT - 1)) - 1) + ((t >> SHIFT) & 1)) >> SHIFT
    # Subnormal range: the 24-bit significand shifted to units of the smallest subnormal.
    e = ab >> 23
    sig = (ab & 0x7FFFFF) | 0x800000
    s = tl.minimum(tl.maximum(151 - BIAS - MANT - e, 1), 31)
    sub = (sig + ((1 << (s - 1)) - 1) + ((sig >> s) & 1)) >> s
    code = tl.where(e >= 128 - BIAS, normal, sub) | sign
    return tl.where(v != v, 0x7F, code)


@triton.jit
def _amax_nan(a, axis: tl.constexpr):
    """max(|.|) over `axis` of non-negative `a`, NaN if any element is NaN (as torch.amax).

    tl.max ignores NaN on the GPU (maxnum) but not in the interpreter, so NaN is handled explicitly.
    """
    nan = tl.max((a != a).to(tl.int32), axis=axis)
    m = tl.max(tl.where(a != a, 0.0, a), axis=axis)
    return tl.where(nan > 0, float("nan"), m)


@triton.jit
def _scale_from_amax(amax, FMT_MAX: tl.constexpr, POW2: tl.constexpr):
    """scale = amax / FMT_MAX; 1 where that is 0 (all-zero or underflowing group); NaN where
    amax is NaN or Inf (the group dequantizes to NaN). As `reference_formats._amax_to_scale`.

    POW2 rounds a finite scale up to the next power of two, exactly: mantissa cleared and the
    exponent bumped (subnormal scales are first lifted by 2^24 so that this holds for them too).
    """
    s = tl.math.div_rn(amax, FMT_MAX)
    s = tl.where(s == 0, 1.0, s)
    if POW2:
        tiny = s < 1.1754943508222875e-38  # below the smallest normal fp32
        t = tl.where(tiny, s * 16777216.0, s)
        tb = t.to(tl.int32, bitcast=True)
        up = tl.where((tb & 0x7FFFFF) != 0, (tb & 0x7F800000) + 0x800000, tb).to(tl.float32, bitcast=True)
        s = tl.where(tiny, up * (1.0 / 16777216.0), up)
    return tl.where(amax < float("inf"), s, float("nan"))


@triton.jit
def _amax_bits(a):
    """max over axis 1 of non-negative `a`, NaN if a row holds a NaN (as torch.amax), in one reduction: the bits
    of non-negative floats order as int32 as the floats do, and every NaN's lie above Inf's."""
    return tl.max(a.to(tl.int32, bitcast=True), axis=1).to(tl.float32, bitcast=True)


@triton.jit
def _div_rn_rows(x, scale):
    """x / scale[:, None] rounded to nearest even, as `div_rn` gives it, with one division a row: the row's
    reciprocal r = RN(1 / s), q = RN(x r), then one correction by the exact residual e = x - q s (an FMA):
    RN(q + e r) (Markstein's step; bit for bit `div_rn`'s on the GPU: tests/gpu/test_swiglu_gpu.py).
    Rows whose scale lies below 2^-100 are lifted by 2^64 first (exact), so that 1 / s stays finite; e == 0
    (exact quotients, -0 among them) keeps q and its sign."""
    lift = tl.where(scale < 7.888609052210118e-31, 18446744073709551616.0, 1.0)
    s = scale * lift
    r = tl.math.div_rn(1.0, s)
    xs = x * lift[:, None]
    q = xs * r[:, None]
    e = tl.fma(-q, s[:, None], xs)
    return tl.where(e == 0.0, q, tl.fma(e, r[:, None], q))


@triton.jit
def _e2m1_code(a, seed_offsets, seed, STOCHASTIC: tl.constexpr):
    """E2M1 magnitude code (0..7) of fp32 `a` >= 0: saturate at 6, round to nearest even
    (ties to the even code), or stochastically between the two neighbours when STOCHASTIC."""
    if STOCHASTIC:
        a = tl.minimum(a, 6.0)
        lo = ((a >= 0.5).to(tl.int32) + (a >= 1.0).to(tl.int32) + (a >= 1.5).to(tl.int32)
              + (a >= 2.0).to(tl.int32) + (a >= 3.0).to(tl.int32) + (a >= 4.0).to(tl.int32)
              + (a >= 6.0).to(tl.int32))
        lo_v = e2m1_value(lo)
        hi_v = e2m1_value(tl.minimum(lo + 1, 7))
        gap = tl.where(hi_v > lo_v, hi_v - lo_v, 1.0)
        p = tl.math.div_rn(a - lo_v, gap)
        r = tl.rand(seed, seed_offsets)
        code = tl.where(r < p, tl.minimum(lo + 1, 7), lo)
    else:
        code = ((a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
                + (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32)
                + (a > 5.0).to(tl.int32))
    return code


# ----------------------------------------------------------------------------------------------
# amax of a whole tensor: partial maxima per program, then one program finishes the reduction
# and derives the scale with the same `_scale_from_amax` as the row/block kernels. (Doing the
# scale in torch would not match: CUDA torch divides by a Python scalar as a multiply by its
# fp32 reciprocal, an ulp off `amax / fmax` for most amaxes.)
# ----------------------------------------------------------------------------------------------

@triton.jit(launch_metadata=bytes_metadata("amax", 2))
def _amax_kernel(x_ptr, partial_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(partial_ptr + pid, _amax_nan(tl.abs(x), 0))


@triton.jit
def _amax_finish_kernel(partial_ptr, n_partial, amax_ptr, scale_ptr, FMT_MAX: tl.constexpr, BLOCK: tl.constexpr):
    """One program: amax = max of the partials (NaN-propagating), scale = amax / FMT_MAX."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, n_partial, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        p = tl.load(partial_ptr + offs, mask=offs < n_partial, other=0.0)
        acc = tl.where((p != p) | (acc != acc), float("nan"), tl.maximum(acc, p))
    a = _amax_nan(acc, 0)
    tl.store(amax_ptr, a)
    tl.store(scale_ptr, _scale_from_amax(a, FMT_MAX, False))


def get_amax_configs(arch: str | None = None) -> dict:
    """One program reduces BLOCK elements; large enough to keep the partial buffer tiny."""
    return dict(BLOCK=8192, num_warps=8)


def amax_and_scale(x: torch.Tensor, fmax: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(max |x|, its scale amax / fmax) over the whole tensor, fp32 0-d tensors, no host sync.

    amax is NaN if x holds a NaN; the scale follows `_scale_from_amax` (1 for 0, NaN for NaN/Inf).
    """
    x = x.contiguous()
    cfg = get_amax_configs()
    n = x.numel()
    a = torch.empty((), device=x.device, dtype=torch.float32)
    scale = torch.empty((), device=x.device, dtype=torch.float32)
    partial = torch.zeros(max(triton.cdiv(n, cfg["BLOCK"]), 1), device=x.device, dtype=torch.float32)
    if n:
        _amax_kernel[(partial.numel(),)](x, partial, n, BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"])
    _amax_finish_kernel[(1,)](partial, partial.numel(), a, scale, FMT_MAX=float(fmax), BLOCK=1024, num_warps=4)
    return a, scale


def amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| over the whole tensor as an fp32 0-d tensor (NaN if x holds a NaN), no host sync."""
    return amax_and_scale(x)[0]


# ----------------------------------------------------------------------------------------------
# FP8 row-wise ("current" scaling): one scale per row, from that row's amax.
# ----------------------------------------------------------------------------------------------

@triton.jit(launch_metadata=bytes_metadata("quantize_fp8_rowwise", 3))
def _quantize_fp8_rowwise_kernel(
    x_ptr, q_ptr, scale_ptr, amax_ptr, M, K, stride_xm, stride_qm,
    FP8_MAX: tl.constexpr, MANT: tl.constexpr, BIAS: tl.constexpr, POW2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ONE_TILE: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    xrow = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    qrow = q_ptr + rows.to(tl.int64)[:, None] * stride_qm
    cols = tl.arange(0, BLOCK_K)
    if ONE_TILE:  # the whole row fits: read x once
        mask = rmask[:, None] & (cols < K)[None, :]
        x = tl.load(xrow + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        row_amax = _amax_nan(tl.abs(x), 1)
        scale = _scale_from_amax(row_amax, FP8_MAX, POW2)
        code = _fp8_code(tl.math.div_rn(x, scale[:, None]), FP8_MAX, MANT, BIAS)
        tl.store(qrow + cols[None, :], code.to(tl.uint8), mask=mask)
    else:
        row_amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask = rmask[:, None] & ((k0 + cols) < K)[None, :]
            x = tl.load(xrow + (k0 + cols)[None, :], mask=mask, other=0.0).to(tl.float32)
            t = _amax_nan(tl.abs(x), 1)
            row_amax = tl.where((t != t) | (row_amax != row_amax), float("nan"), tl.maximum(row_amax, t))
        scale = _scale_from_amax(row_amax, FP8_MAX, POW2)
        for k0 in range(0, K, BLOCK_K):
            mask = rmask[:, None] & ((k0 + cols) < K)[None, :]
            x = tl.load(xrow + (k0 + cols)[None, :], mask=mask, other=0.0).to(tl.float32)
            code = _fp8_code(tl.math.div_rn(x, scale[:, None]), FP8_MAX, MANT, BIAS)
            tl.store(qrow + (k0 + cols)[None, :], code.to(tl.uint8), mask=mask)
    tl.store(scale_ptr + rows, scale, mask=rmask)
    tl.store(amax_ptr + rows, row_amax, mask=rmask)


def get_quantize_fp8_rowwise_configs(arch: str | None, K: int) -> dict:
    """Whole rows in registers up to 8192 columns (one read of x), ~32 elements a thread;
    beyond, two passes of 2 x 4096 (the second read mostly hits L2).

    Measured on H100 (4096 x 4096 bf16): 1 x 4096 tiles with 4 warps 40 us; 2 x 4096 / 8 warps
    75 us; 4 x 4096 / 8 warps 54 us; 4096 x 12288 two-pass 125 us (1.2 TB/s).
    """
    block_k = triton.next_power_of_2(max(K, 16))
    if block_k <= 8192:
        return dict(BLOCK_M=max(1, 4096 // block_k), BLOCK_K=block_k, ONE_TILE=True,
                    num_warps=4 if block_k <= 4096 else 8)
    return dict(BLOCK_M=2, BLOCK_K=4096, ONE_TILE=False, num_warps=8)


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 0:
        raise ValueError("cannot quantize a 0-d tensor; give at least one dimension (..., K)")
    if not x.is_floating_point():
        raise TypeError(f"quantize takes a floating-point tensor, got {x.dtype}")
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def quantize_fp8_rowwise(x: torch.Tensor, element: "str | Element" = "e4m3", power_of_two: bool = False):
    """x (..., K) -> (data (..., K) fp8, scale (..., 1) fp32, amax (...,) fp32); x ~= data * scale."""
    el = fp8_element(element)
    x2 = _as_2d(x)
    M, K = x2.shape
    data = torch.empty((M, K), device=x.device, dtype=_FP8_DTYPE[el])
    scale = torch.empty((M, 1), device=x.device, dtype=torch.float32)
    row_amax = torch.empty((M,), device=x.device, dtype=torch.float32)
    if M and K:
        cfg = get_quantize_fp8_rowwise_configs(None, K)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]),)
        _quantize_fp8_rowwise_kernel[grid](
            x2, data.view(torch.uint8), scale, row_amax, M, K, x2.stride(0), data.stride(0),
            POW2=power_of_two, **fp8_constexprs(el), **cfg)
    elif M:
        scale.fill_(1.0)
        row_amax.zero_()
    lead = x.shape[:-1]
    return data.view(x.shape), scale.view(*lead, 1), row_amax.view(lead)


# ----------------------------------------------------------------------------------------------
# FP8 tensor-wise: one scale for the whole tensor (current, or given by delayed scaling).
# ----------------------------------------------------------------------------------------------

@triton.jit(launch_metadata=bytes_metadata("quantize_fp8_tensorwise", 3))
def _quantize_fp8_tensorwise_kernel(
    x_ptr, q_ptr, scale_ptr, n,
    FP8_MAX: tl.constexpr, MANT: tl.constexpr, BIAS: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr)
    code = _fp8_code(tl.math.div_rn(x, scale), FP8_MAX, MANT, BIAS)
    tl.store(q_ptr + offs, code.to(tl.uint8), mask=mask)


def get_quantize_fp8_tensorwise_configs(arch: str | None = None) -> dict:
    """Elementwise: 4K elements per program, 16-byte loads of bf16."""
    return dict(BLOCK=4096, num_warps=8)


def quantize_fp8_tensorwise(x: torch.Tensor, element: "str | Element" = "e4m3",
                            scale: torch.Tensor | None = None):
    """x -> (data fp8 (x.shape), scale () fp32, amax () fp32).

    `scale` (delayed scaling: from the amax history) is used as given; without it the scale is
    this tensor's amax / format max. The amax of x is returned either way, for the history.
    """
    el = fp8_element(element)
    if not x.is_floating_point():
        raise TypeError(f"quantize takes a floating-point tensor, got {x.dtype}")
    xc = x.contiguous()
    a, own_scale = amax_and_scale(xc, _FP8[el]["FP8_MAX"])
    if scale is None:
        scale = own_scale
    else:
        if scale.numel() != 1:
            raise ValueError(f"a tensor-wise scale has one element, got shape {tuple(scale.shape)}")
        scale = scale.reshape(()).to(device=x.device, dtype=torch.float32)
    data = torch.empty(x.shape, device=x.device, dtype=_FP8_DTYPE[el])
    n = xc.numel()
    if n:
        cfg = get_quantize_fp8_tensorwise_configs()
        _quantize_fp8_tensorwise_kernel[(triton.cdiv(n, cfg["BLOCK"]),)](
            xc, data.view(torch.uint8), scale, n, **fp8_constexprs(el), **cfg)
    return data, scale, a


# ----------------------------------------------------------------------------------------------
# FP8 block-wise: FP32 scale per (1 x 128) activation block or (128 x 128) weight block.
# ----------------------------------------------------------------------------------------------

@triton.jit(launch_metadata=bytes_metadata("quantize_fp8_block", 3))
def _quantize_fp8_block_kernel(
    x_ptr, q_ptr, scale_ptr, M, K, stride_xm, stride_qm, stride_sm, stride_sk,
    FP8_MAX: tl.constexpr, MANT: tl.constexpr, BIAS: tl.constexpr, POW2: tl.constexpr,
    TILE_M: tl.constexpr, BK: tl.constexpr, ROW_BLOCKS: tl.constexpr, FAST: tl.constexpr,
):
    """One program: TILE_M rows x BK columns. ROW_BLOCKS: one scale per row (1 x BK blocks),
    else one scale for the whole tile (TILE_M x BK blocks). Scales go to (row block, K block) through
    their strides: 1 x BK scales are stored M-contiguous, the layout the block GEMM reads coalesced.
    FAST (E4M3 row blocks on the GPU): the same bits in fewer instructions (one amax reduction on the bits,
    one division a row, the hardware's saturating cast); the per-element `_fp8_code` of a `div_rn` else."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * TILE_M + tl.arange(0, TILE_M)
    cols = pid_k * BK + tl.arange(0, BK)
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    if ROW_BLOCKS:
        if FAST:
            scale = _scale_from_amax(_amax_bits(tl.abs(x)), FP8_MAX, POW2)
            code = _div_rn_rows(x, scale).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
        else:
            scale = _scale_from_amax(_amax_nan(tl.abs(x), 1), FP8_MAX, POW2)
            code = _fp8_code(tl.math.div_rn(x, scale[:, None]), FP8_MAX, MANT, BIAS)
        tl.store(scale_ptr + rows.to(tl.int64) * stride_sm + pid_k * stride_sk, scale, mask=rows < M)
    else:
        block_amax = _amax_nan(_amax_nan(tl.abs(x), 1), 0)
        scale = _scale_from_amax(block_amax, FP8_MAX, POW2)
        code = _fp8_code(tl.math.div_rn(x, scale), FP8_MAX, MANT, BIAS)
        tl.store(scale_ptr + pid_m * stride_sm + pid_k * stride_sk, scale)
    tl.store(q_ptr + rows.to(tl.int64)[:, None] * stride_qm + cols[None, :], code.to(tl.uint8), mask=mask)


def get_quantize_fp8_block_configs(arch: str | None, block: tuple[int, int]) -> dict:
    """1 x BK blocks: 16 rows per program; BM x BK blocks: one block per program."""
    bm, bk = block
    if bm == 1:
        return dict(TILE_M=16, BK=bk, ROW_BLOCKS=True, num_warps=4)
    # 16K elements a program: 16 warps keep it at 32 a thread (8 warps spill on sm_90).
    return dict(TILE_M=bm, BK=bk, ROW_BLOCKS=False, num_warps=16)


def quantize_fp8_block(x: torch.Tensor, block: tuple[int, int] = FP8_ACTIVATION_BLOCK,
                       element: "str | Element" = "e4m3", power_of_two: bool = False):
    """x (M, K) (or (..., K) for 1 x 128) -> (data fp8 (x.shape), scale fp32 (ceil(M/bm), ceil(K/bk))).

    1 x 128 scales are stored M-contiguous (strides (1, M)): the block GEMM loads a tile's column of
    row scales every K step, and that load is coalesced only in this layout (DeepGEMM's choice too).
    """
    el = fp8_element(element)
    block = tuple(block)
    if block not in (FP8_ACTIVATION_BLOCK, FP8_WEIGHT_BLOCK):
        raise ValueError(f"block must be {FP8_ACTIVATION_BLOCK} (activations) or {FP8_WEIGHT_BLOCK} (weights), "
                         f"got {block}")
    if block == FP8_WEIGHT_BLOCK and x.dim() != 2:
        raise ValueError(f"128 x 128 blocks need a 2-D (N, K) weight, got shape {tuple(x.shape)}")
    x2 = _as_2d(x)
    M, K = x2.shape
    bm, bk = block
    data = torch.empty((M, K), device=x.device, dtype=_FP8_DTYPE[el])
    if bm == 1:
        scale = torch.empty((triton.cdiv(K, bk), M), device=x.device, dtype=torch.float32).t()
    else:
        scale = torch.empty((triton.cdiv(M, bm), triton.cdiv(K, bk)), device=x.device, dtype=torch.float32)
    if M and K:
        cfg = get_quantize_fp8_block_configs(None, block)
        grid = (triton.cdiv(M, cfg["TILE_M"]), triton.cdiv(K, bk))
        _quantize_fp8_block_kernel[grid](
            x2, data.view(torch.uint8), scale, M, K, x2.stride(0), data.stride(0), scale.stride(0), scale.stride(1),
            POW2=power_of_two, FAST=bm == 1 and el is Element.FP8_E4M3 and not triton_interpreting(),
            **fp8_constexprs(el), **cfg)
    lead = x.shape[:-1]
    if bm == 1:
        return data.view(x.shape), scale.view(*lead, scale.shape[-1])
    return data, scale


# ----------------------------------------------------------------------------------------------
# NVFP4: E2M1 elements, E4M3 scale per 16 along K, one FP32 tensor scale.
# ----------------------------------------------------------------------------------------------

@triton.jit(launch_metadata=bytes_metadata("quantize_nvfp4", 2.5625))
def _quantize_nvfp4_kernel(
    x_ptr, packed_ptr, bscale_ptr, tscale_ptr, seed, M, K, stride_xm, stride_pm, stride_bm,
    STOCHASTIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program: BLOCK_M rows x BLOCK_K columns (BLOCK_K a multiple of 16); K is padded
    with zeros up to a multiple of 16 (the padded columns exist in `packed` and `bscale`)."""
    NB: tl.constexpr = BLOCK_K // 16
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1) * BLOCK_K
    cols = k0 + tl.arange(0, BLOCK_K)
    rmask = rows < M
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :],
                mask=rmask[:, None] & (cols < K)[None, :], other=0.0).to(tl.float32)
    ts = tl.load(tscale_ptr)
    x3 = tl.reshape(x, (BLOCK_M, NB, 16))
    block_amax = _amax_nan(tl.abs(x3), 2)
    # block scale = (block_amax / 6) / tensor_scale, rounded to E4M3 (saturating).
    bcode = _fp8_code(tl.math.div_rn(tl.math.div_rn(block_amax, 6.0), ts), 448.0, 3, 7)
    decode = fp8_value(bcode, 3, 7) * ts
    # v = x / decode, 0 where decode is 0; NaN v -> code 0; sign = signbit(v) (as the reference)
    v = tl.math.div_rn(x3, tl.where(decode == 0, 1.0, decode)[:, :, None])
    v = tl.where((decode == 0)[:, :, None], 0.0, v)
    if STOCHASTIC:
        idx = rows.to(tl.int64)[:, None] * stride_xm + cols[None, :]
        offsets = tl.reshape(idx, (BLOCK_M, NB, 16)).to(tl.uint32)
    else:
        offsets = 0
    code = _e2m1_code(tl.abs(v), offsets, seed, STOCHASTIC)
    code = code | ((v.to(tl.int32, bitcast=True) >> 28) & 8)
    code = tl.where(v != v, 0, code)
    pair = tl.reshape(code, (BLOCK_M, BLOCK_K // 2, 2))
    shift = tl.arange(0, 2)[None, None, :] * 4
    packed = tl.sum(pair << shift, axis=2)
    pcols = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    kp2 = stride_pm  # packed row length (K padded / 2)
    tl.store(packed_ptr + rows.to(tl.int64)[:, None] * stride_pm + pcols[None, :], packed.to(tl.uint8),
             mask=rmask[:, None] & (pcols < kp2)[None, :])
    bcols = k0 // 16 + tl.arange(0, NB)
    tl.store(bscale_ptr + rows.to(tl.int64)[:, None] * stride_bm + bcols[None, :], bcode.to(tl.uint8),
             mask=rmask[:, None] & (bcols < stride_bm)[None, :])


def get_quantize_nvfp4_configs(arch: str | None, K: int) -> dict:
    """Tiles of 8 x 256 (16 scale blocks per row), smaller K tiles for short rows; 16 elements
    a thread (32 need ~250 registers and spill on sm_100). H100, 4096 x 12288 bf16 with a given
    tensor scale: 108 us (8x256/4 warps) vs 105 (16x256/4, spills on sm_100) and 111 (16x256/8)."""
    block_k = min(256, max(16, triton.next_power_of_2(K)))
    return dict(BLOCK_M=8, BLOCK_K=block_k, num_warps=4)


def nvfp4_tensor_scale(x: torch.Tensor) -> torch.Tensor:
    """s_tensor = amax / (448 * 6) (1 when amax is 0), an fp32 0-d tensor, no host sync."""
    return amax_and_scale(x, FP8_E4M3_MAX * FP4_E2M1_MAX)[1]


def quantize_nvfp4(x: torch.Tensor, tensor_scale: torch.Tensor | None = None, stochastic: bool = False,
                   seed: int = 0):
    """x (..., K) -> (packed uint8 (..., Kp/2), block_scale e4m3 (..., Kp/16), tensor_scale () fp32),
    Kp = K rounded up to 16. Stochastic rounding draws from Philox(seed, element index)."""
    x2 = _as_2d(x)
    M, K = x2.shape
    if tensor_scale is None:
        tensor_scale = nvfp4_tensor_scale(x2)
    else:
        if tensor_scale.numel() != 1:
            raise ValueError(f"the NVFP4 tensor scale has one element, got shape {tuple(tensor_scale.shape)}")
        tensor_scale = tensor_scale.reshape(()).to(device=x.device, dtype=torch.float32)
    kp = triton.cdiv(K, NVFP4_BLOCK) * NVFP4_BLOCK
    packed = torch.empty((M, kp // 2), device=x.device, dtype=torch.uint8)
    bscale = torch.empty((M, kp // NVFP4_BLOCK), device=x.device, dtype=torch.float8_e4m3fn)
    if M and K:
        cfg = get_quantize_nvfp4_configs(None, K)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(kp, cfg["BLOCK_K"]))
        _quantize_nvfp4_kernel[grid](
            x2, packed, bscale.view(torch.uint8), tensor_scale, int(seed) & 0x7FFFFFFF, M, K,
            x2.stride(0), packed.stride(0), bscale.stride(0), STOCHASTIC=bool(stochastic), **cfg)
    lead = x.shape[:-1]
    return packed.view(*lead, kp // 2), bscale.view(*lead, kp // NVFP4_BLOCK), tensor_scale


# ----------------------------------------------------------------------------------------------
# Weight preparation on CUDA: the weight lists of docs/internals.md.
# ----------------------------------------------------------------------------------------------

def quantize_weight(weight: torch.Tensor, weight_format) -> list[torch.Tensor]:
    """The tensors that hold the frozen (N, K) `weight` in `weight_format` (str or WeightFormat)."""
    fmt = getattr(weight_format, "value", weight_format)
    if weight.dim() != 2:
        raise ValueError(f"a frozen linear weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
    if fmt == "bf16":
        return [weight.to(torch.bfloat16).contiguous()]
    if fmt == "fp8_row":
        w, s, _ = quantize_fp8_rowwise(weight, "e4m3")
        wt, st, _ = quantize_fp8_rowwise(weight.t().contiguous(), "e4m3")
        return [w, s.view(-1), wt, st.view(-1)]
    if fmt == "fp8_block":
        return list(quantize_fp8_block(weight, FP8_WEIGHT_BLOCK))
    if fmt in ("nvfp4", "nvfp4_cached"):
        return list(quantize_nvfp4(weight))
    if fmt == "nf4":
        # One-time weight preparation: the reference runs on CUDA tensors as is (bit-exact by construction).
        from surogate.kernels.reference import quantize_nf4_ref

        return quantize_nf4_ref(weight).tensors()
    raise ValueError(f"unknown weight_format {fmt!r}; valid: bf16, fp8_row, fp8_block, nvfp4, nvfp4_cached, nf4")

