"""Property tests of the FP8 / NVFP4 / MX references and the public `surogate.formats` API.

Each format is checked three ways: the round-trip error stays within the bound derived
from the element format (written next to each test), the elements equal an independent
brute-force nearest-value search, and odd shapes, zeros, subnormals, huge values and
NaN/Inf behave as docs/formats.md says. NF4 lives in test_formats_nf4.py.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import surogate.ops.formats as sf
from surogate.kernels import reference as ref
from surogate.recipes.formats import FORMATS, FP4_E2M1_VALUES, Scaling

SETTINGS = settings(max_examples=15, deadline=None)
NAN, INF = float("nan"), float("inf")


def _sample(shape: tuple[int, ...], seed: int, log10_scale: float, zero_frac: float,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian values at a given magnitude (kept inside float16's range for float16), some zeroed."""
    if dtype == torch.float16:
        log10_scale = min(max(log10_scale, -4.0), 3.0)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * (10.0 ** log10_scale)
    x = torch.where(torch.rand(shape, generator=g) < zero_frac, torch.zeros_like(x), x)
    return x.to(dtype)


shapes = st.sampled_from([(5,), (123,), (123, 77), (3, 4, 33), (16, 128), (1, 1), (130, 257)])
samples = st.builds(_sample, shapes, st.integers(0, 2**31 - 1), st.floats(-25, 25), st.sampled_from([0.0, 0.3, 1.0]),
                    st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))


def _all_values(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Every finite value of an 8-bit float dtype and its code, sorted by value."""
    codes = torch.arange(256, dtype=torch.uint8)
    vals = codes.view(dtype).float()
    keep = torch.isfinite(vals)
    vals, codes = vals[keep], codes[keep]
    order = torch.argsort(vals, stable=True)
    return vals[order], codes[order]


def _brute_nearest(v: torch.Tensor, grid: torch.Tensor, even: torch.Tensor) -> torch.Tensor:
    """Index into `grid` of the nearest value to each v (clamped to the grid), ties to an `even` entry."""
    v = v.clamp(grid.min(), grid.max())
    d = (v.double().unsqueeze(-1) - grid.double()).abs()
    best = d.min(-1, keepdim=True).values
    candidates = d == best
    tie_even = candidates & even
    pick = torch.where(tie_even.any(-1, keepdim=True), tie_even, candidates)
    return pick.to(torch.int8).argmax(-1)


# ---------------------------------------------------------------- FP8

# E4M3: 3 mantissa bits, RNE -> |err| <= 2**-4 |v| for normal |v| >= 2**-6; subnormal spacing
# 2**-9 -> |err| <= 2**-10 in scaled units. E5M2: 2**-3 relative, subnormal spacing 2**-16.
FP8_BOUND = {"e4m3": (2.0**-4, 2.0**-10), "e5m2": (2.0**-3, 2.0**-17)}


@SETTINGS
@given(samples, st.sampled_from(["e4m3", "e5m2"]),
       st.sampled_from([("tensor", (1, 128)), ("row", (1, 128)), ("block", (1, 128)), ("block", (128, 128)),
                        ("block", (2, 32))]),
       st.booleans())
def test_fp8_round_trip_within_bound(x, element, scaling_block, power_of_two):
    scaling, block = scaling_block
    q = ref.quantize_fp8_ref(x, element, scaling, block, power_of_two)
    assert q.data.shape == x.shape and q.data.dtype == ref.FP8_DTYPES[element]
    k = x.shape[-1]
    m = x.numel() // k
    want_scale = {"tensor": (), "row": (*x.shape[:-1], 1),
                  "block": (math.ceil(m / block[0]), math.ceil(k / block[1]))}[scaling]
    assert tuple(q.scale.shape) == want_scale
    assert torch.isfinite(q.scale).all() and (q.scale > 0).all()
    if power_of_two:
        mant, _ = torch.frexp(q.scale)
        assert (mant == 0.5).all()
    scale_full = ref.dequantize_fp8_ref(ref.quantize_fp8_ref(torch.ones_like(x), element, scaling, block,
                                                             scale=q.scale))  # the scale of every element
    xf = x.float()
    rel, sub = FP8_BOUND[element]
    err = (q.dequantize() - xf).abs()
    bound = torch.maximum(rel * xf.abs(), sub * scale_full) * (1 + 2**-20)
    assert (err <= bound).all(), f"max excess {(err - bound).max().item()}"


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.sampled_from(["e4m3", "e5m2"]))
def test_fp8_equals_torch_cast_and_brute_force_rne(seed, element):
    g = torch.Generator().manual_seed(seed)
    fmax = ref.FP8_MAX[element]
    grid, codes = _all_values(ref.FP8_DTYPES[element])
    # in-range values, exact grid points and exact midpoints (ties)
    mids = (grid[1:] + grid[:-1]) / 2
    x = torch.cat([(torch.rand(500, generator=g) * 2 - 1) * fmax * 10.0 ** -torch.randint(0, 4, (500,), generator=g),
                   grid, mids])
    q = ref.quantize_fp8_ref(x, element, "tensor", scale=1.0)
    assert torch.equal(q.data.view(torch.uint8), x.to(ref.FP8_DTYPES[element]).view(torch.uint8))
    idx = _brute_nearest(x, grid, (codes & 1) == 0)
    assert torch.equal(q.data.float(), grid[idx])


def test_fp8_saturates_instead_of_nan():
    x = torch.tensor([1e6, -1e6, 448.0, 500.0, 60000.0, -1e30])
    for element in ("e4m3", "e5m2"):
        q = ref.quantize_fp8_ref(x, element, "tensor", scale=1.0)
        fmax = ref.FP8_MAX[element]
        assert torch.equal(q.data.float().abs(), x.abs().clamp(max=fmax).to(ref.FP8_DTYPES[element]).float())
        assert torch.isfinite(q.data.float()).all()


def test_fp8_zero_and_tiny_groups():
    x = torch.zeros(3, 130)
    x[1, 5] = 1e-40  # subnormal FP32
    x[2, 0] = 1e-45
    q = ref.quantize_fp8_ref(x, "e4m3", "row")
    assert q.scale[0].item() == 1.0  # all-zero row -> scale 1
    assert torch.isfinite(q.scale).all() and (q.scale > 0).all()
    d = q.dequantize()
    assert torch.equal(d[0], torch.zeros(130))
    assert torch.isfinite(d).all() and ((d - x).abs() <= x.abs().amax(-1, keepdim=True)).all()
    qb = ref.quantize_fp8_ref(torch.zeros(5, 7), "e5m2", "block", (128, 128), power_of_two=True)
    assert qb.scale.item() == 1.0 and torch.equal(qb.dequantize(), torch.zeros(5, 7))


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_fp8_nonfinite_poisons_only_its_group(bad):
    x = torch.randn(4, 256)
    x[1, 3] = bad
    q = ref.quantize_fp8_ref(x, "e4m3", "block", (1, 128))
    d = q.dequantize()
    assert torch.isnan(q.scale[1, 0]) and torch.isnan(d[1, :128]).all()
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[1, :128] = False
    assert torch.isfinite(d[mask]).all()
    assert torch.isfinite(q.scale).sum() == q.scale.numel() - 1


def test_fp8_given_scale_saturates_inf_keeps_nan():
    x = torch.tensor([[INF, -INF, NAN, 3.0]])
    q = ref.quantize_fp8_ref(x, "e4m3", "tensor", scale=0.5)
    d = q.dequantize()
    assert d[0, 0].item() == 448 * 0.5 and d[0, 1].item() == -448 * 0.5
    assert math.isnan(d[0, 2].item()) and d[0, 3].item() == 3.0


def test_fp8_bad_arguments():
    with pytest.raises(ValueError, match="valid: e4m3, e5m2"):
        ref.quantize_fp8_ref(torch.ones(3), "e3m4")
    with pytest.raises(ValueError, match="valid: tensor, row, block"):
        ref.quantize_fp8_ref(torch.ones(3), "e4m3", "column")
    with pytest.raises(ValueError, match="at least one dimension"):
        ref.quantize_fp8_ref(torch.tensor(1.0))
    with pytest.raises(TypeError, match="float32/bfloat16/float16"):
        ref.quantize_fp8_ref(torch.ones(3, dtype=torch.int32))


# ---------------------------------------------------------------- NVFP4

_E2M1 = torch.tensor(FP4_E2M1_VALUES)


def _nvfp4_independent(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DESIGN.md's NVFP4 formula written out with brute-force nearest searches."""
    xf = x.float()
    k = xf.shape[-1]
    xf = torch.nn.functional.pad(xf, (0, (-k) % 16))
    amax = xf.abs().max()
    ts = amax / (448 * 6) if amax > 0 else torch.tensor(1.0)
    blocks = xf.reshape(*xf.shape[:-1], -1, 16)
    grid8, codes8 = _all_values(torch.float8_e4m3fn)
    bs_val = ((blocks.abs().amax(-1) / 6) / ts).clamp(max=448)
    bs = grid8[_brute_nearest(bs_val, grid8, (codes8 & 1) == 0)]
    d = (bs * ts).unsqueeze(-1)
    v = torch.where(d == 0, torch.zeros_like(blocks), blocks / d)
    mag_code = _brute_nearest(v.abs(), _E2M1, torch.arange(8) % 2 == 0)
    codes = mag_code | (torch.signbit(v).to(torch.int64) << 3)
    return codes.reshape(xf.shape), bs, ts


@SETTINGS
@given(samples)
def test_nvfp4_equals_independent_formula_and_bound(x):
    q = ref.quantize_nvfp4_ref(x)
    codes, bs, ts = _nvfp4_independent(x)
    assert q.shape == x.shape
    assert q.packed.shape == (*x.shape[:-1], math.ceil(x.shape[-1] / 16) * 8)
    assert torch.equal(ref.unpack_nibbles(q.packed).to(torch.int64), codes)
    assert torch.equal(q.block_scale.float(), bs) and torch.equal(q.tensor_scale, ts.float())
    # bound: E2M1 spacing <= 0.5 below 2, relative spacing <= 2**-1 above -> |err| <= |v|/4 + d/4,
    # plus saturation above 6 (the E4M3 block scale may round down by up to 2**-4).
    d = (q.block_scale.float() * q.tensor_scale).repeat_interleave(16, -1)[..., : x.shape[-1]]
    xf = x.float()
    err = (q.dequantize() - xf).abs()
    bound = (xf.abs() / 4 + d / 4 + (xf.abs() - 6 * d).clamp(min=0)) * (1 + 2**-20)
    assert (err <= bound).all()


def test_nvfp4_packing_low_nibble_first_and_ties_to_even():
    # Block amax 6 with tensor scale 1/448 gives block scale 448 and decode scale exactly 1,
    # so the inputs land on E2M1 midpoints exactly: ties go to the even code.
    vals = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.5, -0.1, 0.0, -0.0, 5.5, 1.0, 2.0, 3.0])
    q = ref.quantize_nvfp4_ref(vals.reshape(1, 16), tensor_scale=1.0 / 448)
    assert q.block_scale.float().item() == 448.0
    assert (q.block_scale.float() * q.tensor_scale).item() == 1.0
    codes = ref.unpack_nibbles(q.packed).reshape(-1).tolist()
    assert codes == [0, 2, 2, 4, 4, 6, 6, 7, 9, 8, 0, 8, 7, 2, 4, 5]
    assert q.packed[0, 0].item() == 0 | (2 << 4)  # element 0 in the low nibble
    assert ref.e2m1_encode(torch.tensor([7.0, 1e30])).tolist() == [7, 7]  # saturates to 6
    assert ref.pack_nibbles(torch.tensor([[3, 12]])).item() == 3 | (12 << 4)


@SETTINGS
@given(st.sampled_from([(5,), (123,), (123, 77)]), st.integers(0, 2**31 - 1))
def test_nvfp4_stochastic_is_reproducible_and_on_the_grid(shape, seed):
    x = _sample(shape, seed, 0.0, 0.0)
    q1 = ref.quantize_nvfp4_ref(x, stochastic=True, generator=torch.Generator().manual_seed(seed))
    q2 = ref.quantize_nvfp4_ref(x, stochastic=True, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(q1.packed, q2.packed)
    rne = ref.quantize_nvfp4_ref(x)
    assert torch.equal(q1.block_scale, rne.block_scale)
    # each stochastic element is one of the two grid neighbours of the exact value
    d = (rne.block_scale.float() * rne.tensor_scale).repeat_interleave(16, -1)[..., : x.shape[-1]]
    v = (x.float() / d).abs()
    got = ref.e2m1_decode(ref.unpack_nibbles(q1.packed))[..., : x.shape[-1]].abs()
    lo = _E2M1[(v.unsqueeze(-1) >= _E2M1).sum(-1) - 1]
    hi = _E2M1[((v.unsqueeze(-1) > _E2M1).sum(-1)).clamp(max=7)]
    assert ((got == lo) | (got == hi)).all()


def test_nvfp4_stochastic_is_unbiased():
    x = torch.full((1, 16), 0.3)
    x[0, 0] = 6.0  # block amax 6 -> block scale 448, tensor scale 6/2688
    gen = torch.Generator().manual_seed(0)
    means = torch.stack([ref.quantize_nvfp4_ref(x, stochastic=True, generator=gen).dequantize()
                         for _ in range(400)]).mean(0)
    assert abs(means[0, 1:].mean().item() - 0.3) < 0.01  # 0.3 lies between 0 and 0.5: RNE would give 0.5


def test_nvfp4_zeros_nan_inf_and_errors():
    z = ref.quantize_nvfp4_ref(torch.zeros(3, 20))
    assert z.tensor_scale.item() == 1.0 and torch.equal(z.dequantize(), torch.zeros(3, 20))
    x = torch.randn(2, 32)
    x[0, 1] = NAN
    assert torch.isnan(ref.quantize_nvfp4_ref(x).dequantize()).all()  # shared tensor scale is NaN
    x[0, 1] = INF
    assert torch.isnan(ref.quantize_nvfp4_ref(x).dequantize()).all()
    # with a given tensor scale: NaN poisons its block of 16, Inf saturates to 6 x scale
    x = torch.randn(2, 32)
    x[0, 1], x[1, 20] = NAN, INF
    d = ref.quantize_nvfp4_ref(x, tensor_scale=0.01).dequantize()
    assert torch.isnan(d[0, :16]).all() and torch.isfinite(d[0, 16:]).all() and torch.isfinite(d[1]).all()
    assert d[1, 20].item() == pytest.approx(6 * 448 * 0.01, rel=1e-6)
    with pytest.raises(ValueError, match="torch.Generator"):
        ref.quantize_nvfp4_ref(torch.ones(16), stochastic=True)


# ---------------------------------------------------------------- MX

@SETTINGS
@given(samples, st.sampled_from(["e4m3", "e2m1"]))
def test_mx_scale_rule_and_bound(x, element):
    q = ref.quantize_mx_ref(x, element)
    k = x.shape[-1]
    xf = torch.nn.functional.pad(x.float(), (0, (-k) % 32))
    amax = xf.reshape(*xf.shape[:-1], -1, 32).abs().amax(-1)
    emax = {"e4m3": 8, "e2m1": 2}[element]
    want = [127 if a == 0 else min(max(math.floor(math.log2(a)) - emax, -127), 127) + 127
            for a in amax.flatten().tolist()]
    assert q.scale.flatten().tolist() == want
    s = torch.ldexp(torch.ones(()), q.scale.to(torch.int32) - 127).repeat_interleave(32, -1)[..., :k]
    fmax, rel, sub = (448.0, 2.0**-4, 2.0**-10) if element == "e4m3" else (6.0, 2.0**-2, 0.25)
    xa = x.float().abs()
    err = (q.dequantize() - x.float()).abs()
    bound = (rel * xa + sub * s + (xa - fmax * s).clamp(min=0)) * (1 + 2**-20)
    assert (err <= bound).all()


def test_mx_nonfinite_block_gets_nan_scale():
    x = torch.randn(2, 64)
    x[1, 40] = INF
    q = ref.quantize_mx_ref(x, "e4m3")
    assert q.scale[1, 1].item() == 255
    d = q.dequantize()
    assert torch.isnan(d[1, 32:]).all() and torch.isfinite(d[:, :32]).all() and torch.isfinite(d[0]).all()


# ---------------------------------------------------------------- public API

@pytest.mark.parametrize("fmt", sf.names())
@pytest.mark.parametrize("shape", [(5,), (123,), (123, 77)])
def test_public_quantize_round_trip(fmt, shape):
    x = _sample(shape, 1, 0.0, 0.0, torch.bfloat16)
    qt = sf.quantize(x, fmt)
    back = sf.dequantize(qt)
    assert back.shape == x.shape and back.dtype == torch.float32
    assert torch.equal(qt.dequantize(torch.bfloat16), back.to(torch.bfloat16))
    assert qt.nbytes == sum(t.numel() * t.element_size() for t in qt.tensors()) > 0
    assert type(qt).__name__ in repr(qt)
    snr = 10 * math.log10(x.float().pow(2).sum() / (back - x.float()).pow(2).sum())
    assert snr > {"fp8_e4m3": 28, "fp8_e5m2": 22, "fp8_block": 26, "mxfp8": 28, "nvfp4": 17, "mxfp4": 14,
                  "nf4": 17}[fmt]


def test_public_options_and_errors():
    x = torch.randn(4, 64)
    assert sf.quantize(x, "fp8_e4m3", scaling="tensor").scale.shape == ()
    assert sf.quantize(x, "fp8_block", block=(1, 128)).scale.shape == (4, 1)
    assert sf.quantize(x, "nf4", double_quant=False).absmax is not None
    q = sf.quantize(x, "nvfp4", stochastic=True, generator=torch.Generator().manual_seed(0))
    assert q.packed.shape == (4, 32)
    with pytest.raises(ValueError, match="valid formats: fp8_e4m3, fp8_e5m2, fp8_block, nvfp4, mxfp8, mxfp4, nf4"):
        sf.quantize(x, "int4")
    with pytest.raises(ValueError, match="'bf16' .* is not a quantized format; valid formats: fp8_e4m3"):
        sf.quantize(x, "bf16")
    with pytest.raises(ValueError, match="valid options: scaling, block, power_of_two, scale"):
        sf.quantize(x, "fp8_e4m3", blocksize=64)
    with pytest.raises(ValueError, match="valid options: none"):
        sf.quantize(x, "mxfp4", stochastic=True)
    with pytest.raises(TypeError, match="surogate.formats.quantize"):
        sf.dequantize(x)


def test_names_are_the_scaled_formats_of_the_format_table():
    """`quantize` takes every format of `surogate.recipes.FORMATS` that has a scale, and only those."""
    assert set(sf.names()) == {n for n, f in FORMATS.items() if f.scaling is not Scaling.NONE}


def test_containers_import_no_reference_module():
    """Imports go one way: `reference_*` -> `qtensor`; the containers dequantize without them."""
    code = ("import sys, torch; from surogate.kernels.qtensor import NVFP4Tensor; "
            "q = NVFP4Tensor(torch.tensor([[0x2f] + [0] * 7], dtype=torch.uint8), "
            "torch.ones(1, 1).to(torch.float8_e4m3fn), torch.tensor(2.0), torch.Size((1, 2))); "
            "assert q.dequantize().tolist() == [[-12.0, 2.0]], q.dequantize(); "
            "loaded = sorted(m for m in sys.modules if m.startswith('surogate.kernels.')); "
            "assert loaded == ['surogate.kernels.qtensor'], loaded")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
