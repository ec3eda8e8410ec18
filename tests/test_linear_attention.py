"""Qwen3.5 and Qwen3-Next (gated DeltaNet linear-attention layers beside full attention) through surogate on the CPU.

transformers runs the DeltaNet rule in its PyTorch form here (no flash-linear-attention); surogate runs it as one
op, `surogate::gated_delta_rule` (surogate/ops/linear_attention.py), so the traced graph does not grow with the
row length, and packed rows' examples get their own recurrent state and short convolution. The truth is eager
PEFT in FP32, each example alone. Traced in place, transformers' rule failed aot_eager's backward (a stride fault
of torch's) and compiled through Inductor (minutes); its op form runs on the CPU's default backend (aot_eager),
and one case still goes through Inductor's C++ backend, the compiler the GPU runs.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers as T

from test_more_archs import sharpen_routers

import surogate
from surogate.compiler import _attach_lora

V = 128
BASE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": V, "max_position_embeddings": 128, "pad_token_id": 0,
        "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
        "full_attention_interval": 2}
MODELS = {
    "qwen3_5": lambda: T.Qwen3_5TextConfig(**BASE),
    "qwen3_next": lambda: T.Qwen3NextConfig(**BASE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                            shared_expert_intermediate_size=64),
    "qwen3_5_moe": lambda: T.Qwen3_5MoeTextConfig(**{k: v for k, v in BASE.items() if k != "intermediate_size"},
                                                  num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                                  shared_expert_intermediate_size=64),
    # Two decoder-layer classes (attention and DeltaNet layers) in one list: no blocks were found, and compile
    # failed for want of targets before regional compilation took one graph per class.
    "olmo_hybrid": lambda: T.OlmoHybridConfig(**{k: v for k, v in BASE.items() if k != "full_attention_interval"},
                                              layer_types=["linear_attention", "full_attention"]),
}


def _lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.float() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


# The defaults put LoRA on a DeltaNet layer's out_proj only (a default name); its input projections too, as
# Axolotl's Qwen3.5 examples add them.
INPUT_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "in_proj_qkv",
                     "in_proj_z", "out_proj"]


@pytest.mark.parametrize("name, env, targets", [("qwen3_5", None, None), ("qwen3_5", "inductor", None),
                                                ("qwen3_5", None, INPUT_PROJECTIONS),
                                                ("olmo_hybrid", None, None),
                                                pytest.param("qwen3_next", None, None, marks=pytest.mark.slow),
                                                pytest.param("qwen3_5_moe", None, None, marks=pytest.mark.slow)])
def test_deltanet_model_follows_fp32_peft(name, env, targets, monkeypatch):
    """Qwen3.5 (dense and MoE), Qwen3-Next and OLMo-hybrid on the default CPU backend (aot_eager); Qwen3.5 through
    Inductor too, and with LoRA on its DeltaNet input projections."""
    if env is None:
        monkeypatch.delenv("SUROGATE_CPU_BACKEND", raising=False)
    else:
        monkeypatch.setenv("SUROGATE_CPU_BACKEND", env)
    torch.manual_seed(0)
    base = T.AutoModelForCausalLM.from_config(MODELS[name]()).to(torch.bfloat16)
    sharpen_routers(base)  # the MoE models' experts: bf16 and the FP32 truth route alike
    assert {"linear_attention", "full_attention"} <= set(base.config.layer_types)
    lora = {"r": 8, "lora_alpha": 16, "init_lora_weights": False}
    peft_model = _attach_lora(base, lora if targets is None else {**lora, "target_modules": targets})
    truth = copy.deepcopy(peft_model).float()
    model = surogate.compile(peft_model, recipe="bf16", arch="cpu")
    ids = torch.randint(3, V, (2, 48), generator=torch.Generator().manual_seed(1))
    expected = truth(input_ids=ids, labels=ids).loss
    expected.backward()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    report = model.surogate_report
    assert report.backend.split()[0] == (env or "aot_eager")
    assert any(n.startswith("linear attention: 1 gated DeltaNet layers") for n in report.notes), str(report)
    assert report.linears and len(report.rewritten) == len(report.linears), str(report)
    assert report.graphs == 2, str(report)  # one per layer kind, each shared by its layers
    assert abs(loss.item() - expected.item()) < 2e-3 * expected.item()
    grads, ref = _lora_grads(model), _lora_grads(truth)
    assert grads and grads.keys() == ref.keys()
    assert any(".linear_attn." in n for n in grads) and any(".self_attn." in n for n in grads)
    assert targets is None or {n.split(".")[-4] for n in grads} == set(targets)
    for n in grads:
        cos = F.cosine_similarity(grads[n].flatten(), ref[n].flatten(), dim=0).item()
        assert cos > 0.98, (n, cos)


def _packed(lengths: list[int], seed: int = 1) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Examples of `lengths` tokens, and the row packing them with positions restarting at each example."""
    g = torch.Generator().manual_seed(seed)
    examples = [torch.randint(3, V, (1, n), generator=g) for n in lengths]
    return examples, torch.cat(examples, 1), torch.cat([torch.arange(n) for n in lengths])[None]


def _loss_alone(model, examples: list[torch.Tensor]) -> torch.Tensor:
    """The mean token loss over the examples each run alone (what the packed row's loss must equal)."""
    total, count = 0.0, 0
    for e in examples:
        total = total + model(input_ids=e, labels=e).loss * (e.shape[1] - 1)
        count += e.shape[1] - 1
    return total / count


def test_packed_rows_through_deltanet_layers_equal_their_examples_alone():
    """Three examples packed in one row (positions restarting): loss and LoRA gradients as each example alone in
    FP32. transformers' own PyTorch path ignores the boundaries (its state and convolution run on across
    examples): its DeltaNet gradients are checked to be far off, so this test would catch the boundaries lost."""
    torch.manual_seed(0)
    base = T.AutoModelForCausalLM.from_config(MODELS["qwen3_5"]()).to(torch.bfloat16)
    peft_model = _attach_lora(base, {"r": 8, "lora_alpha": 16, "init_lora_weights": False,
                                     "target_modules": ["in_proj_qkv", "in_proj_z", "out_proj", "q_proj", "o_proj"]})
    truth = copy.deepcopy(peft_model).float()
    leaking = copy.deepcopy(truth)
    model = surogate.compile(peft_model, recipe="bf16", arch="cpu")
    examples, ids, positions = _packed([20, 45, 30])
    leaking(input_ids=ids, labels=ids, position_ids=positions).loss.backward()  # transformers alone: boundaries lost
    expected = _loss_alone(truth, examples)
    expected.backward()
    loss = model(input_ids=ids, labels=ids, position_ids=positions).loss
    loss.backward()
    assert abs(loss.item() - expected.item()) < 3e-3 * expected.item(), (loss.item(), expected.item())
    grads, ref, bad = _lora_grads(model), _lora_grads(truth), _lora_grads(leaking)
    assert any("in_proj_qkv" in n for n in grads)
    for n in grads:
        cos = F.cosine_similarity(grads[n].flatten(), ref[n].flatten(), dim=0).item()
        assert cos > 0.98, (n, cos)
        if ".linear_attn." in n:  # the boundaries lost (0.84-0.93 on this model): far under the bound
            assert F.cosine_similarity(bad[n].flatten(), ref[n].flatten(), dim=0).item() < 0.95, n


def test_new_row_lengths_compile_no_new_graph(monkeypatch):
    """The rule is one node whatever the length: rows of 1, 2 and 4 chunks (64 tokens each) run one dynamic graph
    per layer kind (transformers' traced loop over chunks specialized on the chunk count: a compile per count)."""
    monkeypatch.delenv("SUROGATE_CPU_BACKEND", raising=False)
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    base = T.AutoModelForCausalLM.from_config(MODELS["qwen3_5"]()).to(torch.bfloat16)
    model = surogate.compile(_attach_lora(base, {"r": 8, "lora_alpha": 16}), recipe="bf16", arch="cpu")
    compiled = []
    for length in (40, 100, 250):
        ids = torch.randint(3, V, (1, length), generator=torch.Generator().manual_seed(length))
        model(input_ids=ids, labels=ids).loss.backward()
        compiled.append(counters["stats"]["unique_graphs"])
    assert compiled[0] == compiled[-1], compiled


def test_segment_conv1d_reads_no_token_of_another_segment():
    """The short convolution over a packed row equals transformers' convolution of each segment alone."""
    from surogate.ops.linear_attention import segment_conv1d

    module = __import__("transformers.models.qwen3_5.modeling_qwen3_5", fromlist=["causal_conv1d_fn"])
    torch.manual_seed(0)
    x, weight, bias = torch.randn(2, 6, 11), torch.randn(6, 4), torch.randn(6)
    segments = torch.tensor([[0] * 4 + [1] * 2 + [2] * 5, [-1] * 3 + [0] * 8], dtype=torch.int32)
    out = segment_conv1d(x, weight, bias, "silu", segments)
    for b in range(2):
        for s in segments[b].unique():
            cols = (segments[b] == s).nonzero().flatten()
            alone = module.causal_conv1d_fn(x[b:b + 1, :, cols], weight, bias, activation="silu")
            torch.testing.assert_close(out[b:b + 1, :, cols], alone, rtol=1e-5, atol=1e-5)


def test_delta_rule_op_gradients_equal_the_traced_rule():
    """`surogate::gated_delta_rule` and its backward (the rule run again under autograd) against autograd through
    transformers' function, FP32, with the segments' resets against each segment alone."""
    module_name = "transformers.models.qwen3_5.modeling_qwen3_5"
    rule = getattr(__import__(module_name, fromlist=["x"]), "torch_chunk_gated_delta_rule")
    torch.manual_seed(0)
    B, S, H, D = 1, 70, 2, 8
    inputs = [torch.randn(B, S, H, D), torch.randn(B, S, H, D), torch.randn(B, S, H, D),
              -torch.rand(B, S, H), torch.rand(B, S, H)]
    inputs = [t.requires_grad_() for t in inputs]
    segments = torch.tensor([[0] * 30 + [1] * 40], dtype=torch.int32)
    out = torch.ops.surogate.gated_delta_rule(*inputs, segments, True)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, grad)
    for lo, hi in ((0, 30), (30, 70)):  # each segment alone through transformers' function
        part = [t[:, lo:hi].detach().requires_grad_() for t in inputs]
        ref, _ = rule(*part[:3], g=part[3], beta=part[4], use_qk_l2norm_in_kernel=True)
        torch.testing.assert_close(out[:, lo:hi], ref, rtol=1e-4, atol=1e-5)
        want = torch.autograd.grad(ref, part, grad[:, lo:hi])
        for name, g_op, g_ref in zip("qkvgb", got, want):
            if name == "g":  # a segment's first g multiplies a zero state: no gradient (alone: an exact zero too)
                g_op, g_ref = g_op[:, lo + 1:hi], g_ref[:, 1:]
            else:
                g_op = g_op[:, lo:hi]
            torch.testing.assert_close(g_op, g_ref, rtol=1e-4, atol=1e-5, msg=name)


def test_cpu_backend_is_aot_eager_unless_told_or_the_deltanet_layers_are_unknown(monkeypatch):
    from surogate.compiler import cpu_backend
    from surogate.ops import linear_attention

    qwen3_5 = T.AutoModelForCausalLM.from_config(MODELS["qwen3_5"]())
    monkeypatch.delenv("SUROGATE_CPU_BACKEND", raising=False)
    assert (cpu_backend(qwen3_5), cpu_backend()) == ("aot_eager", "aot_eager")
    monkeypatch.setattr(linear_attention, "RULE", "a_renamed_delta_rule")  # a transformers surogate does not know
    assert cpu_backend(qwen3_5) == "inductor"
    monkeypatch.setenv("SUROGATE_CPU_BACKEND", "aot_eager")
    assert cpu_backend(qwen3_5) == "aot_eager"


def test_unknown_cpu_backend_is_refused_before_anything_changes(monkeypatch):
    monkeypatch.setenv("SUROGATE_CPU_BACKEND", "eager")
    model = T.AutoModelForCausalLM.from_config(MODELS["qwen3_5"]()).to(torch.bfloat16)
    with pytest.raises(ValueError, match="SUROGATE_CPU_BACKEND='eager': use one of aot_eager, inductor"):
        surogate.compile(model, recipe="bf16", arch="cpu")
    assert not hasattr(model, "peft_config")

