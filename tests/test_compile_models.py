"""Any HF model: tiny random configs of 13 architectures compiled on CPU against eager PEFT.

For each (model, recipe): it compiles; every target linear is rewritten (none falls back); the loss
and the LoRA gradients match eager PEFT (bf16 LoRA compute vs PEFT's FP32) within the recipe's bound;
20 AdamW steps lower the loss. Bounds (docs/compile.md): relative loss error and the relative
norm of the error of all LoRA gradients together, scaled with the element format's relative step
(bf16 2^-9, E4M3 2^-4, NF4 ~2^-3, E2M1 2^-2), measured, then given a 2x margin.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T

import surogate
from surogate.compiler import _attach_lora

H, V = 64, 128
BOUNDS = {  # recipe: (relative loss error, relative LoRA-gradient error)
    "bf16": (1e-3, 0.06),
    "fp8": (5e-3, 0.25), "qfp8": (5e-3, 0.25), "qfp8-bf16": (5e-3, 0.2),
    "qnf4": (5e-3, 0.3),
    "fp4": (1e-2, 1.0), "qfp4": (1e-2, 1.0),  # E2M1 on both operands of forward and dgrad: loose
}


def tiny_config(name: str):
    """A 2-layer, hidden-64, vocab-128 config (no download, no dropout)."""
    c = dict(hidden_size=H, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=V, max_position_embeddings=64)
    head = dict(head_dim=16)
    return {
        "llama": lambda: T.LlamaConfig(**c),
        "qwen2": lambda: T.Qwen2Config(**c),
        "qwen3": lambda: T.Qwen3Config(**head, **c),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(**head, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, **c),
        "mistral": lambda: T.MistralConfig(**c),
        "mixtral": lambda: T.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **c),
        "gemma2": lambda: T.Gemma2Config(**head, query_pre_attn_scalar=16, sliding_window=16, **c),
        "gemma3": lambda: T.Gemma3TextConfig(**head, query_pre_attn_scalar=16, sliding_window=16, **c),
        "phi3": lambda: T.Phi3Config(pad_token_id=0, **c),
        "gpt2": lambda: T.GPT2Config(n_embd=H, n_layer=2, n_head=4, n_positions=64, vocab_size=V, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0),
        "opt": lambda: T.OPTConfig(hidden_size=H, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                   word_embed_proj_dim=H, max_position_embeddings=64, vocab_size=V, dropout=0.0,
                                   attention_dropout=0.0),
        "gpt_neox": lambda: T.GPTNeoXConfig(hidden_size=H, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, vocab_size=V, max_position_embeddings=64),
        "falcon": lambda: T.FalconConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, vocab_size=V),
    }[name]()


FULL = ["bf16", "fp8", "fp4", "qfp8", "qfp8-bf16", "qfp4", "qnf4"]
# The full recipe matrix on two models; bf16 plus one quantized recipe (rotated) on the rest.
CASES = [(m, r) for m in ("qwen3", "llama") for r in FULL] + [
    (m, r) for m, q in (("qwen2", "qnf4"), ("qwen3_moe", "qfp8"), ("mistral", "fp8"), ("mixtral", "qnf4"),
                        ("gemma2", "qfp8"), ("gemma3", "qfp4"), ("phi3", "qfp8-bf16"), ("gpt2", "qnf4"),
                        ("opt", "fp4"), ("gpt_neox", "qfp8"), ("falcon", "fp8"))
    for r in ("bf16", q)]


# Training 20 steps: every model's bf16 and rotated quantized case, and qwen3 under qfp8 and qnf4. The rest of
# the full matrix compares numbers only (CPU time: the NVFP4 reference is slow to step).
NO_TRAIN = {(m, r) for m in ("qwen3", "llama") for r in FULL if r != "bf16"} - {("qwen3", "qfp8"), ("qwen3", "qnf4")}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


def _lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


@pytest.mark.parametrize("arch_name,recipe", CASES)
def test_model_matches_eager_peft_and_trains(arch_name, recipe):
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(tiny_config(arch_name)).to(torch.bfloat16)
    peft_model = _attach_lora(model, {"r": 8, "lora_alpha": 16, "init_lora_weights": False})
    eager = copy.deepcopy(peft_model)
    compiled = surogate.compile(peft_model, recipe=recipe, arch="cpu", dynamic=False)
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    ref = eager(input_ids=ids, labels=ids).loss
    ref.backward()
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    report = compiled.surogate_report  # filled when the first call compiles the block graph
    assert report.linears and len(report.rewritten) == len(report.linears), str(report)
    loss_bound, grad_bound = BOUNDS[recipe]
    assert torch.isfinite(loss) and abs(loss.item() - ref.item()) / ref.item() < loss_bound
    g_ref, g = _lora_grads(eager), _lora_grads(compiled)
    assert g.keys() == g_ref.keys() and g
    flat = lambda d: torch.cat([d[k].flatten().float() for k in sorted(d)])  # noqa: E731
    assert _rel(flat(g), flat(g_ref)) < grad_bound

    if (arch_name, recipe) in NO_TRAIN:
        return
    opt = torch.optim.AdamW([p for p in compiled.parameters() if p.requires_grad], lr=1e-2)
    first = loss.item()
    for _ in range(20):
        opt.step()
        opt.zero_grad()
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
    assert torch.isfinite(loss) and loss.item() < 0.9 * first
    # One block graph for every layer and every step; models that mix sliding-window and full layers
    # (Gemma 2) compile one per layer type: the attention reads its window (surogate/ops/attention.py).
    layer_types = getattr(compiled.base_model.model.config, "layer_types", None) or ["full_attention"]
    assert report.graphs == len(set(layer_types[:2]))  # the tiny models have 2 layers
