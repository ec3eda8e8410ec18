"""surogate/passes/concat.py on the GPU (marked `gpu`; deselected without CUDA): the tiny Qwen3 compiled by
Inductor with the fused GEMMs' gradient cats as ConcatKernels (the pass on) against Inductor's own lowering
(off, a masked pointwise cat). Same aten graph, same per-element arithmetic, only the indexing differs: the
gradients agree to the GEMMs' run-to-run spread (bit for bit when both compiles pick the same tile configs:
bf16 alone on the H200, session 14; under pytest-xdist's contention Inductor's own benchmarks may pick other
reduction configs, so the bound is 1e-3 relative, far below the O(1) error of a gradient written to the wrong
slice), and the backward's SwiGLU kernel is no longer a cat kernel (Inductor names a kernel after the ops
fused in it)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, when run as a script
from tiny_qwen3 import cuda_lora_qwen3, second_step  # noqa: E402

pytestmark = pytest.mark.gpu


def _step(recipe: str, slices: bool, monkeypatch) -> tuple[float, torch.Tensor, list[str]]:
    """(loss, flat LoRA grads, backward kernel names) of the second step of the compiled tiny Qwen3."""
    import surogate
    from surogate.passes import concat, swiglu

    monkeypatch.setattr(concat, "ENABLED", slices)
    monkeypatch.setattr(swiglu, "ENABLED", False)  # qfp8's gate/up gradient would be one op's output: no cat
    monkeypatch.setenv("SUROGATE_AUTOTUNE", "0")  # both compiles launch the same GEMM configs
    torch._dynamo.reset()
    model = surogate.compile(cuda_lora_qwen3(), recipe=recipe)
    return second_step(model)


def _swiglu_cat_kernels(kernels: list[str]) -> list[str]:
    return [k for k in kernels if "silu" in k and "cat" in k.split("_")]


@pytest.mark.parametrize("recipe", ["bf16", "qfp8"])
def test_gradient_cats_as_concat_kernels_change_no_bit_and_no_longer_run_a_cat_kernel(recipe, monkeypatch):
    loss_on, grads_on, kernels_on = _step(recipe, True, monkeypatch)
    loss_off, grads_off, kernels_off = _step(recipe, False, monkeypatch)
    assert abs(loss_on - loss_off) <= 1e-3 * abs(loss_off)
    rel = ((grads_on - grads_off).norm() / grads_off.norm()).item()
    assert rel < 1e-3, rel
    assert _swiglu_cat_kernels(kernels_off), kernels_off  # Inductor's masked pointwise cat, one a layer
    assert not _swiglu_cat_kernels(kernels_on), _swiglu_cat_kernels(kernels_on)
