"""Recipes: how a LoRA linear stores its frozen weight and in what precision its GEMMs run.

A recipe is a frozen dataclass. Variants are made with `Recipe.replace(...)` (which wraps
`dataclasses.replace`), never by mutation. The registry maps the names users type to
recipes; a duplicate name is an error.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass


class WeightFormat(str, enum.Enum):
    """How the frozen base weight (N x K) is held between steps.

    A str enum: the custom op's schema carries the value as a string (torch.library has no enum
    type) and the op turns it back into a member once, at its boundary (`surogate/ops`)."""

    BF16 = "bf16"  # the bf16 weight itself
    FP8_ROW = "fp8_row"  # bf16 kept, plus cached E4M3 copies with one FP32 scale per output channel
    NVFP4_CACHED = "nvfp4_cached"  # bf16 kept, plus a cached NVFP4 copy
    FP8_BLOCK = "fp8_block"  # E4M3 with an FP32 scale per 128x128 block; bf16 freed
    NVFP4 = "nvfp4"  # NVFP4 (E2M1, E4M3 per 16, FP32 tensor scale); bf16 freed
    NF4 = "nf4"  # bitsandbytes NF4 with double quantization; bf16 freed


class Compute(str, enum.Enum):
    """The operand precision of one GEMM (accumulation is always FP32)."""

    BF16 = "bf16"  # bf16 x bf16 (quantized weights are dequantized in the GEMM prologue)
    FP8 = "fp8"  # forward E4M3 x E4M3; dgrad E5M2 grad x E4M3 weight ("hybrid")
    NVFP4 = "nvfp4"  # NVFP4 x NVFP4 block-scaled MMA


@dataclass(frozen=True)
class Recipe:
    """What a LoRA linear does under one name. LoRA A/B always train in FP32 with bf16 compute."""

    name: str
    weight_format: WeightFormat
    forward: Compute
    grad_input: Compute
    keeps_bf16_weight: bool
    description: str

    def replace(self, **changes) -> "Recipe":
        """A copy with `changes` applied (e.g. `weight_format=WeightFormat.NF4`)."""
        return dataclasses.replace(self, **changes)

    @property
    def is_quantized_storage(self) -> bool:
        """True when the bf16 base weight is freed and only the quantized copy is kept."""
        return not self.keeps_bf16_weight


_RECIPES: dict[str, Recipe] = {}
_ALIASES: dict[str, str] = {}


def register(recipe: Recipe) -> Recipe:
    """Add `recipe` to the registry; a name already taken (by a recipe or alias) is an error."""
    if recipe.name in _RECIPES or recipe.name in _ALIASES:
        raise ValueError(f"recipe {recipe.name!r} is already registered")
    _RECIPES[recipe.name] = recipe
    return recipe


def register_alias(alias: str, name: str) -> None:
    if alias in _RECIPES or alias in _ALIASES:
        raise ValueError(f"recipe name {alias!r} is already registered")
    if name not in _RECIPES:
        raise ValueError(f"alias {alias!r} points at unknown recipe {name!r}")
    _ALIASES[alias] = name


def names(include_aliases: bool = True) -> list[str]:
    """Every recipe name a user may type, aliases last."""
    return list(_RECIPES) + (list(_ALIASES) if include_aliases else [])


def get(name: "str | Recipe") -> Recipe:
    """The recipe called `name` (a `Recipe` passes through). Unknown names list the valid ones."""
    if isinstance(name, Recipe):
        return name
    if not isinstance(name, str):
        raise TypeError(f"recipe must be a name or a Recipe, got {type(name).__name__}")
    key = _ALIASES.get(name.lower(), name.lower())
    try:
        return _RECIPES[key]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; valid recipes: {', '.join(names())}") from None


register(Recipe(
    name="bf16",
    weight_format=WeightFormat.BF16,
    forward=Compute.BF16,
    grad_input=Compute.BF16,
    keeps_bf16_weight=True,
    description="bf16 weights and GEMMs; the accuracy reference",
))
register(Recipe(
    name="fp8",
    weight_format=WeightFormat.FP8_ROW,
    forward=Compute.FP8,
    grad_input=Compute.FP8,
    keeps_bf16_weight=True,
    description="bf16 weights with cached E4M3 copies; E4M3 forward, E5M2xE4M3 dgrad",
))
register(Recipe(
    name="fp4",
    weight_format=WeightFormat.NVFP4_CACHED,
    forward=Compute.NVFP4,
    grad_input=Compute.NVFP4,
    keeps_bf16_weight=True,
    description="bf16 weights with a cached NVFP4 copy; NVFP4 GEMMs, stochastic rounding on grads",
))
register(Recipe(
    name="qfp8",
    weight_format=WeightFormat.FP8_BLOCK,
    forward=Compute.FP8,
    grad_input=Compute.FP8,
    keeps_bf16_weight=False,
    description="weights stored as 128x128 block-scaled E4M3 (bf16 freed); FP8 GEMMs",
))
register(Recipe(
    name="qfp8-bf16",
    weight_format=WeightFormat.FP8_BLOCK,
    forward=Compute.BF16,
    grad_input=Compute.BF16,
    keeps_bf16_weight=False,
    description="weights stored as block-scaled E4M3 (bf16 freed); dequantized into bf16 GEMMs",
))
register(Recipe(
    name="qfp4",
    weight_format=WeightFormat.NVFP4,
    forward=Compute.NVFP4,
    grad_input=Compute.NVFP4,
    keeps_bf16_weight=False,
    description="weights stored as NVFP4 (bf16 freed); NVFP4 GEMMs where native",
))
register(Recipe(
    name="qnf4",
    weight_format=WeightFormat.NF4,
    forward=Compute.BF16,
    grad_input=Compute.BF16,
    keeps_bf16_weight=False,
    description="QLoRA: bitsandbytes-compatible NF4 with double quantization, dequantized into bf16 GEMMs",
))
register_alias("qbnb", "qnf4")
