"""Gradient accumulation weighted by target tokens down the CUDA-graph path (tests/test_grad_accumulation.py is
the CPU side): the step's `num_items_in_batch` (steps.step_items) is an input of the captured graph, refilled at
every replay, so replayed micro-steps take eager's steps, and accumulated micro-batches of very different target
counts take the step of one micro-batch of all their rows. The old weighting (each micro-batch its own token mean)
is checked to fail the same comparison by far."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, when run as a script
from test_grad_accumulation import (
    _completion,
    _data,
    _masked_batch,
    _relative_gap,
    _step_one,
)
from tiny_qwen3 import VOCAB, cuda_lora_qwen3

import surogate
from surogate.training import steps
from surogate.training.config import TrainConfig

# The target count of each micro-batch (2 rows of 128 tokens, 254 predictable) in each of 3 steps: few against
# many, the reverse (the same graph, other items), and a micro-batch without any target (it adds nothing).
TARGETS = [(4, 250), (250, 4), (100, 0)]
NEW_RTOL = 2e-2  # accumulated against one micro-batch of all the rows: bf16 GEMMs of other shapes
OLD_MIN = 0.2  # the old weighting's gap (the 4-target micro-batch weighs 1/2 instead of 4/254): 3.4-4.2 on the CPU


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]


def _step(model: torch.nn.Module, micro: steps.MicroStep, batches: list[dict[str, torch.Tensor]],
          items: torch.Tensor | None) -> tuple[float, list[torch.Tensor]]:
    """One accumulated step as `surogate train` runs it: the mean micro-step loss (the logged loss) and the
    gradients the optimizer would apply, which are then zeroed."""
    cuda = torch.device("cuda")
    losses = [micro({k: v.to(cuda) for k, v in b.items()}, items).clone() for b in batches]
    grads = _grads(model)
    for p in model.parameters():
        p.grad = None
    return float(torch.stack(losses).mean()), grads


@pytest.mark.gpu
def test_graphed_micro_steps_with_step_items_follow_eager_and_one_micro_batch():
    """3 steps of 2 micro-batches through MicroStep (cuda_graphs: true, one graph replayed 6 times) against the same
    eagerly and against one eager micro-batch of the 4 rows (its own token mean). The weights stay the initial ones
    (no optimizer step), so every step compares gradients at one point; the items differ each step."""
    torch.manual_seed(0)
    peft_model = cuda_lora_qwen3()
    twins = [copy.deepcopy(peft_model) for _ in range(3)]
    graphed, eager, whole, old = (surogate.compile(m, recipe="bf16") for m in [peft_model, *twins])
    cuda = torch.device("cuda")
    accumulated = TrainConfig(cuda_graphs="true", gradient_accumulation_steps=2)
    plain = TrainConfig(cuda_graphs="false", gradient_accumulation_steps=2)
    g_step = steps.MicroStep(graphed, accumulated, cuda)
    e_step = steps.MicroStep(eager, plain, cuda)
    w_step = steps.MicroStep(whole, TrainConfig(cuda_graphs="false", gradient_accumulation_steps=1), cuda)
    o_step = steps.MicroStep(old, plain, cuda)
    assert g_step.graphed is not None and e_step.graphed is None

    g = torch.Generator().manual_seed(1)
    for n, counts in enumerate(TARGETS):
        batches = [_masked_batch(g, c, length=128, vocab=VOCAB) for c in counts]  # on the host, as the trainer's
        items = steps.step_items(batches, 2, cuda)  # the trainer's: the step's targets / accumulation
        assert float(items) == sum(counts) / 2
        loss_g, grads_g = _step(graphed, g_step, batches, items)
        loss_e, grads_e = _step(eager, e_step, batches, items)
        rows = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
        loss_w, grads_w = _step(whole, w_step, [rows], None)
        assert _relative_gap(grads_g, grads_e) < 1e-2, n  # the same kernels, replayed
        assert loss_g == pytest.approx(loss_e, rel=2e-3), n
        assert _relative_gap(grads_g, grads_w) < NEW_RTOL, n
        assert loss_g == pytest.approx(loss_w, rel=2e-3), n  # the logged loss: the step's token mean
        if n < 2:  # the old weighting (no items) on the same rows
            _, grads_o = _step(old, o_step, batches, None)
            assert _relative_gap(grads_o, grads_w) > OLD_MIN, n
    assert g_step.graphed.replays == 6 and g_step.graphed.eager_calls == 0 and len(g_step.graphed.graphs) == 1
    (graph,) = g_step.graphed.graphs.values()
    assert "num_items_in_batch" in graph.inputs  # a static input, refilled at every replay


def _save_wide_qwen3(path: Path) -> Path:
    """A 1-layer Qwen3 of hidden 256 in bf16 with the default tokenizer's vocabulary (Inductor's CUDA codegen
    asserted on narrower ones: tests/gpu/test_real_data_gpu.py)."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    from surogate.training.tokenizer import DEFAULT_VOCAB_SIZE

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=DEFAULT_VOCAB_SIZE, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                         initializer_range=0.1)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(path)
    return path


@pytest.mark.gpu
def test_surogate_train_with_cuda_graphs_bs2_ga1_equals_bs1_ga2(tmp_path, monkeypatch):
    """`surogate train` on the GPU with cuda_graphs: true, one step over 2 padded rows of ~2 and ~90 targets: one
    micro-batch of 2 and two of 1 (each replayed from its graph) step with the same gradients and log the same
    loss; so does bs 1 x ga 2 eagerly (cuda_graphs: false); the old weighting does not."""
    monkeypatch.setenv("SUROGATE_CACHE_DIR", str(tmp_path / "cache"))
    model_dir = _save_wide_qwen3(tmp_path / "model")
    data = _data(tmp_path / "data", [_completion(1, 3), _completion(90, 1)])
    one, g_one = _step_one(model_dir, tmp_path / "bs2", data, 2, 1, monkeypatch, cuda_graphs="true")
    two, g_two = _step_one(model_dir, tmp_path / "bs1", data, 1, 2, monkeypatch, cuda_graphs="true")
    eager, g_eager = _step_one(model_dir, tmp_path / "eager", data, 1, 2, monkeypatch, cuda_graphs="false")
    _, g_old = _step_one(model_dir, tmp_path / "old", data, 1, 2, monkeypatch, old=True, cuda_graphs="true")
    assert _relative_gap(g_two, g_one) < NEW_RTOL
    assert _relative_gap(g_two, g_eager) < NEW_RTOL
    assert _relative_gap(g_old, g_one) > OLD_MIN
    loss_one, loss_two, loss_eager = (r.history[0]["loss"] for r in (one, two, eager))
    assert loss_two == pytest.approx(loss_one, rel=2e-3) and loss_eager == pytest.approx(loss_one, rel=2e-3)
    assert all(p.is_cuda for p in g_one)  # the run was on the GPU
