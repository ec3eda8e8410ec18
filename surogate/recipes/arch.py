"""The architecture capability table: what each GPU arch's tensor cores take, as data.

`surogate.kernels.plan` reads it to decide which kernel runs where. The GPU is read only by
`current_arch()`, at an entry point, never at import.
"""

from __future__ import annotations

from dataclasses import dataclass

from surogate.recipes.recipe import Compute


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

    def mma(self, compute: Compute) -> str | None:
        """The SASS MMA instruction class a GEMM of `compute` operands compiles to here."""
        return {Compute.BF16: self.mma_bf16, Compute.FP8: self.mma_fp8, Compute.NVFP4: self.mma_fp4}[compute]

    def has_mma(self, compute: Compute) -> bool:
        """Whether the tensor cores take `compute` operands directly."""
        return {Compute.BF16: True, Compute.FP8: self.fp8_mma, Compute.NVFP4: self.fp4_mma}[compute]


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
