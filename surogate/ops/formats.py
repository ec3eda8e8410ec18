"""Public quantize/dequantize API for surogate's numeric formats.

    qt = surogate.formats.quantize(w, "nvfp4")
    w_hat = qt.dequantize()            # or surogate.formats.dequantize(qt)

Formats and their options (docs/formats.md has the bit layouts and error bounds):

- "fp8_e4m3", "fp8_e5m2": FP8 elements with FP32 scales (`Fp8Tensor`).
    scaling="row" | "tensor" | "block" (default "row": one scale per row of the last dim),
    block=(bm, bk) for scaling="block" (default (1, 128)), power_of_two=False (round scales up
    to powers of two), scale=None (a given scale, e.g. from delayed scaling; used as is).
- "fp8_block": E4M3 with one FP32 scale per block (`Fp8Tensor`).
    block=(128, 128) (weights; (1, 128) for activations), power_of_two=False.
- "nvfp4": E2M1 elements, E4M3 scale per 16 along the last dim, FP32 tensor scale (`NVFP4Tensor`).
    tensor_scale=None (computed as amax / 2688), stochastic=False (stochastic rounding),
    generator=None (a torch.Generator, required when stochastic=True).
- "mxfp8", "mxfp4": OCP MX, E4M3 / E2M1 elements with an E8M0 scale per 32 (`MXTensor`). No options.
- "nf4": bitsandbytes NF4 (`NF4Tensor`), bit-compatible with bitsandbytes' quantize_4bit.
    blocksize=64, double_quant=True (8-bit absmaxes per 256, as bitsandbytes' compress_statistics).

Unknown formats or options raise ValueError naming the valid ones; so does "bf16", which is a
stored format (`surogate.recipes.FORMATS`) but has no scale and nothing to quantize. These run the
plain-torch reference (any device); the Triton kernels are reached through `surogate.ops`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from surogate.kernels import reference as ref
from surogate.kernels.qtensor import Fp8Tensor, MXTensor, NF4Tensor, NVFP4Tensor, QTensor
from surogate.recipes.formats import FORMATS

__all__ = ["Fp8Tensor", "MXTensor", "NF4Tensor", "NVFP4Tensor", "QTensor", "dequantize", "names", "quantize"]


def _fp8(element: str) -> Callable[..., Fp8Tensor]:
    def run(x: torch.Tensor, scaling: str = "row", block: tuple[int, int] = (1, 128),
            power_of_two: bool = False, scale: "torch.Tensor | float | None" = None) -> Fp8Tensor:
        return ref.quantize_fp8_ref(x, element, scaling, tuple(block), power_of_two, scale)

    return run


def _fp8_block(x: torch.Tensor, block: tuple[int, int] = (128, 128), power_of_two: bool = False) -> Fp8Tensor:
    return ref.quantize_fp8_ref(x, "e4m3", "block", tuple(block), power_of_two)


def _nvfp4(x: torch.Tensor, tensor_scale: "torch.Tensor | float | None" = None, stochastic: bool = False,
           generator: torch.Generator | None = None) -> NVFP4Tensor:
    return ref.quantize_nvfp4_ref(x, tensor_scale, stochastic, generator)


def _nf4(x: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Tensor:
    return ref.quantize_nf4_ref(x, blocksize, double_quant)


_QUANTIZERS: dict[str, tuple[Callable[..., QTensor], tuple[str, ...]]] = {
    "fp8_e4m3": (_fp8("e4m3"), ("scaling", "block", "power_of_two", "scale")),
    "fp8_e5m2": (_fp8("e5m2"), ("scaling", "block", "power_of_two", "scale")),
    "fp8_block": (_fp8_block, ("block", "power_of_two")),
    "nvfp4": (_nvfp4, ("tensor_scale", "stochastic", "generator")),
    "mxfp8": (lambda x: ref.quantize_mx_ref(x, "e4m3"), ()),
    "mxfp4": (lambda x: ref.quantize_mx_ref(x, "e2m1"), ()),
    "nf4": (_nf4, ("blocksize", "double_quant")),
}


def names() -> list[str]:
    """The format names `quantize` accepts."""
    return list(_QUANTIZERS)


def quantize(tensor: torch.Tensor, fmt: str, **options: Any) -> QTensor:
    """Quantize `tensor` to format `fmt` (see the module docstring for formats and options)."""
    if fmt not in _QUANTIZERS:
        if fmt in FORMATS:  # bf16: a stored format, but with no scale there is nothing to quantize
            what = f"{fmt!r} ({FORMATS[fmt].doc}) is not a quantized format"
        else:
            what = f"unknown format {fmt!r}"
        raise ValueError(f"{what}; valid formats: {', '.join(_QUANTIZERS)}")
    fn, valid = _QUANTIZERS[fmt]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for format {fmt!r}; valid options: "
                         f"{', '.join(valid) if valid else 'none'}")
    return fn(tensor, **options)


def dequantize(qt: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values `qt` stands for, in `dtype` (default float32)."""
    if not isinstance(qt, (Fp8Tensor, NVFP4Tensor, NF4Tensor, MXTensor)):
        raise TypeError(f"dequantize expects a tensor returned by surogate.formats.quantize, got {type(qt).__name__}")
    return qt.dequantize(dtype)
