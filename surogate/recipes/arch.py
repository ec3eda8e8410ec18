"""The architecture capability table and the per-(recipe, arch) plan.

`plan(recipe, arch)` answers, for each GEMM of a LoRA linear, which kernel runs, which MMA
instruction class it should compile to, and whether that is native, emulated (allowed
only when asked for) or refused (with an error naming a recipe that works). The GPU is read
only when `arch=None`, at the entry point, never at import.
"""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass

from surogate.recipes.recipe import Compute, Recipe, WeightFormat, get


class Support(enum.Enum):
    NATIVE = "native"  # the tensor cores take these operands directly
    EMULATED = "emulated"  # runs, but through a wider MMA after dequantization; opt-in
    REFUSED = "refused"  # cannot run on this arch
    REFERENCE = "reference"  # no GPU: the plain-torch reference implementation runs


class RecipeNotSupportedError(RuntimeError):
    """A recipe cannot run (or would only be emulated) on the chosen architecture."""


@dataclass(frozen=True)
class ArchInfo:
    """What one GPU architecture's tensor cores can do, and what Triton emits for them (SASS)."""

    name: str  # "sm_90"
    capability: int  # 90
    gpus: str
    fp8_mma: bool
    fp4_mma: bool
    mma_bf16: str | None  # SASS instruction class of a bf16 tl.dot
    mma_fp8: str | None
    mma_fp4: str | None
    ptx_target: str  # what Triton compiles for, e.g. "sm_90a"


ARCHS: dict[str, ArchInfo] = {
    a.name: a
    for a in (
        ArchInfo("sm_89", 89, "RTX 4090, L4, L40S", True, False, "HMMA", "QMMA", None, "sm_89"),
        ArchInfo("sm_90", 90, "H100, H200", True, False, "HGMMA", "QGMMA", None, "sm_90a"),
        ArchInfo("sm_100", 100, "B200, GB200", True, True, "UTCHMMA", "UTCQMMA", "UTCOMMA", "sm_100a"),
        ArchInfo("sm_120", 120, "RTX 5090, RTX PRO 6000", True, True, "HMMA", "QMMA", "OMMA", "sm_120a"),
    )
}
CPU = "cpu"

# Kernel names per (GEMM, precision, weight format). `surogate/kernels/` registers kernels
# under exactly these names so that `surogate info` and the SASS tests can find them.
FORWARD_KERNELS: dict[tuple[Compute, WeightFormat], str] = {
    (Compute.BF16, WeightFormat.BF16): "lora_linear_bf16",
    (Compute.BF16, WeightFormat.FP8_BLOCK): "lora_linear_dequant_fp8_block",
    (Compute.BF16, WeightFormat.NVFP4): "lora_linear_dequant_nvfp4",
    (Compute.BF16, WeightFormat.NVFP4_CACHED): "lora_linear_dequant_nvfp4",
    (Compute.BF16, WeightFormat.NF4): "lora_linear_dequant_nf4",
    (Compute.FP8, WeightFormat.FP8_ROW): "lora_linear_fp8",
    (Compute.FP8, WeightFormat.FP8_BLOCK): "lora_linear_fp8_block",
    (Compute.NVFP4, WeightFormat.NVFP4): "lora_linear_nvfp4",
    (Compute.NVFP4, WeightFormat.NVFP4_CACHED): "lora_linear_nvfp4",
}
GRAD_INPUT_KERNELS: dict[tuple[Compute, WeightFormat], str] = {
    (Compute.BF16, WeightFormat.BF16): "grad_input_bf16",
    (Compute.BF16, WeightFormat.FP8_BLOCK): "grad_input_dequant_fp8_block",
    (Compute.BF16, WeightFormat.NVFP4): "grad_input_dequant_nvfp4",
    (Compute.BF16, WeightFormat.NVFP4_CACHED): "grad_input_dequant_nvfp4",
    (Compute.BF16, WeightFormat.NF4): "grad_input_dequant_nf4",
    (Compute.FP8, WeightFormat.FP8_ROW): "grad_input_fp8",
    (Compute.FP8, WeightFormat.FP8_BLOCK): "grad_input_fp8_block",
    (Compute.NVFP4, WeightFormat.NVFP4): "grad_input_nvfp4",
    (Compute.NVFP4, WeightFormat.NVFP4_CACHED): "grad_input_nvfp4",
}
GRAD_LORA_KERNEL = "grad_lora"


@dataclass(frozen=True)
class GemmPlan:
    gemm: str  # "output" | "grad_input" | "grad_lora"
    precision: Compute  # what actually runs (may differ from the recipe when emulated)
    kernel: str
    support: Support
    mma: str | None  # expected SASS instruction class; None on CPU
    note: str = ""


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

    def gemm(self, name: str) -> GemmPlan:
        return next(g for g in self.gemms if g.gemm == name)

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
        what = "; ".join(f"{g.gemm}: {g.support.value} ({g.note})" for g in bad)
        native = [n for n in native_recipes(self.arch) if n != self.recipe.name]
        hint = f" Recipes native on {self.arch}: {', '.join(native)}." if native else ""
        emulate = " Pass allow_emulation=True to run it emulated." if self.support is Support.EMULATED else ""
        return f"recipe {self.recipe.name!r} is not native on {self.arch}: {what}.{hint}{emulate}"

    def __str__(self) -> str:
        rows = [f"recipe {self.recipe.name} on {self.arch}: {self.support.value}"]
        for g in self.gemms:
            rows.append(f"  {g.gemm:<11} {g.precision.value:<6} {g.kernel:<32} {g.support.value:<9} "
                        f"{g.mma or '-':<8} {g.note}")
        return "\n".join(rows)


def normalize_arch(arch: "str | int | tuple[int, int]") -> str:
    """Accept "sm_90", "sm_90a", "sm90", "90", 90, (9, 0) or "cpu"; return "sm_90" or "cpu"."""
    if isinstance(arch, tuple):
        arch = arch[0] * 10 + arch[1]
    text = str(arch).strip().lower()
    if text == CPU:
        return CPU
    digits = text.removeprefix("sm").removeprefix("_").removesuffix("a")
    if not digits.isdigit():
        raise ValueError(f"cannot read architecture {arch!r}; write it like 'sm_90'")
    name = f"sm_{int(digits)}"
    if name not in ARCHS:
        raise RecipeNotSupportedError(
            f"architecture {name} is not supported; surogate targets {', '.join(ARCHS)} (or 'cpu' for the reference)")
    return name


def current_arch() -> str:
    """The arch of the current CUDA device, or "cpu" when there is none."""
    import torch

    if not torch.cuda.is_available():
        return CPU
    major, minor = torch.cuda.get_device_capability()
    return normalize_arch((major, minor))


def _gemm_plan(gemm: str, want: Compute, fmt: WeightFormat, info: ArchInfo) -> GemmPlan:
    table = FORWARD_KERNELS if gemm == "output" else GRAD_INPUT_KERNELS
    if want is Compute.FP8 and not info.fp8_mma:
        return GemmPlan(gemm, want, table[(want, fmt)], Support.REFUSED, None, f"{info.name} has no FP8 tensor cores")
    if want is Compute.NVFP4 and not info.fp4_mma:
        # Dequantize NVFP4 in the prologue and run a bf16 MMA: correct, but not the speed of native FP4.
        return GemmPlan(gemm, Compute.BF16, table[(Compute.BF16, fmt)], Support.EMULATED, info.mma_bf16,
                        f"{info.name} has no FP4 tensor cores; NVFP4 is dequantized to bf16")
    mma = {Compute.BF16: info.mma_bf16, Compute.FP8: info.mma_fp8, Compute.NVFP4: info.mma_fp4}[want]
    return GemmPlan(gemm, want, table[(want, fmt)], Support.NATIVE, mma, _cublas_note(want, fmt, info.name))


def _cublas_note(want: Compute, fmt: WeightFormat, arch: str) -> str:
    """Where kernels/cublas.py sends the GEMM to cuBLAS instead of the named Triton kernel (measured
    faster there on the H100; docs/kernels.md)."""
    if want is Compute.FP8 and fmt is WeightFormat.FP8_BLOCK and arch == "sm_90":
        return "cuBLAS block-scaled FP8 (scaled_mm) where M % 4 == 0 and K % 512 == 0"
    if want is Compute.BF16 and fmt is WeightFormat.BF16:
        return "cuBLAS + LoRA addmm where the reduction is >= 4096"
    if want is Compute.BF16:
        return "large M: weight dequantized to a bf16 scratch, then as bf16 (cuBLAS where the reduction is >= 4096)"
    return ""


def plan(recipe: "str | Recipe", arch: "str | int | tuple[int, int] | None" = None) -> Plan:
    """Which kernel each GEMM of `recipe` uses on `arch` (None: the current GPU, or "cpu")."""
    r = get(recipe)
    name = current_arch() if arch is None else normalize_arch(arch)
    if name == CPU:
        gemms = tuple(GemmPlan(g, c, "reference", Support.REFERENCE, None, "plain-torch reference")
                      for g, c in (("output", r.forward), ("grad_input", r.grad_input), ("grad_lora", Compute.BF16)))
        return Plan(r, CPU, gemms)
    info = ARCHS[name]
    gemms = (
        _gemm_plan("output", r.forward, r.weight_format, info),
        _gemm_plan("grad_input", r.grad_input, r.weight_format, info),
        GemmPlan("grad_lora", Compute.BF16, GRAD_LORA_KERNEL, Support.NATIVE, info.mma_bf16),
    )
    return Plan(r, name, gemms)


def native_recipes(arch: str) -> list[str]:
    """Recipes (no aliases) that run natively on `arch`."""
    from surogate.recipes.recipe import names

    if arch == CPU:
        return names(include_aliases=False)
    return [n for n in names(include_aliases=False) if plan(n, arch).support is Support.NATIVE]
