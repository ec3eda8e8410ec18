"""kernels/cublas.py: which GEMMs leave the Triton kernels for cuBLAS, and the LoRA term added after.

The cuBLAS calls themselves run on the GPU (tests/gpu/test_gemm_gpu.py checks them against the Triton
kernels and the FP32 oracle); here the routing rules and the plain-torch epilogue math.
"""

from __future__ import annotations

import types

import torch

from surogate.kernels import configs, cublas
from surogate.kernels.variants import BF16_CUBLAS_MIN_K, CublasRule, cublas_takes


def test_cpu_tensors_and_forced_triton_never_route_to_cublas(monkeypatch):
    x = torch.zeros(4096, 4096, dtype=torch.bfloat16)
    assert not cublas.available(x, CublasRule.BF16_LONG_REDUCTION)
    assert not cublas.available(x.to(torch.float8_e4m3fn), CublasRule.BLOCK_FP8_SM90)
    cuda_like = types.SimpleNamespace(is_cuda=True)
    monkeypatch.setattr(configs, "interpreting", lambda: False)
    assert cublas._on_cuda(cuda_like)
    monkeypatch.setattr(configs, "FORCE_TRITON_GEMMS", True)
    assert not cublas._on_cuda(cuda_like)


def test_bf16_goes_to_cublas_from_a_reduction_of_4096(monkeypatch):
    assert cublas_takes(CublasRule.BF16_LONG_REDUCTION, "sm_90", 8, 8, BF16_CUBLAS_MIN_K)
    assert not cublas_takes(CublasRule.BF16_LONG_REDUCTION, "sm_90", 8, 8, BF16_CUBLAS_MIN_K - 1)
    monkeypatch.setattr(cublas, "_on_cuda", lambda a: True)
    x = torch.zeros(8, 8, dtype=torch.bfloat16)
    assert cublas.available(x, CublasRule.BF16_LONG_REDUCTION)
    assert not cublas.available(x.half(), CublasRule.BF16_LONG_REDUCTION)  # other dtypes keep the Triton kernel
    assert not cublas.available(x, CublasRule.NEVER)


def test_block_fp8_rule_needs_sm90_and_aligned_shapes():
    rule = CublasRule.BLOCK_FP8_SM90
    assert cublas_takes(rule, "sm_90", 784, 1024, 2048)
    assert not cublas_takes(rule, "sm_90", 777, 1024, 2048)  # M % 4: cuBLASLt answered NOT_SUPPORTED
    assert not cublas_takes(rule, "sm_90", 784, 1024, 640)  # the reduction % 512
    assert not cublas_takes(rule, "sm_90", 784, 1000, 2048)  # the output % 16
    assert not cublas_takes(rule, "sm_89", 784, 1024, 2048)  # only measured faster on sm_90
    assert not cublas_takes(rule, "sm_90", 0, 1024, 2048)


def test_bf16_gemm_adds_bias_and_the_scaled_lora_term():
    g = torch.Generator().manual_seed(0)
    a, w = torch.randn(37, 64, generator=g), torch.randn(48, 64, generator=g)
    hidden, up, bias = torch.randn(37, 8, generator=g), torch.randn(48, 8, generator=g), torch.randn(48, generator=g)
    got = cublas.bf16_gemm(a, w, hidden, up, bias, 2.0)
    want = a @ w.t() + bias + 2.0 * hidden @ up.t()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    # dgrad form: b is a transposed view (W read as (K, N)), up the (K, r) view of lora_a^T
    dy, lora_a = torch.randn(37, 48, generator=g), torch.randn(8, 64, generator=g)
    got = cublas.bf16_gemm(dy, w.t(), hidden, lora_a.t(), None, 0.5)
    torch.testing.assert_close(got, dy @ w + 0.5 * hidden @ lora_a, rtol=1e-5, atol=1e-4)
    assert torch.equal(cublas.bf16_gemm(a, w, None, None, None, 2.0), a @ w.t())
