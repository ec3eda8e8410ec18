"""`swiglu(gate_up)`: h = silu(g) * u over a fused gate/up GEMM's output, with SwiGLU's backward as one op.

The forward is the plain torch of the model's MLP (traced into the graph, so Inductor fuses it and the FP8
producer quantize as before, passes/producer.py); the backward is `surogate::swiglu_backward`, one Triton
kernel on CUDA (kernels/swiglu.py) that writes the fused GEMM's whole gradient [dg | du] (no cat) and, once
the post-grad pass sets `quantize` (passes/swiglu.py), the E4M3 1 x 128 blocks qfp8's dgrad reads. The pass
puts `swiglu` in place of `silu(g) * u` where that pays (passes/swiglu.py); it is not a user-facing API.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from surogate.kernels import reference_swiglu
from surogate.ops.lora_linear import _assert_finite

_BLOCK = 128


@torch.library.custom_op("surogate::swiglu_backward", mutates_args=())
def _swiglu_backward_op(grad_h: Tensor, gate_up: Tensor, quantize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(d_gate_up, data, scale): the CPU implementation, the plain-torch reference (`swiglu_backward_ref`)."""
    _assert_finite(grad_h, "the gradient")
    d, data, scale = reference_swiglu.swiglu_backward_ref(grad_h, gate_up, quantize)
    return d, data, scale


@_swiglu_backward_op.register_kernel("cuda")
def swiglu_backward_cuda(grad_h: Tensor, gate_up: Tensor, quantize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The Triton kernel (tests call it on CPU tensors under the interpreter)."""
    from surogate.kernels import swiglu as kernel

    _assert_finite(grad_h, "the gradient")
    return kernel.swiglu_backward(grad_h, gate_up, quantize)


@_swiglu_backward_op.register_fake
def _(grad_h: Tensor, gate_up: Tensor, quantize: bool) -> tuple[Tensor, Tensor, Tensor]:
    d = gate_up.new_empty(gate_up.shape)
    if not quantize:
        return d, gate_up.new_empty(0, dtype=torch.float8_e4m3fn), gate_up.new_empty(0, dtype=torch.float32)
    lead, width = gate_up.shape[:-1], gate_up.shape[-1]
    rows = gate_up.numel() // width
    scale = gate_up.new_empty((width // _BLOCK, rows), dtype=torch.float32).t().view(*lead, width // _BLOCK)
    return d, gate_up.new_empty(gate_up.shape, dtype=torch.float8_e4m3fn), scale


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: Tensor) -> Tensor:
        ctx.save_for_backward(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_h: Tensor) -> Tensor:
        (gate_up,) = ctx.saved_tensors
        return torch.ops.surogate.swiglu_backward(grad_h.contiguous(), gate_up, False)[0]


def swiglu(gate_up: Tensor) -> Tensor:
    """silu(g) * u for [g | u] = gate_up (..., 2I); differentiable through `surogate::swiglu_backward`."""
    return _SwiGLU.apply(gate_up)
