"""Quantized tensor containers: the storage every floor agrees on (docs/internals.md).

A container only holds tensors and the metadata needed to read them back; the rules that
produce them live in `surogate/kernels/reference*.py` (and their Triton twins). The scale
convention is the same everywhere: dequantized value = stored element x scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Fp8Tensor", "MXTensor", "NF4Tensor", "NVFP4Tensor", "QTensor"]


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
        from surogate.kernels import reference_formats

        return reference_formats.dequantize_fp8_ref(self, dtype)

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
        from surogate.kernels import reference_formats

        return reference_formats.dequantize_nvfp4_ref(self, dtype)

    def __repr__(self) -> str:
        return (f"NVFP4Tensor(shape={_shape_str(self.shape)}, packed={_shape_str(self.packed.shape)}, "
                f"tensor_scale={float(self.tensor_scale):.6g}, nbytes={self.nbytes})")


@dataclass(eq=False)
class NF4Tensor(_QuantizedTensor):
    """bitsandbytes NF4: codes per element (element 2i in the HIGH nibble), absmax per block.

    With double quantization `absmax` is None and the absmaxes are stored as 8-bit codes of
    the bitsandbytes dynamic map (`absmax_code`), one FP32 `absmax_scale` per 256 codes,
    plus the mean `absmax_offset` that was subtracted first. Without it, `absmax` holds the
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
            return [self.packed, self.absmax_q, self.absmax_scale, self.absmax_offset, self.absmax_code]
        return [self.packed, self.absmax]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from surogate.kernels import reference_nf4

        return reference_nf4.dequantize_nf4_ref(self, dtype)

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
        from surogate.kernels import reference_formats

        return reference_formats.dequantize_mx_ref(self, dtype)

    def __repr__(self) -> str:
        return (f"MXTensor({self.element}, shape={_shape_str(self.shape)}, "
                f"scale={_shape_str(self.scale.shape)}, nbytes={self.nbytes})")


QTensor = Fp8Tensor | NVFP4Tensor | NF4Tensor | MXTensor
