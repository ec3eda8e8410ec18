"""Mixture-of-experts models in `surogate.compile` on the CPU (the grouped reference behind the op).

The experts of Qwen3-MoE, Mixtral and Qwen2-MoE get one LoRA pair per expert (PEFT's
`target_parameters`) by default and run as `surogate::grouped_lora_linear`. PEFT itself is not the
truth here: in bf16 it adds `s * B_e A_e` to the bf16 expert stack, which rounds most of the update
away (measured below: expert-gradient cosine 0.96 against FP32 on Qwen3-MoE). The truth is PEFT's
eager model in FP32, on the experts as surogate holds them.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from peft import PeftModel
from peft.tuners.lora import LoraLayer

import surogate
from surogate import moe, ops
from surogate.compiler import _attach_lora
from surogate.ops import grouped
from surogate.ops.experts import SurogateExperts, lora_factors_from_peft
from surogate.ops.modules import parameter_counts

C = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
         vocab_size=128, max_position_embeddings=64)


def moe_configs(sizes: dict, head_dim: int, experts: int, top_k: int, expert_size: int) -> dict:
    """Builders of a Qwen3-MoE, a Mixtral (8 experts, top-2, as the real one) and a Qwen2-MoE config."""
    return {
        "qwen3_moe": lambda: T.Qwen3MoeConfig(head_dim=head_dim, num_experts=experts, num_experts_per_tok=top_k,
                                              moe_intermediate_size=expert_size, **sizes),
        "mixtral": lambda: T.MixtralConfig(num_local_experts=8, num_experts_per_tok=2, **sizes),
        "qwen2_moe": lambda: T.Qwen2MoeConfig(num_experts=experts, num_experts_per_tok=top_k,
                                              moe_intermediate_size=expert_size,
                                              shared_expert_intermediate_size=sizes["intermediate_size"], **sizes),
    }


CONFIGS = moe_configs(C, head_dim=16, experts=8, top_k=2, expert_size=64)
LORA = {"r": 4, "lora_alpha": 8, "init_lora_weights": False}
EXPERTS_ONLY = {**LORA, "target_modules": [], "target_parameters": ["experts.gate_up_proj", "experts.down_proj"]}


def _base(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(CONFIGS[name]()).to(torch.bfloat16)


def _ids(seed: int = 1, shape=(2, 32)) -> torch.Tensor:
    return torch.randint(1, 128, shape, generator=torch.Generator().manual_seed(seed))


def _expert_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.float().flatten() for n, p in model.named_parameters()
            if p.requires_grad and ".experts." in n and p.grad is not None}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _loss_and_grads(model, ids) -> tuple[float, dict[str, torch.Tensor]]:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), _expert_grads(model)


# Mixtral `slow`: test_compile_models runs it (bf16 and qnf4) against the same FP32 truth.
@pytest.mark.parametrize("name", [n if n != "mixtral" else pytest.param(n, marks=pytest.mark.slow) for n in CONFIGS])
def test_experts_get_lora_by_default_and_follow_fp32_closer_than_peft(name):
    base = _base(name)
    plain = copy.deepcopy(base)
    peft_model = _attach_lora(base, LORA)
    truth, peft_bf16 = copy.deepcopy(peft_model).float(), copy.deepcopy(peft_model)
    compiled = surogate.compile(peft_model, recipe="bf16", arch="cpu")

    blocks = [m for m in compiled.modules() if isinstance(m, SurogateExperts)]
    assert len(blocks) == 2 and "experts: 2 MoE blocks run as grouped ops" in str(compiled.surogate_report)
    experts = compiled.base_model.model.model.layers[0].mlp.experts  # the outer PEFT wrapper, now surogate's
    assert isinstance(experts, LoraLayer) and type(experts).__name__ == "SurogateParamWrapper"
    assert experts.get_base_layer() is blocks[0]
    if name == "qwen2_moe":  # the shared expert is a plain MLP: ordinary LoRA linears
        assert isinstance(compiled.base_model.model.model.layers[0].mlp.shared_expert.gate_proj, LoraLayer)

    ids = _ids()
    loss, grads = _loss_and_grads(compiled, ids)
    loss_t, grads_t = _loss_and_grads(truth, ids)
    _, grads_p = _loss_and_grads(peft_bf16, ids)
    assert len(grads) == 8 and grads.keys() == grads_t.keys()  # A and B of gate_up and down, 2 layers
    assert abs(loss - loss_t) < 1e-3 * loss_t
    for key in grads:
        # measured: surogate 0.016-0.022, PEFT bf16 0.07-0.28 (max over the 8 tensors)
        assert _rel(grads[key], grads_t[key]) < 0.05, key
        assert F.cosine_similarity(grads[key], grads_t[key], dim=0) > 0.998, key
    assert max(_rel(grads[k], grads_t[k]) for k in grads) < max(_rel(grads_p[k], grads_t[k]) for k in grads)

    # Adapters disabled (e.g. a reference model for DPO): the experts run without their LoRA, as the base.
    with torch.no_grad():
        with compiled.disable_adapter():
            off = compiled(input_ids=ids, labels=ids).loss
        base_loss = plain(input_ids=ids, labels=ids).loss
    assert abs(off.item() - base_loss.item()) < 2e-3 * base_loss.item()
    assert abs(loss - base_loss.item()) > 1e-2


@pytest.mark.parametrize("recipe", ["qfp8", "qnf4", pytest.param("qfp4", marks=pytest.mark.slow)])
def test_quantized_experts_follow_fp32_on_the_same_operands_and_free_the_bf16_stacks(recipe):
    peft_model = _attach_lora(_base("qwen3_moe"), EXPERTS_ONLY)
    truth = copy.deepcopy(peft_model).float()
    before = parameter_counts(peft_model)
    compiled = surogate.compile(peft_model, recipe=recipe, arch="cpu", allow_emulation=True)
    held = [m for m in compiled.modules() if isinstance(m, SurogateExperts)]
    for (_, experts), mine in zip(moe.expert_modules(truth), held, strict=True):
        assert mine.gate_up_proj is None and mine.down_proj is None  # bf16 stacks freed
        for name in ("gate_up_proj", "down_proj"):
            getattr(experts, name).data.copy_(mine.dequantize(name, torch.float32))
    after = parameter_counts(compiled)
    assert after.frozen == before.frozen and after.frozen_bytes < 0.6 * before.frozen_bytes

    ids = _ids()
    loss, grads = _loss_and_grads(compiled, ids)
    loss_t, grads_t = _loss_and_grads(truth, ids)
    assert abs(loss - loss_t) < 1e-3 * loss_t
    # qfp8 computes in FP8 (E4M3 activations and gradients per 1x128 block): measured min 0.9907; the others
    # dequantize into bf16 MMAs: the same operands as the truth.
    floor = 0.98 if recipe == "qfp8" else 0.998
    for key in grads:
        assert F.cosine_similarity(grads[key], grads_t[key], dim=0) > floor, key


def test_twenty_steps_lower_the_loss_and_peft_loads_the_adapter_back(tmp_path):
    peft_model = _attach_lora(_base("qwen3_moe"), LORA)
    compiled = surogate.compile(peft_model, recipe="bf16", arch="cpu")
    opt = torch.optim.AdamW([p for p in compiled.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids(shape=(4, 32))
    losses = []
    for _ in range(20):
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0], losses  # measured: 4.86 -> 4.48 (random ids, LoRA r=4 only)

    compiled.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_base("qwen3_moe"), tmp_path)
    mine = {k: v for k, v in compiled.state_dict().items() if "lora_" in k}
    theirs = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert mine.keys() == theirs.keys() and any(".experts.base_layer.lora_A" in k for k in mine)
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key
    with torch.no_grad():
        mine_loss = compiled(input_ids=ids, labels=ids).loss
        theirs_loss = loaded.float()(input_ids=ids, labels=ids).loss  # FP32: PEFT's bf16 rounds the update
    assert abs(mine_loss.item() - theirs_loss.item()) < 2e-3 * theirs_loss.item()


def test_target_parameters_naming_nothing_are_refused_before_the_model_changes():
    model = _base("qwen3_moe")
    with pytest.raises(ValueError, match=r"target_parameters \['experts.nope'\] match no parameter.*"
                                         r"experts.down_proj"):
        surogate.compile(model, recipe="qnf4", arch="cpu", lora={"target_parameters": ["experts.nope"]})
    assert not hasattr(model, "peft_config") and type(model.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"


def test_a_failure_after_the_swap_hands_the_experts_back(monkeypatch):
    model = _base("qwen3_moe")
    ids = _ids()
    with torch.no_grad():
        want = model(input_ids=ids, labels=ids).loss

    def broken(hf):
        raise RuntimeError("attention install failed")

    monkeypatch.setattr(surogate.compiler.attention, "install", broken)
    with pytest.raises(RuntimeError, match="attention install failed"):
        surogate.compile(model, recipe="qnf4", arch="cpu")
    experts = model.model.layers[0].mlp.experts
    assert type(experts).__name__ == "Qwen3MoeExperts" and experts.gate_up_proj.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, labels=ids).loss, want)


@pytest.mark.parametrize("train", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["report", "trains"])
def test_experts_surogate_cannot_run_stay_with_peft_and_say_why(monkeypatch, train):
    experts_class = type(_base("qwen3_moe").model.layers[0].mlp.experts)

    def my_gate(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.gelu(gate) * up

    monkeypatch.setattr(experts_class, "_apply_gate", my_gate)
    compiled = surogate.compile(_attach_lora(_base("qwen3_moe"), LORA), recipe="bf16", arch="cpu")
    assert "experts left as PEFT runs them (2)" in str(compiled.surogate_report)
    assert "a custom gate" in str(compiled.surogate_report)
    assert not any(isinstance(m, SurogateExperts) for m in compiled.modules())
    if train:  # PEFT's parametrized experts inside the compiled block: slow (8 s), so `slow`
        loss = compiled(input_ids=_ids(), labels=_ids()).loss
        loss.backward()
        assert torch.isfinite(loss) and all(g.norm() > 0 for g in _expert_grads(compiled).values())


def test_grouped_op_equals_a_loop_of_dense_ops_with_peft_factor_layout():
    """Through autograd: PEFT's (r*E, K) / (N, r*E) factors, a permuted view for B, idle experts."""
    g = torch.Generator().manual_seed(3)
    e, r, n, k, counts = 4, 4, 48, 64, [5, 0, 9, 0]
    x = torch.randn(sum(counts), k, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(e, n, k, generator=g) / 8).bfloat16()
    a_w = (torch.randn(r * e, k, generator=g) / 8).requires_grad_()
    b_w = (torch.randn(n, r * e, generator=g) / 4).requires_grad_()
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    a, b = lora_factors_from_peft(a_w, b_w, e)
    out = grouped.grouped_lora_linear(x, offsets, grouped.prepare_expert_weights(w, "nf4"), "nf4", a, b, 2.0)
    go = torch.randn(out.shape, generator=g).bfloat16()
    ga, gb, gx = torch.autograd.grad(out, (a_w, b_w, x), go)

    x2, a2, b2 = (t.detach().clone().requires_grad_() for t in (x, a_w, b_w))
    a_e, b_e = lora_factors_from_peft(a2, b2, e)
    pieces = []
    for i, (lo, hi) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        dense = ops.prepare_weight(w[i], "nf4")
        pieces.append(ops.lora_linear(x2[lo:hi], dense, "nf4", a_e[i], b_e[i], lora_scale=2.0))
    want = torch.cat(pieces)
    ga2, gb2, gx2 = torch.autograd.grad(want, (a2, b2, x2), go)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    for got, ref in ((ga, ga2), (gb, gb2), (gx, gx2)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert not ga.view(e, r, k)[[1, 3]].any()  # idle experts get no gradient


def test_the_trainer_puts_lora_on_the_experts_unless_told_otherwise():
    from surogate.training.config import ConfigError, from_dict
    from surogate.training.setup import lora_config

    model = _base("qwen3_moe")
    assert sorted(lora_config(from_dict({}), model).target_parameters) == ["experts.down_proj", "experts.gate_up_proj"]
    assert not lora_config(from_dict({"lora_target_parameters": []}), model).target_parameters
    assert not lora_config(from_dict({}), _base_dense()).target_parameters
    with pytest.raises(ConfigError, match="lora_dropout: must be 0 with lora_target_parameters"):
        from_dict({"lora_dropout": 0.1, "lora_target_parameters": ["experts.down_proj"]})
    with pytest.raises(ConfigError, match="lora_target_parameters: expected a list"):
        from_dict({"lora_target_parameters": 3})


def _base_dense() -> torch.nn.Module:
    return T.AutoModelForCausalLM.from_config(T.Qwen3Config(head_dim=16, **C)).to(torch.bfloat16)


def test_grouped_op_reading_rows_through_an_index_equals_the_gathered_copy():
    """`rows`: what SurogateExperts passes (each token once, read per routed expert), forward and autograd."""
    g = torch.Generator().manual_seed(4)
    tokens, top_k, e, r, n, k = 9, 2, 4, 4, 32, 64
    x = torch.randn(tokens, k, generator=g).bfloat16().requires_grad_()
    order = torch.randperm(tokens * top_k, generator=g)
    rows = order // top_k
    offsets = torch.tensor([0, 5, 5, 12, 18], dtype=torch.int32)
    wl = grouped.prepare_expert_weights((torch.randn(e, n, k, generator=g) / 8).bfloat16(), "fp8_block")
    a = (torch.randn(e, r, k, generator=g) / 8).requires_grad_()
    b = (torch.randn(e, n, r, generator=g) / 4).requires_grad_()
    out = grouped.grouped_lora_linear(x, offsets, wl, "fp8_block", a, b, 2.0, rows=rows.to(torch.int32))
    go = torch.randn(out.shape, generator=g).bfloat16()
    grads = torch.autograd.grad(out, (x, a, b), go)
    x2 = x.detach().clone().requires_grad_()
    want = grouped.grouped_lora_linear(x2[rows], offsets, wl, "fp8_block", a, b, 2.0)
    grads2 = torch.autograd.grad(want, (x2, a, b), go)
    assert out.shape == (tokens * top_k, n)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    for got, ref in zip(grads, grads2):
        torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-3)  # token sums: FP32 here, bf16 adds there


def test_a_cpu_model_for_a_gpu_arch_without_cuda_is_refused_with_what_to_do(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = _base("qwen3_moe")
    with pytest.raises(ValueError, match="arch sm_90 runs on a CUDA GPU, but torch sees none here .*pass arch='cpu'"):
        surogate.compile(model, recipe="qnf4", arch="sm_90")
    assert not hasattr(model, "peft_config")


def test_nf4_experts_of_a_shape_nf4_cannot_hold_stay_with_peft_and_say_what_to_use():
    sizes = {**C, "hidden_size": 32, "intermediate_size": 64}
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(moe_configs(sizes, 8, 4, 2, 16)["qwen3_moe"]()).to(torch.bfloat16)
    compiled = surogate.compile(model, recipe="qnf4", arch="cpu")
    report = str(compiled.surogate_report)
    assert "experts left as PEFT runs them (2)" in report and "divisible by 64 (got 32 and 16); use qfp8" in report
    assert not any(isinstance(m, SurogateExperts) for m in compiled.modules())


def test_the_router_load_balancing_loss_is_in_the_loss_when_the_config_asks_for_it():
    """`output_router_logits=True` makes HF add `router_aux_loss_coef * aux` to the loss; the chunked head returned
    the LM loss alone (Mixtral / Qwen3-MoE: 6.26 against HF's 7.27), so the router trained without balancing."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = CONFIGS["qwen3_moe"]()
    config.output_router_logits, config.router_aux_loss_coef = True, 0.5
    base = T.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    peft = get_peft_model(base, LoraConfig(**LORA, target_modules=["q_proj", "v_proj", "gate"]))
    compiled = surogate.compile(copy.deepcopy(peft), recipe="bf16", arch="cpu")
    ids = _ids()
    want = peft(input_ids=ids, labels=ids)
    got = compiled(input_ids=ids, labels=ids)
    assert want.aux_loss > 1.0  # the term is large enough that leaving it out cannot pass
    assert abs(got.loss.item() - want.loss.item()) < 0.01 * want.loss.item()
    want.loss.backward()
    got.loss.backward()
    router = [n for n, p in peft.named_parameters() if ".gate.lora_B" in n]
    grads = dict(compiled.named_parameters())
    for n in router:
        assert _rel(grads[n].grad.float(), dict(peft.named_parameters())[n].grad.float()) < 0.1, n
