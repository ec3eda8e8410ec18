"""Error measures the numerics tests share."""

from __future__ import annotations

import torch


def sqnr(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of `y` against `ref`, in dB (inf when equal); `y` must be finite."""
    y, ref = y.double(), ref.double()
    assert torch.isfinite(y).all(), "non-finite result"
    err = (y - ref).pow(2).sum()
    if err == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum().clamp_min(1e-300) / err))


def bf16_ulp(v: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 values (8 significant bits) at each |v|, as FP64 (the smallest normal's at 0)."""
    _, exp = torch.frexp(v.double().abs().clamp_min(2.0 ** -126))
    return torch.ldexp(torch.ones_like(v, dtype=torch.float64), exp - 8)


def rounded_once(got: torch.Tensor, exact: torch.Tensor, magnitude: torch.Tensor, fp32_terms: int) -> float:
    """The largest `|got - exact|` over what one rounding to bf16 allows (half an ulp of `exact`) plus the FP32
    error of summing `fp32_terms` terms whose absolute values add up to `magnitude`: <= 1 when `got` is the exact
    value rounded once to bf16, summed in FP32 in any order."""
    allowed = 0.5 * bf16_ulp(exact) + fp32_terms * 2.0 ** -24 * magnitude.double()
    return float(((got.double() - exact.double()).abs() / allowed).max())


def odd_values(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """bf16 values a quantizer must survive: a wide dynamic range (1e-20 to 1e20 along the last dim), -0,
    and, with four or more rows, an all-zero row, a row with a NaN and one with an Inf."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * torch.logspace(-20, 20, shape[-1])
    x2 = x.view(-1, shape[-1])
    x2[0, 0] = -0.0
    if x2.shape[0] > 3:
        x2[1] = 0.0
        x2[2, -1] = float("nan")
        x2[3, 0] = float("inf")
    return x.bfloat16()


def lora_gemm_case(m: int, n: int, k: int, r: int, fmt: str, seed: int, device: str):
    """(x, w, lora_a, lora_b, bias, grad_output, w quantized to `fmt`): one LoRA linear's operands at unit
    scale (w and lora_a scaled by 1/sqrt(k)), drawn on the CPU from `seed`, then moved to `device`."""
    from surogate.kernels.quantize import quantize_weight

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) / k ** 0.5).bfloat16()
    a = torch.randn(r, k, generator=g) / k ** 0.5
    b = torch.randn(n, r, generator=g) * 0.2
    bias = torch.randn(n, generator=g).bfloat16()
    go = torch.randn(m, n, generator=g).bfloat16()
    x, w, a, b, bias, go = (t.to(device) for t in (x, w, a, b, bias, go))
    return x, w, a, b, bias, go, quantize_weight(w, fmt)


def lora_op_case(k: int, n: int, r: int = 4) -> tuple[torch.Tensor, ...]:
    """(x (2, 5, k) bf16, w (n, k) bf16, lora_a (r, k), lora_b (n, r), grad_output (2, 5, n) bf16) on the CPU,
    seed 0: the op-level case of the producer and grad-producer tests."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) / k ** 0.5).bfloat16()
    a = torch.randn(r, k, generator=g) / k ** 0.5
    b = torch.randn(n, r, generator=g) * 0.1
    go = torch.randn(2, 5, n, generator=g).bfloat16()
    return x, w, a, b, go
