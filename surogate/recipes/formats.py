"""Numeric formats as data: element types, scaling granularities and their constants.

Every floor reads these; nothing here touches a tensor. The bit-exact rules that turn a
tensor into one of these formats live in `surogate/kernels/reference.py`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Element(enum.Enum):
    """The element type a tensor is stored or multiplied in."""

    BF16 = "bf16"
    FP8_E4M3 = "fp8_e4m3"
    FP8_E5M2 = "fp8_e5m2"
    FP4_E2M1 = "fp4_e2m1"
    NF4 = "nf4"


class Scaling(enum.Enum):
    """How many elements share one scale."""

    NONE = "none"  # bf16: no scale
    TENSOR = "tensor"  # one FP32 scale for the whole tensor
    ROW = "row"  # one FP32 scale per row (per token for activations, per channel for weights)
    BLOCK = "block"  # FP32 scale per 1x128 (activations) or 128x128 (weights) block
    NVFP4 = "nvfp4"  # E4M3 scale per 16 along K, plus one FP32 tensor scale
    MX = "mx"  # E8M0 (power of two) scale per 32 along K
    NF4 = "nf4"  # absmax per 64, optionally double-quantized to 8 bits per 256 absmaxes


# Largest finite magnitudes. Quantizers saturate to these.
FP8_E4M3_MAX = 448.0
FP8_E5M2_MAX = 57344.0
FP4_E2M1_MAX = 6.0

# The eight non-negative E2M1 magnitudes, indexed by the low three bits of a code.
FP4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

# The 16 NF4 code values of bitsandbytes (normal-float quantiles), indexed by code.
NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

NVFP4_BLOCK = 16
MX_BLOCK = 32
NF4_BLOCK = 64
NF4_DOUBLE_QUANT_BLOCK = 256
FP8_ACTIVATION_BLOCK = (1, 128)
FP8_WEIGHT_BLOCK = (128, 128)
# The FP8 element of grad_output in an FP8 dgrad, per weight format. Per-row scales ("hybrid",
# fp8_row) need E5M2's range: one scale spans a whole gradient row. 1x128 blocks (fp8_block) track
# the range locally, so E4M3's extra mantissa bit is the better trade (DeepSeek-V3's choice), and
# it is what Hopper's block-scaled cuBLAS GEMM takes (E4M3 x E4M3 only).
GRAD_FP8_ELEMENT = {"fp8_row": "e5m2", "fp8_block": "e4m3"}
# Seed of the generator that draws the stochastic-rounding bits of NVFP4 gradients (reference and kernels).
NVFP4_SR_SEED = 0


@dataclass(frozen=True)
class Format:
    """A stored format: an element type with its scaling, e.g. block-scaled E4M3."""

    name: str
    element: Element
    scaling: Scaling
    bits: float  # storage bits per element, scales included (for memory estimates)
    doc: str


# Every stored format by name. `surogate.formats.quantize(tensor, fmt)` takes the quantized ones
# (`surogate.formats.names()`); bf16, the unquantized baseline (no scale), is here for its storage bits
# and quantize() refuses it with a ValueError.
FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("bf16", Element.BF16, Scaling.NONE, 16.0, "bfloat16, no scale"),
        Format("fp8_e4m3", Element.FP8_E4M3, Scaling.ROW, 8.0, "E4M3 with a tensor or row FP32 scale"),
        Format("fp8_e5m2", Element.FP8_E5M2, Scaling.ROW, 8.0, "E5M2 with a tensor or row FP32 scale"),
        Format("fp8_block", Element.FP8_E4M3, Scaling.BLOCK, 8.0 + 32 / (128 * 128), "E4M3, FP32 scale per block"),
        Format("nvfp4", Element.FP4_E2M1, Scaling.NVFP4, 4.0 + 8 / 16, "E2M1, E4M3 scale per 16, FP32 tensor scale"),
        Format("mxfp8", Element.FP8_E4M3, Scaling.MX, 8.0 + 8 / 32, "E4M3, E8M0 scale per 32 (OCP MX)"),
        Format("mxfp4", Element.FP4_E2M1, Scaling.MX, 4.0 + 8 / 32, "E2M1, E8M0 scale per 32 (OCP MX)"),
        Format("nf4", Element.NF4, Scaling.NF4, 4.0 + 8 / 64 + 32 / (64 * 256), "bitsandbytes NF4, absmax per 64"),
    )
}


def get_format(name: str) -> Format:
    """The `Format` called `name`; an unknown name lists the valid ones."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r}; valid formats: {', '.join(FORMATS)}") from None
