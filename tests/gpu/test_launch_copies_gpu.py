"""A LoRA linear's small ATen kernels on the GPU (marked `gpu`; deselected without CUDA): what
tests/test_launch_copies.py pins on the CPU, checked where the kernels run.

(1) The one-kernel scalings have the bits of the forms they replaced: ATen multiplies bf16 by a Python scalar
in FP32 and rounds once, and reads bf16 with the cast when the other operand is a one-element FP32 tensor.
(2) The op's CUDA forward + backward (the factors cast once, the casts passed to the backward) equals the
launcher given the FP32 masters (casting them itself) bit for bit, on the persistent route (4096 rows on
sm_90) and the Triton one (256 rows).
(3) What one forward + backward launches, by the profiler: the forward's two `bfloat16_copy` kernels and no
`direct_copy` (before: 6 and 4, plus a strided copy on the persistent route; bench/NOTES.md "Copies in the
fp8 step").
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


def test_one_forward_and_backward_launch_two_casts_and_no_upcast():
    x, _, a, b, _, go, wl = lora_gemm_case(4096, 1536, 2048, 16, "fp8_row", 2, "cuda")
    _step(x, wl, a, b, go, 2.0)  # tuning, the scale tensor
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        _step(x, wl, a, b, go, 2.0)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    copies = [n for n in names if "copy" in n.lower()]
    assert sum("bfloat16_copy" in n for n in copies) == 2 and len(copies) == 2, copies


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
