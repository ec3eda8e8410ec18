"""Quantized tensor containers: the storage every floor agrees on (docs/internals.md), and its decoders.

A container holds tensors and the metadata needed to read them back, and the plain-torch code that
reads them back lives here with it: the nibble layout, E2M1 / E8M0 / NF4 code values, block scales
expanded to elements, bitsandbytes' double-quantized absmax, and `dequantize_*_ref`. The rules that
produce a container (rounding, saturation, the choice of scales) live in `reference_formats.py` /
`reference_nf4.py` (and their Triton twins), which import this module and re-export its decoders;
nothing here imports them. The scale convention is the same everywhere: value = stored element x scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from surogate.recipes.formats import (
    FP4_E2M1_VALUES,
    MX_BLOCK,
    NF4_DOUBLE_QUANT_BLOCK,
    NF4_VALUES,
    NVFP4_BLOCK,
)

__all__ = [
    "E8M0_NAN", "Fp8Tensor", "MXTensor", "NF4Tensor", "NVFP4Tensor", "QTensor", "dequantize_blockwise_8bit_ref",
    "dequantize_fp8_ref", "dequantize_mx_ref", "dequantize_nf4_ref", "dequantize_nvfp4_ref", "e2m1_decode",
    "expand_blocks", "nf4_absmax", "nf4_code", "nf4_offset_per_group", "pack_nibbles", "unpack_nibbles",
]

E8M0_NAN = 255  # the E8M0 scale byte that stands for NaN (OCP MX v1.0)


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _shape_str(shape: "torch.Size | tuple[int, ...]") -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


class _QuantizedTensor:
    """What every quantized tensor shares: storage size (elements and scales) from `tensors()`."""

    def tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        return _nbytes(self.tensors())


@dataclass(eq=False)
class Fp8Tensor(_QuantizedTensor):
    """FP8 (E4M3 or E5M2) elements with FP32 scales.

    `block` says how many elements share one scale: None is one scale for the tensor
    (scale shape `()`); `(1, K)` is one per row (scale shape `(..., 1)`); any other
    `(bm, bk)` tiles the tensor seen as `(M, K)` with `M` the product of the leading dims
    (scale shape `(ceil(M/bm), ceil(K/bk))`, edge blocks partial).
    """

    data: torch.Tensor
    scale: torch.Tensor
    block: tuple[int, int] | None

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def element(self) -> str:
        return "e4m3" if self.data.dtype == torch.float8_e4m3fn else "e5m2"

    @property
    def scaling(self) -> str:
        if self.block is None:
            return "tensor"
        if self.block[0] == 1 and self.block[1] == self.data.shape[-1] and self.scale.shape[-1:] == (1,) \
                and self.scale.shape[:-1] == self.data.shape[:-1]:
            return "row"
        return "block"

    def tensors(self) -> list[torch.Tensor]:
        return [self.data, self.scale]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_fp8_ref(self, dtype)

    def __repr__(self) -> str:
        return (f"Fp8Tensor({self.element}, shape={_shape_str(self.shape)}, scaling={self.scaling}, "
                f"block={self.block}, scale={_shape_str(self.scale.shape)}, nbytes={self.nbytes})")


@dataclass(eq=False)
class NVFP4Tensor(_QuantizedTensor):
    """NVFP4: E2M1 pairs in bytes (element 2i in the low nibble), E4M3 scale per 16, FP32 tensor scale.

    The last dim is padded with zeros up to a multiple of 16; `shape` is the original shape.
    """

    packed: torch.Tensor
    block_scale: torch.Tensor
    tensor_scale: torch.Tensor
    shape: torch.Size

    def tensors(self) -> list[torch.Tensor]:
        return [self.packed, self.block_scale, self.tensor_scale]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_nvfp4_ref(self, dtype)

    def __repr__(self) -> str:
        return (f"NVFP4Tensor(shape={_shape_str(self.shape)}, packed={_shape_str(self.packed.shape)}, "
                f"tensor_scale={float(self.tensor_scale):.6g}, nbytes={self.nbytes})")


@dataclass(eq=False)
class NF4Tensor(_QuantizedTensor):
    """bitsandbytes NF4: codes per element (element 2i in the HIGH nibble), absmax per block.

    With double quantization `absmax` is None and the absmaxes are stored as 8-bit codes of
    the bitsandbytes dynamic map (`absmax_code`), one FP32 `absmax_scale` per 256 codes,
    plus the mean `absmax_offset` that was subtracted first (a scalar, as bitsandbytes stores it, or one
    value per 256-code group: the weight list's layout, see `tensors`). Without it, `absmax` holds the
    FP32 absmaxes and the `absmax_*` fields are None.
    """

    packed: torch.Tensor
    absmax: torch.Tensor | None
    absmax_q: torch.Tensor | None
    absmax_scale: torch.Tensor | None
    absmax_offset: torch.Tensor | None
    absmax_code: torch.Tensor | None
    blocksize: int
    shape: torch.Size

    @property
    def double_quant(self) -> bool:
        return self.absmax is None

    def tensors(self) -> list[torch.Tensor]:
        """The weight list of docs/internals.md (`[packed, absmax]` when not double-quantized)."""
        if self.double_quant:
            return [self.packed, self.absmax_q, self.absmax_scale,
                    nf4_offset_per_group(self.absmax_offset, self.absmax_scale.numel()), self.absmax_code]
        return [self.packed, self.absmax]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_nf4_ref(self, dtype)

    def __repr__(self) -> str:
        return (f"NF4Tensor(shape={_shape_str(self.shape)}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, nbytes={self.nbytes})")


@dataclass(eq=False)
class MXTensor(_QuantizedTensor):
    """OCP MX: E4M3 elements (or E2M1 pairs packed like NVFP4) with an E8M0 scale per 32.

    E8M0 stores a biased exponent: scale = 2**(code - 127), code 255 is NaN. The last dim is
    padded with zeros up to a multiple of 32; `shape` is the original shape.
    """

    data: torch.Tensor
    scale: torch.Tensor
    element: str
    shape: torch.Size

    def tensors(self) -> list[torch.Tensor]:
        return [self.data, self.scale]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_mx_ref(self, dtype)

    def __repr__(self) -> str:
        return (f"MXTensor({self.element}, shape={_shape_str(self.shape)}, "
                f"scale={_shape_str(self.scale.shape)}, nbytes={self.nbytes})")


QTensor = Fp8Tensor | NVFP4Tensor | NF4Tensor | MXTensor


# ----------------------------------------------------------------------------------------------
# Decoders: stored codes and scales back to values (the quantizers in reference_*.py write them).
# ----------------------------------------------------------------------------------------------

def expand_blocks(scale: torch.Tensor, block: tuple[int, int], m: int, k: int) -> torch.Tensor:
    """A `(ceil(M/bm), ceil(K/bk))` grid of scales blown up to `(M, K)` (edge blocks cropped)."""
    bm, bk = block
    return scale.repeat_interleave(bm, 0)[:m].repeat_interleave(bk, 1)[:, :k]


def pack_nibbles(codes: torch.Tensor, first_high: bool = False) -> torch.Tensor:
    """Two 4-bit codes per byte along the last (even) dim; element 2i low unless `first_high`."""
    c = codes.to(torch.uint8)
    even, odd = c[..., 0::2], c[..., 1::2]
    return ((even << 4) | odd) if first_high else (even | (odd << 4))


def unpack_nibbles(packed: torch.Tensor, first_high: bool = False) -> torch.Tensor:
    """Inverse of `pack_nibbles`: `(..., n)` bytes -> `(..., 2n)` codes (uint8)."""
    lo, hi = packed & 0xF, packed >> 4
    first, second = (hi, lo) if first_high else (lo, hi)
    return torch.stack((first, second), dim=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """FP32 values of 4-bit E2M1 codes."""
    grid = torch.tensor(FP4_E2M1_VALUES, dtype=torch.float32, device=codes.device)
    c = codes.to(torch.int64)
    mag = grid[c & 7]
    return torch.where((c & 8) != 0, -mag, mag)


def dequantize_fp8_ref(q: Fp8Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """element x scale in FP32, then cast to `dtype`."""
    data = q.data.float()
    if q.block is None or q.scaling == "row":
        out = data * q.scale
    else:
        k = data.shape[-1]
        m = data.numel() // k if k else 0
        out = data.reshape(m, k) * expand_blocks(q.scale, q.block, m, k)
    return out.reshape(q.data.shape).to(dtype)


def dequantize_nvfp4_ref(q: NVFP4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """e2m1(code) x (float(block_scale) x tensor_scale) in FP32, cropped to the original shape."""
    vals = e2m1_decode(unpack_nibbles(q.packed))
    decode = (q.block_scale.float() * q.tensor_scale).repeat_interleave(NVFP4_BLOCK, -1)
    out = (vals * decode)[..., : q.shape[-1]]
    return out.reshape(q.shape).to(dtype)


def dequantize_mx_ref(q: MXTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """element x 2**(code - 127) (NaN for code 255), cropped to the original shape."""
    code = q.scale.to(torch.int32)
    scale = torch.ldexp(torch.ones(code.shape, device=code.device), code - 127)
    scale = torch.where(code == E8M0_NAN, torch.full_like(scale, float("nan")), scale)
    vals = q.data.float() if q.element == "e4m3" else e2m1_decode(unpack_nibbles(q.data))
    out = (vals * scale.repeat_interleave(MX_BLOCK, -1))[..., : q.shape[-1]]
    return out.reshape(q.shape).to(dtype)


def nf4_code(device: "torch.device | str | None" = None) -> torch.Tensor:
    """The 16 NF4 code values as FP32."""
    return torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)


def dequantize_blockwise_8bit_ref(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                                  blocksize: int = NF4_DOUBLE_QUANT_BLOCK) -> torch.Tensor:
    """code[q] x absmax of its block, FP32."""
    n = q.numel()
    vals = code[q.to(torch.int64).reshape(-1)]
    scale = absmax.repeat_interleave(blocksize)[:n]
    return vals * scale


def nf4_absmax(q: NF4Tensor) -> torch.Tensor:
    """The FP32 absmax per block (decoding the double quantization: code[q] x scale + offset)."""
    if not q.double_quant:
        return q.absmax
    absmax = dequantize_blockwise_8bit_ref(q.absmax_q, q.absmax_scale, q.absmax_code)
    groups = q.absmax_scale.numel()
    offset = nf4_offset_per_group(q.absmax_offset, groups).repeat_interleave(NF4_DOUBLE_QUANT_BLOCK)
    return absmax + offset[:absmax.numel()]


def nf4_offset_per_group(offset: torch.Tensor, groups: int) -> torch.Tensor:
    """The double quantization's offset as one FP32 value per 256-code group (the weight list's layout).

    bitsandbytes stores one scalar per tensor; a weight list repeats it per group so that the lists of
    linears sharing an input concatenate along N (passes/horizontal.py), each member keeping its own mean."""
    offset = offset.reshape(-1)
    if offset.numel() == groups:
        return offset
    if offset.numel() != 1:
        raise ValueError(f"an NF4 absmax offset is one value or one per 256-code group ({groups}); got {offset.numel()}")
    return offset.expand(groups).contiguous()


def dequantize_nf4_ref(q: NF4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """NF4_VALUES[code] x absmax in FP32, then cast to `dtype` (as bitsandbytes' dequantize_4bit)."""
    n = torch.Size(q.shape).numel()
    codes = torch.stack((q.packed >> 4, q.packed & 0xF), -1).reshape(-1)[:n]
    vals = nf4_code(q.packed.device)[codes.to(torch.int64)]
    scale = nf4_absmax(q).repeat_interleave(q.blocksize)[:n]
    return (vals * scale).reshape(q.shape).to(dtype)
