"""The bf16 dgrad that computes the LoRA weight gradients too (persistent.WeightGrads) on an sm_90 GPU.

On CPU the interpreter runs one small config; here each config of the `persistent_bf16_wgrad` family runs
at odd and 8B-like shapes with the real tiles (BLOCK_P 128, BLOCK_S 64) and wgmma: the gradients within FP32
summation error of the float64 formula (a bf16 rounding anywhere would be off by ~1e-3), every row written,
the output as the dgrad without them. Then the op: `lora_linear_backward_cuda` on the persistent route equals
the cuBLAS weight gradients it replaces, launches no cuBLAS GEMM for them, and falls back to them where TMA
cannot read an operand.
"""

from __future__ import annotations

import pytest
import torch

from surogate.kernels import configs, launch, persistent
from surogate.kernels.variants import A_BF16, W_BF16
from surogate.recipes import current_arch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or current_arch() != "sm_90",
                                                  reason="the persistent kernel is routed on sm_90 only")]

# (M, N, K, r): tails everywhere; 8B gate/up's dgrad (N = 2 x 12288); 8B down's (K = 12288) at rank 64.
SHAPES = [(1000, 1008, 1040, 16), (4096, 24576, 4096, 16), (4100, 4096, 12288, 64)]


def _case(m, n, k, r, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    g = torch.randn(m, n, device="cuda", generator=gen).bfloat16()
    x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=gen) / k ** 0.5).bfloat16()
    a = (torch.randn(r, k, device="cuda", generator=gen) / k ** 0.5).bfloat16()
    b = (torch.randn(n, r, device="cuda", generator=gen) * 0.1).bfloat16()
    return g, x, w, a, b, x @ a.t(), g @ b


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("index", range(len(configs.get_configs("persistent_bf16_wgrad", "sm_90"))))
def test_every_wgrad_config_computes_the_fp32_weight_gradients(shape, index):
    m, n, k, r = shape
    config = configs.get_configs("persistent_bf16_wgrad", "sm_90")[index]
    g, x, w, a, b, h, gh = _case(m, n, k, r, seed=index)
    scale = 0.37
    wg = persistent.WeightGrads.of(g, h, x, gh, scale)
    wg.grad_a.fill_(float("nan"))
    wg.grad_b.fill_(float("nan"))
    got = persistent.launch_persistent_gemm(g, None, A_BF16, w, None, W_BF16, True, k, gh, a.t(), None, scale,
                                            config=config, weight_grads=wg)
    plain = persistent.launch_persistent_gemm(g, None, A_BF16, w, None, W_BF16, True, k, gh, a.t(), None, scale,
                                              config=configs.get_configs("persistent_bf16", "sm_90")[1])
    torch.cuda.synchronize()
    name = f"{config.kwargs} warps={config.num_warps} stages={config.num_stages}"
    # The same output tiles (an unspecialized 128 x 256 family config beside it): equal up to the wgmma order.
    assert torch.isfinite(got).all() and (got.float() - plain.float()).abs().max() <= 0.02 * plain.abs().max(), name
    for got_grad, want in ((wg.grad_b, scale * (g.double().t() @ h.double())),
                           (wg.grad_a, scale * (gh.double().t() @ x.double()))):
        assert torch.isfinite(got_grad).all(), f"{name}: gradient rows left unwritten"
        err = _rel_err(got_grad, want)
        rounded = _rel_err(want.bfloat16(), want)
        assert err < 1e-5 < rounded, (name, err, rounded)


def _backward(g, x, w, a, b, h, scale):
    return launch.lora_linear_backward_cuda(g, x, [w], "bf16", a.float(), b.float(), None, h, scale, "bf16",
                                            None, a, b)


@pytest.mark.parametrize("take", [True, False], ids=["in_dgrad", "cublas"])
def test_the_op_backward_takes_them_in_the_dgrad(take, monkeypatch):
    """4096 rows (the persistent route): the gradients agree with the cuBLAS ones to FP32 summation order,
    dx to the bf16 output's rounding; in the dgrad, the backward launches one cuBLAS GEMM (g @ lora_b) and the
    persistent kernel, and no cuBLAS GEMM for the weight gradients."""
    g, x, w, a, b, h, gh = _case(4096, 3072, 2048, 16, seed=7)
    monkeypatch.setattr(persistent, "WEIGHT_GRADS_IN_DGRAD", False)
    dx0, ga0, gb0, _ = _backward(g, x, w, a, b, h, 2.0)
    monkeypatch.setattr(persistent, "WEIGHT_GRADS_IN_DGRAD", take)
    dx, ga, gb, _ = _backward(g, x, w, a, b, h, 2.0)
    assert ga.dtype == gb.dtype == torch.float32
    assert _rel_err(ga, ga0.double()) < 1e-5 and _rel_err(gb, gb0.double()) < 1e-5
    assert _rel_err(dx, dx0.double()) < 1e-2
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        _backward(g, x, w, a, b, h, 2.0)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    persistent_launches = [n for n in names if "_persistent_lora_gemm_kernel" in n]
    cublas_gemms = [n for n in names if n not in persistent_launches and "splitKreduce" not in n
                    and (n.startswith("nvjet") or "gemm" in n.lower() or "cutlass" in n.lower())]
    assert len(persistent_launches) == 1, names
    assert len(cublas_gemms) == (1 if take else 3), names  # g @ lora_b (+ the two weight-gradient GEMMs)


def test_unaligned_operands_fall_back_to_the_gemms():
    """x whose rows TMA cannot read (a view off a 16-byte boundary): the dgrad runs without the gradients and
    grad_input_cuda computes them with the two GEMMs, the same values."""
    g, x, w, a, b, h, gh = _case(4096, 2048, 2048, 16, seed=3)
    x_odd = torch.empty(4096, 2049, dtype=torch.bfloat16, device="cuda")[:, 1:]
    x_odd.copy_(x)
    assert not persistent.tma_ok(x_odd)
    dx, ga, gb, _ = _backward(g, x_odd, w, a, b, h, 2.0)
    want_a = 2.0 * (gh.double().t() @ x.double())
    want_b = 2.0 * (g.double().t() @ h.double())
    assert _rel_err(ga, want_a) < 1e-5 and _rel_err(gb, want_b) < 1e-5
