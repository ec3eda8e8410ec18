"""Recipes, numeric formats and the architecture table: pure data that every floor reads."""

from surogate.recipes.arch import (
    ARCHS,
    ArchInfo,
    GemmPlan,
    Plan,
    RecipeNotSupportedError,
    Support,
    current_arch,
    native_recipes,
    normalize_arch,
    plan,
)
from surogate.recipes.formats import FORMATS, Element, Format, Scaling, get_format
from surogate.recipes.recipe import ActivationScaling, Compute, Recipe, WeightFormat, get, names, register

__all__ = [
    "ARCHS", "ActivationScaling", "ArchInfo", "Compute", "Element", "FORMATS", "Format", "GemmPlan", "Plan",
    "Recipe", "RecipeNotSupportedError", "Scaling", "Support", "WeightFormat", "current_arch", "get",
    "get_format", "names", "native_recipes", "normalize_arch", "plan", "register",
]
