"""Bit-exact plain-torch quantizers for FP8, NVFP4 and OCP MX (DESIGN.md section 2).

These functions define the formats: every Triton quantize kernel must reproduce them
bit for bit (except stochastic rounding, whose random bits come from torch's generator
here). Arithmetic is FP32 throughout, in the order written; docs/formats.md restates the
rules and the NaN/Inf behaviour. The decoders (`dequantize_*_ref`, `e2m1_decode`, the nibble
layout) live with the containers in `qtensor.py` and are re-exported here.
"""

from __future__ import annotations

import torch

from surogate.kernels.qtensor import (
    E8M0_NAN,
    Fp8Tensor,
    MXTensor,
    NVFP4Tensor,
    dequantize_fp8_ref,
    dequantize_mx_ref,
    dequantize_nvfp4_ref,
    e2m1_decode,
    expand_blocks,
    pack_nibbles,
    unpack_nibbles,
)
from surogate.recipes.formats import (
    FP4_E2M1_MAX,
    FP4_E2M1_VALUES,
    FP8_E4M3_MAX,
    FP8_E5M2_MAX,
    MX_BLOCK,
    NVFP4_BLOCK,
)

__all__ = [
    "FP8_DTYPES", "FP8_MAX", "dequantize_fp8_ref", "dequantize_mx_ref", "dequantize_nvfp4_ref",
    "e2m1_decode", "e2m1_encode", "pack_nibbles", "quantize_fp8_block_ref", "quantize_fp8_ref",
    "quantize_fp8_rowwise_e5m2_ref", "quantize_fp8_rowwise_ref", "quantize_mx_ref", "quantize_nvfp4_ref",
    "unpack_nibbles",
]

FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FP8_MAX = {"e4m3": FP8_E4M3_MAX, "e5m2": FP8_E5M2_MAX}
_FP8_SCALINGS = ("tensor", "row", "block")

# E2M1 rounding boundaries between consecutive magnitudes, and whether a value exactly on
# the boundary goes up (ties to the even code: 0.75 -> 1.0 (code 2), 1.25 -> 1.0 (code 2)).
_E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_E2M1_TIE_UP = (False, True, False, True, False, True, False)

# Exponent of the largest power of two in each MX element's range (OCP MX v1.0, emax_elem).
_MX_EMAX = {"e4m3": 8, "e2m1": 2}


def _check_float(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.element_size() < 2:
        raise TypeError(f"{what} expects a float32/bfloat16/float16 tensor, got "
                        f"{type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{what} needs at least one dimension (the last one is K); got a scalar, "
                         "reshape it to (1,)")


def _check_element(element: str) -> None:
    if element not in FP8_DTYPES:
        raise ValueError(f"unknown FP8 element {element!r}; valid: {', '.join(FP8_DTYPES)}")


def _amax_to_scale(amax: torch.Tensor, fmax: float) -> torch.Tensor:
    """scale = amax / fmax; an all-zero group (or an underflowing one) gets 1, a non-finite amax NaN."""
    scale = amax.float() / fmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.where(torch.isfinite(amax), scale, torch.full_like(scale, float("nan")))


def _round_up_pow2(scale: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= scale (so x / scale never exceeds the format's max)."""
    mantissa, exponent = torch.frexp(scale)  # scale = mantissa * 2**exponent, mantissa in [0.5, 1)
    up = torch.ldexp(torch.ones_like(scale), exponent)
    pow2 = torch.where(mantissa == 0.5, scale, up)
    return torch.where(torch.isfinite(scale), pow2, scale)


def _cast_fp8(v: torch.Tensor, element: str) -> torch.Tensor:
    """Saturate to +-max (torch's cast would give NaN/Inf), then round to nearest even."""
    fmax = FP8_MAX[element]
    return v.clamp(-fmax, fmax).to(FP8_DTYPES[element])


def quantize_fp8_ref(
    x: torch.Tensor,
    element: str = "e4m3",
    scaling: str = "tensor",
    block: tuple[int, int] = (1, 128),
    power_of_two: bool = False,
    scale: "torch.Tensor | float | None" = None,
) -> Fp8Tensor:
    """FP8 with FP32 scales: `data = sat_rne(x / scale)`, `scale = amax / fmax` per group.

    scaling: "tensor" (one scale), "row" (one per row of the last dim), "block" (`block`
    = (bm, bk) tiles over the tensor seen as (M, K); partial edge blocks). An all-zero group
    gets scale 1. A group holding NaN or +-Inf gets scale NaN, so it dequantizes to NaN.
    power_of_two rounds each computed scale up to a power of two. `scale` (a given scale,
    e.g. delayed scaling) is used as is: no amax, no rounding, Inf saturates, NaN stays NaN.
    """
    _check_float(x, "quantize_fp8_ref")
    _check_element(element)
    if scaling not in _FP8_SCALINGS:
        raise ValueError(f"unknown FP8 scaling {scaling!r}; valid: {', '.join(_FP8_SCALINGS)}")
    fmax = FP8_MAX[element]
    xf = x.float()
    k = x.shape[-1]
    m = xf.numel() // k if k else 0
    if scaling == "tensor":
        group_block = None
        amax = xf.abs().amax() if xf.numel() else torch.zeros((), device=x.device)
    elif scaling == "row":
        group_block = (1, k)
        amax = xf.abs().amax(-1, keepdim=True) if k else torch.zeros((*x.shape[:-1], 1), device=x.device)
    else:
        if len(block) != 2 or min(block) < 1:
            raise ValueError(f"block must be two positive ints (bm, bk), e.g. (1, 128) or (128, 128); got {block}")
        group_block = (int(block[0]), int(block[1]))
        bm, bk = group_block
        x2 = xf.reshape(m, k)
        gm, gk = -(-m // bm), -(-k // bk)
        padded = torch.nn.functional.pad(x2.abs(), (0, gk * bk - k, 0, gm * bm - m))
        amax = padded.reshape(gm, bm, gk, bk).amax(dim=(1, 3))
    if scale is None:
        s = _amax_to_scale(amax, fmax)
        if power_of_two:
            s = _round_up_pow2(s)
    else:
        s = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
        s = s.reshape(()) if scaling == "tensor" else s.reshape(amax.shape)
    if scaling == "block":
        full = expand_blocks(s, group_block, m, k).reshape(x.shape)
    else:
        full = s
    data = _cast_fp8(xf / full, element)
    return Fp8Tensor(data=data, scale=s.contiguous(), block=group_block)


# --- Traceable activation quantizers ------------------------------------------------------------------
# Twins of the Triton `quantize_fp8_rowwise` / `quantize_fp8_block` launchers that can be put into a graph
# (activations: the FX pass passes/producer.py; gradients: the op's backward formula while compiling,
# ops/lora_linear.py): reductions and pointwise ops with static control flow only, so make_fx/AOTAutograd
# trace them and Inductor fuses them into the kernel that produces the activation or gradient.
# Eager, they equal `quantize_fp8_ref` bit for bit (tests/test_passes_producer.py, tests/test_grad_producer.py)
# and, on CUDA, the Triton kernels (tests/gpu/test_producer_gpu.py). Compiled by Inductor for CUDA, a code
# moves by one FP8 step where x / scale is an exact tie: Inductor divides with the approximate
# `div.full.f32` (and by a constant as a multiply by its reciprocal), where the Triton kernels use IEEE `div_rn`.

def _stored_value(x: torch.Tensor) -> torch.Tensor:
    """x in fp32, as its dtype stores it: `x.float()`, with a bf16 rounding Inductor cannot drop.

    Inductor keeps a fused producer's output in fp32 registers and drops the downcast-upcast pair
    before the quantizer, which would then quantize the unrounded value: its scale moves by up to
    2^-8 and ~2% of the codes by one step, against the unfused op. Rounding to nearest even on the
    bits (a no-op in eager, where x already holds bf16 values) restores what the op would read.
    """
    xf = x.float()
    if x.dtype != torch.bfloat16:
        return xf
    bits = xf.view(torch.int32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).view(torch.float32)
    return torch.where(torch.isnan(xf), xf, rounded)


def _scale_from_amax(amax: torch.Tensor, fmax: float) -> torch.Tensor:
    """`_amax_to_scale`, dividing by a tensor: eager CUDA divides by a Python scalar as a multiply by
    its reciprocal, an ulp off the Triton kernels' IEEE division for some amaxes."""
    scale = amax / torch.full((), fmax, dtype=torch.float32, device=amax.device)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.where(torch.isfinite(amax), scale, torch.full_like(scale, float("nan")))


def quantize_fp8_rowwise_ref(x: torch.Tensor, element: str = "e4m3") -> tuple[torch.Tensor, torch.Tensor]:
    """(data (..., K) fp8, scale (..., 1) fp32): `quantize_fp8_ref(x, element, "row")`, traceable.

    The first two outputs of the Triton `quantize.quantize_fp8_rowwise(x, element)`.
    """
    _check_float(x, "quantize_fp8_rowwise_ref")
    _check_element(element)
    xf = _stored_value(x)
    scale = _scale_from_amax(xf.abs().amax(-1, keepdim=True), FP8_MAX[element])
    return _cast_fp8(xf / scale, element), scale


def quantize_fp8_rowwise_e5m2_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(data (..., K) float8_e5m2, scale (..., 1) fp32): `quantize_fp8_rowwise_ref(x, "e5m2")`, the gradient
    quantizer of the fp8_row dgrad (E5M2's range: one scale spans a whole gradient row), as one named
    function for the graphs and tables that hold it."""
    return quantize_fp8_rowwise_ref(x, "e5m2")


def quantize_fp8_block_ref(x: torch.Tensor, block: tuple[int, int] = (1, 128),
                           element: str = "e4m3") -> tuple[torch.Tensor, torch.Tensor]:
    """(data fp8 (x.shape), scale fp32): `quantize_fp8_ref(x, element, "block", block)`, traceable.

    What the Triton `quantize.quantize_fp8_block(x, block, element)` returns: for (1, bk) blocks the
    scale is `(..., ceil(K/bk))` stored M-contiguous, for (bm, bk) blocks of a 2-D x `(ceil(M/bm), ceil(K/bk))`.
    """
    _check_float(x, "quantize_fp8_block_ref")
    _check_element(element)
    if len(block) != 2 or min(block) < 1:
        raise ValueError(f"block must be two positive ints (bm, bk), e.g. (1, 128) or (128, 128); got {block}")
    bm, bk = block
    k = x.shape[-1]
    xf = _stored_value(x).reshape(-1, k)
    m = xf.shape[0]
    pad_k = -k % bk
    pad_m = 0 if bm == 1 else -m % bm
    padded = torch.nn.functional.pad(xf, (0, pad_k, 0, pad_m))
    tiles = padded.reshape(-1, bm, (k + pad_k) // bk, bk)  # (M/bm, bm, K/bk, bk)
    scale = _scale_from_amax(tiles.abs().amax(dim=(1, 3)), FP8_MAX[element])
    data = _cast_fp8(tiles / scale[:, None, :, None], element)
    if pad_k == 0 and pad_m == 0:
        data = _tiles_as(data, x.shape)
    else:
        data = data.reshape(m + pad_m, k + pad_k)[:m, :k].reshape(x.shape)
    if bm == 1:  # M-contiguous, as the Triton quantizer stores 1 x bk scales
        return data, scale.t().contiguous().t().reshape(*x.shape[:-1], scale.shape[-1])
    return data, scale


def _tiles_as(tiles: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The contiguous, unpadded `tiles` (M/bm, bm, K/bk, bk) as x's shape: a view, taken with `as_strided`
    rather than `reshape` because of what Inductor makes of each when an op reads the result.

    A custom op (`surogate::lora_linear(_backward)`, exact strides) given a reshape of the unrealized
    quantize copies it into a buffer of the reshaped shape, whose loop reads the block scale at
    `m * K/bk + k // bk`: no longer the (M*K/bk, bk) split of the amax reduction, so the scheduler keeps
    the FP8 cast out of the reduction's kernel: one kernel more per quantize on CUDA, in qfp8's forward
    producer and grad_producer alike (run 56: the backward 8 launches more with grad_producer on,
    bench/NOTES.md). `as_strided` realizes the tiles in their own shape first, and the op reads a view of
    that buffer (tests/test_grad_producer.py plans it with Inductor's Triton scheduler)."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step = step * size
    return tiles.as_strided(shape, strides[::-1])


def e2m1_encode(v: torch.Tensor, stochastic: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """4-bit E2M1 codes (sign in bit 3) of FP32 values already divided by their scale.

    Round to nearest, ties to the even code, saturate to 6; or, with `stochastic`, round
    |v| up to the next magnitude with probability (|v| - lo) / (hi - lo), using one
    `torch.rand` draw per element from `generator`. NaN gives code 0 (its scale is NaN).
    The sign bit is torch.signbit (so -0.0 and values rounding to zero keep it).
    """
    mag = v.abs()
    if stochastic:
        grid = torch.tensor(FP4_E2M1_VALUES, dtype=torch.float32, device=v.device)
        lo = (mag.unsqueeze(-1) >= grid).sum(-1).clamp(min=1) - 1  # index of the largest magnitude <= |v|
        lo = torch.where(mag >= FP4_E2M1_MAX, torch.full_like(lo, 7), lo)
        hi = (lo + 1).clamp(max=7)
        lo_v, hi_v = grid[lo], grid[hi]
        p = torch.where(hi > lo, (mag - lo_v) / (hi_v - lo_v), torch.zeros_like(mag))
        u = torch.rand(v.shape, generator=generator, dtype=torch.float32, device=v.device)
        code = torch.where(u < p, hi, lo)
    else:
        code = torch.zeros(v.shape, dtype=torch.int64, device=v.device)
        for bound, tie_up in zip(_E2M1_BOUNDS, _E2M1_TIE_UP):
            code += (mag >= bound) if tie_up else (mag > bound)
    code = torch.where(torch.isnan(v), torch.zeros_like(code), code)
    sign = torch.signbit(v) & ~torch.isnan(v)
    return (code | (sign.to(torch.int64) << 3)).to(torch.uint8)


def _pad_last(x: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = (-x.shape[-1]) % multiple
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


def quantize_nvfp4_ref(
    x: torch.Tensor,
    tensor_scale: "torch.Tensor | float | None" = None,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> NVFP4Tensor:
    """NVFP4: E2M1 elements, an E4M3 scale per 16 along the last dim, one FP32 tensor scale.

    tensor_scale = amax / (448 * 6) (1 for an all-zero tensor, NaN if amax is not finite:
    the whole tensor then dequantizes to NaN); block_scale = e4m3_sat_rne((block_amax / 6) /
    tensor_scale); element = e2m1((x / (float(block_scale) * tensor_scale))), 0 where that
    product is 0. A given `tensor_scale` is used as is (then Inf saturates to 6 x scale).
    The last dim is zero-padded to a multiple of 16.
    """
    _check_float(x, "quantize_nvfp4_ref")
    if stochastic and generator is None:
        raise ValueError("stochastic NVFP4 rounding needs a torch.Generator (generator=...), "
                         "so that the result is reproducible")
    shape = x.shape
    xf = _pad_last(x.float(), NVFP4_BLOCK)
    if tensor_scale is None:
        amax = xf.abs().amax() if xf.numel() else torch.zeros((), device=x.device)
        ts = _amax_to_scale(amax, FP8_E4M3_MAX * FP4_E2M1_MAX)
    else:
        ts = torch.as_tensor(tensor_scale, dtype=torch.float32, device=x.device).reshape(())
    blocks = xf.reshape(*xf.shape[:-1], xf.shape[-1] // NVFP4_BLOCK, NVFP4_BLOCK)
    block_amax = blocks.abs().amax(-1)
    block_scale = _cast_fp8((block_amax / FP4_E2M1_MAX) / ts, "e4m3")
    decode = block_scale.float() * ts
    v = blocks / decode.unsqueeze(-1)
    v = torch.where(decode.unsqueeze(-1) == 0, torch.zeros_like(v), v)
    codes = e2m1_encode(v, stochastic, generator).reshape(xf.shape)
    return NVFP4Tensor(packed=pack_nibbles(codes), block_scale=block_scale, tensor_scale=ts, shape=shape)


def quantize_mx_ref(x: torch.Tensor, element: str = "e4m3") -> MXTensor:
    """OCP MX (v1.0): an E8M0 scale 2**(floor(log2(amax)) - emax_elem) per 32 along the last dim.

    Elements are x / scale rounded to nearest even with saturation (E4M3 in float8_e4m3fn,
    E2M1 packed like NVFP4). An all-zero block gets scale 1 (code 127); the exponent is
    clamped to [-127, 127]; a block holding NaN/Inf gets the NaN scale code 255.
    The last dim is zero-padded to a multiple of 32.
    """
    _check_float(x, "quantize_mx_ref")
    if element not in _MX_EMAX:
        raise ValueError(f"unknown MX element {element!r}; valid: {', '.join(_MX_EMAX)}")
    shape = x.shape
    xf = _pad_last(x.float(), MX_BLOCK)
    blocks = xf.reshape(*xf.shape[:-1], xf.shape[-1] // MX_BLOCK, MX_BLOCK)
    amax = blocks.abs().amax(-1)
    _, e = torch.frexp(amax)  # amax = m * 2**e, m in [0.5, 1): floor(log2(amax)) = e - 1
    exp = (e - 1 - _MX_EMAX[element]).clamp(-127, 127)
    exp = torch.where(amax == 0, torch.zeros_like(exp), exp)
    finite = torch.isfinite(amax)
    code = torch.where(finite, exp + 127, torch.full_like(exp, E8M0_NAN)).to(torch.uint8)
    scale = torch.where(finite, torch.ldexp(torch.ones_like(amax), exp), torch.full_like(amax, float("nan")))
    v = blocks / scale.unsqueeze(-1)
    if element == "e4m3":
        data = _cast_fp8(v, "e4m3").reshape(xf.shape)
    else:
        data = pack_nibbles(e2m1_encode(v).reshape(xf.shape))
    return MXTensor(data=data, scale=code, element=element, shape=shape)


