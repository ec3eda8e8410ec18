"""Plain-torch twins of kernels/swiglu.py: SwiGLU's (or GeGLU's, `activation="gelu_tanh"`) forward and backward
over a fused gate/up output, each optionally with qfp8's 1 x 128 quantize of its result. The CPU implementations
of `surogate::swiglu_forward` / `surogate::swiglu_backward` and what the Triton kernels are tested against
(tests/test_swiglu.py)."""

from __future__ import annotations

import math

import torch

from surogate.kernels.reference_formats import quantize_fp8_block_ref


_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


def _gelu_tanh(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, a): t = tanh(c (g + 0.044715 g^3)) and the gate a = g / 2 (1 + t), GELU's tanh form."""
    t = torch.tanh(_GELU_C * (g + _GELU_A * (g * g * g)))
    return t, 0.5 * g * (1.0 + t)


def gate(g: torch.Tensor, activation: str) -> torch.Tensor:
    """act(g) in g's dtype's arithmetic (FP32 here): g * sigmoid(g), or the tanh GELU."""
    return _gelu_tanh(g)[1] if activation == "gelu_tanh" else g * torch.sigmoid(g)


def gated_grads(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor,
                activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dg, du) of h = act(g) * u, unrounded (FP32 inputs): dg = dh * u * s * (1 + g * (1 - s)), du = dh * g * s,
    s = sigmoid(g); `gelu_tanh`: dg = dh * u * a'(g), du = dh * a(g), a'(g) in the order of PyTorch's GELU backward."""
    if activation == "gelu_tanh":
        t, a = _gelu_tanh(g)
        da = 0.5 * (1.0 + t) + (0.5 * g) * (1.0 - t * t) * _GELU_C * (1.0 + 3.0 * _GELU_A * (g * g))
        return dh * u * da, dh * a
    s = torch.sigmoid(g)
    return dh * u * s * (1.0 + g * (1.0 - s)), dh * (g * s)


def swiglu_forward_ref(gate_up: torch.Tensor, quantize: bool = False,
                       activation: str = "silu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, data, scale): h = silu(g) * u = g * sigmoid(g) * u (`gelu_tanh`: gelu(g, approximate="tanh") * u) for
    [g | u] = gate_up, in FP32 and rounded once to gate_up's dtype; with `quantize`, data and scale are
    `quantize_fp8_block_ref(h)`, else empty."""
    g, u = gate_up.float().chunk(2, dim=-1)
    h = (gate(g, activation) * u).to(gate_up.dtype)
    return (h, *_quantized(h, quantize))


def _quantized(x: torch.Tensor, quantize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if not quantize:
        return x.new_empty(0, dtype=torch.float8_e4m3fn), x.new_empty(0, dtype=torch.float32)
    return quantize_fp8_block_ref(x)


def swiglu_backward_ref(grad_h: torch.Tensor, gate_up: torch.Tensor, quantize: bool = False,
                        activation: str = "silu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_gate_up, data, scale) for h = silu(g) * u with [g | u] = gate_up: dg = dh * u * s * (1 + g * (1 - s)),
    du = dh * g * s, s = sigmoid(g) (`gelu_tanh`: dg = dh * u * a'(g), du = dh * a(g), a'(g) in the order of
    PyTorch's GELU backward), in FP32 and rounded once to gate_up's dtype; with `quantize`, data and scale are
    `quantize_fp8_block_ref(d_gate_up)` (E4M3, 1 x 128 blocks, scales M-contiguous), else empty."""
    g, u = gate_up.float().chunk(2, dim=-1)
    d = torch.cat(gated_grads(grad_h.float(), g, u, activation), dim=-1).to(gate_up.dtype)
    return (d, *_quantized(d, quantize))
