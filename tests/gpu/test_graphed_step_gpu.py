"""GraphedStep on CUDA: a surogate-compiled tiny Qwen3 trained through a captured CUDA graph follows
the same trajectory as the same model driven eagerly."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, when run as a script
from tiny_qwen3 import VOCAB, assert_same_lora, cuda_lora_qwen3, eager_micro_step, train_losses  # noqa: E402

import surogate  # noqa: E402
from surogate.training.graphed_step import GraphedStep  # noqa: E402


def _models(recipe: str, checkpoint: bool = False):
    peft_model = cuda_lora_qwen3()
    twin = copy.deepcopy(peft_model)
    return (surogate.compile(peft_model, recipe=recipe, allow_emulation=True, checkpoint=checkpoint),
            surogate.compile(twin, recipe=recipe, allow_emulation=True))


@pytest.mark.gpu
@pytest.mark.parametrize("recipe,checkpoint", [("bf16", False), ("fp8", False), ("qfp8", False), ("qnf4", False),
                                               ("bf16", True), ("qnf4", True)])
def test_graphed_training_follows_eager(recipe, checkpoint):
    """With checkpoint=True the graphed model recomputes its blocks; the eager twin does not."""
    graphed_model, eager_model = _models(recipe, checkpoint)
    g = torch.Generator("cuda").manual_seed(1)
    steps = [[torch.randint(0, VOCAB, (2, 128), device="cuda", generator=g) for _ in range(2)] for _ in range(3)]

    step = GraphedStep(graphed_model, loss_scale=0.5)
    graphed = train_losses(graphed_model, lambda ids: step(input_ids=ids, labels=ids), steps)

    eager = train_losses(eager_model, eager_micro_step(eager_model, 0.5), steps)
    assert step.replays == 6 and step.eager_calls == 0
    torch.testing.assert_close(torch.tensor(graphed), torch.tensor(eager), rtol=2e-3, atol=0)
    assert_same_lora(graphed_model, eager_model)


@pytest.mark.gpu
def test_fp8_on_the_persistent_route_stays_finite_over_many_replays():
    """Regression of bench/NOTES.md runs 63-70: fp8 on the sm_90 persistent kernel (its default route from 1,024
    rows) with Triton 3.6's warp-specialized configs gave NaN losses in training under CUDA graphs at a random
    replay (the 2nd to the ~160th), never eagerly. Micro-batches of 2 x 512 = 1,024 rows, 40 optimizer steps of 2
    (80 replays): every loss finite and on the eager twin's trajectory (configs.PERSISTENT_WARP_SPECIALIZE = True
    brings the specialized configs back, to reproduce the fault on a Triton that has it)."""
    from surogate.kernels import variants
    from surogate.recipes import current_arch

    graphed_model, eager_model = _models("fp8")
    g = torch.Generator("cuda").manual_seed(3)
    steps = [[torch.randint(0, VOCAB, (2, 512), device="cuda", generator=g) for _ in range(2)] for _ in range(40)]
    step = GraphedStep(graphed_model, loss_scale=0.5)
    with variants.trace() as ran:
        graphed = train_losses(graphed_model, lambda ids: step(input_ids=ids, labels=ids), steps)
    persistent = {r.variant.kernel for r in ran if r.engine is variants.Engine.PERSISTENT}
    # sm_90 runs the persistent kernel; other GPUs run the Triton kernel, checked the same way.
    assert persistent == ({"lora_linear_fp8", "grad_input_fp8"} if current_arch() == "sm_90" else set())
    assert step.replays == 80 and all(torch.isfinite(torch.tensor(graphed))), graphed
    eager = train_losses(eager_model, eager_micro_step(eager_model, 0.5), steps)
    torch.testing.assert_close(torch.tensor(graphed), torch.tensor(eager), rtol=1e-2, atol=0)
