"""NF4 reference against bitsandbytes' CPU backend: packed bytes, absmax (plain and double-quantized)
and dequantized weights bit for bit, for float32, bfloat16 and float16 inputs.

bitsandbytes is a test dependency (pyproject `test` extra); these tests run, they never skip.
"""

from __future__ import annotations

import math

import bitsandbytes.functional as bnbf
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from surogate.kernels import reference as ref
from surogate.recipes.formats import NF4_VALUES

SETTINGS = settings(max_examples=12, deadline=None)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _eager_bitsandbytes():
    """bitsandbytes wraps some CPU fallbacks in torch.compile; run them eagerly (same math, no compile time).

    torch's own `config.patch`, not pytest's monkeypatch: pytest >= 9.2 undoes a setattr on an
    attribute served by `__getattr__` (torch's config modules) with delattr, which removes the option.
    """
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        yield


def _bnb(x: torch.Tensor, double_quant: bool):
    packed, state = bnbf.quantize_4bit(x, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    return packed, state, bnbf.dequantize_4bit(packed, state)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality that treats NaN as equal to NaN."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    return torch.equal(nan_a, nan_b) and torch.equal(torch.where(nan_a, 0, a), torch.where(nan_b, 0, b))


def _check_equal_to_bnb(x: torch.Tensor, double_quant: bool) -> None:
    packed, state, want = _bnb(x, double_quant)
    q = ref.quantize_nf4_ref(x, double_quant=double_quant)
    assert torch.equal(q.packed, packed.reshape(-1)), "packed bytes differ"
    if double_quant:
        assert torch.equal(q.absmax_q, state.absmax)
        assert _same(q.absmax_scale, state.state2.absmax)
        assert _same(q.absmax_offset, state.offset)
        assert torch.equal(q.absmax_code, state.state2.code)
    else:
        assert _same(q.absmax, state.absmax)
    assert _same(q.dequantize(x.dtype), want)


def test_code_tables_equal_bitsandbytes():
    assert torch.equal(ref.nf4_code(), torch.tensor(NF4_VALUES, dtype=torch.float32))
    assert torch.equal(ref.nf4_code(), bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(ref.dynamic_map(), bnbf.create_dynamic_map(signed=True))
    assert torch.equal(ref.dynamic_map(signed=False), bnbf.create_dynamic_map(signed=False))
    assert ref.dynamic_map().shape == (256,)


@SETTINGS
@given(st.sampled_from([(64, 64), (5,), (123,), (123, 77), (3, 5, 64), (300, 256)]),
       st.sampled_from(DTYPES), st.booleans(), st.integers(0, 2**31 - 1), st.floats(-3, 3))
def test_nf4_equals_bitsandbytes(shape, dtype, double_quant, seed, log10_scale):
    g = torch.Generator().manual_seed(seed)
    # columns of different magnitude, so blocks and absmaxes vary
    x = torch.randn(shape, generator=g) * torch.rand(shape[-1], generator=g) * 10.0 ** log10_scale
    _check_equal_to_bnb(x.to(dtype), double_quant)


def test_nf4_double_quant_many_blocks_equals_bitsandbytes():
    # > 256 absmaxes: several double-quant blocks, the last one partial; wide absmax spread
    g = torch.Generator().manual_seed(0)
    x = torch.randn(700, 96, generator=g) * torch.logspace(-3, 2, 96)
    for dtype in DTYPES[:2]:
        _check_equal_to_bnb(x.to(dtype), True)


def test_nf4_midpoints_zeros_and_special_values_equal_bitsandbytes():
    code = ref.nf4_code()
    mids = (code[1:] + code[:-1]) / 2
    block = torch.cat([torch.tensor([1.0]), mids, -mids, code, torch.zeros(64 - 1 - 30 - 16)])
    x = torch.cat([block, torch.zeros(64), torch.full((64,), 1e-40), block * 3e4]).reshape(4, 64)
    for dq in (False, True):
        _check_equal_to_bnb(x, dq)
    # midpoints go to the lower code (bucketize, right=False)
    q = ref.quantize_nf4_ref(block, double_quant=False)
    codes = torch.stack((q.packed >> 4, q.packed & 0xF), -1).reshape(-1)
    assert codes[1:16].tolist() == list(range(15))
    special = torch.randn(2, 64)
    special[0, 3], special[1, 7] = float("nan"), float("inf")
    for dq in (False, True):
        _check_equal_to_bnb(special, dq)  # NaN/Inf: whatever bitsandbytes does, bit for bit
    assert torch.isnan(ref.quantize_nf4_ref(special, double_quant=False).dequantize()[0]).all()


def test_blockwise_8bit_equals_bitsandbytes_cpu_lookup():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5000, generator=g) * 10.0 ** (2 * torch.randn(5000, generator=g))
    x[:256] = 0.0  # an all-zero block
    x[300] = float("nan")
    want_q, state = bnbf.quantize_blockwise(x, blocksize=256)
    q, absmax = ref.quantize_blockwise_8bit_ref(x, ref.dynamic_map(), 256)
    assert torch.equal(q, want_q) and torch.equal(absmax, state.absmax)
    assert _same(ref.dequantize_blockwise_8bit_ref(q, absmax, ref.dynamic_map(), 256),
                 bnbf.dequantize_blockwise(want_q, state))


@SETTINGS
@given(st.sampled_from([(5,), (123, 77), (64, 128)]), st.integers(0, 2**31 - 1))
def test_nf4_round_trip_bound(shape, seed):
    # NF4 codes are at most 0.3 apart (between -1 and -0.696), so |err| <= 0.16 x absmax of the
    # block; the 8-bit double-quantized absmax adds < 1% of the largest absmax.
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    for dq in (False, True):
        q = ref.quantize_nf4_ref(x, double_quant=dq)
        flat = torch.nn.functional.pad(x.reshape(-1), (0, (-x.numel()) % 64)).reshape(-1, 64)
        absmax = flat.abs().amax(-1).repeat_interleave(64)[: x.numel()].reshape(shape)
        err = (q.dequantize() - x).abs()
        slack = 0.01 * x.abs().max() if dq else 0.0
        assert (err <= 0.1522 * absmax + slack + 1e-6).all()
        assert q.packed.numel() == math.ceil(x.numel() / 2)


def test_nf4_errors():
    with pytest.raises(ValueError, match="blocksize"):
        ref.quantize_nf4_ref(torch.randn(64), blocksize=48)
    with pytest.raises(TypeError, match="float32/bfloat16/float16"):
        ref.quantize_nf4_ref(torch.ones(64, dtype=torch.int64))
    with pytest.raises(ValueError, match="empty"):
        ref.quantize_nf4_ref(torch.ones(0))
