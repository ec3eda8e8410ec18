"""The per-(recipe, arch) plan: which kernel variant runs each GEMM, and whether it is native.

`plan(recipe, arch)` answers, for each GEMM of a LoRA linear, the variant of the kernel table
(kernels/variants.py) that runs, the MMA instruction class it compiles to, its shape rule (where
cuBLAS or a dequantized scratch weight takes over), and whether that is native, emulated (allowed
only when asked for) or refused (with an error naming a recipe that works). `Plan.route(gemm, ...)`
applies the shape rule to one call, with the same function the CUDA launcher uses. The GPU is read
only when `arch=None`, at the entry point, never at import.
"""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass

from surogate.kernels.variants import Gemm, Route, Variant, route, variant
from surogate.recipes.arch import ARCHS, CPU, ArchInfo, RecipeNotSupportedError, current_arch, normalize_arch
from surogate.recipes.recipe import Compute, Recipe, WeightFormat, get, names


class Support(enum.Enum):
    NATIVE = "native"  # the tensor cores take these operands directly
    EMULATED = "emulated"  # runs, but through a wider MMA after dequantization; opt-in
    REFUSED = "refused"  # cannot run on this arch
    REFERENCE = "reference"  # no GPU: the plain-torch reference implementation runs


# The LoRA factors' gradients: three skinny bf16 GEMMs on cuBLAS, whatever the recipe.
GRAD_LORA_KERNEL = "grad_lora"


@dataclass(frozen=True)
class GemmPlan:
    gemm: Gemm
    precision: Compute  # what actually runs (may differ from the recipe when emulated)
    variant: Variant | None  # the kernel table's row; None for grad_lora (cuBLAS) and on CPU
    support: Support
    arch: str
    mma: str | None  # expected SASS instruction class; None on CPU
    note: str = ""

    @property
    def rule(self) -> str:
        """Where calls of this GEMM leave its kernel: the variant's shape rule on this plan's arch."""
        return self.variant.describe_rule(self.arch) if self.variant is not None else self.note

    @property
    def kernel(self) -> str:
        """The Triton kernel the variant names ("reference" on CPU, "grad_lora" for the LoRA grads)."""
        if self.variant is not None:
            return self.variant.kernel
        return "reference" if self.support is Support.REFERENCE else GRAD_LORA_KERNEL


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    arch: str
    gemms: tuple[GemmPlan, ...]

    @property
    def support(self) -> Support:
        """The worst support level over the GEMMs."""
        order = (Support.REFUSED, Support.EMULATED, Support.REFERENCE, Support.NATIVE)
        return next(s for s in order if any(g.support is s for g in self.gemms))

    def gemm(self, name: "Gemm | str") -> GemmPlan:
        return next(g for g in self.gemms if g.gemm == Gemm(name))

    def route(self, gemm: "Gemm | str", rows: int, n_out: int, k_red: int, cublas: bool = True,
              rank: int | None = None, bias: bool = False) -> Route:
        """What runs for one call of `gemm` with `rows` rows, `n_out` output columns, reduction `k_red`
        (forward: N and K of the weight; dgrad: K and N), LoRA `rank` (None: none) and `bias` (whether it adds
        one), as the launcher decides it."""
        g = self.gemm(gemm)
        if g.variant is None:
            raise ValueError(f"{g.gemm.value} has no kernel variant on {self.arch} (it is {g.kernel})")
        return route(g.variant, self.arch, rows, n_out, k_red, cublas, rank, bias)

    def check(self, allow_emulation: bool = False) -> "Plan":
        """Raise unless the plan can run; warn when it runs emulated by request."""
        if self.support is Support.REFUSED or (self.support is Support.EMULATED and not allow_emulation):
            raise RecipeNotSupportedError(self.explain())
        if self.support is Support.EMULATED:
            warnings.warn(self.explain(), stacklevel=2)
        return self

    def explain(self) -> str:
        bad = [g for g in self.gemms if g.support in (Support.REFUSED, Support.EMULATED)]
        if not bad:
            return f"recipe {self.recipe.name!r} runs natively on {self.arch}"
        what = "; ".join(f"{g.gemm.value}: {g.support.value} ({g.note})" for g in bad)
        native = [n for n in native_recipes(self.arch) if n != self.recipe.name]
        hint = f" Recipes native on {self.arch}: {', '.join(native)}." if native else ""
        emulate = " Pass allow_emulation=True to run it emulated." if self.support is Support.EMULATED else ""
        return f"recipe {self.recipe.name!r} is not native on {self.arch}: {what}.{hint}{emulate}"

    def __str__(self) -> str:
        rows = [f"recipe {self.recipe.name} on {self.arch}: {self.support.value}"]
        for g in self.gemms:
            rows.append(f"  {g.gemm.value:<11} {g.precision.value:<6} {g.kernel:<32} {g.support.value:<9} "
                        f"{g.mma or '-':<8} {g.rule}")
        return "\n".join(rows)


def _gemm_plan(gemm: Gemm, want: Compute, r: Recipe, info: ArchInfo) -> GemmPlan:
    fmt = r.weight_format
    if not info.has_mma(want) and want is Compute.FP8:
        return GemmPlan(gemm, want, variant(gemm, want, fmt), Support.REFUSED, info.name, None,
                        f"{info.name} has no FP8 tensor cores")
    if not info.has_mma(want):
        # NVFP4 values through a bf16 MMA: correct, but not the speed of native FP4. The forward reads the
        # NVFP4 weight through the dequantizing kernel; the dgrad first re-quantizes the weight along N
        # (what a native FP4 dgrad reads) into a dense bf16 tensor, so it runs the plain bf16 variant.
        v = variant(gemm, Compute.BF16, fmt if gemm is Gemm.OUTPUT else WeightFormat.BF16)
        return GemmPlan(gemm, Compute.BF16, v, Support.EMULATED, info.name, info.mma_bf16,
                        f"{info.name} has no FP4 tensor cores; NVFP4 values run through a bf16 MMA")
    v = variant(gemm, want, fmt)
    return GemmPlan(gemm, want, v, Support.NATIVE, info.name, info.mma(want), v.describe_rule(info.name))


def plan(recipe: "str | Recipe", arch: "str | int | tuple[int, int] | None" = None) -> Plan:
    """Which kernel variant each GEMM of `recipe` uses on `arch` (None: the current GPU, or "cpu")."""
    r = get(recipe)
    name = current_arch() if arch is None else normalize_arch(arch)
    if name == CPU:
        gemms = tuple(GemmPlan(g, c, None, Support.REFERENCE, CPU, None, "plain-torch reference")
                      for g, c in ((Gemm.OUTPUT, r.forward), (Gemm.GRAD_INPUT, r.grad_input),
                                   (Gemm.GRAD_LORA, Compute.BF16)))
        return Plan(r, CPU, gemms)
    info = ARCHS[name]
    gemms = (
        _gemm_plan(Gemm.OUTPUT, r.forward, r, info),
        _gemm_plan(Gemm.GRAD_INPUT, r.grad_input, r, info),
        GemmPlan(Gemm.GRAD_LORA, Compute.BF16, None, Support.NATIVE, name, info.mma_bf16,
                 "three skinny bf16 GEMMs on cuBLAS"),
    )
    return Plan(r, name, gemms)


def native_recipes(arch: str) -> list[str]:
    """Recipes (no aliases) that run natively on `arch`."""
    if arch == CPU:
        return names(include_aliases=False)
    return [n for n in names(include_aliases=False) if plan(n, arch).support is Support.NATIVE]
