"""NF4 reference against bitsandbytes' CPU backend, for float32, bfloat16 and float16 inputs.

- Quantization: our packed bytes and absmax (plain, or the double-quantized state: 8-bit absmax
  codes, their FP32 scale per 256, the offset, the code tables) equal bitsandbytes'
  `quantize_4bit` output bit for bit.
- Dequantization: our `dequantize` of our own quantization equals `decode_nf4`, an independent
  numpy decode of bitsandbytes' QuantState written from the format definition (tests/bnb_decode.py,
  which also has the 8-bit blockwise `decode_blockwise`); `decode_nf4` is itself checked here from
  first principles (exact round trips of code values x power-of-two absmax, the NF4 error bound on
  gaussian data).

bitsandbytes' own CPU `dequantize_4bit` is NOT used as the reference: in 0.50.2 it returns wrong
values on AVX-512 CPUs (e.g. ~0.94 relative error on a 700 x 96 tensor, with or without double
quantization; seen for 2-D shapes whose last dim is a multiple of 16 but not of 64, where a
64-block straddles rows), while its `quantize_4bit` is right. CI runs on CPUs with and without
AVX-512, so no test here may depend on it.

bitsandbytes is a test dependency (pyproject `test` extra); these tests run, they never skip.
"""

from __future__ import annotations

import math

import bitsandbytes.functional as bnbf
import pytest
import torch
from bnb_decode import BNB_NF4, decode_blockwise, decode_nf4
from hypothesis import given, settings
from hypothesis import strategies as st

import surogate.ops.formats
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
    """bitsandbytes' quantization only (its CPU dequantize is wrong on AVX-512; module docstring)."""
    return bnbf.quantize_4bit(x, blocksize=64, compress_statistics=double_quant, quant_type="nf4")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality that treats NaN as equal to NaN."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    return torch.equal(nan_a, nan_b) and torch.equal(torch.where(nan_a, 0, a), torch.where(nan_b, 0, b))


def _check_equal_to_bnb(x: torch.Tensor, double_quant: bool) -> None:
    packed, state = _bnb(x, double_quant)
    q = surogate.ops.formats.quantize(x, "nf4", double_quant=double_quant)
    assert torch.equal(q.packed, packed.reshape(-1)), "packed bytes differ"
    assert state.nested == double_quant and tuple(state.shape) == tuple(x.shape) and state.dtype == x.dtype
    if double_quant:
        assert torch.equal(q.absmax_q, state.absmax)
        assert _same(q.absmax_scale, state.state2.absmax)
        assert _same(q.absmax_offset, state.offset)
        assert torch.equal(q.absmax_code, state.state2.code)
    else:
        assert _same(q.absmax, state.absmax)
    # ours (our quantization, our dequantize) against the independent decode of bitsandbytes' state
    assert _same(q.dequantize(x.dtype), decode_nf4(packed, state)), "dequantized values differ"


def test_code_tables_equal_bitsandbytes():
    assert torch.equal(ref.nf4_code(), torch.tensor(NF4_VALUES, dtype=torch.float32))
    assert torch.equal(ref.nf4_code(), bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(ref.dynamic_map(), bnbf.create_dynamic_map(signed=True))
    assert torch.equal(ref.dynamic_map(signed=False), bnbf.create_dynamic_map(signed=False))
    assert ref.dynamic_map().shape == (256,)


@SETTINGS
@given(st.sampled_from([(64, 64), (5,), (123,), (123, 77), (3, 5, 64), (300, 256), (5, 64), (10, 96),
                        (7, 48), (33, 160)]),
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
    for dtype in DTYPES:
        for dq in (True, False):
            _check_equal_to_bnb(x.to(dtype), dq)


def _code_value_tensor(shape, seed: int, max_exp: int):
    """x = NF4 code value x 2**k per 64-block (k random in [-max_exp, max_exp]), every block (the last,
    partial one too) holding a code +1.0, so its absmax is exactly 2**k. Returns x, codes, absmax, pos."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    nblocks = -(-n // 64)
    idx = torch.randint(0, 16, (n,), generator=g)
    pos = torch.arange(nblocks) * 64 + (torch.rand(nblocks, generator=g) * 64).long()
    pos[-1] = min(int(pos[-1]), n - 1)
    idx[pos] = 15
    absmax = torch.exp2(torch.randint(-max_exp, max_exp + 1, (nblocks,), generator=g).float())
    x = torch.from_numpy(BNB_NF4)[idx] * absmax.repeat_interleave(64)[:n]
    return x.reshape(shape), idx, absmax, pos


SHAPES_FOR_DECODER = [(5, 64), (700, 96), (7, 13), (3, 5, 64), (1,), (130, 200)]


@pytest.mark.parametrize("shape", SHAPES_FOR_DECODER)
def test_decoder_round_trips_code_values_exactly(shape):
    """First principles for `decode_nf4` (plain absmax): code values x power-of-two absmax come back exactly."""
    x, idx, absmax, _ = _code_value_tensor(shape, seed=sum(shape), max_exp=20)
    packed, state = _bnb(x, double_quant=False)
    assert torch.equal(state.absmax, absmax)
    b = packed.reshape(-1).to(torch.int64)
    padded = torch.cat([idx, idx.new_full((idx.numel() % 2,), 7)])
    assert torch.equal(b >> 4, padded[0::2]) and torch.equal(b & 0xF, padded[1::2])  # first = high nibble
    dec = decode_nf4(packed, state)
    assert dec.dtype == torch.float32 and dec.shape == x.shape
    assert torch.equal(dec, x)
    assert torch.equal(surogate.ops.formats.quantize(x, "nf4", double_quant=False).dequantize(), x)


@pytest.mark.parametrize("shape", SHAPES_FOR_DECODER + [(1000, 64)])  # (1000, 64): 1000 absmaxes, 4 groups
def test_decoder_double_quant_from_first_principles(shape):
    """`decode_nf4` with double quantization: every element is its NF4 code times one per-block absmax
    (read back at the block's +1.0 element), and that absmax is the true one within the 8-bit
    dynamic-map resolution of its 256-group (<= 0.0071 x the group's largest |absmax - mean|)."""
    x, idx, absmax, pos = _code_value_tensor(shape, seed=7 + sum(shape), max_exp=4)
    packed, state = _bnb(x, double_quant=True)
    dec = decode_nf4(packed, state).reshape(-1)
    n = x.numel()
    a_hat = dec[pos]
    assert torch.equal(dec, torch.from_numpy(BNB_NF4)[idx] * a_hat.repeat_interleave(64)[:n])
    dev = (absmax.double() - absmax.double().mean()).abs()
    group_max = torch.nn.functional.pad(dev, (0, (-dev.numel()) % 256)).reshape(-1, 256).amax(-1)
    bound = 0.0071 * group_max.repeat_interleave(256)[: absmax.numel()] + 1e-6 * absmax
    assert ((a_hat.double() - absmax.double()).abs() <= bound).all()
    assert torch.equal(surogate.ops.formats.quantize(x, "nf4").dequantize().reshape(-1), dec)


@pytest.mark.parametrize("shape", [(700, 96), (5, 64), (300, 256), (77,), (1000, 64)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_decoder_error_within_nf4_bound_on_gaussian(shape, dtype, double_quant):
    """`decode_nf4` against the input: NF4 codes are at most 0.3044 apart, so |err| <= 0.1522 x the
    block's absmax (+ the 8-bit absmax error with double quantization, + rounding to `dtype`);
    relative RMS error about 0.1."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(11)).to(dtype)
    packed, state = _bnb(x, double_quant)
    dec = decode_nf4(packed, state).float()
    xf = x.float()
    rel = ((dec - xf).norm() / xf.norm()).item()
    assert rel < 0.12, rel
    flat = torch.nn.functional.pad(xf.reshape(-1), (0, (-x.numel()) % 64)).reshape(-1, 64)
    absmax = flat.abs().amax(-1).repeat_interleave(64)[: x.numel()].reshape(shape)
    slack = 0.01 * xf.abs().max() if double_quant else 0.0
    rounding = 0.0 if dtype == torch.float32 else 2.0 ** -8 * dec.abs()
    assert ((dec - xf).abs() <= 0.1522 * absmax + slack + rounding + 1e-6).all()


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
    assert torch.equal(ref.dynamic_map(), state.code)
    # decode of bitsandbytes' state (code[q] x absmax of its 256-block, numpy; tests/bnb_decode.py),
    # not its CPU dequantize_blockwise (module docstring)
    want = decode_blockwise(want_q, state)
    assert want.dtype == torch.float32
    assert _same(ref.dequantize_blockwise_8bit_ref(q, absmax, ref.dynamic_map(), 256), want)
    # first principles for that decode: map entries are at most 0.0141 apart on [-1, 1] (-1 itself
    # goes to -0.99297), so |decoded - x| <= 0.0071 x the block's absmax
    ok = ~torch.isnan(x)
    bound = 0.0071 * state.absmax.repeat_interleave(256)[: x.numel()]
    assert ((want - x).abs() <= bound)[ok].all()


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
