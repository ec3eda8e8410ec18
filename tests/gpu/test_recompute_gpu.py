"""`recompute_producers` compiled by Inductor for CUDA (marked `gpu`; deselected without CUDA).

On the CPU (tests/test_passes_recompute.py) the rebuilt values are the same ops on the same tensors and
the step is bit for bit the same. Inductor may fuse the rebuilt pointwise nodes into other backward
kernels than before, so here the bound is a tight closeness rather than equality: the loss to 1e-3
relative, the LoRA gradients to a cosine of 0.9999 (a fused reordering moves bf16 roundings, nothing
more); and the report shows the pass ran.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, when run as a script
from tiny_qwen3 import VOCAB, cuda_lora_qwen3  # noqa: E402

pytestmark = pytest.mark.gpu


def _loss_and_grads(recipe: str, recompute: bool):
    import surogate

    torch._dynamo.reset()
    # save_fp8_inputs pinned off: its "auto" turns on where the producers are kept, and changes A's gradients.
    model = surogate.compile(cuda_lora_qwen3(), recipe=recipe, recompute_producers=recompute, save_fp8_inputs=False)
    ids = torch.randint(0, VOCAB, (2, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()  # compiles; the next forward is measured
    model.zero_grad(set_to_none=True)
    before = torch.cuda.memory_allocated()
    loss = model(input_ids=ids, labels=ids).loss
    kept = torch.cuda.memory_allocated() - before  # what the forward holds for the backward
    loss.backward()
    params = dict(model.named_parameters())
    grads = torch.cat([params[n].grad.flatten().float() for n in sorted(n for n in params if "lora_" in n)])
    return loss.item(), grads, str(model.surogate_report), kept


@pytest.mark.parametrize("recipe", ["bf16", "qfp8", "qnf4"])
def test_recompute_on_cuda_follows_recompute_off(recipe):
    loss_off, g_off, _, kept_off = _loss_and_grads(recipe, False)
    loss_on, g_on, report, kept_on = _loss_and_grads(recipe, True)
    assert "rebuilt in the backward" in report, report
    # The forward keeps less, so the partition really differs (run 51: a cache once served the same one).
    assert kept_on < 0.85 * kept_off, (kept_on, kept_off)
    assert abs(loss_on - loss_off) <= 1e-3 * abs(loss_off)
    assert torch.nn.functional.cosine_similarity(g_on, g_off, dim=0).item() > 0.9999


def test_auto_keeps_the_producers_for_bf16_and_rebuilds_them_for_qfp8():
    """On a GPU with memory to spare (this tiny model's producers take far less than a fifth of what is free),
    "auto" (the default) keeps them for bf16 weights and rebuilds them for a recipe stored for memory."""
    import surogate

    reports = {}
    for recipe in ("bf16", "qfp8"):
        torch._dynamo.reset()
        model = surogate.compile(cuda_lora_qwen3(), recipe=recipe)
        ids = torch.randint(0, VOCAB, (2, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        model(input_ids=ids, labels=ids).loss.backward()
        reports[recipe] = str(model.surogate_report)
    assert "recompute_producers auto: kept" in reports["bf16"], reports["bf16"]
    assert "rebuilt in the backward" not in reports["bf16"]
    assert "recompute_producers auto: rebuilt (qfp8" in reports["qfp8"] and "rebuilt in the backward" in reports["qfp8"]
