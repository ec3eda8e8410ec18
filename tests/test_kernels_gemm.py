"""The fused GEMM kernels against the plain-torch reference, on small odd shapes.

On a CPU-only machine (CI) the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py);
on a CUDA machine the same tests run on the GPU. Every (compute, weight format) pair of the arch
table, forward and backward, with and without LoRA / bias / a separate LoRA input, M not a
multiple of the tile. Floors are SQNR in dB: both sides quantize bit-identically and accumulate
in FP32, so the difference is FP32 summation order plus the final bf16 rounding (~48 dB here).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from numerics import lora_gemm_case

from surogate.kernels import configs, launch, variants
from surogate.kernels import reference as ref
from surogate.kernels.quantize import quantize_weight
from surogate.recipes import ARCHS
from numerics import sqnr

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (forward/grad compute, weight format): every pair the kernel table has a variant for.
PAIRS = sorted({(v.compute.value, v.weight_format.value) for v in variants.VARIANTS
                if v.gemm is variants.Gemm.OUTPUT} - {("bf16", "nvfp4_cached")})
FLOOR = 40.0
NVFP4_SR_FLOOR = 12.0  # NVFP4 dgrad: stochastic rounding from another RNG than the reference's



def _case(m: int, n: int, k: int, r: int, fmt: str, seed: int):
    return lora_gemm_case(m, n, k, r, fmt, seed, DEVICE)


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}-{p[1]}")
@settings(max_examples=2, deadline=None)
@given(m=st.sampled_from([1, 5, 37]), n=st.sampled_from([64, 96, 160]), k=st.sampled_from([128, 192, 256]),
       r=st.sampled_from([4, 16]), use_bias=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_lora_linear_matches_reference(pair, m, n, k, r, use_bias, seed) -> None:
    compute, fmt = pair
    x, w, a, b, bias, go, wl = _case(m, n, k, r, fmt, seed)
    bias = bias if use_bias else None
    y, h = launch.lora_linear_cuda(x, wl, fmt, a, b, None, bias, 2.0, compute, compute)
    y_r, h_r = ref.lora_linear_ref(x, wl, fmt, a, b, None, bias, 2.0, compute, compute)
    assert y.shape == y_r.shape == (m, n) and y.dtype == y_r.dtype
    assert h.shape == h_r.shape == (m, r)
    assert sqnr(h, h_r) > 60
    assert sqnr(y, y_r) > FLOOR

    gi, ga, gb, gl = launch.lora_linear_backward_cuda(go, x, wl, fmt, a, b, None, h, 2.0, compute)
    gi_r, ga_r, gb_r, gl_r = ref.lora_linear_backward_ref(go, x, wl, fmt, a, b, None, h_r, 2.0, compute)
    assert gl is None and gl_r is None
    assert gi.shape == x.shape and ga.shape == a.shape and gb.shape == b.shape
    assert ga.dtype == a.dtype and gb.dtype == b.dtype and gi.dtype == x.dtype
    assert sqnr(gi, gi_r) > (NVFP4_SR_FLOOR if compute == "nvfp4" else FLOOR)
    assert sqnr(ga, ga_r) > FLOOR
    assert sqnr(gb, gb_r) > FLOOR


@pytest.mark.parametrize("fmt", ["nvfp4", "nvfp4_cached"])
def test_emulated_fp4_matches_reference(fmt, monkeypatch) -> None:
    """Where the GPU has no FP4 MMA (sm_89/sm_90) the op quantizes the input (and, in the backward,
    the gradient and the N-major weight) to NVFP4 itself and runs bf16 kernels: same numbers as the
    reference's NVFP4 GEMMs up to bf16 rounding of the tensor scale."""
    monkeypatch.setattr(launch, "emulates_fp4", lambda device: True)
    x, w, a, b, bias, go, wl = _case(37, 96, 256, 16, fmt, seed=3)
    y, h = launch.lora_linear_cuda(x, wl, fmt, a, b, None, bias, 2.0, "nvfp4", "nvfp4")
    y_r, h_r = ref.lora_linear_ref(x, wl, fmt, a, b, None, bias, 2.0, "nvfp4", "nvfp4")
    y_bf16, _ = ref.lora_linear_ref(x, wl, fmt, a, b, None, bias, 2.0, "bf16", "bf16")
    assert sqnr(y, y_r) > FLOOR and sqnr(h, h_r) > 60
    assert sqnr(y, y_r) > sqnr(y, y_bf16) + 10  # the input really went through NVFP4
    gi, ga, gb, _ = launch.lora_linear_backward_cuda(go, x, wl, fmt, a, b, None, h, 2.0, "nvfp4")
    gi_r, ga_r, gb_r, _ = ref.lora_linear_backward_ref(go, x, wl, fmt, a, b, None, h_r, 2.0, "nvfp4")
    assert sqnr(gi, gi_r) > NVFP4_SR_FLOOR and sqnr(ga, ga_r) > FLOOR and sqnr(gb, gb_r) > FLOOR


@pytest.mark.parametrize("pair", [("fp8", "fp8_row"), ("bf16", "nf4")], ids=lambda p: f"{p[0]}-{p[1]}")
def test_separate_lora_input_and_3d_input(pair) -> None:
    """Dropout on the LoRA branch: its gradient comes back separately; (B, S, K) inputs keep their shape."""
    compute, fmt = pair
    x, w, a, b, bias, go, wl = _case(2 * 7, 64, 128, 8, fmt, seed=1)
    x3, go3 = x.view(2, 7, 128), go.view(2, 7, 64)
    xl = (x3 * (torch.arange(128, device=DEVICE) % 3 != 0)).bfloat16()  # a fixed "dropout" mask
    y, h = launch.lora_linear_cuda(x3, wl, fmt, a, b, xl, None, 0.5, compute, compute)
    y_r, h_r = ref.lora_linear_ref(x3, wl, fmt, a, b, xl, None, 0.5, compute, compute)
    assert y.shape == (2, 7, 64) and h.shape == (2, 7, 8)
    assert sqnr(y, y_r) > FLOOR and sqnr(h, h_r) > 60
    got = launch.lora_linear_backward_cuda(go3, x3, wl, fmt, a, b, xl, h, 0.5, compute)
    want = ref.lora_linear_backward_ref(go3, x3, wl, fmt, a, b, xl, h_r, 0.5, compute)
    assert got[3] is not None and got[3].shape == xl.shape
    for g_, r_ in zip(got, want):
        assert g_.shape == r_.shape
        assert sqnr(g_, r_) > FLOOR


@pytest.mark.parametrize("pair", [("bf16", "bf16"), ("fp8", "fp8_block"), ("bf16", "nvfp4")],
                         ids=lambda p: f"{p[0]}-{p[1]}")
def test_plain_linear_without_lora(pair) -> None:
    compute, fmt = pair
    x, w, a, b, bias, go, wl = _case(5, 96, 256, 4, fmt, seed=2)
    y, h = launch.lora_linear_cuda(x, wl, fmt, None, None, None, bias, 1.0, compute, compute)
    y_r, h_r = ref.lora_linear_ref(x, wl, fmt, None, None, None, bias, 1.0, compute, compute)
    assert h.shape == h_r.shape == (5, 0)
    assert sqnr(y, y_r) > FLOOR
    gi, ga, gb, gl = launch.lora_linear_backward_cuda(go, x, wl, fmt, None, None, None, h, 1.0, compute)
    assert ga is None and gb is None and gl is None
    assert sqnr(gi, ref.lora_linear_backward_ref(go, x, wl, fmt, None, None, None, h_r, 1.0, compute)[0]) > FLOOR


def test_every_variant_has_its_launcher() -> None:
    from surogate.kernels import grad_input, lora_linear

    for v in variants.VARIANTS:
        module = lora_linear if v.gemm is variants.Gemm.OUTPUT else grad_input
        assert callable(getattr(module, v.launcher)), v
    assert variants.variant("output", "fp8", "fp8_block").kernel == "lora_linear_fp8_block"
    assert variants.variant("grad_input", "bf16", "nf4").kernel == "grad_input_dequant_nf4"


def test_bad_input_says_what_to_do() -> None:
    with pytest.raises(ValueError, match="valid pairs"):
        variants.variant("output", "fp8", "nf4")
    x, w, a, b, bias, go, wl = _case(3, 64, 128, 4, "bf16", seed=3)
    nf4 = quantize_weight(torch.randn(64, 96, device=DEVICE).bfloat16(), "nf4")
    with pytest.raises(ValueError, match="divisible by 64"):
        launch.lora_linear_cuda(torch.randn(3, 96, device=DEVICE).bfloat16(), nf4, "nf4", None, None, None, None,
                                1.0, "bf16", "bf16")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_configs_fit_each_arch(arch: str) -> None:
    for family in ("bf16", "fp8", "dequant"):
        cfgs = configs.get_configs(family, arch)
        assert cfgs, family
        for c in cfgs:
            assert 128 % c.kwargs["BLOCK_K"] == 0 or c.kwargs["BLOCK_K"] % 128 == 0
            assert c.kwargs["BLOCK_N"] >= 64  # one NF4 absmax block per dgrad tile row
    if ARCHS[arch].fp4_mma:
        assert configs.get_configs("nvfp4", arch)
    else:
        with pytest.raises(ValueError, match="no FP4 tensor cores"):
            configs.get_configs("nvfp4", arch)
    assert configs.block_r(4) == 16 and configs.block_r(33) == 64


def test_nf4_lists_concatenated_along_n_keep_each_members_scales(monkeypatch) -> None:
    """Horizontal fusion's packed NF4 list (two members, their own absmax means, one code table): both the
    in-register and the scratch dequant GEMM compute each member's linear, forward and dgrad."""
    g = torch.Generator().manual_seed(5)
    ws = [(torch.randn(64, 256, generator=g) * s).bfloat16().to(DEVICE) for s in (0.02, 0.2)]
    lists = [quantize_weight(w, "nf4") for w in ws]
    whole = [torch.cat(pair) for pair in zip(*lists)][:4] + [lists[0][4]]
    x = (torch.randn(37, 256, generator=g)).bfloat16().to(DEVICE)
    go = (torch.randn(37, 128, generator=g)).bfloat16().to(DEVICE)
    want = torch.cat([ref.lora_linear_ref(x, t, "nf4", None, None, None, None, 1.0, "bf16", "bf16")[0] for t in lists], -1)
    want_gi = sum(ref.lora_linear_backward_ref(gp, x, t, "nf4", None, None, None, None, 1.0, "bf16")[0]
                  for gp, t in zip(go.split(64, -1), lists))
    for min_rows in (10**9, 1):  # fused in-register dequantization, then the scratch buffer
        monkeypatch.setattr(variants, "DEQUANT_SCRATCH_MIN_ROWS", min_rows)
        y, h = launch.lora_linear_cuda(x, whole, "nf4", None, None, None, None, 1.0, "bf16", "bf16")
        gi = launch.lora_linear_backward_cuda(go, x, whole, "nf4", None, None, None, h, 1.0, "bf16")[0]
        assert sqnr(y, want) > FLOOR and sqnr(gi, want_gi.to(gi.dtype)) > FLOOR


@pytest.mark.parametrize("fmt", ["nf4", "fp8_block", "nvfp4"])
def test_dequantize_to_scratch_equals_the_fused_dequant_path(fmt, monkeypatch) -> None:
    """Large-M dequant GEMMs dequantize once to a bf16 buffer; both paths compute the same function."""
    x, w, a, b, bias, go, wl = _case(37, 96, 128, 4, fmt, seed=3)
    results = []
    for min_rows in (10**9, 1):  # fused in-register dequantization, then the scratch buffer
        monkeypatch.setattr(variants, "DEQUANT_SCRATCH_MIN_ROWS", min_rows)
        with variants.trace() as ran:
            y, h = launch.lora_linear_cuda(x, wl, fmt, a, b, None, bias, 2.0, "bf16", "bf16")
            grads = launch.lora_linear_backward_cuda(go, x, wl, fmt, a, b, None, h, 2.0, "bf16")
        assert [r.scratch for r in ran] == [min_rows == 1] * 2  # the threshold decided both GEMMs
        results.append((y, grads[0]))
    (y_fused, gi_fused), (y_scratch, gi_scratch) = results
    assert sqnr(y_scratch, y_fused) > FLOOR
    assert sqnr(gi_scratch, gi_fused) > FLOOR
    y_r, _ = ref.lora_linear_ref(x, wl, fmt, a, b, None, bias, 2.0, "bf16", "bf16")
    assert sqnr(y_scratch, y_r) > FLOOR
