"""Plain-torch twin of the fused quantize-GEMM-LoRA op (`surogate::lora_linear` and its backward).

This defines what the Triton kernels compute (docs/internals.md has the op signatures):
- every GEMM multiplies the dequantized operands in FP32 (products exact, FP32 accumulation);
  kernels accumulate in another order, so they match this to FP32 rounding, not bitwise;
- the quantizations feeding the GEMMs are the bit-exact ones of `reference_formats`;
- each output is rounded once, at the end, to the input dtype (bf16).

Quantized GEMM operands, per `Compute`:
- "bf16": the weight dequantized to bf16 (bf16 itself for the bf16 format), the activation as is.
- "fp8" forward: input E4M3 per row (current scaling) against the weight's FP8 form (fp8_row:
  per output channel; fp8_block: 128x128 blocks with the input in 1x128 blocks). dgrad:
  grad_output E5M2 per row (fp8_block: E4M3 per 1x128; `GRAD_FP8_ELEMENT`) against the E4M3
  weight (fp8_row: the K-major copy with per-input-channel scales; fp8_block: the same blocks, transposed).
  Weight formats without an FP8 form are quantized per row to E4M3 on the fly.
- "nvfp4" forward: input NVFP4 (its own tensor scale, 16 along K) x the weight's NVFP4 copy
  (or the weight quantized on the fly). dgrad: grad_output NVFP4 along N with stochastic
  rounding from `torch.Generator().manual_seed(NVFP4_SR_SEED)`, against the weight's
  dequantized values re-quantized to NVFP4 along N (round to nearest).
`input_q`: the input already quantized for the forward GEMM, `[data, scale]` as the Triton quantizer
the CUDA op would run on `input` returns it (`input_quantizer` names it). Only the FP8 forward kernels
take it (lora_linear_fp8: E4M3 per row; lora_linear_fp8_block: E4M3 per 1x128); the LoRA branch and
the backward read the bf16 `input` as always.
`grad_output_q`: the same for the dgrad, grad_output already quantized, `[data, scale]` as the Triton
quantizer the CUDA backward would run on `grad_output` returns it (`grad_output_quantizer` names it); only
the FP8 dgrads take it (fp8_row: E5M2 per row; fp8_block: E4M3 per 1x128). The LoRA gradients read the
bf16 `grad_output` as always.
LoRA (bf16 compute, FP32 accumulation): lora_hidden = bf16(lora_input @ A.T);
output = bf16(base + bias + s * lora_hidden @ B.T). Backward: t = bf16(grad_output @ B);
grad_lora_b = s * grad_output.T @ lora_hidden; grad_lora_a = s * t.T @ lora_input (both in the
dtype of A/B); s * t @ A is added to grad_input, or returned as grad_lora_input when a
separate lora_input was given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from surogate.kernels import variants
from surogate.kernels.qtensor import Fp8Tensor, NF4Tensor, NVFP4Tensor
from surogate.kernels.reference_formats import (
    dequantize_fp8_ref,
    dequantize_nvfp4_ref,
    quantize_fp8_block_ref,
    quantize_fp8_ref,
    quantize_fp8_rowwise_e5m2_ref,
    quantize_fp8_rowwise_ref,
    quantize_nvfp4_ref,
)
from surogate.kernels.reference_nf4 import dequantize_nf4_ref, quantize_nf4_ref
from surogate.kernels.variants import WEIGHT_LISTS, Gemm, Quantizer, variant, weight_format_of
from surogate.recipes.formats import (
    FP8_ACTIVATION_BLOCK,
    FP8_WEIGHT_BLOCK,
    GRAD_FP8_ELEMENT,
    NF4_BLOCK,
    NVFP4_SR_SEED,
)
from surogate.recipes.recipe import Compute, WeightFormat

__all__ = ["GRAD_OUTPUT_Q_QUANTIZERS", "INPUT_Q_QUANTIZERS", "check_grad_output_q", "check_input_q",
           "dequantize_input_q", "dequantize_weight_ref", "grad_output_quantizer", "input_quantizer",
           "lora_linear_backward_ref", "lora_linear_ref", "quantize_weight_ref"]

# The forward kernels that take a pre-quantized input (`input_q`), each with the traceable twin of the
# quantizer launch.py runs on `input` for it: `input_q` is exactly what that function returns.
# NVFP4 is not here: its tensor scale needs the amax of the whole activation before any block is
# quantized, and on sm_89/sm_90 the op emulates it (bf16 MMA over round-tripped values).
INPUT_Q_QUANTIZERS: dict[Quantizer, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = {
    Quantizer.FP8_ROW_E4M3: quantize_fp8_rowwise_ref,  # E4M3, one scale per row: (data, scale (..., 1))
    Quantizer.FP8_BLOCK_E4M3: quantize_fp8_block_ref,  # E4M3, one scale per 1x128: (data, scale (..., K/128))
}
# The same for the dgrad kernels that take a pre-quantized gradient (`grad_output_q`): the traceable twin of
# the quantizer launch.py runs on `grad_output`, which the op's backward formula puts into the compiled
# backward graph (ops/lora_linear.py) for Inductor to fuse into the kernel that produces the gradient.
# NVFP4 dgrads are not here (stochastic rounding from torch's generator, a whole-tensor scale).
GRAD_OUTPUT_Q_QUANTIZERS: dict[Quantizer, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = {
    Quantizer.FP8_ROW_E5M2: quantize_fp8_rowwise_e5m2_ref,  # fp8_row: E5M2, one scale per row (..., 1)
    Quantizer.FP8_BLOCK_E4M3: quantize_fp8_block_ref,  # fp8_block: E4M3, one scale per 1x128 (..., N/128)
}


def _compute(compute: "str | Compute", what: str) -> Compute:
    try:
        return Compute(compute)
    except ValueError:
        valid = ", ".join(c.value for c in Compute)
        raise ValueError(f"unknown {what} compute {compute!r}; valid: {valid}") from None


def _prequantized_operand(gemm: Gemm, compute: "str | Compute", weight_format: "str | WeightFormat") -> Quantizer | None:
    """The quantizer of the (gemm, compute, weight_format) variant when that kernel reads its A operand
    already quantized (`input_q` for the forward, `grad_output_q` for the dgrad), else None."""
    what = "forward" if gemm is Gemm.OUTPUT else "grad_input"
    comp, fmt = _compute(compute, what), weight_format_of(weight_format)
    try:
        v = variant(gemm, comp, fmt)
    except ValueError:
        return None
    takes = v.takes_input_q if gemm is Gemm.OUTPUT else v.takes_grad_output_q
    return v.quantizer if takes else None


def _input_q_kernel(forward: "str | Compute", weight_format: "str | WeightFormat") -> Quantizer | None:
    """The quantizer of the forward variant of (forward, weight_format) when it takes `input_q`, else None."""
    return _prequantized_operand(Gemm.OUTPUT, forward, weight_format)


def input_quantizer(forward: "str | Compute", weight_format: "str | WeightFormat"
                    ) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """The function whose outputs `input_q` must be for (forward, weight_format), or None when the
    forward kernel of that pair quantizes its input itself (bf16, dequant and NVFP4 kernels)."""
    name = _input_q_kernel(forward, weight_format)
    return None if name is None else INPUT_Q_QUANTIZERS[name]


def _grad_output_q_kernel(grad_input: "str | Compute", weight_format: "str | WeightFormat") -> Quantizer | None:
    """The quantizer of the dgrad variant of (grad_input, weight_format) when it takes `grad_output_q`, else None."""
    return _prequantized_operand(Gemm.GRAD_INPUT, grad_input, weight_format)


def grad_output_quantizer(grad_input: "str | Compute", weight_format: "str | WeightFormat"
                          ) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """The function whose outputs `grad_output_q` must be for (grad_input, weight_format), or None when the
    dgrad kernel of that pair quantizes its gradient itself or reads it in bf16 (bf16, dequant, NVFP4)."""
    name = _grad_output_q_kernel(grad_input, weight_format)
    return None if name is None else GRAD_OUTPUT_Q_QUANTIZERS[name]


def check_grad_output_q(grad_output_q: Sequence[torch.Tensor], grad_output: torch.Tensor,
                        weight_format: "str | WeightFormat", grad_input: "str | Compute"
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate `grad_output_q` against `grad_output` (..., N); return it as (data (M, N), scale (M, groups)).
    The contract is the kernel table's (`variants.check_grad_output_q`); this names the reference twin."""
    quantizer = GRAD_OUTPUT_Q_QUANTIZERS.get(_grad_output_q_kernel(grad_input, weight_format))
    what = None if quantizer is None else f"what {quantizer.__name__}(grad_output) returns"
    return variants.check_grad_output_q(grad_output_q, grad_output, weight_format, grad_input, what=what)


def check_input_q(input_q: Sequence[torch.Tensor], input: torch.Tensor, weight_format: "str | WeightFormat",
                  forward: "str | Compute") -> tuple[torch.Tensor, torch.Tensor]:
    """Validate `input_q` against `input` (..., K); return it as (data (M, K), scale (M, groups)).
    The contract is the kernel table's (`variants.check_input_q`); this names the reference twin."""
    name = _input_q_kernel(forward, weight_format)
    quantizer = INPUT_Q_QUANTIZERS.get(name)
    return variants.check_input_q(input_q, input, weight_format, forward,
                                  what=None if quantizer is None else f"what {quantizer.__name__}(input) returns")


def dequantize_input_q(input_q: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The input that `input_q` (what an `input_quantizer(...)` returned: E4M3 data (..., K) and FP32 scales)
    stands for, in `dtype`: each element times its scale in FP32, then one cast. The scales say the layout: one a
    row `(..., 1)` (fp8_row, or fp8_block with K <= 128, the same thing), else one per 1 x 128 block
    `(..., ceil(K/128))`. Traceable; what LoRA A's gradient reads when an op keeps its input in FP8
    (`ops.save_input_q`; `kernels/grad_lora_fp8.py` dequantizes the same way in its loads)."""
    data, scale = input_q
    groups = scale.shape[-1]
    if groups == 1:
        return Fp8Tensor(data, scale, (1, data.shape[-1])).dequantize(dtype)
    return Fp8Tensor(data, scale.reshape(-1, groups), FP8_ACTIVATION_BLOCK).dequantize(dtype)


def quantize_weight_ref(weight: torch.Tensor, weight_format: "str | WeightFormat") -> list[torch.Tensor]:
    """The weight list of docs/internals.md for a frozen `(N, K)` weight."""
    fmt = weight_format_of(weight_format)
    if weight.dim() != 2:
        raise ValueError(f"a linear weight is (N, K); got shape {tuple(weight.shape)}")
    if fmt is WeightFormat.BF16:
        return [weight.to(torch.bfloat16)]
    if fmt is WeightFormat.FP8_ROW:
        fwd = quantize_fp8_ref(weight, "e4m3", "row")
        bwd = quantize_fp8_ref(weight.t().contiguous(), "e4m3", "row")
        return [fwd.data, fwd.scale.reshape(-1), bwd.data, bwd.scale.reshape(-1)]
    if fmt is WeightFormat.FP8_BLOCK:
        return quantize_fp8_ref(weight, "e4m3", "block", FP8_WEIGHT_BLOCK).tensors()
    if fmt in (WeightFormat.NVFP4, WeightFormat.NVFP4_CACHED):
        return quantize_nvfp4_ref(weight).tensors()
    return quantize_nf4_ref(weight, NF4_BLOCK, double_quant=True).tensors()


def _check_list(tensors: list[torch.Tensor], fmt: str) -> None:
    want = len(WEIGHT_LISTS[WeightFormat(fmt)])
    if len(tensors) != want:
        raise ValueError(f"weight_format {fmt!r} takes {want} tensors {WEIGHT_LISTS[WeightFormat(fmt)]} "
                         f"(docs/internals.md), got {len(tensors)}; build it with quantize_weight_ref")


def _fp8_weight(tensors: list[torch.Tensor], fmt: str) -> Fp8Tensor:
    """The forward FP8 copy of an fp8_row / fp8_block weight list."""
    if fmt is WeightFormat.FP8_ROW:
        return Fp8Tensor(tensors[0], tensors[1].reshape(-1, 1), (1, tensors[0].shape[-1]))
    return Fp8Tensor(tensors[0], tensors[1], FP8_WEIGHT_BLOCK)


def dequantize_weight_ref(tensors: list[torch.Tensor], weight_format: "str | WeightFormat",
                          shape: "torch.Size | tuple[int, int]", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The `(N, K)` weight a weight list stands for (the forward copy), in `dtype`."""
    fmt = weight_format_of(weight_format)
    _check_list(tensors, fmt)
    shape = torch.Size(shape)
    if fmt is WeightFormat.BF16:
        out = tensors[0]
    elif fmt in (WeightFormat.FP8_ROW, WeightFormat.FP8_BLOCK):
        out = dequantize_fp8_ref(_fp8_weight(tensors, fmt))
    elif fmt in (WeightFormat.NVFP4, WeightFormat.NVFP4_CACHED):
        out = dequantize_nvfp4_ref(NVFP4Tensor(tensors[0], tensors[1], tensors[2], shape))
    else:
        packed, absmax_q, absmax_scale, absmax_offset, absmax_code = tensors
        out = dequantize_nf4_ref(NF4Tensor(packed, None, absmax_q, absmax_scale, absmax_offset, absmax_code,
                                           NF4_BLOCK, shape))
    if out.shape != shape:
        raise ValueError(f"weight list holds a {tuple(out.shape)} weight, not {tuple(shape)}")
    return out.to(dtype)


def _mm(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """a @ b_t.T with FP32 operands and accumulation."""
    return a.float() @ b_t.float().t()


def forward_base(x2: torch.Tensor, tensors: list[torch.Tensor], fmt: str, n: int, forward: str,
                  input_q: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Q(input) @ Q(W).T in FP32, for a 2D input (M, K); `input_q` (checked, 2D) replaces Q(input)."""
    k = x2.shape[-1]
    if forward is Compute.BF16:
        return _mm(x2, dequantize_weight_ref(tensors, fmt, (n, k), torch.bfloat16))
    if forward is Compute.FP8:
        if fmt in (WeightFormat.FP8_ROW, WeightFormat.FP8_BLOCK):
            w = dequantize_fp8_ref(_fp8_weight(tensors, fmt))
        else:
            w = quantize_fp8_ref(dequantize_weight_ref(tensors, fmt, (n, k)), "e4m3", "row").dequantize()
        if input_q is not None:
            xq = Fp8Tensor(input_q[0], input_q[1], FP8_ACTIVATION_BLOCK if fmt is WeightFormat.FP8_BLOCK else (1, k))
        elif fmt is WeightFormat.FP8_BLOCK:
            xq = quantize_fp8_ref(x2, "e4m3", "block", FP8_ACTIVATION_BLOCK)
        else:
            xq = quantize_fp8_ref(x2, "e4m3", "row")
        return _mm(xq.dequantize(), w)
    if fmt in (WeightFormat.NVFP4, WeightFormat.NVFP4_CACHED):
        w = dequantize_weight_ref(tensors, fmt, (n, k))
    else:
        w = quantize_nvfp4_ref(dequantize_weight_ref(tensors, fmt, (n, k))).dequantize()
    return _mm(quantize_nvfp4_ref(x2).dequantize(), w)


def dgrad_base(g2: torch.Tensor, tensors: list[torch.Tensor], fmt: str, k: int, grad_input: str,
               grad_output_q: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Q(grad_output) @ Q(W) in FP32, for a 2D grad_output (M, N); `grad_output_q` (checked, 2D) replaces
    Q(grad_output)."""
    n = g2.shape[-1]
    if grad_input is Compute.BF16:
        return _mm(g2, dequantize_weight_ref(tensors, fmt, (n, k), torch.bfloat16).t())
    if grad_input is Compute.FP8:
        if fmt is WeightFormat.FP8_ROW:
            w_t = dequantize_fp8_ref(Fp8Tensor(tensors[2], tensors[3].reshape(-1, 1), (1, n)))
        elif fmt is WeightFormat.FP8_BLOCK:
            w_t = dequantize_fp8_ref(_fp8_weight(tensors, fmt)).t()
        else:
            w = dequantize_weight_ref(tensors, fmt, (n, k))
            w_t = quantize_fp8_ref(w.t().contiguous(), "e4m3", "row").dequantize()
        if grad_output_q is not None:
            gq = Fp8Tensor(grad_output_q[0], grad_output_q[1],
                           FP8_ACTIVATION_BLOCK if fmt is WeightFormat.FP8_BLOCK else (1, n))
        elif fmt is WeightFormat.FP8_BLOCK:
            gq = quantize_fp8_ref(g2, GRAD_FP8_ELEMENT[fmt.value], "block", FP8_ACTIVATION_BLOCK)
        else:
            gq = quantize_fp8_ref(g2, GRAD_FP8_ELEMENT["fp8_row"], "row")
        return _mm(gq.dequantize(), w_t)
    w_t = dequantize_weight_ref(tensors, fmt, (n, k)).t().contiguous()
    w_t = quantize_nvfp4_ref(w_t).dequantize()
    gen = torch.Generator(device=g2.device).manual_seed(NVFP4_SR_SEED)
    gq = quantize_nvfp4_ref(g2, stochastic=True, generator=gen)
    return _mm(gq.dequantize(), w_t)


def _check_lora(lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, k: int, n: int) -> bool:
    if (lora_a is None) != (lora_b is None):
        raise ValueError("pass both lora_a and lora_b, or neither (a plain linear)")
    if lora_a is None:
        return False
    if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_a.shape[1] != k or lora_b.shape[0] != n \
            or lora_a.shape[0] != lora_b.shape[1]:
        raise ValueError(f"lora_a must be (r, K={k}) and lora_b (N={n}, r); got {tuple(lora_a.shape)} "
                         f"and {tuple(lora_b.shape)}")
    return True


def _weight_n(tensors: list[torch.Tensor], fmt: str, k: int, lora_b: torch.Tensor | None) -> int:
    """N, read from the weight list (NF4 stores a flat vector: N*K rounded up to even, / 2 bytes)."""
    _check_list(tensors, fmt)
    if fmt is not WeightFormat.NF4:
        return tensors[0].shape[0]
    if lora_b is not None:
        return lora_b.shape[0]
    numel = 2 * tensors[0].numel()
    return numel // k if numel % k == 0 else (numel - 1) // k


def lora_linear_ref(
    input: torch.Tensor,
    weight: list[torch.Tensor],
    weight_format: "str | WeightFormat",
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    lora_input: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora_scale: float,
    forward: "str | Compute",
    grad_input: "str | Compute",
    input_q: Sequence[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`surogate::lora_linear` on plain torch: (output (..., N), lora_hidden (..., r))."""
    fmt = weight_format_of(weight_format)
    fwd = _compute(forward, "forward")
    _compute(grad_input, "grad_input")
    k = input.shape[-1]
    n = _weight_n(weight, fmt, k, lora_b)
    has_lora = _check_lora(lora_a, lora_b, k, n)
    xq = None if input_q is None else check_input_q(input_q, input, fmt, fwd)
    lead = input.shape[:-1]
    x2 = input.reshape(-1, k)
    acc = forward_base(x2, weight, fmt, n, fwd, xq)
    if bias is not None:
        acc = acc + bias.float()
    if not has_lora:
        return acc.to(input.dtype).reshape(*lead, n), input.new_empty((*lead, 0))
    li = x2 if lora_input is None else lora_input.reshape(-1, k)
    hidden = _mm(li.to(input.dtype), lora_a.to(input.dtype)).to(input.dtype)
    acc = acc + lora_scale * _mm(hidden, lora_b.to(input.dtype))
    return acc.to(input.dtype).reshape(*lead, n), hidden.reshape(*lead, lora_a.shape[0])


def lora_linear_backward_ref(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    weight: list[torch.Tensor],
    weight_format: "str | WeightFormat",
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    lora_input: torch.Tensor | None,
    lora_hidden: torch.Tensor | None,
    lora_scale: float,
    grad_input: "str | Compute",
    grad_output_q: Sequence[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """`surogate::lora_linear_backward`: (grad_input, grad_lora_a, grad_lora_b, grad_lora_input)."""
    fmt = weight_format_of(weight_format)
    dgrad = _compute(grad_input, "grad_input")
    k = input.shape[-1]
    n = grad_output.shape[-1]
    has_lora = _check_lora(lora_a, lora_b, k, n)
    dtype = input.dtype
    gq = None if grad_output_q is None else check_grad_output_q(grad_output_q, grad_output, fmt, dgrad)
    g2 = grad_output.reshape(-1, n).to(dtype)
    acc = dgrad_base(g2, weight, fmt, k, dgrad, gq)
    if not has_lora:
        return acc.to(dtype).reshape(input.shape), None, None, None
    li = (input if lora_input is None else lora_input).reshape(-1, k).to(dtype)
    a, b = lora_a.to(dtype), lora_b.to(dtype)
    hidden = _mm(li, a).to(dtype) if lora_hidden is None else lora_hidden.reshape(-1, a.shape[0]).to(dtype)
    t = (g2.float() @ b.float()).to(dtype)  # (M, r): grad of lora_hidden before the scale
    grad_b = (lora_scale * (g2.float().t() @ hidden.float())).to(lora_b.dtype)
    grad_a = (lora_scale * (t.float().t() @ li.float())).to(lora_a.dtype)
    lora_dx = lora_scale * (t.float() @ a.float())
    if lora_input is None:
        return (acc + lora_dx).to(dtype).reshape(input.shape), grad_a, grad_b, None
    return acc.to(dtype).reshape(input.shape), grad_a, grad_b, lora_dx.to(dtype).reshape(lora_input.shape)
