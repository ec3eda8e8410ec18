"""Triton quantize / dequantize kernels equal the format rules bit for bit (atol 0).

Runs on CPU under TRITON_INTERPRET=1 (tests/conftest.py sets it before Triton loads). Each
kernel is compared with `surogate.kernels.reference` and with the DESIGN.md formula restated
here in plain torch (`_spec_*`), on small odd shapes with zeros, huge/tiny values and NaN/Inf.
"""

from __future__ import annotations

import os

import torch
from bit_compare import bits as _bits
from bnb_decode import decode_nf4

if not torch.cuda.is_available():  # conftest sets it too; here so the file also runs alone
    os.environ.setdefault("TRITON_INTERPRET", "1")

import bitsandbytes.functional as bnbf  # noqa: E402  (may load Triton)
import pytest  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from surogate.kernels import dequantize as D  # noqa: E402
from surogate.kernels import quantize as Q  # noqa: E402
from surogate.kernels import reference_formats as RF  # noqa: E402
from surogate.kernels import reference_nf4 as RN  # noqa: E402
from surogate.recipes.formats import FP4_E2M1_VALUES  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = {"e4m3": (torch.float8_e4m3fn, 448.0), "e5m2": (torch.float8_e5m2, 57344.0)}
ODD = st.sampled_from([1, 5, 16, 77, 123, 128, 130])


def _sample(shape, seed: int, dtype=torch.bfloat16, specials: bool = True, nonfinite: bool = False) -> torch.Tensor:
    """Normal values at a random magnitude, with an all-zero row, tiny and huge entries
    (and, if `nonfinite`, a NaN and an Inf somewhere)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 10.0 ** torch.randint(-3, 4, (), generator=g).item()
    if specials and x.numel() >= 4:
        flat = x.view(-1)
        flat[0], flat[-1] = 0.0, -1e-30
        flat[x.numel() // 2] *= 1e4
        if x.dim() == 2 and x.shape[0] > 1:
            x[1] = 0.0
    if nonfinite:
        idx = torch.randint(0, x.numel(), (2,), generator=g)
        x.view(-1)[idx[0]], x.view(-1)[idx[1]] = float("nan"), -float("inf")
    return x.to(dtype).to(DEV)


# ----------------------------------------------------------------------------------------------
# The references (surogate.kernels.reference_formats / reference_nf4), shaped like the launchers.
# ----------------------------------------------------------------------------------------------

def _scale(amax: torch.Tensor, fmax: float) -> torch.Tensor:
    """The reference's amax -> scale rule (1 for zero, NaN for non-finite)."""
    return RF._amax_to_scale(amax, fmax)


def _spec_fp8(x: torch.Tensor, scale: torch.Tensor, element: str) -> torch.Tensor:
    """Data for given scales (broadcast to x): the reference's `sat_rne(x / scale)`."""
    return RF._cast_fp8(x.float() / scale, element)


def _spec_e2m1(a: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 magnitude code of a >= 0 (saturating at 6), ties to the even code: an
    independent restatement (argmin over the grid) of the reference's threshold table."""
    grid = torch.tensor(FP4_E2M1_VALUES, device=a.device)
    d = (a.clamp(max=6.0)[..., None] - grid).abs()
    best = d == d.min(-1, keepdim=True).values
    even = best & (torch.arange(8, device=a.device) % 2 == 0)
    pick = torch.where(even.any(-1, keepdim=True), even, best)
    return pick.int().argmax(-1)


# ----------------------------------------------------------------------------------------------
# FP8
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("element", ["e4m3", "e5m2"])
def test_fp8_code_every_grid_point_tie_and_neighbour(element):
    """Rounding itself: every FP8 value, every midpoint (ties to even), one ulp either side,
    out-of-range, Inf and NaN, through the tensor-wise kernel with scale 1."""
    dtype, fmax = FP8[element]
    grid = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    grid = grid[torch.isfinite(grid)].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    v = torch.cat([grid, mids, torch.nextafter(mids, torch.tensor(-1e30)), torch.nextafter(mids, torch.tensor(1e30)),
                   torch.tensor([fmax * 1.03, -fmax * 1.5, 1e38, float("inf"), -float("inf"), float("nan"),
                                 -0.0, 1e-40, -1e-40])])
    data, scale, amax = Q.quantize_fp8_tensorwise(v.to(DEV), element, scale=torch.tensor(1.0))
    want = v.clamp(-fmax, fmax).to(dtype)
    assert torch.equal(_bits(data.cpu()), _bits(want))
    assert torch.isnan(amax).item() and scale.item() == 1.0


@given(m=st.integers(1, 40), k=ODD, element=st.sampled_from(["e4m3", "e5m2"]),
       dtype=st.sampled_from([torch.bfloat16, torch.float32]), nonfinite=st.booleans(), seed=st.integers(0, 2**16))
def test_fp8_rowwise_matches_reference(m, k, element, dtype, nonfinite, seed):
    x = _sample((m, k), seed, dtype, nonfinite=nonfinite)
    data, scale, amax = Q.quantize_fp8_rowwise(x, element)
    ref = RF.quantize_fp8_ref(x, element, scaling="row")
    assert data.shape == x.shape and scale.shape == (m, 1) and amax.shape == (m,)
    assert torch.equal(_bits(amax), _bits(x.float().abs().amax(-1)))
    assert torch.equal(_bits(scale), _bits(ref.scale))
    assert torch.equal(_bits(data), _bits(ref.data))


def test_fp8_rowwise_long_rows_two_pass_and_nan_row():
    """K > 8192 takes the two-pass path; a NaN makes its row's amax and scale NaN (as torch.amax)."""
    x = _sample((3, 9000), 1, torch.bfloat16)
    x[2, 8500] = float("nan")
    data, scale, amax = Q.quantize_fp8_rowwise(x, "e4m3")
    ref_amax = x.float().abs().amax(-1)
    ref_scale = _scale(ref_amax, 448.0)[:, None]
    assert torch.isnan(amax[2]) and torch.isnan(scale[2]).all()
    assert torch.equal(_bits(scale), _bits(ref_scale))
    assert torch.equal(_bits(data), _bits(_spec_fp8(x, ref_scale, "e4m3")))


def test_fp8_rowwise_leading_dims_and_power_of_two():
    x = _sample((2, 3, 77), 3, torch.bfloat16)
    data, scale, amax = Q.quantize_fp8_rowwise(x, "e4m3", power_of_two=True)
    assert data.shape == x.shape and scale.shape == (2, 3, 1) and amax.shape == (2, 3)
    s = scale.float()
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)  # powers of two
    ref = _scale(x.float().abs().amax(-1, keepdim=True), 448.0)
    assert ((s >= ref) & ((s < 2 * ref) | (ref == 1.0))).all()  # the next power of two up
    assert torch.equal(_bits(data), _bits(_spec_fp8(x, s, "e4m3")))


@given(n=st.sampled_from([1, 5, 123, 5000]), element=st.sampled_from(["e4m3", "e5m2"]),
       given_scale=st.booleans(), nonfinite=st.booleans(), seed=st.integers(0, 2**16))
def test_fp8_tensorwise_matches_reference(n, element, given_scale, nonfinite, seed):
    x = _sample((n,), seed, torch.bfloat16, nonfinite=nonfinite and n > 1)
    scale = torch.tensor(0.37, device=DEV) if given_scale else None
    data, s, a = Q.quantize_fp8_tensorwise(x, element, scale=scale)
    ref = RF.quantize_fp8_ref(x, element, scaling="tensor", scale=scale)
    assert torch.equal(_bits(a), _bits(x.float().abs().amax()))
    assert torch.equal(_bits(s), _bits(ref.scale)) and torch.equal(_bits(data), _bits(ref.data))


@pytest.mark.parametrize("values", [[0.0, -0.0], [1e-44, 0.0], [3.0, -7.5, 1e-30], [1.0, float("nan")],
                                    [1.0, -float("inf")], [3e38, -3.4e38]])
@pytest.mark.parametrize("fmax", [448.0, 57344.0, 2688.0])
def test_amax_and_scale_special_values(values, fmax):
    """Zero -> scale 1, underflow -> 1, NaN / Inf -> NaN, across the partial-then-finish reduction."""
    x = torch.tensor(values * 5000, device=DEV)  # > one 8192-element partial
    a, s = Q.amax_and_scale(x, fmax)
    want_a = x.abs().amax()
    assert torch.equal(_bits(a), _bits(want_a)) and torch.equal(_bits(s), _bits(_scale(want_a, fmax)))


@given(m=st.sampled_from([1, 5, 77, 130]), k=ODD, weight=st.booleans(), pow2=st.booleans(),
       element=st.sampled_from(["e4m3", "e5m2"]), nonfinite=st.booleans(), seed=st.integers(0, 2**16))
def test_fp8_block_matches_reference(m, k, weight, pow2, element, nonfinite, seed):
    block = (128, 128) if weight else (1, 128)
    x = _sample((m, k), seed, torch.bfloat16, nonfinite=nonfinite)
    data, scale = Q.quantize_fp8_block(x, block, element=element, power_of_two=pow2)
    ref = RF.quantize_fp8_ref(x, element, scaling="block", block=block, power_of_two=pow2)
    assert scale.shape == (-(-m // block[0]), -(-k // 128))
    assert torch.equal(_bits(scale), _bits(ref.scale)) and torch.equal(_bits(data), _bits(ref.data))
    back = D.dequantize_fp8_block(data, scale, block)
    assert torch.equal(_bits(back), _bits(RF.dequantize_fp8_ref(ref, torch.bfloat16)))


def test_fp8_activation_block_scales_are_stored_m_contiguous():
    """The block GEMM loads a tile's row scales each K step: coalesced only when M is the inner dim.
    The traceable twin (producer fusion) hands the GEMM the same layout."""
    x = _sample((2, 33, 300), 3, torch.bfloat16)
    for quantize in (lambda t: Q.quantize_fp8_block(t, (1, 128)), RF.quantize_fp8_block_ref):
        data, scale = quantize(x)
        assert scale.shape == (2, 33, 3) and scale.stride() == (33, 1, 66)
    assert Q.quantize_fp8_block(x[0], (128, 128))[1].is_contiguous()  # weight scales: (N/128, K/128) rows


def test_fp8_power_of_two_scales_for_tiny_and_huge_amax():
    """Subnormal and near-max scales round up to the exact power of two (as frexp/ldexp)."""
    x = torch.tensor([[1e-42, 0.0], [3e-39, 1.0e-40], [3.0e38, 1.0], [448.0, 1.0], [449.0, 0.0]], device=DEV)
    data, scale, _ = Q.quantize_fp8_rowwise(x, "e4m3", power_of_two=True)
    ref = RF.quantize_fp8_ref(x, "e4m3", scaling="row", power_of_two=True)
    assert torch.equal(_bits(scale), _bits(ref.scale)) and torch.equal(_bits(data), _bits(ref.data))


def test_fp8_bad_arguments_say_what_to_do():
    x = torch.ones(4, 8, device=DEV)
    with pytest.raises(ValueError, match="e4m3"):
        Q.quantize_fp8_rowwise(x, "e3m4")
    with pytest.raises(ValueError, match="128"):
        Q.quantize_fp8_block(x, (64, 64))
    with pytest.raises(TypeError, match="floating-point"):
        Q.quantize_fp8_rowwise(x.int())


# ----------------------------------------------------------------------------------------------
# NVFP4
# ----------------------------------------------------------------------------------------------

@given(m=st.sampled_from([1, 5, 17, 33]), k=st.sampled_from([1, 5, 16, 77, 123, 300]),
       nonfinite=st.booleans(), seed=st.integers(0, 2**16))
def test_nvfp4_matches_reference_and_round_trips(m, k, nonfinite, seed):
    x = _sample((m, k), seed, torch.bfloat16, nonfinite=nonfinite)
    packed, bscale, ts = Q.quantize_nvfp4(x)
    ref = RF.quantize_nvfp4_ref(x)
    assert torch.equal(_bits(ts), _bits(ref.tensor_scale))
    assert torch.equal(_bits(bscale), _bits(ref.block_scale))
    assert torch.equal(packed, ref.packed)
    back = D.dequantize_nvfp4(packed, bscale, ts, shape=x.shape, dtype=torch.float32)
    assert torch.equal(_bits(back), _bits(RF.dequantize_nvfp4_ref(ref)))
    back16 = D.dequantize_nvfp4(packed, bscale, ts, shape=x.shape)
    assert torch.equal(_bits(back16), _bits(RF.dequantize_nvfp4_ref(ref, torch.bfloat16)))
    # within half a grid step (<= 1 block-scale unit), plus saturation when the E4M3 block scale
    # rounded down or underflowed (<= 6 * 2^-10 tensor-scale units)
    if nonfinite:  # a NaN / Inf amax makes the tensor scale NaN: everything dequantizes to NaN
        assert torch.isnan(back).all()
        return
    bound = ((bscale.float() + 2.0**-7) * ts).repeat_interleave(16, 1)[:, :k]
    assert ((back - x.float()).abs() <= bound * 1.0001).all()


def test_nvfp4_ties_saturation_zero_blocks_and_given_tensor_scale():
    """Every E2M1 midpoint rounds to the even code (checked against an argmin restatement too);
    -0 keeps its sign; an all-zero block has scale 0 and codes 0; Inf saturates to 6."""
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 5.5, 0.0, 0.1, 5.9, 4.5, 2.9, 1.1, 0.6])
    x = torch.cat([mids, -mids, torch.zeros(16), -torch.zeros(15), torch.tensor([-float("inf")])])[None].to(DEV)
    ts = torch.tensor(1.0 / 256.0)  # block amax 6 -> block scale 256 exactly: elements see x itself
    packed, bscale, ts_out = Q.quantize_nvfp4(x, tensor_scale=ts)
    ref = RF.quantize_nvfp4_ref(x, tensor_scale=ts)
    assert torch.equal(_bits(bscale), _bits(ref.block_scale)) and torch.equal(packed, ref.packed)
    assert bscale.float()[0, :2].tolist() == [256.0, 256.0] and bscale.float()[0, 3].item() == 448.0
    assert bscale.view(torch.uint8)[0, 2].item() == 0 and (packed[0, 16:24] == 0).all()
    codes = RF.unpack_nibbles(packed.cpu())[0].long()
    assert torch.equal(codes[:16], _spec_e2m1(mids)) and torch.equal(codes[16:32], _spec_e2m1(mids) | 8)
    assert (codes[48:63] == 8).all() and codes[63].item() == 15 and ts_out.item() == ts.item()


def test_nvfp4_nan_poisons_its_block_only():
    x = _sample((2, 48), 7, torch.float32, specials=False)
    x[0, 20] = float("nan")
    packed, bscale, ts = Q.quantize_nvfp4(x, tensor_scale=torch.tensor(0.01))
    back = D.dequantize_nvfp4(packed, bscale, ts, dtype=torch.float32)
    assert torch.isnan(back[0, 16:32]).all() and not torch.isnan(back[0, :16]).any()
    assert not torch.isnan(back[1]).any() and not torch.isnan(back[0, 32:]).any()


def test_nvfp4_stochastic_rounding_is_unbiased_and_on_the_grid():
    x = torch.full((64, 256), 1.3, device=DEV)
    x[:, ::16] = 6.0  # pins every block scale to 256 (exact), so the elements see x itself
    ts = torch.tensor(1.0 / 256.0, device=DEV)
    packed, bscale, _ = Q.quantize_nvfp4(x, tensor_scale=ts, stochastic=True, seed=1234)
    vals = D.dequantize_nvfp4(packed, bscale, ts, dtype=torch.float32).view(64, 16, 16)[:, :, 1:]
    assert set(vals.unique().tolist()) <= {1.0, 1.5}
    assert abs(vals.mean().item() - 1.3) < 0.02  # 16K draws: std of the mean ~0.002
    again, _, _ = Q.quantize_nvfp4(x, tensor_scale=ts, stochastic=True, seed=1234)
    other, _, _ = Q.quantize_nvfp4(x, tensor_scale=ts, stochastic=True, seed=99)
    assert torch.equal(packed, again) and not torch.equal(packed, other)


# ----------------------------------------------------------------------------------------------
# Dequantize
# ----------------------------------------------------------------------------------------------

def _nf4_tensor(packed, absmax, n, blocksize=64, double=None):
    from surogate.kernels.qtensor import NF4Tensor

    if double is None:
        return NF4Tensor(packed=packed, absmax=absmax, absmax_q=None, absmax_scale=None, absmax_offset=None,
                         absmax_code=None, blocksize=blocksize, shape=torch.Size((n,)))
    q, scale, offset, code = double
    return NF4Tensor(packed=packed, absmax=None, absmax_q=q, absmax_scale=scale, absmax_offset=offset,
                     absmax_code=code, blocksize=blocksize, shape=torch.Size((n,)))


@given(n=st.sampled_from([2, 5, 64, 130, 5 * 77, 64 * 256 + 6]), blocksize=st.sampled_from([32, 64, 128]),
       seed=st.integers(0, 2**16))
def test_dequantize_nf4_plain_matches_reference(n, blocksize, seed):
    g = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, ((n + 1) // 2,), generator=g, dtype=torch.uint8).to(DEV)
    absmax = (torch.rand(-(-n // blocksize), generator=g) * 3).to(DEV)
    out = D.dequantize_nf4(packed, None, None, None, None, (n,), absmax=absmax, blocksize=blocksize)
    want = RN.dequantize_nf4_ref(_nf4_tensor(packed, absmax, n, blocksize), torch.bfloat16)
    assert torch.equal(_bits(out), _bits(want))


@given(shape=st.sampled_from([(5, 123), (77, 130), (300, 64), (3, 7)]), seed=st.integers(0, 2**16))
def test_dequantize_nf4_double_quant_matches_reference(shape, seed):
    """Round trip through quantize_nf4_ref: 64 * 300 elements span two double-quant groups."""
    w = _sample(shape, seed, torch.bfloat16, specials=False)
    q = RN.quantize_nf4_ref(w)
    got = D.dequantize_nf4(q.packed, q.absmax_q, q.absmax_scale, q.absmax_offset, q.absmax_code, w.shape)
    assert torch.equal(_bits(got), _bits(RN.dequantize_nf4_ref(q, torch.bfloat16)))
    got32 = D.dequantize_nf4(q.packed, q.absmax_q, q.absmax_scale, q.absmax_offset, q.absmax_code, w.shape,
                             dtype=torch.float32)
    assert torch.equal(_bits(got32), _bits(RN.dequantize_nf4_ref(q)))


def test_dequantize_nf4_reads_each_group_offset_of_concatenated_lists():
    """Two weights' lists concatenated along N (horizontal fusion's packed NF4): each 256-code group keeps its
    own weight's scale and mean, so the whole decodes to the two decodes stacked, bit for bit."""
    ws = [_sample((64 * m, 256), 7 + m, torch.bfloat16, specials=False) * m for m in (1, 3)]  # different means
    lists = [RN.quantize_nf4_ref(w).tensors() for w in ws]
    assert lists[0][3][0] != lists[1][3][0] and torch.equal(lists[0][4], lists[1][4])
    whole = [torch.cat(pair) for pair in zip(*lists)][:4] + [lists[0][4]]  # one code table, shared
    got = D.dequantize_nf4(*whole, (64 * 4, 256))
    want = torch.cat([D.dequantize_nf4(*t, w.shape) for t, w in zip(lists, ws)])
    assert torch.equal(_bits(got), _bits(want))
    assert torch.equal(_bits(want), _bits(torch.cat([RN.dequantize_nf4_ref(RN.quantize_nf4_ref(w), torch.bfloat16)
                                                    for w in ws])))


@pytest.mark.parametrize("shape", [(70, 130), (70, 96), (64, 160)])
def test_dequantize_nf4_double_quant_equals_bitsandbytes(shape):
    """The kernel on bitsandbytes' double-quantized NF4 state equals the independent decode of that
    state (tests/bnb_decode.py), bit for bit. Not bitsandbytes' CPU `dequantize_4bit`: in 0.50.2 it
    is wrong on AVX-512 CPUs for 2-D shapes whose last dim is a multiple of 16 but not of 64 (a
    64-block straddling rows gets the wrong absmax), which (70, 96) and (64, 160) are."""
    w = _sample(shape, 5, torch.bfloat16, specials=False).cpu()
    q, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert state.nested
    want = decode_nf4(q, state)
    assert want.dtype == torch.bfloat16 and want.shape == w.shape
    got = D.dequantize_nf4(q.view(-1).to(DEV), state.absmax.to(DEV), state.state2.absmax.to(DEV),
                           state.offset.to(DEV), state.state2.code.to(DEV), w.shape)
    assert torch.equal(_bits(got.cpu()), _bits(want))


def test_dequantize_bad_layouts_say_what_to_do():
    with pytest.raises(ValueError, match="ceil"):
        D.dequantize_nf4(torch.zeros(3, dtype=torch.uint8), None, None, None, None, (10,), absmax=torch.ones(1))
    with pytest.raises(ValueError, match="Kp"):
        D.dequantize_nvfp4(torch.zeros(2, 8, dtype=torch.uint8), torch.zeros(2, 2, dtype=torch.float8_e4m3fn),
                           torch.tensor(1.0))
    with pytest.raises(ValueError, match="blocks"):
        D.dequantize_fp8_block(torch.zeros(4, 4, dtype=torch.float8_e4m3fn), torch.ones(2, 2))


# ----------------------------------------------------------------------------------------------
# Weight lists (docs/internals.md)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["bf16", "fp8_row", "fp8_block", "nvfp4", "nvfp4_cached", "nf4"])
def test_quantize_weight_lists_follow_internals(fmt):
    n, k = 130, 77
    w = _sample((n, k), 11, torch.bfloat16, specials=False)
    ts = Q.quantize_weight(w, fmt)
    shapes = [(tuple(t.shape), t.dtype) for t in ts]
    kp = 80
    want = {
        "bf16": [((n, k), torch.bfloat16)],
        "fp8_row": [((n, k), torch.float8_e4m3fn), ((n,), torch.float32), ((k, n), torch.float8_e4m3fn),
                    ((k,), torch.float32)],
        "fp8_block": [((n, k), torch.float8_e4m3fn), ((2, 1), torch.float32)],
        "nvfp4": [((n, kp // 2), torch.uint8), ((n, kp // 16), torch.float8_e4m3fn), ((), torch.float32)],
        "nf4": [((n * k // 2,), torch.uint8), ((157,), torch.uint8), ((1,), torch.float32), ((1,), torch.float32),
                ((256,), torch.float32)],
    }
    assert shapes == want.get(fmt, want["nvfp4"])
    from surogate.kernels.reference import quantize_weight_ref

    ref = quantize_weight_ref(w, fmt)
    assert len(ref) == len(ts) and all(torch.equal(_bits(a), _bits(b)) for a, b in zip(ts, ref))
    if fmt == "fp8_row":
        wt_scale = _scale(w.float().abs().amax(0), 448.0)
        assert torch.equal(_bits(ts[3]), _bits(wt_scale))
        assert torch.equal(_bits(ts[2]), _bits(_spec_fp8(w.t(), wt_scale[:, None], "e4m3")))


def test_quantize_weight_rejects_unknown_format():
    with pytest.raises(ValueError, match="valid"):
        Q.quantize_weight(torch.ones(4, 4, device=DEV), "int3")
