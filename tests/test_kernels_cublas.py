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


def test_row_fp8_rules_are_opt_in_and_need_sm90_and_aligned_shapes(monkeypatch):
    """Row-scaled fp8 goes to cuBLAS only for the rules variants.FP8_ROW_CUBLAS names (none by default: slower than
    the persistent route at 8B, runs 68 and 71), forward and dgrad each on its own, on sm_90, with 16-element
    leading dimensions, where the persistent kernel does not take the call (below 1024 rows)."""
    from surogate.kernels import variants

    fwd, dgrad = CublasRule.ROW_FP8_FWD_SM90, CublasRule.ROW_FP8_DGRAD_SM90
    assert variants.FP8_ROW_CUBLAS == frozenset()
    assert not cublas_takes(fwd, "sm_90", 4096, 4096, 4096) and not cublas_takes(dgrad, "sm_90", 4096, 4096, 4096)
    monkeypatch.setattr(variants, "FP8_ROW_CUBLAS", frozenset({dgrad}))
    assert cublas_takes(dgrad, "sm_90", 37, 4096, 1040) and not cublas_takes(fwd, "sm_90", 37, 4096, 1040)
    assert not cublas_takes(dgrad, "sm_90", 37, 4096, 1048 - 4)  # the reduction % 16
    assert not cublas_takes(dgrad, "sm_90", 37, 4104, 1040)  # the output % 16
    assert not cublas_takes(dgrad, "sm_89", 37, 4096, 1040) and not cublas_takes(dgrad, "sm_90", 0, 4096, 1040)
    fp8_dgrad = variants.variant("grad_input", "fp8", "fp8_row")
    assert variants.route(fp8_dgrad, "sm_90", 512, 4096, 4096).engine is variants.Engine.CUBLAS
    assert variants.route(fp8_dgrad, "sm_90", 4096, 4096, 4096).engine is variants.Engine.PERSISTENT  # ahead
    assert "cuBLASLt row-scaled FP8 + LoRA addmm" in fp8_dgrad.describe_rule("sm_90")
    fp8_fwd = variants.variant("output", "fp8", "fp8_row")
    assert variants.route(fp8_fwd, "sm_90", 512, 4096, 4096).engine is variants.Engine.TRITON


def test_row_fp8_gemm_is_the_scaled_product_plus_the_lora_term():
    """torch._scaled_mm (on the CPU here) with row scales (M, 1) and channel scales (N,), E4M3 x E4M3 (forward)
    and E5M2 x E4M3 (dgrad): the dequantized product to bf16's rounding, then bias and the LoRA term."""
    from surogate.kernels.reference_formats import quantize_fp8_rowwise_ref

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(37, 64, generator=g).bfloat16(), torch.randn(48, 64, generator=g).bfloat16()
    hidden, up, bias = torch.randn(37, 8, generator=g), torch.randn(48, 8, generator=g), torch.randn(48, generator=g)
    for element in ("e4m3", "e5m2"):
        xq, xs = quantize_fp8_rowwise_ref(x, element)[:2]
        wq, ws = quantize_fp8_rowwise_ref(w, "e4m3")[:2]
        got = cublas.row_fp8_gemm(xq, xs, wq, ws.reshape(-1), hidden.bfloat16(), up.bfloat16(), bias, 2.0)
        base = ((xq.float() * xs.float().reshape(-1, 1)) @ (wq.float() * ws.float().reshape(-1, 1)).t()).bfloat16()
        want = base.float() + bias + 2.0 * hidden.bfloat16().float() @ up.bfloat16().float().t()
        assert got.dtype == torch.bfloat16 and got.shape == (37, 48)
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=5e-2)
        assert torch.equal(cublas.row_fp8_gemm(xq, xs, wq, ws, None, None, None, 1.0), base)


def test_the_fp8_op_on_the_row_fp8_cublas_route_matches_the_triton_kernel(monkeypatch):
    """The op's forward and dgrad with both row-fp8 rules on run cuBLAS's GEMM (torch._scaled_mm on the CPU here,
    cuBLAS taken as available) on the operands the Triton kernel reads, the dgrad on the cached K-major transpose:
    the same numbers to the two roundings' difference (the cuBLAS route rounds x W^T before adding the LoRA)."""
    from numerics import lora_gemm_case

    from surogate.kernels import launch, variants

    x, _, a, b, _, go, wl = lora_gemm_case(40, 96, 128, 16, "fp8_row", seed=0, device="cpu")

    def step():
        with variants.trace() as ran:
            y, h = launch.lora_linear_cuda(x, wl, "fp8_row", a, b, None, None, 2.0, "fp8", "fp8")
            dx = launch.lora_linear_backward_cuda(go, x, wl, "fp8_row", a, b, None, h, 2.0, "fp8")[0]
        return y.float(), dx.float(), [r.engine for r in ran]

    y0, dx0, engines = step()
    assert engines == [variants.Engine.TRITON] * 2
    monkeypatch.setattr(cublas, "available", lambda t, rule: True)
    monkeypatch.setattr(variants, "FP8_ROW_CUBLAS", frozenset({CublasRule.ROW_FP8_FWD_SM90,
                                                              CublasRule.ROW_FP8_DGRAD_SM90}))
    y1, dx1, engines = step()
    assert engines == [variants.Engine.CUBLAS] * 2
    for got, want in ((y1, y0), (dx1, dx0)):
        sqnr = 10 * torch.log10(want.pow(2).sum() / (got - want).pow(2).sum())
        assert sqnr > 40, float(sqnr)
