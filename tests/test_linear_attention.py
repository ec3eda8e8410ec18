"""Qwen3.5 and Qwen3-Next (gated DeltaNet linear-attention layers beside full attention) through surogate on the CPU.

The CPU's reference backend (aot_eager) cannot run their backward: it replays an `aten.view` of a `_to_copy`
whose eager strides differ from the traced ones (a torch fault: plain `torch.compile(backend="aot_eager")` of the
HF layer fails the same way). Inductor plans its own layouts, and it is the compiler the GPU runs, so surogate
compiles such models through Inductor's C++ backend on the CPU (`cpu_backend`; `SUROGATE_CPU_BACKEND` overrides
it), and these tests check what that runs: the passes, the rewritten ops
and the DeltaNet rule's PyTorch form (transformers' fallback without flash-linear-attention) in one graph per
layer kind, against eager PEFT in FP32 (the truth). About 1.5 minutes of compile each on two cores.
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
}


def _lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.float() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


@pytest.mark.parametrize("name, env", [("qwen3_5", None), pytest.param("qwen3_next", "inductor", marks=pytest.mark.slow),
                                       pytest.param("qwen3_5_moe", None, marks=pytest.mark.slow)])
def test_deltanet_model_through_inductor_follows_fp32_peft(name, env, monkeypatch):
    """Qwen3.5 (dense and MoE) takes Inductor by itself (no environment variable); Qwen3-Next with
    SUROGATE_CPU_BACKEND=inductor."""
    if env is None:
        monkeypatch.delenv("SUROGATE_CPU_BACKEND", raising=False)
    else:
        monkeypatch.setenv("SUROGATE_CPU_BACKEND", env)
    torch.manual_seed(0)
    base = T.AutoModelForCausalLM.from_config(MODELS[name]()).to(torch.bfloat16)
    sharpen_routers(base)  # the MoE models' experts: bf16 and the FP32 truth route alike
    assert {"linear_attention", "full_attention"} <= set(base.config.layer_types)
    peft_model = _attach_lora(base, {"r": 8, "lora_alpha": 16, "init_lora_weights": False})
    truth = copy.deepcopy(peft_model).float()
    model = surogate.compile(peft_model, recipe="bf16", arch="cpu")
    ids = torch.randint(3, V, (2, 48), generator=torch.Generator().manual_seed(1))
    expected = truth(input_ids=ids, labels=ids).loss
    expected.backward()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    report = model.surogate_report
    assert report.backend == "inductor"
    assert any(n.startswith("CPU graphs compiled by Inductor") for n in report.notes), str(report)
    assert report.linears and len(report.rewritten) == len(report.linears), str(report)
    assert report.graphs == 2, str(report)  # one per layer kind, each shared by its layers
    assert abs(loss.item() - expected.item()) < 2e-3 * expected.item()
    grads, ref = _lora_grads(model), _lora_grads(truth)
    assert grads and grads.keys() == ref.keys()
    assert any(".linear_attn." in n for n in grads) and any(".self_attn." in n for n in grads)
    for n in grads:
        cos = F.cosine_similarity(grads[n].flatten(), ref[n].flatten(), dim=0).item()
        assert cos > 0.98, (n, cos)


def test_cpu_backend_is_inductor_only_for_linear_attention_models_unless_told(monkeypatch):
    from surogate.compiler import cpu_backend

    qwen3 = T.AutoModelForCausalLM.from_config(T.Qwen3Config(**{k: v for k, v in BASE.items() if "linear" not in k
                                                                and k != "full_attention_interval"}))
    qwen3_5 = T.AutoModelForCausalLM.from_config(MODELS["qwen3_5"]())
    monkeypatch.delenv("SUROGATE_CPU_BACKEND", raising=False)
    assert (cpu_backend(qwen3), cpu_backend(qwen3_5), cpu_backend()) == ("aot_eager", "inductor", "aot_eager")
    monkeypatch.setenv("SUROGATE_CPU_BACKEND", "aot_eager")
    assert cpu_backend(qwen3_5) == "aot_eager"
    monkeypatch.setenv("SUROGATE_CPU_BACKEND", "inductor")
    assert cpu_backend(qwen3) == "inductor"


def test_unknown_cpu_backend_is_refused_before_anything_changes(monkeypatch):
    monkeypatch.setenv("SUROGATE_CPU_BACKEND", "eager")
    model = T.AutoModelForCausalLM.from_config(MODELS["qwen3_5"]()).to(torch.bfloat16)
    with pytest.raises(ValueError, match="SUROGATE_CPU_BACKEND='eager': use one of aot_eager, inductor"):
        surogate.compile(model, recipe="bf16", arch="cpu")
    assert not hasattr(model, "peft_config")
