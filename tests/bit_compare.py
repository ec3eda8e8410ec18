"""Bit-level comparison shared by the CPU (interpreter) and GPU quantizer tests."""

from __future__ import annotations

import torch


def bits(t: torch.Tensor) -> torch.Tensor:
    """Compare floats by their bytes: -0 differs from +0, every NaN is one NaN.

    The sign of a NaN is not part of the format: torch on x86 CPUs keeps or sets it
    (x / NaN), CUDA makes NaNs canonical; the kernels always write the positive NaN.
    """
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        b = t.contiguous().view(torch.uint8)
        nan = (b & 0x7F) > (0x7E if t.dtype == torch.float8_e4m3fn else 0x7C)
        return torch.where(nan, torch.full_like(b, 0x7F), b)
    if t.is_floating_point():
        t = torch.where(torch.isnan(t), torch.full_like(t, float("nan")), t)
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])
