"""On a GPU, with the cuBLAS routes live: the routes the launcher takes equal what plan() names.

The CPU twin (tests/test_kernel_variants.py) runs under the Triton interpreter, where cuBLAS never
runs; here the 8B-like shape (N = K = 4096) sends bf16, qfp8 and large-M dequant GEMMs to cuBLAS on
sm_90, and the small M keeps the fused Triton kernels.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
from test_kernel_variants import RECIPES, planned_routes, run_routes  # noqa: E402

from surogate.kernels import variants  # noqa: E402
from surogate.recipes import current_arch  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("rows", [64, 512])
@pytest.mark.parametrize("recipe", RECIPES)
def test_plan_names_what_runs_on_this_gpu(recipe: str, rows: int) -> None:
    arch = current_arch()
    ran = run_routes(recipe, rows, 4096, 4096, "cuda")
    assert ran == planned_routes(recipe, arch, rows, 4096, 4096, cublas=True)
    if arch == "sm_90" and recipe in ("bf16", "qfp8") and rows == 512:
        assert [r.engine for r in ran] == [variants.Engine.CUBLAS] * 2
