"""Recipes registry, formats table and the per-(recipe, arch) plan."""

from __future__ import annotations

import subprocess
import sys

import pytest

import surogate
from surogate.kernels.plan import Support, native_recipes, plan
from surogate.recipes import (
    ARCHS,
    Compute,
    RecipeNotSupportedError,
    WeightFormat,
    get,
    get_format,
    names,
    normalize_arch,
    register,
)

ALL = ["bf16", "fp8", "fp4", "qfp8", "qfp8-bf16", "qfp4", "qnf4"]


def test_names_list_every_recipe_and_alias():
    assert names() == [*ALL, "qbnb"]
    assert names(include_aliases=False) == ALL


def test_import_prints_recipe_names_in_a_fresh_interpreter():
    """The issue's check, as a new user types it."""
    out = subprocess.run([sys.executable, "-c", "import surogate; print(surogate.recipes.names())"],
                         capture_output=True, text=True, check=True).stdout
    for name in ALL:
        assert repr(name) in out


def test_alias_and_case_resolve_to_the_same_recipe():
    assert get("qbnb") is get("qnf4")
    assert get("QFP8") is get("qfp8")
    assert get(get("fp8")) is get("fp8")


def test_unknown_recipe_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown recipe 'fp16'.*valid recipes: bf16, fp8"):
        get("fp16")
    with pytest.raises(TypeError):
        get(8)


def test_registry_refuses_a_duplicate_name():
    with pytest.raises(ValueError, match="already registered"):
        register(get("bf16").replace(description="again"))


def test_recipes_are_frozen_and_replace_makes_a_variant():
    fp8 = get("fp8")
    with pytest.raises(Exception):
        fp8.name = "x"  # type: ignore[misc]
    bf16_only = fp8.replace(forward=Compute.BF16, grad_input=Compute.BF16)
    assert (bf16_only.forward, bf16_only.grad_input) == (Compute.BF16, Compute.BF16)
    assert (fp8.forward, fp8.grad_input) == (Compute.FP8, Compute.FP8)
    assert bf16_only.weight_format is fp8.weight_format


@pytest.mark.parametrize("name, storage, frees", [
    ("bf16", WeightFormat.BF16, False), ("fp8", WeightFormat.FP8_ROW, False),
    ("fp4", WeightFormat.NVFP4_CACHED, False), ("qfp8", WeightFormat.FP8_BLOCK, True),
    ("qfp8-bf16", WeightFormat.FP8_BLOCK, True), ("qfp4", WeightFormat.NVFP4, True),
    ("qnf4", WeightFormat.NF4, True),
])
def test_recipe_storage_matches_design_table(name, storage, frees):
    r = get(name)
    assert r.weight_format is storage
    assert r.is_quantized_storage is frees


def test_format_table():
    assert get_format("nvfp4").bits == pytest.approx(4.5)
    with pytest.raises(ValueError, match="valid formats"):
        get_format("int3")


@pytest.mark.parametrize("text, want", [("sm_90", "sm_90"), ("sm_90a", "sm_90"), ("sm90", "sm_90"),
                                        ("120", "sm_120"), (100, "sm_100"), ((8, 9), "sm_89"), ("cpu", "cpu")])
def test_normalize_arch(text, want):
    assert normalize_arch(text) == want


def test_unknown_arch_is_refused_with_the_supported_list():
    with pytest.raises(RecipeNotSupportedError, match="sm_89, sm_90, sm_100, sm_120"):
        normalize_arch("sm_75")
    with pytest.raises(ValueError, match="like 'sm_90'"):
        normalize_arch("hopper")


@pytest.mark.parametrize("arch", ["sm_100", "sm_120"])
def test_fp4_is_native_on_blackwell(arch):
    p = plan("fp4", arch)
    assert p.support is Support.NATIVE
    assert p.gemm("output").precision is Compute.NVFP4
    assert p.gemm("output").mma == ARCHS[arch].mma_fp4


@pytest.mark.parametrize("arch", ["sm_89", "sm_90"])
def test_fp4_is_emulated_on_ada_and_hopper_and_names_a_native_recipe(arch):
    p = plan("fp4", arch)
    assert p.support is Support.EMULATED
    with pytest.raises(RecipeNotSupportedError) as err:
        p.check()
    message = str(err.value)
    assert "fp8" in message and "allow_emulation=True" in message
    with pytest.warns(UserWarning, match="not native"):
        p.check(allow_emulation=True)


def test_plan_names_kernels_and_mma_per_gemm():
    p = plan("qfp8", "sm_90")
    assert p.gemm("output").kernel == "lora_linear_fp8_block"
    assert p.gemm("output").mma == "QGMMA"
    assert p.gemm("grad_input").kernel == "grad_input_fp8_block"
    assert p.gemm("grad_lora").mma == "HGMMA"
    assert plan("qnf4", "sm_89").gemm("output").kernel == "lora_linear_dequant_nf4"
    assert plan("bf16", "sm_100").gemm("output").mma == "UTCHMMA"
    assert "lora_linear_fp8_block" in str(p)


def test_cpu_plan_runs_the_reference():
    p = plan("qfp4", "cpu")
    assert p.support is Support.REFERENCE
    assert p.check() is p


def test_plan_without_arch_reads_the_machine():
    import torch

    from surogate.recipes import normalize_arch

    expected = normalize_arch(torch.cuda.get_device_capability(0)) if torch.cuda.is_available() else "cpu"
    assert plan("bf16").arch == expected


def test_native_recipes_per_arch():
    assert native_recipes("sm_90") == ["bf16", "fp8", "qfp8", "qfp8-bf16", "qnf4"]
    assert native_recipes("sm_120") == ALL


def test_lazy_attributes():
    with pytest.raises(AttributeError):
        surogate.does_not_exist  # noqa: B018
