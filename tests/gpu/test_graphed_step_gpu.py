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
