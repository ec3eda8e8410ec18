"""Recipes, numeric formats and the architecture table: pure data that every floor reads.

Which kernel runs a recipe's GEMMs on an arch is `surogate.kernels.plan.plan` (floor 1), which
reads this data and the kernel table.
"""

from surogate.recipes.arch import (
    ARCHS,
    ArchInfo,
    RecipeNotSupportedError,
    current_arch,
    normalize_arch,
)
from surogate.recipes.formats import FORMATS, Element, Format, Scaling, get_format
from surogate.recipes.recipe import Compute, Recipe, WeightFormat, get, names, register

__all__ = [
    "ARCHS", "ArchInfo", "Compute", "Element", "FORMATS", "Format", "Recipe", "RecipeNotSupportedError",
    "Scaling", "WeightFormat", "current_arch", "get", "get_format", "names", "normalize_arch", "register",
]
