"""The fused GEMM kernels at real sizes on a GPU (marked `gpu`; deselected without CUDA).

Two checks per (recipe, shape): (1) the kernel computes the math on its quantized operands
(fp32 oracle on the dequantized activation and weight) to a tight SQNR, which catches
indexing, scale and epilogue bugs; (2) against `reference.lora_linear_ref` /
`lora_linear_backward_ref`, with an SQNR floor per recipe (the two quantize the same way, so
the floors are high, not format-noise floors).
"""

from __future__ import annotations

import pytest
import torch

from surogate.recipes import current_arch, get

from surogate.kernels.plan import Support, plan
from surogate.recipes.formats import GRAD_FP8_ELEMENT
from numerics import sqnr

pytestmark = pytest.mark.gpu

# Shapes: odd M (tile tails), Qwen3-0.6B-like and 8B-like N/K.
SHAPES = [(1000, 1024, 2048), (4096, 4096, 4096), (123, 3072, 1024)]
RECIPES = ["bf16", "fp8", "qfp8", "qfp8-bf16", "qnf4", "fp4", "qfp4"]
# SQNR floors (dB) against the reference: same quantization on both sides, fp32 accumulation
# in a different order, bf16 outputs.
REF_FLOOR = {"output": 35.0, "grad_input": 30.0, "grad_lora_a": 30.0, "grad_lora_b": 35.0}
ORACLE_FLOOR = 38.0
SCALE = 2.0



def _runs(recipe: str) -> tuple[str, str]:
    """(forward, grad_input) computes the compiled graph passes the op (the recipe's own: where FP4
    is emulated, the op quantizes to NVFP4 and runs a bf16 MMA itself)."""
    p = plan(recipe, current_arch())
    if p.support is Support.REFUSED:
        pytest.fail(f"{recipe} refused on {current_arch()}: {p.explain()}")
    return p.recipe.forward.value, p.recipe.grad_input.value


def _case(recipe: str, m: int, n: int, k: int, seed: int):
    from surogate.kernels.quantize import quantize_weight

    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=g) / k ** 0.5).bfloat16()
    a = torch.randn(16, k, device="cuda", generator=g) / k ** 0.5
    b = torch.randn(n, 16, device="cuda", generator=g) * 0.1
    bias = torch.randn(n, device="cuda", generator=g).bfloat16()
    go = torch.randn(m, n, device="cuda", generator=g).bfloat16()
    fmt = get(recipe).weight_format.value
    return x, w, a, b, bias, go, fmt, quantize_weight(w, fmt)


def _dequant_weight(wl, fmt: str, n: int, k: int) -> torch.Tensor:
    from surogate.kernels import dequantize as dq

    if fmt == "bf16":
        return wl[0].float()
    if fmt == "fp8_row":
        return wl[0].float() * wl[1][:, None]
    if fmt == "fp8_block":
        return dq.dequantize_fp8_block(wl[0], wl[1]).float()
    if fmt in ("nvfp4", "nvfp4_cached"):
        return dq.dequantize_nvfp4(wl[0], wl[1], wl[2], shape=(n, k), dtype=torch.float32)
    return dq.dequantize_nf4(*wl, shape=(n, k), dtype=torch.float32)


def _dequant_act(x: torch.Tensor, compute: str, fmt: str, element: str) -> torch.Tensor:
    from surogate.kernels import dequantize as dq
    from surogate.kernels import quantize as q

    if compute == "bf16":
        return x.float()
    if compute == "fp8" and fmt == "fp8_row":
        d, s, _ = q.quantize_fp8_rowwise(x, element)
        return d.float() * s
    if compute == "fp8":
        d, s = q.quantize_fp8_block(x, (1, 128), element)
        return (d.float().view(x.shape[0], -1, 128) * s[:, :, None]).view(x.shape) if x.shape[1] % 128 == 0 \
            else dq.dequantize_fp8_block(d, s, (1, 128)).float()
    p, bs, ts = q.quantize_nvfp4(x)
    return dq.dequantize_nvfp4(p, bs, ts, shape=x.shape, dtype=torch.float32)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_backward_vs_oracle(recipe: str, shape: tuple[int, int, int]) -> None:
    from surogate.kernels import launch

    m, n, k = shape
    fwd, dg = _runs(recipe)
    x, w, a, b, bias, go, fmt, wl = _case(recipe, m, n, k, seed=m + n)
    out = torch.full((m, n), float("nan"), device="cuda")
    y, h = launch.lora_linear_cuda(x, wl, fmt, a, b, None, bias, SCALE, fwd, dg)
    out.copy_(y)
    wd = _dequant_weight(wl, fmt, n, k)
    h_ref = x.float() @ a.bfloat16().float().t()
    y_ref = _dequant_act(x, fwd, fmt, "e4m3") @ wd.t() + bias.float() + SCALE * h_ref.bfloat16().float() @ \
        b.bfloat16().float().t()
    assert sqnr(out, y_ref) > ORACLE_FLOOR
    assert sqnr(h, h_ref) > 45

    gi, ga, gb, gl = launch.lora_linear_backward_cuda(go, x, wl, fmt, a, b, None, h, SCALE, dg)
    assert gl is None and ga.dtype == a.dtype and gb.dtype == b.dtype
    gh = go.float() @ b.bfloat16().float()
    # fp8_row dgrad reads the K-major transpose, quantized on its own (per input channel)
    wd_t = (wl[2].float() * wl[3][:, None]).t() if fmt == "fp8_row" and dg == "fp8" else wd
    grad_element = GRAD_FP8_ELEMENT.get(fmt, "e5m2")  # nf4 / nvfp4 weights with an FP8 dgrad: per row
    gi_ref = _dequant_act(go, dg, fmt, grad_element) @ wd_t + SCALE * gh.bfloat16().float() @ a.bfloat16().float()
    # NVFP4 dgrad: stochastic rounding and the weight re-quantized along N, neither in this oracle
    assert sqnr(gi, gi_ref) > (12.0 if dg == "nvfp4" else ORACLE_FLOOR - 3)
    assert sqnr(ga, SCALE * gh.t() @ x.float()) > 40
    assert sqnr(gb, SCALE * go.float().t() @ h.float()) > 40


@pytest.mark.parametrize("recipe", RECIPES)
def test_against_reference(recipe: str) -> None:
    from surogate.kernels import launch, reference

    m, n, k = 777, 1024, 2048
    fwd, dg = _runs(recipe)
    x, w, a, b, bias, go, fmt, wl = _case(recipe, m, n, k, seed=7)
    y, h = launch.lora_linear_cuda(x, wl, fmt, a, b, None, bias, SCALE, fwd, dg)
    y_r, h_r = reference.lora_linear_ref(x, wl, fmt, a, b, None, bias, SCALE, fwd, dg)
    assert y.shape == y_r.shape and h.shape == h_r.shape
    assert sqnr(y, y_r) > REF_FLOOR["output"]
    got = launch.lora_linear_backward_cuda(go, x, wl, fmt, a, b, None, h, SCALE, dg)
    want = reference.lora_linear_backward_ref(go, x, wl, fmt, a, b, None, h_r, SCALE, dg)
    for name, g_, r_ in zip(("grad_input", "grad_lora_a", "grad_lora_b"), got[:3], want[:3]):
        assert g_.shape == r_.shape and g_.dtype == r_.dtype, name
        # NVFP4 dgrad rounds the gradient stochastically with another RNG than the reference's:
        # two independent rounding noises, so only a format-noise floor applies.
        floor = 12.0 if name == "grad_input" and dg == "nvfp4" else REF_FLOOR[name]
        assert sqnr(g_, r_) > floor, name


def test_lora_input_and_no_lora() -> None:
    """Dropout path (separate LoRA input -> separate grad) and a plain quantized linear."""
    from surogate.kernels import launch

    m, n, k = 300, 1024, 1024
    x, w, a, b, bias, go, fmt, wl = _case("fp8", m, n, k, seed=3)
    xl = torch.nn.functional.dropout(x, 0.1)
    y, h = launch.lora_linear_cuda(x, wl, fmt, a, b, xl, None, SCALE, "fp8", "fp8")
    assert sqnr(h, xl.float() @ a.bfloat16().float().t()) > 45
    gi, ga, gb, gl = launch.lora_linear_backward_cuda(go, x, wl, fmt, a, b, xl, h, SCALE, "fp8")
    gh = go.float() @ b.bfloat16().float()
    assert sqnr(gl, SCALE * gh @ a.bfloat16().float()) > 40
    assert sqnr(ga, SCALE * gh.t() @ xl.float()) > 40
    y0, h0 = launch.lora_linear_cuda(x, wl, fmt, None, None, None, None, 1.0, "fp8", "fp8")
    assert h0.shape == (m, 0)
    assert sqnr(y0, _dequant_act(x, "fp8", fmt, "e4m3") @ _dequant_weight(wl, fmt, n, k).t()) > ORACLE_FLOOR
    gi0, ga0, gb0, gl0 = launch.lora_linear_backward_cuda(go, x, wl, fmt, None, None, None, h0, 1.0, "fp8")
    assert ga0 is None and gb0 is None and gi0.shape == x.shape


@pytest.mark.parametrize("shape", [(784, 1024, 2048), (777, 1024, 2048), (256, 384, 640)],
                         ids=["cublas_shape", "m_not_4", "k_not_512"])
def test_block_fp8_cublas_and_triton_agree(shape, monkeypatch) -> None:
    """qfp8's block GEMMs run on cuBLAS where it takes them (sm_90, K a multiple of 512) and on the
    Triton kernel elsewhere: both compute the same forward and dgrad, and the shape decides which runs."""
    from surogate.kernels import configs, launch, variants

    m, n, k = shape
    x, w, a, b, bias, go, fmt, wl = _case("qfp8", m, n, k, seed=11)
    runs, engines = {}, {}
    for backend in (None, "triton"):
        monkeypatch.setattr(configs, "FORCE_TRITON_GEMMS", backend == "triton")
        with variants.trace() as ran:
            y, h = launch.lora_linear_cuda(x, wl, fmt, a, b, None, bias, SCALE, "fp8", "fp8")
            runs[backend] = (y, launch.lora_linear_backward_cuda(go, x, wl, fmt, a, b, None, h, SCALE, "fp8")[0])
        engines[backend] = [r.engine.value for r in ran]
    monkeypatch.setattr(configs, "FORCE_TRITON_GEMMS", False)
    wants_cublas = current_arch() == "sm_90" and k % 512 == 0 and m % 4 == 0
    assert engines[None][0] == ("cublas" if wants_cublas else "triton")  # the forward reduces over K
    assert engines["triton"] == ["triton", "triton"]
    assert sqnr(runs[None][0], runs["triton"][0]) > 45  # one more bf16 rounding (LoRA added after)
    assert sqnr(runs[None][1], runs["triton"][1]) > 45
    y_ref = _dequant_act(x, "fp8", fmt, "e4m3") @ _dequant_weight(wl, fmt, n, k).t() + bias.float() + \
        SCALE * (x.float() @ a.bfloat16().float().t()).bfloat16().float() @ b.bfloat16().float().t()
    assert sqnr(runs[None][0], y_ref) > ORACLE_FLOOR


@pytest.mark.parametrize("k", [2048, 4096])
def test_bf16_long_reductions_run_on_cublas_and_match_triton(k, monkeypatch) -> None:
    """bf16 GEMMs with K >= 4096 go to cuBLAS + an addmm_ LoRA term (faster there on the H100),
    shorter ones stay on the fused Triton kernel; forward and dgrad agree either way."""
    from surogate.kernels import configs, launch, variants

    m, n = 512, 4096
    x, w, a, b, bias, go, fmt, wl = _case("bf16", m, n, k, seed=5)
    runs, engines = {}, {}
    for force_triton in (False, True):
        monkeypatch.setattr(configs, "FORCE_TRITON_GEMMS", force_triton)
        with variants.trace() as ran:
            y, h = launch.lora_linear_cuda(x, wl, fmt, a, b, None, bias, SCALE, "bf16", "bf16")
            runs[force_triton] = (y, launch.lora_linear_backward_cuda(go, x, wl, fmt, a, b, None, h, SCALE,
                                                                      "bf16")[0])
        engines[force_triton] = [r.engine.value for r in ran]
    monkeypatch.setattr(configs, "FORCE_TRITON_GEMMS", False)
    long_k = "cublas" if k >= variants.BF16_CUBLAS_MIN_K else "triton"
    assert engines[False] == [long_k, "cublas"]  # the dgrad reduces over N = 4096
    assert engines[True] == ["triton", "triton"]
    assert sqnr(runs[False][0], runs[True][0]) > 45
    assert sqnr(runs[False][1], runs[True][1]) > 45


@pytest.mark.parametrize("shape", [(4096, 4096, 4096), (1000, 1024, 2048), (1000, 1032, 2048)],
                         ids=["8b_q", "odd_m", "n_not_16"])
def test_row_fp8_cublas_route_matches_triton(shape, monkeypatch) -> None:
    """The opt-in row-scaled fp8 cuBLAS route (variants.FP8_ROW_CUBLAS, forward and dgrad: torch._scaled_mm with
    row / channel scales, E5M2 x E4M3 in the dgrad, then the LoRA addmm_) computes what the Triton kernel does
    to one more bf16 rounding; where N is not a multiple of 16 (the forward's output, the dgrad's reduction) both
    keep the Triton kernel. The persistent route, which takes these GEMMs first from 1,024 rows, is off here."""
    from surogate.kernels import launch, variants

    m, n, k = shape
    x, w, a, b, bias, go, fmt, wl = _case("fp8", m, n, k, seed=13)
    monkeypatch.setattr(variants, "PERSISTENT_SM90", False)
    runs, engines = {}, {}
    for rules in (frozenset(), frozenset({variants.CublasRule.ROW_FP8_FWD_SM90,
                                          variants.CublasRule.ROW_FP8_DGRAD_SM90})):
        monkeypatch.setattr(variants, "FP8_ROW_CUBLAS", rules)
        with variants.trace() as ran:
            y, h = launch.lora_linear_cuda(x, wl, fmt, a, b, None, bias, SCALE, "fp8", "fp8")
            runs[bool(rules)] = (y, launch.lora_linear_backward_cuda(go, x, wl, fmt, a, b, None, h, SCALE, "fp8")[0])
        engines[bool(rules)] = [r.engine.value for r in ran]
    assert engines[False] == ["triton", "triton"]
    if current_arch() == "sm_90":
        assert engines[True] == ["cublas" if n % 16 == 0 else "triton"] * 2
    assert sqnr(runs[True][0], runs[False][0]) > 45
    assert sqnr(runs[True][1], runs[False][1]) > 45
