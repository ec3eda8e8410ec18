"""The architectures of tests/test_more_archs.py on CUDA (Inductor, CUDA graphs): parallel attention + MLP blocks
whose q/k/v and gate/up are packed apart (Cohere, Phi-1/2: one GEMM per packed group), StarCoder2's biased MLP
(companion targets c_fc / c_proj), GLM-4-MoE's dense first layer beside its experts, DeepSeek-V3's MLA projections,
and GPT-OSS with its experts as grouped ops (biases, interleaved gate/up, the clamped gate; tests/gpu/test_moe_gpu.py
compares them with FP32 PEFT). Each compiled twice from one PEFT model: one captured and replayed, one run eagerly;
the replays follow the eager twin."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, when run as a script
from test_more_archs import _model  # noqa: E402

import surogate  # noqa: E402
from surogate.compiler import _attach_lora  # noqa: E402
from surogate.training.graphed_step import GraphedStep  # noqa: E402

pytestmark = pytest.mark.gpu

# Inductor's CUDA codegen asserted on hidden-64 configs (tests/gpu/test_real_data_gpu.py): wider, same shapes else.
WIDE = {"hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128, "shared_intermediate_size": 128}


@pytest.mark.parametrize("name", ["cohere", "phi", "starcoder2", "glm4_moe", "deepseek_v3", "gpt_oss"])
def test_capture_follows_the_eager_twin(name):
    torch.manual_seed(0)
    head = {} if name == "deepseek_v3" else {"head_dim": 64}  # MLA's head dims are its own
    base = _model(name, **WIDE, **head).cuda()
    peft_model = _attach_lora(base, {"r": 8, "lora_alpha": 16, "init_lora_weights": False})
    twin = copy.deepcopy(peft_model)
    model, twin = surogate.compile(peft_model, recipe="bf16"), surogate.compile(twin, recipe="bf16")
    g = torch.Generator("cuda").manual_seed(1)
    ids = torch.randint(3, 120, (2, 128), device="cuda", generator=g)
    step = GraphedStep(model, loss_scale=0.5, strict=True)
    losses = [step(input_ids=ids, labels=ids).clone() for _ in range(2)]
    expected = []
    for _ in range(2):
        loss = twin(input_ids=ids, labels=ids).loss
        (loss * 0.5).backward()
        expected.append(loss.detach())
    assert step.failure is None and step.replays == 2
    torch.testing.assert_close(torch.stack(losses), torch.stack(expected), rtol=2e-3, atol=0)
    lora = {n: p for n, p in twin.named_parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        if p.requires_grad and lora[n].grad is not None:
            cos = F.cosine_similarity(p.grad.flatten().float(), lora[n].grad.flatten().float(), dim=0)
            assert cos > 0.999, (n, cos.item())
