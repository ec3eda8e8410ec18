"""`swiglu(gate_up)`: h = silu(g) * u over a fused gate/up GEMM's output, with SwiGLU's backward as one op
(`activation="gelu_tanh"`: Gemma's GeGLU, gelu(g, approximate="tanh") * u, the same way).

The forward is the plain torch of the model's MLP (traced into the graph, so Inductor fuses it and the FP8
producer quantize as before, passes/producer.py); the backward is `surogate::swiglu_backward`, one Triton
kernel on CUDA (kernels/swiglu.py) that writes the fused GEMM's whole gradient [dg | du] (no cat) and, once
the post-grad pass sets `quantize` (passes/swiglu.py), the E4M3 1 x 128 blocks qfp8's dgrad reads.
`swiglu_fused(gate_up)` also runs the forward as one op, `surogate::swiglu_forward`, which with `quantize` set
writes h's 1 x 128 blocks for qfp8's down_proj (passes/swiglu.py `FORWARD_OP`, on by default).
The pass puts these in place of `silu(g) * u` where that pays; they are not a user-facing API.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from surogate.kernels import reference_swiglu
from surogate.ops.lora_linear import _assert_finite
from surogate.recipes.formats import FP8_ACTIVATION_BLOCK

_BLOCK = FP8_ACTIVATION_BLOCK[1]  # qfp8's 1 x 128 scale blocks


def _fake_fp8(like: Tensor, quantize: bool) -> tuple[Tensor, Tensor]:
    """The (data, scale) the ops return for `like`'s shape: E4M3 and M-contiguous 1 x 128 scales, or empties."""
    if not quantize:
        return like.new_empty(0, dtype=torch.float8_e4m3fn), like.new_empty(0, dtype=torch.float32)
    lead, width = like.shape[:-1], like.shape[-1]
    rows = like.numel() // width
    scale = like.new_empty((width // _BLOCK, rows), dtype=torch.float32).t().view(*lead, width // _BLOCK)
    return like.new_empty(like.shape, dtype=torch.float8_e4m3fn), scale


@torch.library.custom_op("surogate::swiglu_backward", mutates_args=())
def _swiglu_backward_op(grad_h: Tensor, gate_up: Tensor, activation: str,
                        quantize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(d_gate_up, data, scale): the CPU implementation, the plain-torch reference (`swiglu_backward_ref`)."""
    _assert_finite(grad_h, "the gradient")
    return reference_swiglu.swiglu_backward_ref(grad_h, gate_up, quantize, activation)


@_swiglu_backward_op.register_kernel("cuda")
def swiglu_backward_cuda(grad_h: Tensor, gate_up: Tensor, activation: str,
                         quantize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The Triton kernel (tests call it on CPU tensors under the interpreter)."""
    from surogate.kernels import swiglu as kernel

    _assert_finite(grad_h, "the gradient")
    return kernel.swiglu_backward(grad_h, gate_up, quantize, activation)


@_swiglu_backward_op.register_fake
def _(grad_h: Tensor, gate_up: Tensor, activation: str, quantize: bool) -> tuple[Tensor, Tensor, Tensor]:
    d = gate_up.new_empty(gate_up.shape)
    return (d, *_fake_fp8(d, quantize))


@torch.library.custom_op("surogate::swiglu_forward", mutates_args=())
def _swiglu_forward_op(gate_up: Tensor, activation: str, quantize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(h, data, scale): the CPU implementation, the plain-torch reference (`swiglu_forward_ref`)."""
    return reference_swiglu.swiglu_forward_ref(gate_up, quantize, activation)


@_swiglu_forward_op.register_kernel("cuda")
def swiglu_forward_cuda(gate_up: Tensor, activation: str, quantize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The Triton kernel (tests call it on CPU tensors under the interpreter)."""
    from surogate.kernels import swiglu as kernel

    return kernel.swiglu_forward(gate_up, quantize, activation)


@_swiglu_forward_op.register_fake
def _(gate_up: Tensor, activation: str, quantize: bool) -> tuple[Tensor, Tensor, Tensor]:
    h = gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))
    return (h, *_fake_fp8(h, quantize))


def _gate(gate: Tensor, activation: str) -> Tensor:
    """The model's own gate activation, as torch ops (traced into the graph)."""
    return F.gelu(gate, approximate="tanh") if activation == "gelu_tanh" else F.silu(gate)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: Tensor, activation: str) -> Tensor:
        ctx.save_for_backward(gate_up)
        ctx.activation = activation
        gate, up = gate_up.chunk(2, dim=-1)
        return _gate(gate, activation) * up

    @staticmethod
    def backward(ctx, grad_h: Tensor) -> tuple[Tensor, None]:
        (gate_up,) = ctx.saved_tensors
        return torch.ops.surogate.swiglu_backward(grad_h.contiguous(), gate_up, ctx.activation, False)[0], None


class _SwiGLUFused(_SwiGLU):
    @staticmethod
    def forward(ctx, gate_up: Tensor, activation: str) -> Tensor:
        ctx.save_for_backward(gate_up)
        ctx.activation = activation
        return torch.ops.surogate.swiglu_forward(gate_up, activation, False)[0]


def swiglu(gate_up: Tensor, activation: str = "silu") -> Tensor:
    """act(g) * u for [g | u] = gate_up (..., 2I), act silu or (`"gelu_tanh"`) the tanh GELU; differentiable
    through `surogate::swiglu_backward`."""
    return _SwiGLU.apply(gate_up, activation)


def swiglu_fused(gate_up: Tensor, activation: str = "silu") -> Tensor:
    """`swiglu`, its forward one op too (`surogate::swiglu_forward`, rounded once as Inductor's fused kernel)."""
    return _SwiGLUFused.apply(gate_up, activation)
