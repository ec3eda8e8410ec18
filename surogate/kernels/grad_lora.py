"""LoRA weight gradients: `grad_lora_a`, `grad_lora_b` and the hidden gradient both need.

With `g = grad_output (M, N)`, `x = lora_input (M, K)`, `h = lora_hidden (M, r)`:
    grad_lora_hidden = g @ lora_b            (M, r)
    grad_lora_b      = s * g^T @ h           (N, r)
    grad_lora_a      = s * grad_lora_hidden^T @ x   (r, K)
These are skinny GEMMs (one side is r = 8..64) whose cost is reading `g` and `x` once, so
`grad_lora` is three cuBLAS calls; a Triton version (one pass over `g` for both) was not written
or measured (docs/kernels.md). FP32 accumulate, bf16 operands, results in the masters'
dtype.

Around the GEMMs every elementwise kernel works on a tensor of a few hundred KB and costs a launch (~2-5 us
on an H200, with the gap after it), so there are as few as the numbers allow: the factors arrive already in the
compute dtype (the forward's casts, kept by the op). On CUDA the two weight gradients are each one cuBLAS call
that writes the FP32 product scaled by `alpha` (`aten::addmm.dtype`): the reference's formula, with no bf16
rounding of the product and no multiply kernel after it (1,152 launches a Qwen3-8B step, bench/NOTES.md run 83).
Where that op is missing (the CPU, where the tests run the kernels) the bf16 product is scaled in one multiply
(`_scaled`), not a cast and then a multiply (bench/NOTES.md, "Copies in the fp8 step").
"""

from __future__ import annotations

import torch

from surogate.compat import fp32_out_addmm
from surogate.kernels.grad_lora_fp8 import grad_lora_a_fp8

# One-element FP32 constants per (device, value): `_scaled`'s second operand (a LoRA scale) and addmm's
# unread `input` at beta = 0.
_CONSTANTS: dict[tuple[torch.device, float], torch.Tensor] = {}


def _fp32_constant(device: torch.device, value: float) -> torch.Tensor:
    """`value` as a (1,) FP32 tensor on `device`, made once. Not kept when made during a CUDA graph
    capture: its fill runs only when the graph replays, so an eager reader could find it unwritten."""
    key = (device, float(value))
    constant = _CONSTANTS.get(key)
    if constant is None:
        constant = torch.full((1,), float(value), dtype=torch.float32, device=device)
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            _CONSTANTS[key] = constant
    return constant


def _scaled(product: torch.Tensor, lora_scale: float, dtype: torch.dtype) -> torch.Tensor:
    """`(product.float() * lora_scale).to(dtype)` in one kernel, with the same bits.

    A one-element FP32 tensor operand promotes the multiply to FP32 (a Python scalar would not: bf16 x
    scalar rounds to bf16), and on CUDA the multiply reads `product` with the cast (no temporary): the FP32
    product of the same two FP32 values. FP32 masters need no further cast."""
    return torch.mul(product, _fp32_constant(product.device, lora_scale)).to(dtype)


def _weight_grad(p: torch.Tensor, q: torch.Tensor, lora_scale: float, dtype: torch.dtype) -> torch.Tensor:
    """`lora_scale * p @ q` in `dtype` (a master's): on CUDA one GEMM writing the FP32 product times the scale;
    elsewhere the product in `p`'s dtype, then `_scaled`."""
    if p.is_cuda and fp32_out_addmm():
        zero = _fp32_constant(p.device, 0.0).expand(p.shape[0], q.shape[1])  # beta = 0: never read or copied
        out = torch.addmm(zero, p, q, beta=0, alpha=float(lora_scale), out_dtype=torch.float32)
        return out if dtype == torch.float32 else out.to(dtype)
    return _scaled(p @ q, lora_scale, dtype)


def grad_lora(grad_output: torch.Tensor, lora_input: "torch.Tensor | tuple[torch.Tensor, torch.Tensor]",
              lora_hidden: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, lora_scale: float,
              grad_dtypes: tuple[torch.dtype, torch.dtype] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """2-D operands in, `(grad_lora_a, grad_lora_b, grad_lora_hidden)` out.

    `lora_input` may be the input's FP8 copy `(data (M, K), scale (M, groups))` (`save_fp8_inputs`): A's gradient
    is then `grad_lora_fp8.grad_lora_a_fp8`, one Triton kernel dequantizing in its loads, where the input itself
    is one cuBLAS call.

    `lora_a` / `lora_b` may already be in the compute dtype (the forward's casts); `grad_dtypes` are then the
    dtypes of the masters, which the gradients take (default: those of `lora_a` and `lora_b`).
    `grad_lora_hidden` is unscaled and in the compute dtype; the caller folds `lora_scale`
    into the dgrad epilogue.
    """
    dtype = grad_output.dtype
    a_dtype, b_dtype = grad_dtypes or (lora_a.dtype, lora_b.dtype)
    gh = grad_output @ lora_b.to(dtype)
    grad_b = _weight_grad(grad_output.t(), lora_hidden.to(dtype), lora_scale, b_dtype)
    if isinstance(lora_input, tuple):
        grad_a = grad_lora_a_fp8(gh, *lora_input, lora_scale, a_dtype)
    else:
        grad_a = _weight_grad(gh.t(), lora_input.to(dtype), lora_scale, a_dtype)
    return grad_a, grad_b, gh
