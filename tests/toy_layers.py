"""Layers the toy FX-pass test models share, spelled as Hugging Face spells them (the passes match that)."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """HF's RMSNorm: fp32 statistics, the normalised value cast back before the weight multiply."""
    var = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(var + 1e-6)).to(x.dtype)
