"""CUDA entry points of the `surogate::lora_linear` ops: quantize activations, run the kernels.

`lora_linear_cuda` / `lora_linear_backward_cuda` have exactly the signatures and semantics of
`reference.lora_linear_ref` / `lora_linear_backward_ref` (docs/internals.md). Which kernel runs
is read from the arch table (`surogate/recipes/arch.py`), keyed on (compute, weight format), so
the names here are the names `plan()` reports.
"""

from __future__ import annotations

import torch

from surogate.kernels import quantize as q
from surogate.kernels.dequantize import dequantize_fp8_block, dequantize_nf4, dequantize_nvfp4
from surogate.kernels.configs import device_arch
from surogate.kernels.grad_input import GRAD_INPUT_LAUNCHERS
from surogate.kernels.grad_lora import grad_lora
from surogate.kernels.lora_linear import FORWARD_LAUNCHERS
from surogate.kernels.reference_linear import NVFP4_SR_SEED, check_input_q
from surogate.recipes.arch import ARCHS, FORWARD_KERNELS, GRAD_INPUT_KERNELS
from surogate.recipes.formats import FP8_ACTIVATION_BLOCK, GRAD_FP8_ELEMENT
from surogate.recipes.recipe import Compute, WeightFormat


def kernel_name(gemm: str, compute: str, weight_format: str) -> str:
    """The kernel that runs `gemm` ("output" | "grad_input") for (compute, weight_format)."""
    table = FORWARD_KERNELS if gemm == "output" else GRAD_INPUT_KERNELS
    try:
        return table[(Compute(compute), WeightFormat(weight_format))]
    except (KeyError, ValueError):
        valid = ", ".join(f"({c.value}, {w.value})" for c, w in table)
        raise ValueError(f"no {gemm} kernel for compute {compute!r} with weight_format {weight_format!r}; "
                         f"valid pairs: {valid}") from None


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., K) -> (M, K) with unit stride along K (a view when possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _nf4_shape(weight: list[torch.Tensor], k: int) -> tuple[int, int]:
    if k % 64:
        raise ValueError(f"the NF4 kernels need in_features divisible by 64 (one absmax block per row "
                         f"segment); got {k}. Use the qfp8 or bf16 recipe for this layer.")
    return weight[0].numel() * 2 // k, k


# Below this many rows the fused in-register dequantization wins: the GEMM is bound by reading
# the weight, and the packed weight is 2-4x smaller than bf16. Above it, every M tile decoding
# the same weight tile again makes the kernel ALU-bound (qnf4 ran at 0.3x of bf16 on an H100,
# bench/NOTES.md), while one dequantization pass to a transient bf16 buffer costs ~2% of the GEMM.
DEQUANT_SCRATCH_MIN_ROWS = 128


def dequantize_to_scratch(rows: int) -> bool:
    """Whether a dequant-format GEMM over `rows` rows dequantizes the weight once into a transient
    bf16 buffer (freed after the call) and runs the bf16 kernel, instead of dequantizing per tile."""
    return rows >= DEQUANT_SCRATCH_MIN_ROWS


def _dequantize_weight(weight, weight_format: str, k: int) -> torch.Tensor:
    """The frozen weight as a transient bf16 (N, K) tensor, by the Triton dequantization kernels."""
    if weight_format == "fp8_block":
        return dequantize_fp8_block(weight[0], weight[1])
    if weight_format in ("nvfp4", "nvfp4_cached"):
        return dequantize_nvfp4(weight[0], weight[1], weight[2], shape=(weight[0].shape[0], k))
    if weight_format == "nf4":
        return dequantize_nf4(*weight, shape=_nf4_shape(weight, k))
    raise ValueError(f"weight_format {weight_format!r} is not dequantized")


def emulates_fp4(device: torch.device) -> bool:
    """Whether NVFP4 GEMMs on `device` run emulated: no FP4 tensor cores (sm_89, sm_90). Off the GPU
    (the Triton interpreter in tests) every kernel runs, the native FP4 one included."""
    return device.type == "cuda" and not ARCHS[device_arch(device.index or 0)].fp4_mma


def _nvfp4_round_trip(t: torch.Tensor, stochastic: bool = False) -> torch.Tensor:
    """`t` quantized to NVFP4 (16 along its last dim) and back to bf16: the values an FP4 MMA would
    read. bf16 holds each e2m1 x e4m3 product exactly; only the FP32 tensor scale rounds (2^-9)."""
    packed, block_scale, tensor_scale = q.quantize_nvfp4(t, stochastic=stochastic, seed=NVFP4_SR_SEED)
    return dequantize_nvfp4(packed, block_scale, tensor_scale, shape=t.shape)


def lora_linear_cuda(input, weight, weight_format, lora_a, lora_b, lora_input, bias, lora_scale, forward,
                     grad_input, input_q=None):
    """-> (output (..., N) bf16, lora_hidden (..., r)); see docs/internals.md for the contract.

    `input_q` ([data, scale], FP8 forwards only) is the input already quantized, usually by the kernel
    that produced it (passes/producer.py); the GEMM reads it instead of quantizing `input`.
    """
    lead, k = input.shape[:-1], input.shape[-1]
    dtype = input.dtype
    if input_q is not None:  # the scale keeps its strides: block scales are read M-contiguous
        data_q, scale_q = check_input_q(input_q, input, weight_format, forward)
        given_q = (_rows(data_q), scale_q)
    else:
        given_q = None
    x = _rows(input)
    has_lora = lora_a is not None and lora_b is not None
    if has_lora:
        xl = x if lora_input is None else _rows(lora_input).to(dtype)
        hidden = xl @ lora_a.to(dtype).t()  # (M, r): one skinny cuBLAS GEMM reading x once
        up = lora_b.to(dtype)
    else:
        hidden = x.new_empty((x.shape[0], 0))
    if forward == "nvfp4" and emulates_fp4(x.device):
        # As the reference: the input's NVFP4 values times the weight's, here by a bf16 MMA (the LoRA
        # branch above keeps the unquantized input).
        x, forward = _nvfp4_round_trip(x), "bf16"
    name = kernel_name("output", forward, weight_format)
    h, u = (hidden, up) if has_lora else (None, None)
    b = bias.to(dtype) if bias is not None else None
    if name.startswith("lora_linear_dequant_") and dequantize_to_scratch(x.shape[0]):
        name = "lora_linear_bf16"
        weight = [_dequantize_weight(weight, weight_format, k)]
    run = FORWARD_LAUNCHERS[name]
    if name == "lora_linear_bf16":
        out = run(x, weight[0], h, u, b, lora_scale)
    elif name == "lora_linear_fp8":
        xq, xs = q.quantize_fp8_rowwise(x, "e4m3")[:2] if given_q is None else given_q
        out = run(xq, xs, weight[0], weight[1], h, u, b, lora_scale)
    elif name == "lora_linear_fp8_block":
        xq, xs = q.quantize_fp8_block(x, FP8_ACTIVATION_BLOCK, "e4m3") if given_q is None else given_q
        out = run(xq, xs, weight[0], weight[1], h, u, b, lora_scale)
    elif name == "lora_linear_dequant_fp8_block":
        out = run(x, weight[0], weight[1], h, u, b, lora_scale)
    elif name == "lora_linear_dequant_nvfp4":
        out = run(x, weight[0], weight[1], weight[2], h, u, b, lora_scale)
    elif name == "lora_linear_dequant_nf4":
        out = run(x, weight, _nf4_shape(weight, k), h, u, b, lora_scale)
    elif name == "lora_linear_nvfp4":
        xp, xbs, xts = q.quantize_nvfp4(x)
        out = run(xp, xbs, xts, weight[0], weight[1], weight[2], h, u, b, lora_scale)
    else:  # a name in the arch table without a launcher: a bug, not user input
        raise NotImplementedError(f"kernel {name} has no launcher")
    return out.view(*lead, out.shape[-1]), hidden.view(*lead, hidden.shape[-1])


def lora_linear_backward_cuda(grad_output, input, weight, weight_format, lora_a, lora_b, lora_input, lora_hidden,
                              lora_scale, grad_input):
    """-> (grad_input, grad_lora_a, grad_lora_b, grad_lora_input); absent ones are None."""
    k = input.shape[-1]
    dtype = grad_output.dtype
    g = _rows(grad_output)
    has_lora = lora_a is not None and lora_b is not None
    grad_a = grad_b = grad_lora_input = None
    gh = a = None
    if has_lora:
        xl = _rows(input if lora_input is None else lora_input)
        grad_a, grad_b, gh = grad_lora(g, xl, _rows(lora_hidden), lora_a, lora_b, lora_scale)
        a = lora_a.to(dtype)
        if lora_input is not None:  # the LoRA branch had its own input (dropout): its grad is separate
            grad_lora_input = ((gh @ a) * lora_scale).to(lora_input.dtype).view(lora_input.shape)
            gh = a = None
    if grad_input == "nvfp4" and emulates_fp4(g.device):
        # As the reference: the gradient NVFP4 along N with stochastic rounding, the weight's values
        # re-quantized along N; a bf16 MMA over both (the LoRA term above used the exact gradient).
        w = dequantize_nvfp4(weight[0], weight[1], weight[2], shape=(g.shape[1], k), dtype=torch.float32)
        weight, weight_format, grad_input = [_nvfp4_round_trip(w.t().contiguous()).t().contiguous()], "bf16", "bf16"
        g = _nvfp4_round_trip(g, stochastic=True)
    name = kernel_name("grad_input", grad_input, weight_format)
    if name.startswith("grad_input_dequant_") and dequantize_to_scratch(g.shape[0]):
        name = "grad_input_bf16"
        weight = [_dequantize_weight(weight, weight_format, k)]
    run = GRAD_INPUT_LAUNCHERS[name]
    if name == "grad_input_bf16":
        dx = run(g, weight[0], gh, a, lora_scale)
    elif name == "grad_input_fp8":
        gq, gs, _ = q.quantize_fp8_rowwise(g, GRAD_FP8_ELEMENT["fp8_row"])
        dx = run(gq, gs, weight[2], weight[3], gh, a, lora_scale)
    elif name == "grad_input_fp8_block":
        gq, gs = q.quantize_fp8_block(g, FP8_ACTIVATION_BLOCK, GRAD_FP8_ELEMENT["fp8_block"])
        dx = run(gq, gs, weight[0], weight[1], gh, a, lora_scale)
    elif name == "grad_input_dequant_fp8_block":
        dx = run(g, weight[0], weight[1], gh, a, lora_scale)
    elif name == "grad_input_dequant_nvfp4":
        dx = run(g, weight[0], weight[1], weight[2], k, gh, a, lora_scale)
    elif name == "grad_input_dequant_nf4":
        dx = run(g, weight, _nf4_shape(weight, k), gh, a, lora_scale)
    elif name == "grad_input_nvfp4":
        # As the reference: the weight's values re-quantized to NVFP4 along N (its K-major copy),
        # the gradient NVFP4 along N with stochastic rounding.
        w = dequantize_nvfp4(weight[0], weight[1], weight[2], shape=(g.shape[1], k), dtype=torch.float32)
        wt_p, wt_bs, wt_ts = q.quantize_nvfp4(w.t().contiguous())
        gp, gbs, gts = q.quantize_nvfp4(g, stochastic=True, seed=NVFP4_SR_SEED)
        dx = run(gp, gbs, gts, wt_p, wt_bs, wt_ts, gh, a, lora_scale)
    else:
        raise NotImplementedError(f"kernel {name} has no launcher")
    return dx.view(input.shape).to(input.dtype), grad_a, grad_b, grad_lora_input
