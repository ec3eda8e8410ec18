"""GPT-OSS's and Llama 4's experts through `SurogateExperts` (the layouts of surogate/ops/experts_layout.py).

Without torch.compile (the ops' CPU reference runs eagerly), so every recipe is cheap:
- the experts (GPT-OSS) or the MoE block (Llama 4) in bf16 without LoRA against transformers' own bf16 forward,
  with GPT-OSS's clamp cutting a third of the values; each field of the layout (interleaved gate/up, biases, the
  clamp, the gate's alpha, where Llama 4's routing weight enters) read wrong fails that comparison;
- the MoE block of layer 0 after `moe.swap_experts` against PEFT's eager LoRA block in FP32 on the same experts
  (dequantized as the recipe holds them), output and every LoRA gradient, for every recipe. (The clamp is left at
  GPT-OSS's 7, which the tiny model never reaches: against FP32, a clamp decision that bf16 rounds the other way
  zeroes or restores a whole gradient element, 5% of the gate_up gradients' norm at a limit of 0.25.)
- PEFT's factors are read as PEFT applies them, whatever the stored layout.
The whole models compiled against eager PEFT: tests/test_more_archs.py.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from test_more_archs import _model

from surogate import moe
from surogate.compiler import _attach_lora
from surogate.ops.experts import (
    EXPERT_PARAMETERS,
    SurogateExperts,
    peft_expert_factors,
    unsupported_experts,
)
from surogate.ops.experts_layout import ExpertsLayout, Gate, Routing, experts_layout
from surogate.recipes import get

LORA = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, "target_modules": []}  # the experts only
RECIPES = ["bf16", "fp8", "fp4", "qfp8", "qfp8-bf16", "qfp4", "qnf4"]
# test_moe.py's bounds: relative error and cosine of each LoRA gradient (and here the block output) against the
# FP32 truth; qfp8 computes in FP8 (E4M3 activations and gradients), the rest in bf16 on the same operands.
REL, COS, COS_FP8 = 0.05, 0.998, 0.98


def _block(model: torch.nn.Module) -> torch.nn.Module:
    layer = model.base_model.model.model.layers[0]
    return layer.feed_forward if hasattr(layer, "feed_forward") else layer.mlp


def _swapped(name: str, recipe: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the PEFT model with its experts swapped for `recipe`, PEFT's model in FP32 on the experts as held)."""
    peft_model = _attach_lora(_model(name), LORA)
    truth = copy.deepcopy(peft_model).float()
    moe.swap_experts(peft_model, get(recipe))
    held = [m for m in peft_model.modules() if isinstance(m, SurogateExperts)]
    for (_, experts), mine in zip(moe.expert_modules(truth), held, strict=True):
        for param in EXPERT_PARAMETERS:
            getattr(experts, param).data.copy_(mine.dequantize(param, torch.float32))
    return peft_model, truth


def _errors(name: str, recipe: str, **mutation) -> dict[str, tuple[float, float]]:
    """(relative error, cosine) against the truth of layer 0's block output and of each of its LoRA gradients;
    `mutation` replaces fields of the swapped experts' layout."""
    peft_model, truth = _swapped(name, recipe)
    mine, ref = _block(peft_model), _block(truth)
    if mutation:
        experts = mine.experts.get_base_layer()
        experts.layout = dataclasses.replace(experts.layout, **mutation)
    x = torch.randn(1, 48, 64, generator=torch.Generator().manual_seed(1)).bfloat16()
    grad = torch.randn(1, 48, 64, generator=torch.Generator().manual_seed(2))
    out, out_t = mine(x)[0], ref(x.float())[0]
    (out.float() * grad).sum().backward()
    (out_t * grad).sum().backward()
    pairs = {"output": (out.float(), out_t)}
    pairs.update({n: (p.grad, dict(ref.named_parameters())[n].grad) for n, p in mine.named_parameters()
                  if p.grad is not None})
    assert len(pairs) == 5, sorted(pairs)  # the output and A, B of gate_up and down
    return {n: ((a.float() - b).norm().item() / b.norm().item(),
                F.cosine_similarity(a.float().flatten(), b.flatten(), dim=0).item()) for n, (a, b) in pairs.items()}


def _within(errors: dict[str, tuple[float, float]], recipe: str) -> bool:
    floor = COS_FP8 if recipe == "qfp8" else COS
    return all(rel < REL and cos > floor for rel, cos in errors.values())


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("name", ["gpt_oss", "llama4"])
def test_block_follows_fp32_peft(name, recipe):
    errors = _errors(name, recipe)
    # measured max relative error / min cosine over the 5: bf16-compute recipes 0.0072 / 0.99998, qfp8 0.029 / 0.9996
    assert _within(errors, recipe), errors


def _against_hf(name: str, **mutation) -> dict[str, float]:
    """Relative errors of `SurogateExperts` (bf16, no LoRA) against transformers' own bf16 forward, output and input
    gradients. GPT-OSS: its experts module on random routing, its gate_up stack scaled 40x so that the clamp (7)
    cuts a third of the values; Llama 4: its MoE block (HF's dense routing against surogate's top-k). No FP32
    reference here, so no clamp decision differs: the same bf16 operands, the GEMMs' rounding only."""
    model = _model(name)
    layer = model.model.layers[0]
    if name == "gpt_oss":
        hf = layer.mlp.experts
        with torch.no_grad():
            hf.gate_up_proj.mul_(40)
        mine = SurogateExperts(hf, "bf16")
        gen = torch.Generator().manual_seed(3)
        top_k_index = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(48)])
        weights = torch.rand(48, 2, generator=gen).bfloat16()
        inputs = (torch.randn(48, 64, generator=gen).bfloat16(), weights)

        def run(module, x, w):
            return module(x, top_k_index, w)
    else:
        hf = layer.feed_forward
        mine = copy.deepcopy(hf)
        moe.swap_experts(mine, get("bf16"))
        assert type(mine).__name__ == "TopKLlama4TextMoe" and isinstance(mine.experts, SurogateExperts)
        inputs = (torch.randn(1, 48, 64, generator=torch.Generator().manual_seed(3)).bfloat16(),)

        def run(module, x):
            return module(x)[0]
    experts = mine if isinstance(mine, SurogateExperts) else mine.experts
    experts.layout = dataclasses.replace(experts.layout, **mutation)
    errors = {}
    outs = []
    for module in (mine, hf):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = run(module, *leaves)
        out.float().pow(2).sum().backward()
        outs.append([out, *(t.grad for t in leaves)])
    for i, (got, want) in enumerate(zip(*outs)):
        errors["output" if i == 0 else f"grad {i}"] = ((got.float() - want.float()).norm() / want.float().norm()).item()
    return errors


HF_BOUND = 1e-2  # measured max: GPT-OSS 0.0059 (bf16 roundings in another order), Llama 4 0 (bit for bit)


@pytest.mark.parametrize("name", ["gpt_oss", "llama4"])
def test_experts_equal_transformers_own_forward(name):
    errors = _against_hf(name)
    assert max(errors.values()) < HF_BOUND, errors


# A field read wrong: each moves the output or an input gradient past the bound (measured max relative error).
MUTATIONS = [
    ("gpt_oss", {"interleaved": False}),  # [gate; up] halves instead of alternate columns (1.40)
    ("gpt_oss", {"bias": False}),  # expert biases dropped (0.14)
    ("gpt_oss", {"limit": math.inf}),  # no clamp (4.3)
    ("gpt_oss", {"alpha": 1.0}),  # sigmoid(gate) instead of sigmoid(1.702 gate) (0.059)
    ("llama4", {"routing": Routing.OUTPUT}),  # the score scaling the expert's output, not its input (0.26)
]


@pytest.mark.parametrize("name,mutation", MUTATIONS, ids=[f"{n}-{next(iter(m))}" for n, m in MUTATIONS])
def test_a_layout_field_read_wrong_fails_the_comparison(name, mutation):
    errors = _against_hf(name, **mutation)
    assert max(errors.values()) > HF_BOUND, errors


@pytest.mark.parametrize("name", ["qwen3_moe", "gpt_oss", "llama4"])
def test_peft_factors_read_as_peft_applies_them(name):
    """`s * B_e A_e` of the factors handed to the grouped op is PEFT's own delta of each expert weight, in the
    grouped op's (E, N, K) layout: direct for Qwen3-MoE ((E, N, K) stored) and GPT-OSS ((E, K, N), marked
    `is_transposed`), swapped and transposed for Llama 4 ((E, K, N), unmarked: PEFT takes its in/out the other way)."""
    from peft.tuners.lora.layer import ParamWrapper

    if name == "qwen3_moe":
        torch.manual_seed(0)
        model = T.AutoModelForCausalLM.from_config(T.Qwen3MoeConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=128, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32))
    else:
        model = _model(name)
    peft_model = _attach_lora(model.float(), LORA)  # FP32: PEFT's delta is in the parameter's dtype
    wrappers = [m for m in peft_model.modules() if isinstance(m, ParamWrapper)]
    assert len(wrappers) == 2 * len(moe.expert_modules(model))
    transposed = experts_layout(wrappers[0].get_base_layer()).transposed
    assert transposed == (name != "qwen3_moe")
    for wrapper in wrappers:
        a, b, scale = peft_expert_factors(wrapper, "default", transposed)
        delta = wrapper.get_delta_weight("default")  # PEFT's, in the stored layout
        want = delta.transpose(1, 2) if transposed else delta
        torch.testing.assert_close(scale * b @ a, want, rtol=1e-5, atol=1e-7)
        assert a.shape[1] == b.shape[2] == 4


def test_layouts_of_the_models():
    def experts(name):
        return next(m for _, m in moe.expert_modules(_model(name)))

    assert experts_layout(experts("gpt_oss")) == ExpertsLayout(
        transposed=True, interleaved=True, bias=True, gate=Gate.CLAMPED_SWIGLU, alpha=1.702, limit=7.0)
    assert experts_layout(experts("llama4")) == ExpertsLayout(transposed=True, routing=Routing.INPUT)
    assert experts_layout(experts("glm4_moe")) == ExpertsLayout()


def test_what_surogate_cannot_run_says_why(monkeypatch):
    """A gate marked concatenated that reads interleaved, Llama 4 experts in a block of another forward, a Llama 4
    experts class with its own forward: refused with the reason, the model left as it was."""
    gpt_oss = next(m for _, m in moe.expert_modules(_model("gpt_oss")))
    monkeypatch.setattr(gpt_oss, "is_concatenated", True)
    assert "is_concatenated=True, but its gate reads gate and up interleaved" in unsupported_experts(gpt_oss)

    model = _model("llama4")
    blocks = [layer.feed_forward for layer in model.model.layers]
    block_class = type(blocks[0])
    my_block = type("MyMoe", (block_class,), {"forward": lambda self, hidden_states: block_class.forward(
        self, hidden_states)})
    for block in blocks:
        block.__class__ = my_block
    with pytest.warns(UserWarning, match="2 MoE experts modules stay as PEFT runs them"):
        lines = moe.swap_experts(_attach_lora(model, LORA), get("bf16"))
    why = ("experts left as PEFT runs them (2): base_model.model.model.layers.0.feed_forward.experts "
           "(Llama4TextExperts: its MoE block MyMoe is not transformers' Llama4TextMoe (whose dense routing surogate "
           "reroutes))")
    assert lines == [why]
    assert all(type(b) is my_block for b in blocks) and not any(isinstance(m, SurogateExperts) for m in model.modules())

    llama4 = next(m for _, m in moe.expert_modules(_model("llama4")))
    llama4.__class__ = type("MyExperts", (type(llama4),), {"forward": lambda self, hidden_states: hidden_states})
    assert unsupported_experts(llama4) == "a custom forward (MyExperts.forward)"
