"""kernels/lora_add.py on CUDA (marked `gpu`; deselected without CUDA): the LoRA term added into a cuBLAS GEMM's
output against cuBLAS's own addmm_, alone and inside qfp8's cuBLAS route (sm_90), forward and dgrad.

The kernel sums the r products of bf16 values and the output in FP32 and rounds once: checked against the exact
sum (FP64) rounded once, up to FP32's summation error. cuBLAS's addmm_ is no reference for that: on the H200 it
rounds the product before adding the output (run 143: 28% of outputs one bf16 rounding apart from the kernel's, and
from the exact sum rounded once), so against it the tests ask for closeness only.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, when run as a script
from numerics import rounded_once, sqnr  # noqa: E402

pytestmark = pytest.mark.gpu


def _exact(out, hidden, up, bias, scale):
    """(out + bias + scale * hidden @ up^T in FP64, the sum of the terms' absolute values)."""
    term = scale * (hidden.double() @ up.double().t())
    magnitude = out.double().abs() + scale * (hidden.double().abs() @ up.double().abs().t())
    exact = out.double() + term
    if bias is not None:
        exact, magnitude = exact + bias.double(), magnitude + bias.double().abs()
    return exact, magnitude


@pytest.mark.parametrize("m,n,r", [(4096, 24576, 16), (1000, 4000, 24), (37, 384, 8), (300, 4096, 128)], ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_the_kernel_against_addmm(m, n, r, with_bias):
    from surogate.kernels.lora_add import lora_add_

    gen = torch.Generator(device="cuda").manual_seed(m + r)
    out = torch.randn(m, n, device="cuda", generator=gen).bfloat16()
    hidden = torch.randn(m, r, device="cuda", generator=gen).bfloat16()
    lora_a = torch.randn(r, n, device="cuda", generator=gen).bfloat16()  # the dgrad's U is lora_a^T, a strided view
    bias = torch.randn(n, device="cuda", generator=gen).bfloat16() if with_bias else None
    exact, magnitude = _exact(out, hidden, lora_a.t(), bias, 2.0)
    got = lora_add_(out.clone(), hidden, lora_a.t(), bias, 2.0)
    assert rounded_once(got, exact, magnitude, r + 2) <= 1.0
    if bias is None:
        addmm = out.clone().addmm_(hidden, lora_a, alpha=2.0)
        assert sqnr(got, addmm) > 45


@pytest.mark.parametrize("shape", [(4096, 4096, 4096), (784, 1024, 2048)], ids=["8b_q", "small"])
def test_qfp8_cublas_route_with_the_kernel_matches_addmm(shape, monkeypatch):
    """qfp8's forward and dgrad on cuBLAS (sm_90) with the LoRA term added by the kernel (the default) and by addmm_
    (cublas.LORA_ADD_KERNEL = False): the same GEMM outputs, the add rounded once or (addmm_) twice."""
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
    assert sqnr(runs[True][0], runs[False][0]) > 45
    assert sqnr(runs[True][1], runs[False][1]) > 45
