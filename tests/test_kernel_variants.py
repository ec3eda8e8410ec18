"""The kernel table (kernels/variants.py) driven through plan() and the launcher: what plan() names is what runs.

Every recipe, forward and dgrad, at a row count below and above the dequantize-to-scratch threshold:
the routes the CUDA launcher records (`variants.trace()`) must equal `plan(recipe, arch).route(...)` for
the same shapes. On a CPU the launcher runs the Triton kernels under the interpreter, where cuBLAS never
runs (`cublas=False`); tests/gpu/test_variants_gpu.py repeats this on a GPU with the cuBLAS routes live.
Every entry of the table must be reached by some case, so a new variant cannot go untested.
"""

from __future__ import annotations

import pytest
import torch

from surogate.kernels import launch, variants
from surogate.kernels.plan import Support, plan
from surogate.kernels.quantize import quantize_weight
from surogate.recipes import Compute, get, names

N, K, R = 128, 128, 8
ROWS = (16, variants.DEQUANT_SCRATCH_MIN_ROWS + 32)  # below and above the scratch threshold
RECIPES = names(include_aliases=False)


def run_routes(recipe: str, rows: int, n: int, k: int, device: str) -> list[variants.Route]:
    """The routes the launcher takes for one forward + dgrad of `recipe` on a (rows, k) input."""
    r = get(recipe)
    fmt = r.weight_format.value
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=g).bfloat16().to(device)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).bfloat16().to(device)
    a = (torch.randn(R, k, generator=g) / k ** 0.5).to(device)
    b = (torch.randn(n, R, generator=g) * 0.1).to(device)
    go = torch.randn(rows, n, generator=g).bfloat16().to(device)
    wl = quantize_weight(w, fmt)
    with variants.trace() as ran:
        y, h = launch.lora_linear_cuda(x, wl, fmt, a, b, None, None, 2.0, r.forward.value, r.grad_input.value)
        dx = launch.lora_linear_backward_cuda(go, x, wl, fmt, a, b, None, h, 2.0, r.grad_input.value)[0]
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    return list(ran)


def planned_routes(recipe: str, arch: str, rows: int, n: int, k: int, cublas: bool) -> list[variants.Route]:
    p = plan(recipe, arch)
    assert p.support in (Support.NATIVE, Support.EMULATED), str(p)
    return [p.route("output", rows, n, k, cublas), p.route("grad_input", rows, k, n, cublas)]


def _native_arch(recipe: str) -> str:
    r = get(recipe)
    return "sm_120" if Compute.NVFP4 in (r.forward, r.grad_input) else "sm_90"


_SEEN: set[variants.Variant] = set()


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("recipe", RECIPES)
def test_plan_names_what_the_launcher_runs(recipe: str, rows: int) -> None:
    ran = run_routes(recipe, rows, N, K, "cpu")
    assert ran == planned_routes(recipe, _native_arch(recipe), rows, N, K, cublas=False)
    _SEEN.update(r.variant for r in ran)
    _SEEN.update(plan(recipe, _native_arch(recipe)).gemm(g).variant for g in ("output", "grad_input"))


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("recipe", [n for n in RECIPES if get(n).forward is Compute.NVFP4])
def test_emulated_fp4_plan_names_what_the_launcher_runs(recipe: str, rows: int, monkeypatch) -> None:
    """sm_89 / sm_90 have no FP4 tensor cores: the plan's emulated variants are the ones that run."""
    monkeypatch.setattr(launch, "emulates_fp4", lambda device: True)
    ran = run_routes(recipe, rows, N, K, "cpu")
    assert ran == planned_routes(recipe, "sm_90", rows, N, K, cublas=False)
    _SEEN.update(r.variant for r in ran)
    _SEEN.update(plan(recipe, "sm_90").gemm(g).variant for g in ("output", "grad_input"))


def test_every_table_entry_is_reached_or_named() -> None:
    """Runs after the tests above (file order): each variant was run by the launcher or named by a plan,
    except the ones no registered recipe uses (a user's own recipe can)."""
    unused = {(v.gemm, v.compute, v.weight_format) for v in variants.VARIANTS} - \
        {(v.gemm, v.compute, v.weight_format) for v in _SEEN}
    assert unused == {(variants.Gemm.GRAD_INPUT, Compute.BF16, variants.WeightFormat.NVFP4),
                      (variants.Gemm.GRAD_INPUT, Compute.BF16, variants.WeightFormat.NVFP4_CACHED)}


def test_route_rules() -> None:
    v = variants.variant("output", "bf16", "nf4")
    assert variants.route(v, "sm_90", 64, 4096, 4096).variant is v  # fused in-register dequantization
    big = variants.route(v, "sm_89", 4096, 4096, 4096)
    assert big.scratch and big.engine is variants.Engine.CUBLAS and big.variant.kernel == "lora_linear_bf16"
    assert variants.route(v, "sm_89", 4096, 4096, 1024).engine is variants.Engine.TRITON  # short reduction
    # sm_90: the bf16 route of the scratch is the persistent kernel (variants.PERSISTENT_SM90).
    assert variants.route(v, "sm_90", 4096, 4096, 4096).engine is variants.Engine.PERSISTENT
    q = variants.variant("output", "fp8", "fp8_block")
    assert variants.route(q, "sm_90", 4096, 4096, 4096).engine is variants.Engine.CUBLAS
    assert variants.route(q, "sm_90", 4095, 4096, 4096).engine is variants.Engine.TRITON  # M % 4
    assert variants.route(q, "sm_89", 4096, 4096, 4096).engine is variants.Engine.TRITON
    assert variants.route(q, "sm_90", 4096, 4096, 4096, cublas=False).engine is variants.Engine.TRITON
    assert variants.route(q, "cpu", 4096, 4096, 4096).engine is variants.Engine.REFERENCE
