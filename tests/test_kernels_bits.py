"""The shared Triton decoders of `surogate/kernels/bits.py` equal the format tables bit for bit.

Every code of every format, decoded by the `@triton.jit` helper inside a one-program kernel and
compared with the table in `surogate.recipes.formats` (or torch's own FP8 decode), atol 0.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from bit_compare import bits as _bits

if not torch.cuda.is_available():  # conftest sets it too; here so the file also runs alone
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from surogate.kernels import bits  # noqa: E402
from surogate.recipes.formats import FP4_E2M1_VALUES, NF4_VALUES  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _decode_kernel(code_ptr, out_ptr, n, WHAT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    c = tl.load(code_ptr + offs, mask=mask, other=0)
    if WHAT == 0:
        v = bits.nf4_value(c)
    elif WHAT == 1:
        v = bits.e2m1_value(c)
    else:
        v = bits.fp8_value(c, 3, 7)
    tl.store(out_ptr + offs, v, mask=mask)


def _decode(codes: list[int], what: int) -> torch.Tensor:
    c = torch.tensor(codes, dtype=torch.int32, device=DEV)
    out = torch.empty(len(codes), dtype=torch.float32, device=DEV)
    _decode_kernel[(1,)](c, out, len(codes), WHAT=what, BLOCK=triton.next_power_of_2(len(codes)))
    return out.cpu()


def test_nf4_value_select_tree_is_the_nf4_table():
    assert torch.equal(_bits(_decode(list(range(16)), 0)), _bits(torch.tensor(NF4_VALUES, dtype=torch.float32)))


def test_e2m1_value_is_the_e2m1_grid():
    want = torch.tensor(FP4_E2M1_VALUES, dtype=torch.float32)
    assert torch.equal(_bits(_decode(list(range(8)), 1)), _bits(want))


def test_fp8_value_decodes_every_e4m3_byte_as_torch():
    got = _decode(list(range(256)), 2)
    want = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan) and int(nan.sum()) == 2  # 0x7f and 0xff
    assert torch.equal(_bits(got[~nan]), _bits(want[~nan]))


@triton.jit
def _round_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, bits.round_bf16(tl.load(x_ptr + offs, mask=mask, other=0.0)), mask=mask)


def test_round_bf16_is_torchs_nearest_even_cast():
    """Random bit patterns plus the ties on both sides of an even and an odd bf16 mantissa."""
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(-2**31, 2**31 - 1, (4093,), generator=g, dtype=torch.int64).to(torch.int32)
    ties = torch.tensor([0x3F808000, 0x3F818000, 0xBF808000 - 2**32, 0x3F807FFF, 0x7F7FFFFF], dtype=torch.int64)
    x = torch.cat([raw, ties.to(torch.int32)]).view(torch.float32)
    x = x[~torch.isnan(x)].to(DEV)
    out = torch.empty_like(x)
    _round_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    assert torch.equal(_bits(out.cpu()), _bits(x.cpu().to(torch.bfloat16).float()))


def test_bits_imports_no_other_kernel_module():
    """The kernel modules import bits.py, never the other way round (no import loop)."""
    code = ("import sys, surogate.kernels.bits; "
            "loaded = sorted(m for m in sys.modules if m.startswith('surogate.kernels.')); "
            "assert loaded == ['surogate.kernels.bits'], loaded")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
