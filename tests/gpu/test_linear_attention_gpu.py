"""Qwen3.5 (dense and MoE) and Qwen3-Next (gated DeltaNet linear-attention layers beside full attention) compiled by
Inductor for CUDA (marked `gpu`; deselected without CUDA): tests/test_linear_attention.py's models, wider.

The delta rule runs as one op (`surogate::gated_delta_rule`, surogate/ops/linear_attention.py), whose implementation
is transformers' PyTorch form here (no flash-linear-attention on the GPU machine). Traced in place instead, a 2-layer
Qwen3.5's first 256-token step did not finish compiling in 250 s on an H200 (bench/NOTES.md run 108).

The reference is eager PEFT in FP32 on the frozen weights as the compiled model holds them (dequantized for the
q-recipes; the truth: bf16 PEFT rounds an expert's LoRA update into the bf16 stack); the bounds are bf16's distance
from it on the tiny models. Against the unquantized weights qnf4's q_proj lora_B sat at cosine 0.964 (run 111): the
NF4 rounding of the weights themselves, not the recipe's arithmetic.
"""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers as T

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, when run as a script
from test_linear_attention import MODELS, V, _lora_grads, _loss_alone, _packed  # noqa: E402
from test_more_archs import sharpen_routers  # noqa: E402

import surogate  # noqa: E402
from surogate.compiler import _attach_lora  # noqa: E402
from surogate.ops.modules import SurogateLinear  # noqa: E402

pytestmark = pytest.mark.gpu

# Inductor's CUDA codegen asserted on hidden-64 configs (tests/gpu/test_real_data_gpu.py): the CPU test's models, wider.
WIDE = {"hidden_size": 256, "intermediate_size": 512, "head_dim": 64, "linear_key_head_dim": 64,
        "linear_value_head_dim": 64, "moe_intermediate_size": 128, "shared_expert_intermediate_size": 128}


def _on_held_weights(truth: torch.nn.Module, model: torch.nn.Module) -> torch.nn.Module:
    """`truth` with each LoRA layer's frozen weight as `model` (compiled) holds it: exact for bf16, dequantized
    (in FP32) for the q-recipes."""
    held = {n: m.base_layer for n, m in model.named_modules() if isinstance(getattr(m, "base_layer", None), SurogateLinear)}
    assert held
    for name, module in truth.named_modules():
        if name in held:
            module.base_layer.weight.data.copy_(held[name].dequantize(torch.float32))
    return truth


@pytest.mark.parametrize("name, recipe", [("qwen3_5", "bf16"), ("qwen3_5", "qnf4"), ("qwen3_next", "bf16"),
                                          ("qwen3_5_moe", "qfp8"), ("qwen3_5_vlm", "bf16")])
def test_linear_attention_model_on_cuda_follows_fp32_peft(name, recipe):
    """qwen3_5_vlm: the published checkpoints' class (Qwen3_5ForConditionalGeneration, as `surogate train` builds
    them: surogate/training/model_class.py) on text rows."""
    try:
        config = MODELS[name.removesuffix("_vlm")]()
    except AttributeError as error:  # a transformers without the model class
        pytest.skip(f"transformers {T.__version__}: {error}")
    for key, value in WIDE.items():
        if getattr(config, key, None) is not None:
            setattr(config, key, value)
    torch.manual_seed(0)
    if name.endswith("_vlm"):
        vision = {"depth": 1, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2,
                  "out_hidden_size": config.hidden_size}
        config = T.Qwen3_5Config(text_config=config.to_dict(), vision_config=vision)
        base = T.Qwen3_5ForConditionalGeneration(config).to(torch.bfloat16)
    else:
        base = T.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    sharpen_routers(base)  # the MoE models' experts: bf16 and the FP32 truth route alike
    base = base.cuda()
    peft_model = _attach_lora(base, {"r": 8, "lora_alpha": 16, "init_lora_weights": False})
    truth = copy.deepcopy(peft_model).float()
    model = surogate.compile(peft_model, recipe=recipe)
    truth = _on_held_weights(truth, model)
    ids = torch.randint(3, V, (2, 256), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    expected = truth(input_ids=ids, labels=ids).loss
    expected.backward()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    report = model.surogate_report
    assert report.linears and len(report.rewritten) == len(report.linears), str(report)
    assert torch.isfinite(loss) and abs(loss.item() - expected.item()) < 1e-2 * expected.item()
    grads, ref = _lora_grads(model), _lora_grads(truth)
    assert grads.keys() == ref.keys() and grads
    floor = 0.99 if recipe == "bf16" else 0.97  # tests/test_moe*.py's floors for the quantized recipes
    for n in grads:
        cos = F.cosine_similarity(grads[n].flatten(), ref[n].flatten(), dim=0).item()
        assert cos > floor, (n, cos)
    # And it trains: a few AdamW steps on the one batch lower the loss.
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = loss.item()
    for _ in range(5):
        opt.step()
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    assert torch.isfinite(loss) and loss.item() < 0.97 * first


def test_packed_qwen3_5_rows_on_cuda_equal_their_examples_alone_and_replay_in_a_cuda_graph():
    """Three examples packed in one row through the DeltaNet op on CUDA: the loss as each example alone (FP32
    PEFT), then the micro-step captured (GraphedStep, strict: the op's eager rule must be capturable) and replayed
    with the same loss as the eager step."""
    from surogate.training.graphed_step import GraphedStep

    config = MODELS["qwen3_5"]()
    for key, value in WIDE.items():
        if getattr(config, key, None) is not None:
            setattr(config, key, value)
    torch.manual_seed(0)
    base = T.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).cuda()
    peft_model = _attach_lora(base, {"r": 8, "lora_alpha": 16, "init_lora_weights": False})
    truth = copy.deepcopy(peft_model).float()
    model = surogate.compile(peft_model, recipe="bf16")
    examples, ids, positions = _packed([70, 130, 56])
    examples, ids, positions = [e.cuda() for e in examples], ids.cuda(), positions.cuda()
    with torch.no_grad():
        expected = _loss_alone(truth, examples).item()
        loss = model(input_ids=ids, labels=ids, position_ids=positions).loss.item()
    assert abs(loss - expected) < 3e-3 * expected, (loss, expected)
    eager = model(input_ids=ids, labels=ids, position_ids=positions).loss.item()
    model.zero_grad(set_to_none=True)
    step = GraphedStep(model, loss_scale=1.0, strict=True)
    replayed = [step(input_ids=ids, labels=ids, position_ids=positions).item() for _ in range(3)]
    assert step.replays >= 1 and step.eager_calls == 0
    assert abs(replayed[-1] - eager) < 2e-3 * eager, (replayed, eager)


@pytest.mark.parametrize("batch, length, heads, key_heads", [(2, 2048, 16, 16), (1, 1000, 32, 16)])
def test_delta_rule_at_model_sizes_on_cuda_follows_transformers_rule(batch, length, heads, key_heads):
    """surogate's rule (the scan kernels, TF32 products) at Qwen3.5's head dim 128 against transformers' rule in FP32
    (no TF32), forward and the five gradients; a length off the chunk and grouped key heads. The model tests above
    run head dim 64: the kernels' 128-wide build is the one that asked for too much shared memory (run 114)."""
    from surogate.ops.delta_rule import chunk_gated_delta_rule
    from test_delta_rule import _reference

    gen = torch.Generator("cuda").manual_seed(0)
    q, k = (torch.randn(batch, length, key_heads, 128, device="cuda", generator=gen).bfloat16() for _ in range(2))
    v = torch.randn(batch, length, heads, 128, device="cuda", generator=gen).bfloat16()
    g = -torch.rand(batch, length, heads, device="cuda", generator=gen) * 0.3
    g[:, length // 3] = -100.0  # a packed example starting there
    beta = torch.rand(batch, length, heads, device="cuda", generator=gen).bfloat16()
    ours = [t.clone().requires_grad_() for t in (q, k, v, g, beta)]
    ref = [t.clone().requires_grad_() for t in (q, k, v, g, beta)]
    out, expected = chunk_gated_delta_rule(*ours, use_qk_l2norm=True), _reference(*ref, True)
    grad = torch.randn_like(out)
    got, want = [out, *torch.autograd.grad(out, ours, grad)], [expected, *torch.autograd.grad(expected, ref, grad)]
    for name, a, b in zip(["out", "dq", "dk", "dv", "dg", "dbeta"], got, want):
        error = ((a.float() - b.float()).norm() / b.float().norm()).item()
        assert error < 5e-3, (name, error)  # run 115: 5e-4 (out, dq), 2e-4 (dg); bf16 outputs round at 4e-3
