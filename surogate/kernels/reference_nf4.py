"""Bit-exact plain-torch NF4 (bitsandbytes QLoRA storage), with double quantization.

Matches bitsandbytes 0.50's CPU backend bit for bit (tests/test_formats_nf4.py checks it):
- `quantize_4bit(nf4)`: absmax per 64 over the flattened tensor; full blocks are scaled by
  `x * (1 / absmax)` (a zero absmax is clamped to 1e-38 for that reciprocal only), a
  trailing partial block by `x / absmax`; both clamped to [-1, 1]; the code is
  `bucketize(scaled, midpoints)` with midpoints `(code[i] + code[i+1]) / 2` in FP32, so a
  value exactly on a midpoint takes the LOWER code, and NaN takes code 15.
- double quantization: `absmax - mean(absmax)` is quantized per 256 to 8 bits with the
  dynamic map through bitsandbytes' CPU lookup table: `r = x * (1 / blockmax)` (blockmax
  ignores NaN), clamped to [-1, 1], `j = trunc(((r + 1) * 0.5) * 65535 + 0.5)` in FP32,
  code = the dynamic-map entry nearest to `j / 65535 * 2 - 1` (NaN -> code 0). bitsandbytes'
  CUDA kernel picks the nearest entry of `r` directly, which differs in rare near-midpoint cases.

The decoders (`dequantize_nf4_ref`, `dequantize_blockwise_8bit_ref`, `nf4_code`) live with the
container in `qtensor.py` and are re-exported here.
"""

from __future__ import annotations

import functools

import torch

from surogate.kernels.qtensor import (
    NF4Tensor,
    dequantize_blockwise_8bit_ref,
    dequantize_nf4_ref,
    nf4_code,
)
from surogate.recipes.formats import NF4_BLOCK, NF4_DOUBLE_QUANT_BLOCK

__all__ = ["dequantize_nf4_ref", "dynamic_map", "nf4_code", "quantize_blockwise_8bit_ref",
           "dequantize_blockwise_8bit_ref", "quantize_nf4_ref"]

_LUT_STEPS = 65535  # bitsandbytes' CPU 8-bit quantizer: a 16-bit lookup over [-1, 1]


@functools.lru_cache(maxsize=None)
def _dynamic_map_cpu(signed: bool, max_exponent_bits: int, total_bits: int) -> torch.Tensor:
    non_sign_bits = total_bits - 1

    def level(n_values: int, exponent: int) -> list[float]:
        # n_values fraction values: the bin centres of an FP32 linspace over [0.1, 1],
        # times 10**exponent (FP32 arithmetic, as bitsandbytes), with their negatives if signed.
        edges = torch.linspace(0.1, 1, n_values + 1, dtype=torch.float32)
        centres = (edges[:-1] + edges[1:]) / 2.0
        out = ((10 ** exponent) * centres).tolist()
        return out + ((-(10 ** exponent)) * centres).tolist() if signed else out

    values: list[float] = []
    for i in range(max_exponent_bits):
        values += level(2 ** (i + non_sign_bits - max_exponent_bits + (0 if signed else 1)),
                        i - (max_exponent_bits - 1))
    extra = 2 ** (non_sign_bits - max_exponent_bits) - 1  # no indicator bit left: a last linear level
    if extra > 0:
        values += level(extra, 0)
    values += [0.0, 1.0]
    if len(values) > 2 ** total_bits:
        raise ValueError(f"dynamic map with max_exponent_bits={max_exponent_bits}, total_bits={total_bits} "
                         f"has {len(values)} entries, more than {2 ** total_bits}")
    values += [0.0] * (2 ** total_bits - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8,
                device: "torch.device | str | None" = None) -> torch.Tensor:
    """bitsandbytes' 256-entry dynamic 8-bit map (`create_dynamic_map` semantics), sorted, FP32."""
    return _dynamic_map_cpu(signed, max_exponent_bits, total_bits).to(device, copy=True)


@functools.lru_cache(maxsize=8)
def _lookup_table_cpu(code_key: tuple[float, ...]) -> torch.Tensor:
    """For each of the 65536 LUT cells, the index of the (sorted) code entry nearest its centre."""
    code = torch.tensor(code_key, dtype=torch.float64)
    centres = torch.arange(_LUT_STEPS + 1, dtype=torch.float64) / _LUT_STEPS * 2 - 1
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(centres, midpoints).to(torch.uint8)  # ties (never hit) go low


def quantize_blockwise_8bit_ref(x: torch.Tensor, code: torch.Tensor,
                                blocksize: int = NF4_DOUBLE_QUANT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes CPU `quantize_blockwise` for an FP32 vector: (uint8 codes, FP32 absmax per block)."""
    n = x.numel()
    xf = x.reshape(-1).float()
    pad = (-n) % blocksize
    blocks = torch.nn.functional.pad(xf, (0, pad)).reshape(-1, blocksize)
    absmax = torch.where(torch.isnan(blocks), torch.zeros_like(blocks), blocks.abs()).amax(-1)
    r = (blocks * (1.0 / absmax).unsqueeze(-1)).clamp(-1.0, 1.0)
    cell = torch.trunc(((r + 1.0) * 0.5) * float(_LUT_STEPS) + 0.5)
    cell = torch.where(torch.isnan(cell), torch.zeros_like(cell), cell).to(torch.int64)
    lut = _lookup_table_cpu(tuple(code.cpu().tolist())).to(x.device)
    return lut[cell].reshape(-1)[:n], absmax


def _nf4_absmax_and_codes(xf: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = xf.numel()
    rem = n % blocksize
    full = n - rem
    code = nf4_code(xf.device)
    bounds = (code[:-1] + code[1:]) / 2
    head = xf[:full].reshape(-1, blocksize)
    absmax = head.abs().amax(-1)
    scaled = (head * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(-1)).clamp(-1, 1).reshape(-1)
    if rem:
        tail_max = xf[full:].abs().amax()
        absmax = torch.cat([absmax, tail_max.reshape(1)])
        scaled = torch.cat([scaled, (xf[full:] / tail_max.clamp(min=1e-38)).clamp(-1, 1)])
    return absmax, torch.bucketize(scaled, bounds).to(torch.uint8)


def quantize_nf4_ref(x: torch.Tensor, blocksize: int = NF4_BLOCK, double_quant: bool = True) -> NF4Tensor:
    """NF4 over the flattened tensor, bitsandbytes-compatible (module docstring has the exact rules).

    An odd element count pads the last byte's low nibble with code 7 (0.0), as bitsandbytes does.
    """
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"quantize_nf4_ref expects a float32/bfloat16/float16 tensor, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise ValueError(f"NF4 blocksize must be one of 32, 64, ..., 4096 (bitsandbytes); got {blocksize}")
    if x.numel() == 0:
        raise ValueError("quantize_nf4_ref got an empty tensor; there is nothing to quantize")
    xf = x.reshape(-1).float()
    absmax, codes = _nf4_absmax_and_codes(xf, blocksize)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), 7)])
    packed = (codes[0::2] << 4) | codes[1::2]
    if not double_quant:
        return NF4Tensor(packed=packed, absmax=absmax, absmax_q=None, absmax_scale=None, absmax_offset=None,
                         absmax_code=None, blocksize=blocksize, shape=x.shape)
    offset = absmax.mean()
    dmap = dynamic_map(device=x.device)
    absmax_q, absmax_scale = quantize_blockwise_8bit_ref(absmax - offset, dmap, NF4_DOUBLE_QUANT_BLOCK)
    return NF4Tensor(packed=packed, absmax=None, absmax_q=absmax_q, absmax_scale=absmax_scale,
                     absmax_offset=offset, absmax_code=dmap, blocksize=blocksize, shape=x.shape)


