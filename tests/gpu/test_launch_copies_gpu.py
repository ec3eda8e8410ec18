"""A LoRA linear's small ATen kernels on the GPU (marked `gpu`; deselected without CUDA): what
tests/test_launch_copies.py pins on the CPU, checked where the kernels run.

(1) The one-kernel scalings have the bits of the forms they replaced: ATen multiplies bf16 by a Python scalar
in FP32 and rounds once, and reads bf16 with the cast when the other operand is a one-element FP32 tensor.
(2) The op's CUDA forward + backward (the factors cast once, the casts passed to the backward) equals the
launcher given the FP32 masters (casting them itself) bit for bit, on the persistent route (4096 rows on
sm_90) and the Triton one (256 rows).
(3) What one forward + backward launches, by the profiler: no copy kernel; the factors' casts are one
`_lora_factors_kernel` (before it: two `bfloat16_copy` kernels; before those, 6 and 4 `direct_copy`, plus a
strided copy on the persistent route; bench/NOTES.md "Copies in the fp8 step").
(5) `lora_factors` has the bits of `lora_a.to(bf16)`, `lora_b.to(bf16)` and `lora_up_rows`, and the op's forward
that runs it those of the forward given the `.to()` casts (no fused launch), on the persistent, Triton and cuBLAS
routes.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, when run as a script
from numerics import lora_gemm_case  # noqa: E402

pytestmark = pytest.mark.gpu


def _step(x, wl, a, b, go, scale):
    op = importlib.import_module("surogate.ops.lora_linear")
    y, h, a_cast, b_cast = op.lora_linear_cuda(x, wl, "fp8_row", a, b, None, None, scale, "fp8", "fp8")
    grads = op.lora_linear_backward_cuda(go, x, wl, "fp8_row", a, b, None, h, scale, "fp8", None, a_cast, b_cast)
    return y, grads


@pytest.mark.parametrize("scale", [2.0, 0.37, 1 / 3])
def test_one_kernel_scalings_have_the_old_bits_on_cuda(scale):
    from surogate.kernels import grad_lora, lora_linear

    g = torch.Generator().manual_seed(0)
    up = (torch.randn(12288, 16, generator=g) * torch.logspace(-30, 30, 16)).bfloat16().cuda()
    want = (up.float() * scale).to(torch.bfloat16)
    assert torch.equal(lora_linear._prescale(up, scale), want)
    assert torch.equal(lora_linear.lora_up_rows(up, scale), want.t())
    assert torch.equal(lora_linear.lora_up_rows(up.t().contiguous().t(), scale), want.t())
    assert torch.equal(grad_lora._scaled(up, scale, torch.float32), up.float() * scale)


@pytest.mark.parametrize("rows", [4096, 256])
@pytest.mark.parametrize("scale", [2.0, 0.37])
def test_the_op_path_equals_the_launcher_casting_itself(rows, scale):
    from surogate.kernels import launch, variants

    x, _, a, b, _, go, wl = lora_gemm_case(rows, 1536, 2048, 16, "fp8_row", 1, "cuda")
    with variants.trace() as ran:
        y, (dx, ga, gb, _) = _step(x, wl, a, b, go, scale)
    y0, h0 = launch.lora_linear_cuda(x, wl, "fp8_row", a, b, None, None, scale, "fp8", "fp8")
    dx0, ga0, gb0, _ = launch.lora_linear_backward_cuda(go, x, wl, "fp8_row", a, b, None, h0, scale, "fp8")
    for got, want in ((y, y0), (dx, dx0), (ga, ga0), (gb, gb0)):
        assert got.dtype == want.dtype and torch.equal(got, want)
    if torch.cuda.get_device_capability() == (9, 0) and rows >= 1024:
        assert {r.engine for r in ran} == {variants.Engine.PERSISTENT}


def test_one_forward_and_backward_launch_one_factor_kernel_and_no_copy():
    x, _, a, b, _, go, wl = lora_gemm_case(4096, 1536, 2048, 16, "fp8_row", 2, "cuda")
    _step(x, wl, a, b, go, 2.0)  # tuning, the scale tensor
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        _step(x, wl, a, b, go, 2.0)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert not [n for n in names if "copy" in n.lower()], names
    assert sum("_lora_factors_kernel" in n for n in names) == 1, names


@pytest.mark.parametrize("scale", [2.0, 0.37])
def test_lora_weight_gradients_are_one_fp32_gemm_each(scale):
    """(4) On CUDA each LoRA weight gradient is one cuBLAS call writing `scale * (p @ q)` in FP32 (addmm with
    out_dtype, beta 0): the reference's formula (FP32 products of the bf16 values, no bf16 rounding of the
    product), and no multiply or fill kernel after the GEMMs."""
    from surogate.compat import fp32_out_addmm
    from surogate.kernels import grad_lora

    # Every supported torch (2.11-2.13) has it; without it the gradients would fall back to the bf16 product
    # and `_scaled` silently, one launch more each.
    assert fp32_out_addmm(), "torch.addmm(out_dtype=) is missing: LoRA gradients fell back to the slower path"
    g = torch.Generator().manual_seed(3)
    go = torch.randn(4096, 1536, generator=g).bfloat16().cuda()
    x = torch.randn(4096, 2048, generator=g).bfloat16().cuda()
    h = torch.randn(4096, 16, generator=g).bfloat16().cuda()
    a = (torch.randn(16, 2048, generator=g) * 0.02).bfloat16().cuda()
    b = (torch.randn(1536, 16, generator=g) * 0.02).bfloat16().cuda()
    ga, gb, gh = grad_lora.grad_lora(go, x, h, a, b, scale, (torch.float32, torch.float32))
    want_b = scale * (go.double().t() @ h.double())
    want_a = scale * (gh.double().t() @ x.double())
    for got, want in ((gb, want_b), (ga, want_a)):
        assert got.dtype == torch.float32
        err = ((got.double() - want).abs().max() / want.abs().max()).item()
        rounded = ((want.bfloat16().double() - want).abs().max() / want.abs().max()).item()
        assert err < 1e-5 < rounded, (err, rounded)  # FP32 sums; a bf16 product would be off by ~1e-3
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        grad_lora.grad_lora(go, x, h, a, b, scale, (torch.float32, torch.float32))
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert not [n for n in names if "elementwise" in n or "Fill" in n or "copy" in n.lower()], names


@pytest.mark.parametrize("r", [8, 16, 48, 64])
@pytest.mark.parametrize("scale", [1.0, 2.0, 0.37, 1.5])
def test_the_factor_kernel_has_the_bits_of_the_casts_on_cuda(r, scale):
    """(5) FP32 masters over 1e-30..1e30, K and N not multiples of the tile."""
    from surogate.kernels import lora_linear
    from surogate.kernels.lora_factors import lora_factors

    g = torch.Generator().manual_seed(r)
    a = (torch.randn(r, 2053, generator=g) * torch.logspace(-30, 30, 2053)).cuda()
    b = (torch.randn(1543, r, generator=g) * torch.logspace(-30, 30, r)).cuda()
    a_cast, b_cast, ut = lora_factors(a, b, torch.bfloat16, scale)
    assert torch.equal(a_cast, a.bfloat16()) and torch.equal(b_cast, b.bfloat16())
    assert torch.equal(ut, lora_linear.lora_up_rows(b.bfloat16(), scale))


# (weight format, forward precision, rows, K, the route on sm_90): 4096 rows take the persistent kernel there
# (nf4 through its bf16 scratch), fp8 at 256 rows the Triton kernel, bf16 with K >= BF16_CUBLAS_MIN_K cuBLAS.
_ROUTES = [("fp8_row", "fp8", 4096, 2048, "persistent"), ("bf16", "bf16", 4096, 2048, "persistent"),
           ("nf4", "bf16", 4096, 2048, "persistent"), ("fp8_row", "fp8", 256, 2048, "triton"),
           ("bf16", "bf16", 256, 4096, "cublas")]


@pytest.mark.parametrize("fmt,compute,rows,k,engine", _ROUTES)
@pytest.mark.parametrize("scale", [2.0, 0.37])
def test_the_forward_op_has_the_bits_of_the_unfused_casts_on_cuda(fmt, compute, rows, k, engine, scale):
    """(5) (output, hidden, a_cast, b_cast) of the op's forward equal the launcher given `lora_a.to(bf16)`,
    `lora_b.to(bf16)` (which runs no `lora_factors`; the persistent launcher makes U^T by `lora_up_rows`)."""
    from surogate.kernels import launch, variants

    op = importlib.import_module("surogate.ops.lora_linear")
    x, _, a, b, bias, _, wl = lora_gemm_case(rows, 1536, k, 16, fmt, 4, "cuda")
    with variants.trace() as ran:
        y, h, a_cast, b_cast = op.lora_linear_cuda(x, wl, fmt, a, b, None, bias, scale, compute, compute)
    want_a, want_b = a.bfloat16(), b.bfloat16()
    y0, h0 = launch.lora_linear_cuda(x, wl, fmt, want_a, want_b, None, bias, scale, compute, compute)
    for got, want in ((y, y0), (h, h0), (a_cast, want_a), (b_cast, want_b)):
        assert got.dtype == want.dtype and torch.equal(got, want)
    if torch.cuda.get_device_capability() == (9, 0) or engine == "cublas":
        assert ran[0].engine is variants.Engine(engine), ran
