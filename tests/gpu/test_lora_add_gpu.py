"""kernels/lora_add.py on CUDA (marked `gpu`; deselected without CUDA): the LoRA term added into a cuBLAS GEMM's
output against cuBLAS's own addmm_, alone and inside qfp8's cuBLAS route (sm_90), forward and dgrad.

Both sum the r products of bf16 values in FP32 and round once; only the order of that sum differs, so the outputs
are bit-equal but for rare one-ulp ties. With a bias, addmm_'s path rounds twice (the bias added first), the kernel
once, as the FP32 sum rounded once that it is checked against there.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, when run as a script
from numerics import sqnr  # noqa: E402

pytestmark = pytest.mark.gpu


def _ulps(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest difference in units of the last place of bf16 (8 bits of mantissa) of `want`."""
    ulp = want.float().abs().clamp_min(2.0 ** -126) * 2.0 ** -7
    return float(((got.float() - want.float()).abs() / ulp).max())


@pytest.mark.parametrize("m,n,r", [(4096, 24576, 16), (1000, 4000, 24), (37, 384, 8), (300, 4096, 128)], ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_the_kernel_against_addmm(m, n, r, with_bias):
    from surogate.kernels.lora_add import lora_add_

    gen = torch.Generator(device="cuda").manual_seed(m + r)
    out = torch.randn(m, n, device="cuda", generator=gen).bfloat16()
    hidden = torch.randn(m, r, device="cuda", generator=gen).bfloat16()
    lora_a = torch.randn(r, n, device="cuda", generator=gen).bfloat16()  # the dgrad's U is lora_a^T, a strided view
    bias = torch.randn(n, device="cuda", generator=gen).bfloat16() if with_bias else None
    if bias is None:
        want = out.clone().addmm_(hidden, lora_a, alpha=2.0)
    else:
        want = (out.float() + bias.float() + 2.0 * (hidden.float() @ lora_a.float())).bfloat16()
    got = lora_add_(out.clone(), hidden, lora_a.t(), bias, 2.0)
    assert _ulps(got, want) <= 1.0
    assert float((got == want).float().mean()) > 0.99


@pytest.mark.parametrize("shape", [(4096, 4096, 4096), (784, 1024, 2048)], ids=["8b_q", "small"])
def test_qfp8_cublas_route_with_the_kernel_matches_addmm(shape, monkeypatch):
    """qfp8's forward and dgrad on cuBLAS (sm_90) with the LoRA term added by the kernel (the default) and by addmm_
    (cublas.LORA_ADD_KERNEL = False): the same GEMM outputs, the add one ulp apart at most (no bias: addmm_'s path
    would round twice with one)."""
    from surogate.kernels import cublas, launch, variants
    from surogate.kernels.quantize import quantize_weight
    from surogate.recipes import current_arch

    m, n, k = shape
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=g) / k ** 0.5).bfloat16()
    a = torch.randn(16, k, device="cuda", generator=g) / k ** 0.5
    b = torch.randn(n, 16, device="cuda", generator=g) * 0.1
    go = torch.randn(m, n, device="cuda", generator=g).bfloat16()
    wl = quantize_weight(w, "fp8_block")
    runs, engines = {}, {}
    for kernel in (True, False):
        monkeypatch.setattr(cublas, "LORA_ADD_KERNEL", kernel)
        with variants.trace() as ran:
            y, h = launch.lora_linear_cuda(x, wl, "fp8_block", a, b, None, None, 2.0, "fp8", "fp8")
            dx = launch.lora_linear_backward_cuda(go, x, wl, "fp8_block", a, b, None, h, 2.0, "fp8")[0]
        runs[kernel], engines[kernel] = (y, dx), [r.engine.value for r in ran]
    if current_arch() == "sm_90":
        assert engines[True] == ["cublas", "cublas"]
    assert _ulps(runs[True][0], runs[False][0]) <= 1.0
    assert _ulps(runs[True][1], runs[False][1]) <= 1.0
    assert sqnr(runs[True][0], runs[False][0]) > 60
