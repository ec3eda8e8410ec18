"""Independent numpy decoders of bitsandbytes' quantized states, used as test references.

Why this exists: bitsandbytes' own CPU dequantizers cannot be the reference. In 0.50.2 its CPU
`dequantize_4bit` returns wrong values on AVX-512 CPUs (e.g. ~0.94 relative error on a 700 x 96
tensor, with or without double quantization; seen for 2-D shapes whose last dim is a multiple of
16 but not of 64, where a 64-block straddles rows and the wrong absmax is used), while its
`quantize_4bit` / `quantize_blockwise` are right. CI runs on CPUs with and without AVX-512, so the
tests compare against bitsandbytes' *quantized state* (packed bytes + QuantState), decoded here
from the format definition, never against its dequantize functions.

- `decode_nf4(packed, state)`: NF4 (`quantize_4bit(..., quant_type="nf4")`), plain or
  double-quantized absmax (`decode_absmax(state)`).
- `decode_blockwise(q, state)`: 8-bit blockwise (`quantize_blockwise`).

The NF4 table `BNB_NF4` is written out here, so the decoder does not take it from the code under
test. `tests/test_formats_nf4.py` checks these decoders from first principles.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# The 16 NF4 code values as bitsandbytes defines them (QLoRA, appendix E).
BNB_NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def decode_absmax(state) -> np.ndarray:
    """The FP32 absmax per 64-block that a bitsandbytes NF4 QuantState stands for.

    Plain: `state.absmax`. Double quantization (`state.nested`): the absmaxes minus their mean
    were quantized per `state.state2.blocksize` (256) to 8-bit indices into the dynamic map
    `state.state2.code`, with FP32 scale `state.state2.absmax[group]`; so the absmax of block b is
    `code2[absmax_q[b]] * scale2[b // 256] + offset`, each step rounded to FP32.
    """
    if not state.nested:
        assert state.absmax.dtype == torch.float32
        return _np(state.absmax).reshape(-1)
    s2 = state.state2
    assert state.absmax.dtype == torch.uint8 and s2.code.numel() == 256
    q = _np(state.absmax).reshape(-1).astype(np.int64)
    code2 = _np(s2.code).astype(np.float32)
    scale2 = _np(s2.absmax).astype(np.float32).reshape(-1)
    group = np.arange(q.size) // s2.blocksize
    assert scale2.size == -(-q.size // s2.blocksize)
    with np.errstate(invalid="ignore", over="ignore"):
        return code2[q] * scale2[group] + np.float32(_np(state.offset).reshape(()))


def decode_nf4(packed: torch.Tensor, state) -> torch.Tensor:
    """Decode bitsandbytes' NF4 (packed bytes + QuantState) from the format, on the CPU.

    The flattened tensor is cut into blocks of `state.blocksize` (64; the last may be partial);
    each byte holds two 4-bit indices into the NF4 table, the FIRST element in the HIGH nibble
    (an odd count leaves the last low nibble as padding). Element i is
    `code[index_i] * absmax[i // 64]` in FP32, then rounded to `state.dtype`; the result has
    `state.shape`.
    """
    assert state.quant_type == "nf4" and state.blocksize == 64
    code = _np(state.code).astype(np.float32)
    assert np.array_equal(code, BNB_NF4)
    n = math.prod(state.shape)
    b = _np(packed.view(torch.uint8)).reshape(-1).astype(np.int64)
    assert b.size == -(-n // 2)
    idx = np.empty(2 * b.size, dtype=np.int64)
    idx[0::2], idx[1::2] = b >> 4, b & 0xF
    idx = idx[:n]
    absmax = decode_absmax(state)
    assert absmax.size == -(-n // state.blocksize)
    with np.errstate(invalid="ignore", over="ignore"):
        vals = code[idx] * absmax[np.arange(n) // state.blocksize]
    assert vals.dtype == np.float32
    return torch.from_numpy(vals).reshape(tuple(state.shape)).to(state.dtype)


def decode_blockwise(q: torch.Tensor, state) -> torch.Tensor:
    """Decode bitsandbytes' 8-bit blockwise quantization (uint8 codes + QuantState), on the CPU.

    Element i of the flattened tensor is `state.code[q_i] * state.absmax[i // state.blocksize]`
    in FP32, then rounded to `state.dtype`; the result has the shape of `q`.
    """
    assert q.dtype == torch.uint8 and state.code.numel() == 256
    n = q.numel()
    absmax = _np(state.absmax).astype(np.float32).reshape(-1)
    assert absmax.size == -(-n // state.blocksize)
    code = _np(state.code).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        vals = code[_np(q).reshape(-1).astype(np.int64)] * absmax[np.arange(n) // state.blocksize]
    assert vals.dtype == np.float32
    return torch.from_numpy(vals).reshape(tuple(q.shape)).to(state.dtype)
