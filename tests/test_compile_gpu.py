"""surogate.compile on CUDA (Triton kernels + Inductor): a tiny Qwen3 against eager PEFT, every recipe (emulated ones allowed)."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_qwen3 import VOCAB, cuda_lora_qwen3

import surogate

BOUNDS = {"bf16": (1e-3, 0.06), "fp8": (5e-3, 0.25), "qfp8": (5e-3, 0.25), "qfp8-bf16": (5e-3, 0.2),
          "qnf4": (5e-3, 0.3), "fp4": (1e-2, 1.0), "qfp4": (1e-2, 1.0)}


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["bf16", "fp8", "qfp8", "qfp8-bf16", "qnf4", "fp4", "qfp4"])
def test_cuda_compile_matches_eager(recipe):
    peft_model = cuda_lora_qwen3()
    eager = copy.deepcopy(peft_model)
    compiled = surogate.compile(peft_model, recipe=recipe, allow_emulation=True)  # fp4 emulated on sm_89/90
    ids = torch.randint(0, VOCAB, (2, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    ref = eager(input_ids=ids, labels=ids).loss
    ref.backward()
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    report = compiled.surogate_report
    assert len(report.rewritten) == len(report.linears) == 7, str(report)
    lb, gb = BOUNDS[recipe]
    assert abs(loss.item() - ref.item()) / ref.item() < lb
    names = sorted(n for n, p in eager.named_parameters() if "lora_" in n)
    g_ref = torch.cat([dict(eager.named_parameters())[n].grad.flatten().float() for n in names])
    g = torch.cat([dict(compiled.named_parameters())[n].grad.flatten().float() for n in names])
    assert ((g - g_ref).norm() / g_ref.norm()).item() < gb
