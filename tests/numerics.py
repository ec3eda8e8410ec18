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
