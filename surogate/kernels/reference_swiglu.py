"""Plain-torch twins of kernels/swiglu.py: SwiGLU's forward and backward over a fused gate/up output, each
optionally with qfp8's 1 x 128 quantize of its result. The CPU implementations of `surogate::swiglu_forward` /
`surogate::swiglu_backward` and what the Triton kernels are tested against (tests/test_swiglu.py)."""

from __future__ import annotations

import torch

from surogate.kernels.reference_formats import quantize_fp8_block_ref


def swiglu_forward_ref(gate_up: torch.Tensor,
                       quantize: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, data, scale): h = silu(g) * u = g * sigmoid(g) * u for [g | u] = gate_up, in FP32 and rounded once to
    gate_up's dtype; with `quantize`, data and scale are `quantize_fp8_block_ref(h)`, else empty."""
    g, u = gate_up.float().chunk(2, dim=-1)
    h = (g * torch.sigmoid(g) * u).to(gate_up.dtype)
    return (h, *_quantized(h, quantize))


def _quantized(x: torch.Tensor, quantize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if not quantize:
        return x.new_empty(0, dtype=torch.float8_e4m3fn), x.new_empty(0, dtype=torch.float32)
    return quantize_fp8_block_ref(x)


def swiglu_backward_ref(grad_h: torch.Tensor, gate_up: torch.Tensor,
                        quantize: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_gate_up, data, scale) for h = silu(g) * u with [g | u] = gate_up: dg = dh * u * s * (1 + g * (1 - s)),
    du = dh * g * s, s = sigmoid(g), in FP32 and rounded once to gate_up's dtype; with `quantize`, data and
    scale are `quantize_fp8_block_ref(d_gate_up)` (E4M3, 1 x 128 blocks, scales M-contiguous), else empty."""
    g, u = gate_up.float().chunk(2, dim=-1)
    dh = grad_h.float()
    s = torch.sigmoid(g)
    d = torch.cat([dh * u * s * (1.0 + g * (1.0 - s)), dh * (g * s)], dim=-1).to(gate_up.dtype)
    return (d, *_quantized(d, quantize))
