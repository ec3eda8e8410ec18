"""kernels/lora_factors.py: the LoRA factors' casts and the persistent kernel's U^T in one launch, with the bits
of the three ATen kernels it replaced (`lora_a.to`, `lora_b.to`, `lora_linear.lora_up_rows`), and the op's
forward, which runs it, with the bits of the forward that cast the factors before the launcher (the casts passed
in: no fused launch, U^T made by `lora_up_rows`). Triton under the interpreter on the CPU;
tests/gpu/test_launch_copies_gpu.py checks the same on CUDA."""

from __future__ import annotations

import importlib

import pytest
import torch
from numerics import lora_gemm_case

from surogate.kernels import launch, lora_linear, variants
from surogate.kernels.lora_factors import lora_factors

L = importlib.import_module("surogate.ops.lora_linear")
F32, BF16 = torch.float32, torch.bfloat16


def _masters(r: int, k: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FP32 (r, k) and (n, r) over 1e-30..1e30, half of lora_a's values exactly halfway between two bf16 values
    (ties, which round to even), the rest random: the values whose rounding a truncating cast gets wrong."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(r, k, generator=g) * torch.logspace(-30, 30, k)
    b = torch.randn(n, r, generator=g) * torch.logspace(-30, 30, r)
    tie = a.to(BF16).float()
    half_ulp = (tie.abs().view(torch.int32) & 0x7F800000).view(F32) * 2.0 ** -8
    a[:, ::2] = (tie + half_ulp)[:, ::2]
    return a, b


@pytest.mark.parametrize("r", [8, 16, 32, 48, 64])
@pytest.mark.parametrize("scale", [1.0, 2.0, 0.37, 1.5])
def test_the_kernel_has_the_bits_of_the_casts_and_lora_up_rows(r, scale):
    """K and N not multiples of the tile; 1.5 makes ties in U^T's rounding, 0.37 a scale FP32 cannot hold."""
    a, b = _masters(r, 123, 301, seed=r)
    assert not torch.equal(a.to(BF16).float(), a)
    a_cast, b_cast, ut = lora_factors(a, b, BF16, scale)
    assert a_cast.dtype == b_cast.dtype == ut.dtype == BF16
    assert a_cast.is_contiguous() and b_cast.is_contiguous() and ut.is_contiguous()
    assert torch.equal(a_cast, a.to(BF16)) and torch.equal(b_cast, b.to(BF16))
    assert torch.equal(ut, lora_linear.lora_up_rows(b.to(BF16), scale))


def test_the_kernel_reads_any_strides_and_dtype_and_writes_no_up_t_unless_asked():
    """Transposed FP32 masters, bf16 masters (a copy), an fp16 compute dtype (fp16 subnormals among the values);
    without a scale no U^T."""
    a, b = _masters(16, 300, 200, seed=1)
    a_t, b_t = a.t().contiguous().t(), b.t().contiguous().t()
    cases = ((a_t, b_t, BF16), (a.to(BF16), b.to(BF16), BF16), (a * 1e-26, b * 1e-26, torch.float16))
    for lora_a, lora_b, dtype in cases:
        a_cast, b_cast, ut = lora_factors(lora_a, lora_b, dtype, 0.37)
        assert torch.equal(a_cast, lora_a.to(dtype)) and torch.equal(b_cast, lora_b.to(dtype))
        assert torch.equal(ut, lora_linear.lora_up_rows(lora_b.to(dtype), 0.37))
    a_cast, b_cast, ut = lora_factors(a, b, BF16)
    assert ut is None and torch.equal(b_cast, b.to(BF16))


# (weight format, forward precision): the persistent route's bf16 and fp8 variants, and nf4 at 136 rows, which
# dequantizes into a bf16 scratch (DEQUANT_SCRATCH_MIN_ROWS) and runs the bf16 route.
FORMATS = [("bf16", "bf16"), ("fp8_row", "fp8"), ("nf4", "bf16")]


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "triton"])
@pytest.mark.parametrize("fmt,compute", FORMATS)
@pytest.mark.parametrize("scale", [2.0, 0.37])
def test_the_forward_op_has_the_bits_of_the_unfused_casts(fmt, compute, persistent, scale, monkeypatch):
    """(output, hidden, a_cast, b_cast) of the op's CUDA forward (one `lora_factors` launch, writing U^T on the
    persistent route) equal the launcher given the `.to()` casts (no fused launch; the persistent launcher
    makes U^T by `lora_up_rows`) and those casts, bit for bit."""
    monkeypatch.setattr(variants, "PERSISTENT_SM90", persistent)
    x, _, a, b, bias, _, wl = lora_gemm_case(136, 96, 128, 16, fmt, seed=2, device="cpu")
    fused = []
    monkeypatch.setattr(launch, "lora_factors", lambda *args: fused.append(args[3]) or lora_factors(*args))
    with variants.trace() as ran:
        y, h, a_cast, b_cast = L.lora_linear_cuda(x, wl, fmt, a, b, None, bias, scale, compute, compute)
    assert [r.engine for r in ran] == [variants.Engine.PERSISTENT if persistent else variants.Engine.TRITON]
    assert ran[0].scratch == (fmt == "nf4")
    assert fused == [scale if persistent else None]  # U^T only for the persistent kernel
    want_a, want_b = a.to(BF16), b.to(BF16)
    y0, h0 = launch.lora_linear_cuda(x, wl, fmt, want_a, want_b, None, bias, scale, compute, compute)
    assert len(fused) == 1
    for got, want in ((y, y0), (h, h0), (a_cast, want_a), (b_cast, want_b)):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_a_master_already_in_the_compute_dtype_gets_no_cast_output(monkeypatch):
    """lora_b in bf16, lora_a FP32: one fused launch still casts lora_a; the op's output 3 is empty (the fake
    implementation's shape, `_cast_shape`), and the forward's bits are those of the unfused path."""
    monkeypatch.setattr(variants, "PERSISTENT_SM90", True)
    x, _, a, b, _, _, wl = lora_gemm_case(40, 96, 128, 16, "bf16", seed=3, device="cpu")
    y, h, a_cast, b_cast = L.lora_linear_cuda(x, wl, "bf16", a, b.to(BF16), None, None, 0.37, "bf16", "bf16")
    y0, h0 = launch.lora_linear_cuda(x, wl, "bf16", a.to(BF16), b.to(BF16), None, None, 0.37, "bf16", "bf16")
    assert torch.equal(a_cast, a.to(BF16)) and b_cast.shape == (0,)
    assert torch.equal(y, y0) and torch.equal(h, h0)
