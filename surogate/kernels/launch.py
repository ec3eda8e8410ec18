"""The CUDA implementation of the `surogate::lora_linear` ops: quantize activations, route, launch.

`lora_linear_cuda` / `lora_linear_backward_cuda` have exactly the signatures and semantics of
`reference.lora_linear_ref` / `lora_linear_backward_ref` (docs/internals.md); the op layer's CUDA
kernels call `lora_linear_with_casts_cuda` (`lora_linear_cuda` that also returns the LoRA factors'
casts, which the op keeps for its backward) and `lora_linear_backward_cuda`. Each GEMM looks up its
row of the kernel table (`variants.variant`), applies the table's shape rule (`variants.route`, the
function `plan()` uses too), then runs the route: the variant's Triton launcher, cuBLAS + the LoRA
term, or the weight dequantized once into a bf16 scratch and the bf16 route. Nothing here branches
on a name.
"""

from __future__ import annotations

import torch

from surogate.kernels import cublas, grad_input, lora_linear, persistent
from surogate.kernels import quantize as q
from surogate.kernels.configs import device_arch
from surogate.kernels.dequantize import dequantize_fp8_block, dequantize_nf4, dequantize_nvfp4
from surogate.kernels.grad_lora import grad_lora
from surogate.kernels.lora_factors import lora_factors
from surogate.kernels.transpose import transpose_fp8
from surogate.kernels.variants import (
    Engine,
    Gemm,
    Quantizer,
    Route,
    Variant,
    check_grad_output_q,
    check_input_q,
    record,
    route,
    variant,
)
from surogate.recipes.arch import ARCHS
from surogate.recipes.formats import FP8_ACTIVATION_BLOCK, NVFP4_SR_SEED
from surogate.recipes.recipe import Compute, WeightFormat


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., K) -> (M, K) with unit stride along K (a view when possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _nf4_rows(weight: list[torch.Tensor], k: int) -> int:
    if k % 64:
        raise ValueError(f"the NF4 kernels need in_features divisible by 64 (one absmax block per row "
                         f"segment); got {k}. Use the qfp8 or bf16 recipe for this layer.")
    return weight[0].numel() * 2 // k


def _out_features(weight: list[torch.Tensor], fmt: WeightFormat, k: int) -> int:
    return _nf4_rows(weight, k) if fmt is WeightFormat.NF4 else weight[0].shape[0]


def _dequantize_weight(weight: list[torch.Tensor], fmt: WeightFormat, k: int) -> list[torch.Tensor]:
    """The frozen weight as a one-tensor bf16 (N, K) list, by the Triton dequantization kernels."""
    if fmt is WeightFormat.FP8_BLOCK:
        return [dequantize_fp8_block(weight[0], weight[1])]
    if fmt in (WeightFormat.NVFP4, WeightFormat.NVFP4_CACHED):
        return [dequantize_nvfp4(weight[0], weight[1], weight[2], shape=(weight[0].shape[0], k))]
    if fmt is WeightFormat.NF4:
        return [dequantize_nf4(*weight, shape=(_nf4_rows(weight, k), k))]
    raise ValueError(f"weight_format {fmt.value!r} is not dequantized")


def _quantize(t: torch.Tensor, how: Quantizer) -> tuple[torch.Tensor, ...]:
    """The activation operand as the variant's quantizer leaves it (Triton kernels)."""
    if how is Quantizer.NONE:
        return (t,)
    if how is Quantizer.FP8_ROW_E4M3:
        return tuple(q.quantize_fp8_rowwise(t, "e4m3")[:2])
    if how is Quantizer.FP8_ROW_E5M2:
        return tuple(q.quantize_fp8_rowwise(t, "e5m2")[:2])
    if how is Quantizer.FP8_BLOCK_E4M3:
        return tuple(q.quantize_fp8_block(t, FP8_ACTIVATION_BLOCK, "e4m3"))
    if how is Quantizer.NVFP4:
        return tuple(q.quantize_nvfp4(t))
    return tuple(q.quantize_nvfp4(t, stochastic=True, seed=NVFP4_SR_SEED))


def emulates_fp4(device: torch.device) -> bool:
    """Whether NVFP4 GEMMs on `device` run emulated: no FP4 tensor cores (sm_89, sm_90). Off the GPU
    (the Triton interpreter in tests) every kernel runs, the native FP4 one included."""
    return device.type == "cuda" and not ARCHS[device_arch(device.index or 0)].fp4_mma


def _nvfp4_round_trip(t: torch.Tensor, stochastic: bool = False) -> torch.Tensor:
    """`t` quantized to NVFP4 (16 along its last dim) and back to bf16: the values an FP4 MMA would
    read. bf16 holds each e2m1 x e4m3 product exactly; only the FP32 tensor scale rounds (2^-9)."""
    packed, block_scale, tensor_scale = q.quantize_nvfp4(t, stochastic=stochastic, seed=NVFP4_SR_SEED)
    return dequantize_nvfp4(packed, block_scale, tensor_scale, shape=t.shape)


def _route(v: Variant, a: torch.Tensor, n_out: int, k_red: int, rank: int | None, bias: bool = False) -> Route:
    """The table's route for this call on `a`'s device (LoRA `rank`, None without; whether it adds a `bias`),
    recorded for `variants.trace()`."""
    arch = device_arch(a.device.index or 0) if a.is_cuda else "sm_90"  # the interpreter: cuBLAS never runs
    return record(route(v, arch, a.shape[0], n_out, k_red, cublas=lambda rule: cublas.available(a, rule),
                        rank=rank, bias=bias))


def lora_linear_cuda(input, weight, weight_format, lora_a, lora_b, lora_input, bias, lora_scale, forward,
                     grad_input_precision, input_q=None):
    """-> (output (..., N) bf16, lora_hidden (..., r)); see docs/internals.md for the contract.

    `lora_linear_with_casts_cuda` without the factors' casts, which only the op keeps."""
    return lora_linear_with_casts_cuda(input, weight, weight_format, lora_a, lora_b, lora_input, bias, lora_scale,
                                       forward, grad_input_precision, input_q)[:2]


def lora_linear_with_casts_cuda(input, weight, weight_format, lora_a, lora_b, lora_input, bias, lora_scale, forward,
                                grad_input_precision, input_q=None):
    """-> (output (..., N) bf16, lora_hidden (..., r), lora_a_cast, lora_b_cast): the op's forward.

    `input_q` ([data, scale], FP8 forwards only: `variants.check_input_q`) is the input already quantized,
    usually by the kernel that produced it (passes/producer.py); the GEMM reads it instead of quantizing
    `input`. `lora_a` / `lora_b` may be the FP32 masters or already in `input`'s dtype. The casts are each
    factor in `input`'s dtype where its master is in another (None where it is absent or needs none); the op
    keeps them for its backward (ops/lora_linear.py). They come from one `lora_factors` launch, which on the
    persistent route also writes that kernel's U^T (three launches before: two casts and `lora_up_rows`).
    """
    fmt, compute = WeightFormat(weight_format), Compute(forward)
    lead, k = input.shape[:-1], input.shape[-1]
    dtype = input.dtype
    x = _rows(input)
    gemm_input = x
    if compute is Compute.NVFP4 and emulates_fp4(x.device):
        # As the reference: the input's NVFP4 values times the weight's, here by a bf16 MMA (the LoRA
        # branch keeps the unquantized input `x`).
        gemm_input, compute = _nvfp4_round_trip(x), Compute.BF16
    v = variant(Gemm.OUTPUT, compute, fmt)
    n = _out_features(weight, fmt, k)
    has_lora = lora_a is not None and lora_b is not None
    r = _route(v, gemm_input, n, k, lora_a.shape[0] if has_lora else None, bias is not None)
    a_cast = b_cast = up_t = None
    if has_lora:
        a, up, up_t = _lora_factors(lora_a, lora_b, dtype, lora_scale, r.engine is Engine.PERSISTENT)
        a_cast, b_cast = (cast if master.dtype != dtype else None for cast, master in ((a, lora_a), (up, lora_b)))
        xl = x if lora_input is None else _rows(lora_input).to(dtype)
        hidden = xl @ a.t()  # (M, r): one skinny cuBLAS GEMM reading x once
    else:
        hidden, up = x.new_empty((x.shape[0], 0)), None
    h = hidden if has_lora else None
    b = bias.to(dtype) if bias is not None else None
    if r.scratch:
        weight = _dequantize_weight(weight, fmt, k)
    if input_q is not None:
        data, scale = check_input_q(input_q, input, fmt, compute)
        aq = (_rows(data), scale)  # block scales keep their M-contiguous strides
    else:
        aq = _quantize(gemm_input, r.variant.quantizer)
    if r.engine is Engine.CUBLAS:
        out = _cublas_forward(r.variant, aq, weight, h, up, b, lora_scale)
    elif r.engine is Engine.PERSISTENT:
        out = persistent.persistent_output(r.variant, aq, weight, k, h, up, b, lora_scale, ut=up_t)
    else:
        out = getattr(lora_linear, r.variant.launcher)(r.variant, aq, weight, k, h, up, b, lora_scale)
    return out.view(*lead, out.shape[-1]), hidden.view(*lead, hidden.shape[-1]), a_cast, b_cast


def _lora_factors(lora_a, lora_b, dtype: torch.dtype, lora_scale: float,
                  up_t: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(lora_a, lora_b, U^T or None) in `dtype` for the forward. Masters in another dtype (FP32) are cast by one
    `lora_factors` launch, which writes the persistent kernel's U^T (lora_scale folded in) too where `up_t`;
    factors already in `dtype` are read as they are (the persistent launcher then makes U^T itself)."""
    if lora_a.dtype == dtype and lora_b.dtype == dtype:
        return lora_a, lora_b, None
    return lora_factors(lora_a, lora_b, dtype, lora_scale if up_t else None)


def _cublas_forward(v: Variant, aq, weight, hidden, up, bias, lora_scale) -> torch.Tensor:
    if v.quantizer is Quantizer.FP8_BLOCK_E4M3:
        return cublas.block_fp8_gemm(aq[0], aq[1], weight[0], weight[1], hidden, up, bias, lora_scale)
    if v.quantizer is Quantizer.FP8_ROW_E4M3:
        return cublas.row_fp8_gemm(aq[0], aq[1], weight[0], weight[1], hidden, up, bias, lora_scale)
    return cublas.bf16_gemm(aq[0], weight[0], hidden, up, bias, lora_scale)


def lora_linear_backward_cuda(grad_output, input, weight, weight_format, lora_a, lora_b, lora_input, lora_hidden,
                              lora_scale, grad_input_precision, grad_output_q=None, lora_a_cast=None, lora_b_cast=None,
                              input_q=None):
    """-> (grad_input, grad_lora_a, grad_lora_b, grad_lora_input); absent ones are None.

    `grad_output_q` ([data, scale], FP8 dgrads only: `variants.check_grad_output_q`) is the gradient already
    quantized, by the kernel that produced it in a compiled backward (ops/lora_linear.py); the dgrad GEMM
    reads it instead of quantizing `grad_output`, the LoRA gradients read `grad_output`.
    `lora_a_cast` / `lora_b_cast`: the factors in `grad_output`'s dtype as the forward cast them (the op saves
    them), read instead of casting the masters again; the gradients take the masters' dtypes.
    `input_q` ([data, scale], the forward's FP8 copy kept instead of the input): LoRA A's gradient reads it
    (`grad_lora_fp8`, dequantizing in its loads); `input` is then the FP8 data, for the shape, and the input
    gradient takes `grad_output`'s dtype.
    """
    fmt, compute = WeightFormat(weight_format), Compute(grad_input_precision)
    gq = None
    if grad_output_q is not None:
        data, scale = check_grad_output_q(grad_output_q, grad_output, fmt, compute)
        gq = (_rows(data), scale)  # block scales keep their M-contiguous strides
    k = input.shape[-1]
    dtype = grad_output.dtype
    g = _rows(grad_output)
    has_lora = lora_a is not None and lora_b is not None
    grad_a = grad_b = grad_lora_input = None
    gh = a = None
    if has_lora:
        if lora_input is None and input_q is not None:  # LoRA A's gradient reads the FP8 copy
            xl = (_rows(input_q[0]), input_q[1].reshape(-1, input_q[1].shape[-1]))
        else:
            xl = _rows(input if lora_input is None else lora_input)
        a = lora_a.to(dtype) if lora_a_cast is None else lora_a_cast
        b = lora_b.to(dtype) if lora_b_cast is None else lora_b_cast
        grad_a, grad_b, gh = grad_lora(g, xl, _rows(lora_hidden), a, b, lora_scale, (lora_a.dtype, lora_b.dtype))
        if lora_input is not None:  # the LoRA branch had its own input (dropout): its grad is separate
            grad_lora_input = ((gh @ a) * lora_scale).to(lora_input.dtype).view(lora_input.shape)
            gh = a = None
    dx = grad_input_cuda(g, weight, fmt, compute, k, gh, a, lora_scale, gq)
    return dx.view(input.shape).to(dtype if input_q is not None else input.dtype), grad_a, grad_b, grad_lora_input


def grad_input_cuda(g, weight, fmt: WeightFormat, compute: Compute, k: int, gh, a, lora_scale, gq=None):
    """The dgrad GEMM of the backward: `g (M, N) @ W (+ lora_scale * gh @ a)` -> (M, K), `a` = lora_a (r, K)
    in g's dtype (or None, with `gh`). Quantizes g as the route's variant says (unless `gq`, g already
    quantized by its producer, is given), runs the route."""
    if compute is Compute.NVFP4 and emulates_fp4(g.device):
        # As the reference: the gradient NVFP4 along N with stochastic rounding, the weight's values
        # re-quantized along N; a bf16 MMA over both (`gh`, the LoRA term, came from the exact gradient).
        w = dequantize_nvfp4(weight[0], weight[1], weight[2], shape=(g.shape[1], k), dtype=torch.float32)
        weight, fmt, compute = [_nvfp4_round_trip(w.t().contiguous()).t().contiguous()], WeightFormat.BF16, Compute.BF16
        g = _nvfp4_round_trip(g, stochastic=True)
    v = variant(Gemm.GRAD_INPUT, compute, fmt)
    r = _route(v, g, k, g.shape[1], None if gh is None else gh.shape[-1])
    if r.scratch:
        weight = _dequantize_weight(weight, fmt, k)
    elif v.quantizer is Quantizer.FP8_BLOCK_E4M3:  # both routes read the K-major copy
        weight = [transpose_fp8(weight[0]), weight[1].t()]
    elif v.quantizer is Quantizer.NVFP4_SR:
        # As the reference: the weight's values re-quantized to NVFP4 along N (its K-major copy).
        w = dequantize_nvfp4(weight[0], weight[1], weight[2], shape=(g.shape[1], k), dtype=torch.float32)
        weight = list(q.quantize_nvfp4(w.t().contiguous()))
    if gq is None:
        gq = _quantize(g, r.variant.quantizer)
    if r.engine is Engine.CUBLAS:
        up = grad_input.lora_up(a)
        if r.variant.quantizer is Quantizer.FP8_BLOCK_E4M3:
            dx = cublas.block_fp8_gemm(gq[0], gq[1], weight[0], weight[1], gh, up, None, lora_scale)
        elif r.variant.quantizer is Quantizer.FP8_ROW_E5M2:  # the cached K-major transpose and its scales
            dx = cublas.row_fp8_gemm(gq[0], gq[1], weight[2], weight[3], gh, up, None, lora_scale)
        else:
            dx = cublas.bf16_gemm(gq[0], weight[0].t(), gh, up, None, lora_scale)
    elif r.engine is Engine.PERSISTENT:
        dx = persistent.persistent_grad_input(r.variant, gq, weight, k, gh, a, lora_scale)
    else:
        dx = getattr(grad_input, r.variant.launcher)(r.variant, gq, weight, k, gh, a, lora_scale)
    return dx
