"""Plain-torch twin of kernels/swiglu.py: SwiGLU's backward over a fused gate/up output, optionally with the
FP8 dgrad's 1 x 128 quantize of the result. The CPU implementation of `surogate::swiglu_backward` and what the
Triton kernel is tested against (tests/test_swiglu.py)."""

from __future__ import annotations

import torch

from surogate.kernels.reference_formats import quantize_fp8_block_ref


def swiglu_backward_ref(grad_h: torch.Tensor, gate_up: torch.Tensor,
                        quantize: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_gate_up, data, scale) for h = silu(g) * u with [g | u] = gate_up: dg = dh * u * s * (1 + g * (1 - s)),
    du = dh * g * s, s = sigmoid(g), in FP32 and rounded once to gate_up's dtype; with `quantize`, data and
    scale are `quantize_fp8_block_ref(d_gate_up)` (E4M3, 1 x 128 blocks, scales M-contiguous), else empty."""
    g, u = gate_up.float().chunk(2, dim=-1)
    dh = grad_h.float()
    s = torch.sigmoid(g)
    d = torch.cat([dh * u * s * (1.0 + g * (1.0 - s)), dh * (g * s)], dim=-1).to(gate_up.dtype)
    if not quantize:
        return d, d.new_empty(0, dtype=torch.float8_e4m3fn), d.new_empty(0, dtype=torch.float32)
    data, scale = quantize_fp8_block_ref(d)
    return d, data, scale
