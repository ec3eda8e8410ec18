"""`generate()` on a surogate-compiled model on CUDA, between training steps: calls with a KV cache run the blocks
eagerly (surogate/forward.py `_eager_with_a_kv_cache`), so `SurogateLinear`'s own forward decodes, a row at a time,
in every native recipe. Each step's scores must be the logits the compiled model gives the whole sequence so far
(no cache), and neither generate nor the training step after it may compile anything."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, when run as a script
from tiny_qwen3 import VOCAB, cuda_lora_qwen3  # noqa: E402

import surogate  # noqa: E402


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["bf16", "fp8", "qfp8", "qnf4"])
def test_generate_between_steps_decodes_the_full_forwards_logits_and_compiles_nothing(recipe):
    from torch._dynamo.utils import counters

    model = surogate.compile(cuda_lora_qwen3(), recipe=recipe, allow_emulation=True)
    ids = torch.randint(0, VOCAB, (2, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    model(input_ids=ids, labels=ids).loss.backward()
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        out = model.generate(input_ids=ids[:1, :16], max_new_tokens=8, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
        assert counters["stats"]["unique_graphs"] == graphs  # generate compiled nothing
        full = model(input_ids=out.sequences, use_cache=False).logits[0, 15:-1].float()  # compiled blocks
    scores = torch.stack(out.scores, 1)[0].float()  # (8, vocab): each decoded step's logits
    assert out.sequences.shape == (1, 24) and torch.isfinite(scores).all()
    # bf16 logits of two summation orders: 0.015-0.022 on the CPU (bf16, qfp8, qnf4)
    assert ((scores - full).norm() / full.norm()).item() < 6e-2
    graphs = counters["stats"]["unique_graphs"]
    model(input_ids=ids, labels=ids).loss.backward()
    assert counters["stats"]["unique_graphs"] == graphs  # the training graph is still there to reuse
