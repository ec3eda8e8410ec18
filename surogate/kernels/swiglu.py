"""SwiGLU over a fused gate/up GEMM's output, its forward and backward, each with qfp8's FP8 quantize in the same pass.

The forward of a Llama-class MLP is h = silu(g) * u, where [g | u] is the output of one fused gate/up GEMM
(passes/horizontal.py). Its backward gives that GEMM's gradient [dg | du] (M, 2I), which qfp8's dgrad reads
quantized to E4M3 with one FP32 scale per 1 x 128 block. Inductor made that two kernels a layer: the SwiGLU
backward writing [dg | du], then a quantize reading it back (39 ms of a Qwen3-8B qfp8 step on the H200,
bench/results/profile_8b_h200.md); it would not fuse the quantize into the producer on CUDA (bench/NOTES.md
run 121). Here one program reads a [TILE_M, 128] tile of dh, g and u, writes the tiles of dg and du, and, with
QUANTIZE, their FP8 codes and one scale per row of each tile. A 1 x 128 block lies in g or in u as long as
I % 128 == 0 (the launcher checks). The forward kernel is the same over g and u: h, and with QUANTIZE the 1 x 128
blocks of h that qfp8's down_proj reads (Inductor's SwiGLU and its producer quantize were two kernels there too).

Numbers: dg = dh * u * s * (1 + g * (1 - s)), du = dh * g * s with s = sigmoid(g), in FP32 from the bf16
inputs and rounded once to bf16 (as Inductor's fused kernel computes it; eager PyTorch rounds dh * u first).
With GELU (Gemma's GeGLU MLP, `gelu(g, approximate="tanh") * u`) the gate is a(g) = g/2 (1 + t) with
t = tanh(c (g + 0.044715 g^3)), c = sqrt(2/pi), and a'(g) = (1 + t)/2 + g/2 (1 - t^2) c (1 + 3 * 0.044715 g^2),
in the order of PyTorch's own GELU backward; t = 2 sigmoid(2x) - 1 (Triton has no tanh of its own).
The FP8 codes and scales are `quantize_fp8_block_ref` of the rounded gradient, bit for bit
(tests/test_swiglu.py). The plain-torch twins are in `reference_swiglu`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from surogate.compat import triton_interpreting
from surogate.kernels.bits import round_bf16
from surogate.kernels.quantize import _amax_bits, _div_rn_rows, _fp8_code, _scale_from_amax, fp8_constexprs
from surogate.recipes.formats import FP8_ACTIVATION_BLOCK

BLOCK = FP8_ACTIVATION_BLOCK[1]  # the 1 x 128 scale blocks of qfp8's activations and gradients
ACTIVATIONS = ("silu", "gelu_tanh")  # the gate: SwiGLU's, or GeGLU's with the tanh GELU (Gemma)


def _swiglu_metadata(grid, kernel, args):
    """Name, shape and bytes moved for profilers (STYLE.md 3): dh, g, u read; dg, du written, and with
    QUANTIZE their codes and scales."""
    m, i = args["M"], args["INTER"]
    moved = m * i * 2 * (3 + 2) + (m * 2 * i + m * 2 * i // BLOCK * 4 if args["QUANTIZE"] else 0)
    return {"name": f"{kernel.name} M={m} I={i} quantize={bool(args['QUANTIZE'])}", "bytes": moved}


@triton.jit
def _tile(M, INTER, TILE_M: tl.constexpr, BK: tl.constexpr):
    """This program's tile, rows [pid_m * TILE_M, +TILE_M) x columns [pid_k * BK, +BK) of g: (pid_k, rows, rows in
    range, columns, the tile's mask, rows as int64 offsets (M x 2I elements may pass 2^31))."""
    pid_k = tl.program_id(1)
    rows = tl.program_id(0) * TILE_M + tl.arange(0, TILE_M)
    cols = pid_k * BK + tl.arange(0, BK)
    row_in = rows < M
    return pid_k, rows, row_in, cols, row_in[:, None] & (cols < INTER)[None, :], rows.to(tl.int64)[:, None]


@triton.jit
def _bf16(v, INTERPRET: tl.constexpr):
    """`v` rounded to nearest even bf16: the hardware cast on the GPU, `round_bf16` under the interpreter (whose
    cast truncates)."""
    if INTERPRET:
        return round_bf16(v).to(tl.bfloat16)
    else:
        return v.to(tl.bfloat16)


@triton.jit
def _gelu_tanh(g):
    """(t, a): t = tanh(c (g + 0.044715 g^3)), c = sqrt(2 / pi), and the gate a = g / 2 (1 + t), in FP32 (the
    interpreter takes no constexpr globals in arithmetic, so the numbers are written here)."""
    t = 2.0 * tl.sigmoid(2.0 * (0.7978845608028654 * (g + 0.044715 * (g * g * g)))) - 1.0
    return t, 0.5 * g * (1.0 + t)


@triton.jit
def _quantize_rows(x, q_ptr, scale_ptr, rows, row_in, cols, mask, block, stride_qm, stride_sm, stride_sk,
                   FP8_MAX: tl.constexpr, MANT: tl.constexpr, BIAS: tl.constexpr, INTERPRET: tl.constexpr):
    """E4M3 codes of the [TILE_M, 128] tile `x` (bf16 values held in FP32), one scale per row, stored at
    scale block `block` of each row. On the GPU the code is the hardware's `cvt.rn.satfinite` (what `_fp8_code`
    computes on the bits: saturate, round to nearest even, NaN to 0x7f), under the interpreter `_fp8_code`."""
    scale = _scale_from_amax(_amax_bits(tl.abs(x)), FP8_MAX, False)
    if INTERPRET:
        code = _fp8_code(tl.math.div_rn(x, scale[:, None]), FP8_MAX, MANT, BIAS).to(tl.uint8)
    else:
        code = _div_rn_rows(x, scale).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    tl.store(q_ptr + rows.to(tl.int64)[:, None] * stride_qm + cols[None, :], code, mask=mask)
    tl.store(scale_ptr + rows.to(tl.int64) * stride_sm + block * stride_sk, scale, mask=row_in)


@triton.jit(launch_metadata=_swiglu_metadata)
def _swiglu_backward_kernel(
    dh_ptr, gu_ptr, d_ptr, q_ptr, scale_ptr, M, INTER,
    stride_dh, stride_gu, stride_d, stride_qm, stride_sm, stride_sk,
    FP8_MAX: tl.constexpr, MANT: tl.constexpr, BIAS: tl.constexpr, QUANTIZE: tl.constexpr, GELU: tl.constexpr,
    INTERPRET: tl.constexpr, TILE_M: tl.constexpr, BK: tl.constexpr,
):
    """Program (pid_m, pid_k): rows [pid_m * TILE_M, +TILE_M), columns [pid_k * BK, +BK) of g (and the same
    columns of u, INTER = I further on). Scale blocks: pid_k for dg, I / BK + pid_k for du. GELU: the tanh GELU gate
    in place of silu."""
    pid_k, rows, row_in, cols, mask, r64 = _tile(M, INTER, TILE_M, BK)
    dh = tl.load(dh_ptr + r64 * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gu_ptr + r64 * stride_gu + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + r64 * stride_gu + INTER + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if GELU:
        t, a = _gelu_tanh(g)
        da = 0.5 * (1.0 + t) + (0.5 * g) * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * (g * g))
        dg = _bf16(dh * u * da, INTERPRET)
        du = _bf16(dh * a, INTERPRET)
    else:
        s = tl.sigmoid(g)
        dg = _bf16(dh * u * s * (1.0 + g * (1.0 - s)), INTERPRET)
        du = _bf16(dh * (g * s), INTERPRET)
    tl.store(d_ptr + r64 * stride_d + cols[None, :], dg, mask=mask)
    tl.store(d_ptr + r64 * stride_d + INTER + cols[None, :], du, mask=mask)
    if QUANTIZE:
        _quantize_rows(dg.to(tl.float32), q_ptr, scale_ptr, rows, row_in, cols, mask, pid_k, stride_qm, stride_sm,
                       stride_sk, FP8_MAX, MANT, BIAS, INTERPRET)
        _quantize_rows(du.to(tl.float32), q_ptr, scale_ptr, rows, row_in, cols + INTER, mask, pid_k + INTER // BK,
                       stride_qm, stride_sm, stride_sk, FP8_MAX, MANT, BIAS, INTERPRET)


def _swiglu_forward_metadata(grid, kernel, args):
    """Name, shape and bytes moved for profilers: g and u read; h written, and with QUANTIZE its codes and scales."""
    m, i = args["M"], args["INTER"]
    moved = m * i * 2 * 3 + (m * i + m * i // BLOCK * 4 if args["QUANTIZE"] else 0)
    return {"name": f"{kernel.name} M={m} I={i} quantize={bool(args['QUANTIZE'])}", "bytes": moved}


@triton.jit(launch_metadata=_swiglu_forward_metadata)
def _swiglu_forward_kernel(
    gu_ptr, h_ptr, q_ptr, scale_ptr, M, INTER, stride_gu, stride_h, stride_qm, stride_sm, stride_sk,
    FP8_MAX: tl.constexpr, MANT: tl.constexpr, BIAS: tl.constexpr, QUANTIZE: tl.constexpr, GELU: tl.constexpr,
    INTERPRET: tl.constexpr, TILE_M: tl.constexpr, BK: tl.constexpr,
):
    """Program (pid_m, pid_k): h = silu(g) * u (GELU: the tanh GELU of g) over rows [pid_m * TILE_M, +TILE_M),
    columns [pid_k * BK, +BK), in FP32 and rounded once to bf16 (as Inductor's fused kernel); with QUANTIZE also h's
    E4M3 codes and the scale of each row's block pid_k (what qfp8's down_proj reads)."""
    pid_k, rows, row_in, cols, mask, r64 = _tile(M, INTER, TILE_M, BK)
    g = tl.load(gu_ptr + r64 * stride_gu + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + r64 * stride_gu + INTER + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if GELU:
        t, a = _gelu_tanh(g)
        h = _bf16(a * u, INTERPRET)
    else:
        h = _bf16(g * tl.sigmoid(g) * u, INTERPRET)
    tl.store(h_ptr + r64 * stride_h + cols[None, :], h, mask=mask)
    if QUANTIZE:
        _quantize_rows(h.to(tl.float32), q_ptr, scale_ptr, rows, row_in, cols, mask, pid_k, stride_qm, stride_sm,
                       stride_sk, FP8_MAX, MANT, BIAS, INTERPRET)


def get_swiglu_backward_configs(arch: str | None = None) -> dict:
    """16 rows of one 128-column block a program, as the 1 x 128 quantizer (quantize.py); the forward kernel too
    (the backward's tile sweep was flat from 8 to 32 rows, bench/results/swiglu_h200.md)."""
    return dict(TILE_M=16, BK=BLOCK, num_warps=4)


def check_shapes(gate_up: torch.Tensor, grad_h: torch.Tensor | None = None, activation: str = "silu") -> int:
    """I, after checking what the kernels need: gate_up (..., 2I) bf16 with I a multiple of 128, and grad_h (..., I)
    of the same rows and dtype when given (the backward); `activation` one of ACTIVATIONS."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"swiglu kernels take activation {' or '.join(map(repr, ACTIVATIONS))}, got {activation!r}")
    if gate_up.dtype != torch.bfloat16 or (grad_h is not None and grad_h.dtype != gate_up.dtype):
        got = f"gate_up {gate_up.dtype}" + ("" if grad_h is None else f" and grad_h {grad_h.dtype}")
        raise ValueError(f"swiglu kernels take bf16 tensors, got {got}")
    i = gate_up.shape[-1] // 2
    grad_ok = grad_h is None or tuple(grad_h.shape) == (*gate_up.shape[:-1], i)
    if gate_up.shape[-1] != 2 * i or i % BLOCK or not grad_ok:
        got = f"gate_up {tuple(gate_up.shape)}" + ("" if grad_h is None else f", grad_h {tuple(grad_h.shape)}")
        raise ValueError(f"swiglu kernels need gate_up (..., 2I) with I a multiple of {BLOCK} (and grad_h (..., I)); "
                         f"got {got}")
    return i


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """`t` as (rows, width) with unit column stride: a view where the strides allow it, else a copy."""
    t2 = t.reshape(-1, width)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _fp8_outputs(m: int, width: int, device, quantize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(data (m, width) E4M3, scale (m, width / 128) stored M-contiguous), or two empty tensors."""
    if not quantize:
        return (torch.empty(0, device=device, dtype=torch.float8_e4m3fn),
                torch.empty(0, device=device, dtype=torch.float32))
    return (torch.empty((m, width), device=device, dtype=torch.float8_e4m3fn),
            torch.empty((width // BLOCK, m), device=device, dtype=torch.float32).t())


def _as_lead(outputs, lead, width: int, quantize: bool):
    """The launchers' (m, ...) outputs viewed with the input's leading dims."""
    out, data, scale = outputs
    out = out.view(*lead, out.shape[-1])
    if not quantize:
        return out, data, scale
    return out, data.view(*lead, width), scale.view(*lead, width // BLOCK)


def swiglu_forward(gate_up: torch.Tensor, quantize: bool = False, activation: str = "silu"):
    """(h (..., I) bf16, data (..., I) E4M3, scale (..., I / 128) FP32 stored M-contiguous) on CUDA; without
    `quantize` the last two are empty. What `reference_swiglu.swiglu_forward_ref` computes."""
    i = check_shapes(gate_up, activation=activation)
    gu = _rows(gate_up, 2 * i)
    m = gu.shape[0]
    h = torch.empty((m, i), device=gu.device, dtype=gu.dtype)
    data, scale = _fp8_outputs(m, i, gu.device, quantize)
    if m:
        cfg = get_swiglu_backward_configs()
        _swiglu_forward_kernel[(triton.cdiv(m, cfg["TILE_M"]), i // BLOCK)](
            gu, h, data.view(torch.uint8), scale, m, i, gu.stride(0), h.stride(0), i,
            *(scale.stride() if quantize else (0, 0)), QUANTIZE=quantize, GELU=activation == "gelu_tanh",
            INTERPRET=triton_interpreting(), **fp8_constexprs("e4m3"), **cfg)
    return _as_lead((h, data, scale), gate_up.shape[:-1], i, quantize)


def swiglu_backward(grad_h: torch.Tensor, gate_up: torch.Tensor, quantize: bool = False, activation: str = "silu"):
    """(d_gate_up (..., 2I) bf16, data (..., 2I) E4M3, scale (..., 2I / 128) FP32 stored M-contiguous) on CUDA;
    without `quantize` the last two are empty. What `reference_swiglu.swiglu_backward_ref` computes."""
    i = check_shapes(gate_up, grad_h, activation)
    dh, gu = _rows(grad_h, i), _rows(gate_up, 2 * i)
    m = gu.shape[0]
    d = torch.empty((m, 2 * i), device=gu.device, dtype=gu.dtype)
    data, scale = _fp8_outputs(m, 2 * i, gu.device, quantize)
    if m:
        cfg = get_swiglu_backward_configs()
        grid = (triton.cdiv(m, cfg["TILE_M"]), i // BLOCK)
        _swiglu_backward_kernel[grid](
            dh, gu, d, data.view(torch.uint8), scale, m, i, dh.stride(0), gu.stride(0), d.stride(0), 2 * i,
            *(scale.stride() if quantize else (0, 0)), QUANTIZE=quantize, GELU=activation == "gelu_tanh",
            INTERPRET=triton_interpreting(), **fp8_constexprs("e4m3"), **cfg)
    return _as_lead((d, data, scale), gate_up.shape[:-1], 2 * i, quantize)
