"""The grouped (mixture-of-experts) LoRA linear: reference, Triton kernels, and PEFT's semantics.

Three tiers:
- the grouped reference equals a loop of the dense reference over the experts, bit for bit
  (`torch.equal`), for every format and compute it accepts: the grouped op is E dense LoRA linears;
- the Triton grouped kernels (TRITON_INTERPRET=1 on the CPU, tests/conftest.py) against the grouped
  reference: uneven groups, empty groups (first and last expert with no token), odd T, N not a
  multiple of the tile, K a multiple of 64 but not of 128 (NF4 blocks whole, FP8 blocks partial).
  Floors are SQNR in dB as in test_kernels_gemm.py; under the interpreter a kernel's fp32 -> bf16
  store truncates instead of rounding to nearest, which is why its hidden is ~47 dB, not > 60;
- a gathered input (`rows`, MoE routing: each token in top_k groups): the reference with rows is the
  reference on `input[rows]` bit for bit, and the kernels reading through the index match it;
- FP8 compute (fp8_block weights, block-scaled FP8 MMA): the kernels against the reference's fp8
  compute, which quantizes the same operands (x or the gradient E4M3 per 1x128, the stored 128x128
  weight blocks), so the floor holds; and more than FP8's noise away from its bf16 compute, so a
  kernel that did not quantize would fail;
- a tiny Qwen3-MoE wrapped by PEFT (`target_parameters`) against the reference given the same
  routing, forward and LoRA gradients: this pins PEFT's layout of the per-expert factors.
"""

from __future__ import annotations

import pytest
import torch

from surogate.kernels import grouped
from surogate.kernels import reference as ref
from surogate.kernels import reference_grouped as rg
from surogate.ops.experts import lora_factors_from_peft
from numerics import sqnr

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOOR = 40.0
KERNEL_FORMATS = ("bf16", "fp8_block", "nf4", "nvfp4")
# FP8 compute against the reference's bf16 compute: E4M3's 3-bit mantissa on x (or g) is ~31 dB of noise
# (measured 33-34 dB on these cases); below this, the kernel did quantize.
FP8_VS_BF16 = 38.0



def _offsets(counts: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def _case(counts: list[int], n: int, k: int, r: int, fmt: str, seed: int):
    """Sorted tokens, offsets, the expert stack quantized per expert, FP32 LoRA factors, a gradient."""
    g = torch.Generator().manual_seed(seed)
    e, t = len(counts), sum(counts)
    x = torch.randn(t, k, generator=g).bfloat16()
    w = (torch.randn(e, n, k, generator=g) / k ** 0.5).bfloat16()
    a = torch.randn(e, r, k, generator=g) / k ** 0.5
    b = torch.randn(e, n, r, generator=g) * 0.2
    go = torch.randn(t, n, generator=g).bfloat16()
    x, w, a, b, go = (v.to(DEVICE) for v in (x, w, a, b, go))
    return x, _offsets(counts), rg.quantize_grouped_weight_ref(w, fmt), a, b, go


# Uneven groups; the first and the last expert get no token; T odd.
COUNTS = [0, 5, 17, 1, 0, 14]


@pytest.mark.parametrize("pair", [("bf16", "bf16"), ("bf16", "fp8_block"), ("bf16", "nf4"), ("bf16", "nvfp4"),
                                  ("fp8", "fp8_row"), ("fp8", "fp8_block")], ids=lambda p: f"{p[0]}-{p[1]}")
def test_reference_is_a_loop_of_dense_references(pair) -> None:
    compute, fmt = pair
    x, offsets, wl, a, b, go = _case(COUNTS, 96, 192, 4, fmt, seed=1)
    y, h = rg.grouped_lora_linear_ref(x, offsets, wl, fmt, a, b, 2.0, compute)
    gi, ga, gb = rg.grouped_lora_linear_backward_ref(go, x, offsets, wl, fmt, a, b, h, 2.0, compute)
    bounds = offsets.tolist()
    for e in range(len(COUNTS)):
        rows = slice(bounds[e], bounds[e + 1])
        if rows.start == rows.stop:  # the dense reference cannot take 0 rows (its hidden.reshape(0, -1))
            continue
        w_e = rg.expert_weight(wl, e)
        y_e, h_e = ref.lora_linear_ref(x[rows], w_e, fmt, a[e], b[e], None, None, 2.0, compute, compute)
        gi_e, ga_e, gb_e, _ = ref.lora_linear_backward_ref(go[rows], x[rows], w_e, fmt, a[e], b[e], None, h_e,
                                                           2.0, compute)
        assert torch.equal(y[rows], y_e) and torch.equal(h[rows], h_e) and torch.equal(gi[rows], gi_e)
        assert torch.equal(ga[e], ga_e) and torch.equal(gb[e], gb_e)
    assert not ga[0].any() and not gb[4].any()  # an expert with no token gets no gradient
    assert ga[1].any() and gb[3].any()
    # Without the saved hidden the backward recomputes it: the same numbers.
    again = rg.grouped_lora_linear_backward_ref(go, x, offsets, wl, fmt, a, b, None, 2.0, compute)
    assert all(torch.equal(u, v) for u, v in zip(again, (gi, ga, gb)))


# (format, group sizes, rank, compute): every format on COUNTS in bf16 compute, fp8_block also in fp8 compute;
# bf16, nf4 (the flat per-expert layout) and fp8 compute also on a group of two M tiles beside two empty
# middle groups, at r = 16 (fp8 `slow`: the routed case below has groups of 3 M tiles in fp8 compute).
# Without `rows` (the down projection's path); fp8_block and nvfp4 in bf16 compute and bf16 at r = 4 are
# `slow`: the routed cases below run every format through the same weight tiles with `rows`.
KERNEL_CASES = [*(pytest.param(f, COUNTS, 4, "bf16", marks=pytest.mark.slow) for f in ("bf16", "fp8_block", "nvfp4")),
                ("nf4", COUNTS, 4, "bf16"), ("fp8_block", COUNTS, 4, "fp8"),
                *((f, [3, 0, 0, 30, 2], 16, "bf16") for f in ("bf16", "nf4")),
                pytest.param("fp8_block", [3, 0, 0, 30, 2], 16, "fp8", marks=pytest.mark.slow)]


@pytest.mark.parametrize("fmt,counts,r,compute", KERNEL_CASES,
                         ids=lambda v: v if isinstance(v, str) else str(v).replace(" ", ""))
def test_grouped_kernel_matches_reference(fmt, counts, r, compute) -> None:
    x, offsets, wl, a, b, go = _case(counts, 96, 192, r, fmt, seed=len(counts))
    y, h = grouped.grouped_lora_linear(x, offsets, wl, fmt, a, b, 2.0, compute)
    y_r, h_r = rg.grouped_lora_linear_ref(x, offsets, wl, fmt, a, b, 2.0, compute)
    assert y.shape == y_r.shape == (sum(counts), 96) and y.dtype == torch.bfloat16
    assert h.shape == h_r.shape == (sum(counts), r)
    assert sqnr(h, h_r) > FLOOR
    assert sqnr(y, y_r) > FLOOR

    gi, ga, gb = grouped.grouped_lora_linear_backward(go, x, offsets, wl, fmt, a, b, h, 2.0, compute)
    gi_r, ga_r, gb_r = rg.grouped_lora_linear_backward_ref(go, x, offsets, wl, fmt, a, b, h_r, 2.0, compute)
    assert gi.shape == x.shape and ga.shape == a.shape and gb.shape == b.shape
    assert ga.dtype == a.dtype == torch.float32 and gb.dtype == b.dtype and gi.dtype == x.dtype
    assert sqnr(gi, gi_r) > FLOOR
    assert sqnr(ga, ga_r) > FLOOR
    assert sqnr(gb, gb_r) > FLOOR
    empty = [e for e, c in enumerate(counts) if c == 0]
    assert not ga[empty].any() and not gb[empty].any()
    if compute == "fp8":  # the operands were quantized: far from the bf16-compute reference
        assert sqnr(y, rg.grouped_lora_linear_ref(x, offsets, wl, fmt, a, b, 2.0)[0]) < FP8_VS_BF16
        assert sqnr(gi, rg.grouped_lora_linear_backward_ref(go, x, offsets, wl, fmt, a, b, h_r, 2.0)[0]) < FP8_VS_BF16


def test_fp8_dgrad_reading_the_stored_stack_equals_the_k_major_copy(monkeypatch) -> None:
    """FP8_DGRAD_READS_STORED_STACK: the dgrad reads the stored (E, N, K) stack transposed instead of a
    K-major copy: the same FP8 products and block scales in the same order, so the same bits; the scale
    indexing of the transposed read (reduction block, output block) is what this pins."""
    x, offsets, wl, a, b, go = _case([3, 0, 0, 30, 2], 256, 192, 4, "fp8_block", seed=7)  # N: two 128 blocks
    h = grouped.grouped_lora_linear(x, offsets, wl, "fp8_block", a, b, 2.0, "fp8")[1]
    copy = grouped.grouped_lora_linear_backward(go, x, offsets, wl, "fp8_block", a, b, h, 2.0, "fp8")
    monkeypatch.setattr(grouped, "FP8_DGRAD_READS_STORED_STACK", True)
    stored = grouped.grouped_lora_linear_backward(go, x, offsets, wl, "fp8_block", a, b, h, 2.0, "fp8")
    assert torch.equal(stored[0], copy[0])
    ref_dx = rg.grouped_lora_linear_backward_ref(go, x, offsets, wl, "fp8_block", a, b, h, 2.0, "fp8")[0]
    assert sqnr(stored[0], ref_dx) > FLOOR


# ------------------------------------------------------------------ gathered input (rows)

ROUTED_E, ROUTED_TOKENS, TOP_K = 6, 37, 2


def _routed_case(fmt: str, r: int = 4, seed: int = 11):
    """MoE routing: each of T tokens picks TOP_K distinct experts (skewed, experts 0 and 4 never), the
    (token, expert) pairs sorted by expert give `rows = order // top_k` (S = T*k, every token in k groups)
    and the offsets; the input has 3 more tokens that no expert gets. -> (tokens, rows int64, offsets,
    weight list, A, B, grad_output (S, N))."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.tensor([0.0, 1.0, 4.0, 0.5, 0.0, 2.0])
    idx = torch.multinomial(weights.expand(ROUTED_TOKENS, -1), TOP_K, generator=g)
    expert_ids, order = torch.sort(idx.reshape(-1), stable=True)
    counts = torch.bincount(expert_ids, minlength=ROUTED_E).tolist()
    assert counts[0] == counts[4] == 0 and max(counts) > 32  # empty groups; one spans 3 M tiles, 2 T steps
    _, offsets, wl, a, b, go = _case(counts, 96, 192, r, fmt, seed)
    tokens = torch.randn(ROUTED_TOKENS + 3, 192, generator=g).bfloat16().to(DEVICE)
    return tokens, (order // TOP_K).to(DEVICE), offsets, wl, a, b, go


@pytest.mark.parametrize("pair", [("bf16", "bf16"), ("bf16", "nf4"), ("fp8", "fp8_row"), ("fp8", "fp8_block")],
                         ids=lambda p: f"{p[0]}-{p[1]}")
def test_reference_with_rows_is_the_reference_on_the_gathered_rows(pair) -> None:
    compute, fmt = pair
    tokens, rows, offsets, wl, a, b, go = _routed_case(fmt)
    x = tokens[rows]  # what the index stands for: the (S, K) copy
    y, h = rg.grouped_lora_linear_ref(tokens, offsets, wl, fmt, a, b, 2.0, compute, rows=rows)
    y_g, h_g = rg.grouped_lora_linear_ref(x, offsets, wl, fmt, a, b, 2.0, compute)
    assert y.shape == (rows.shape[0], 96) and h.shape == (rows.shape[0], 4)
    assert torch.equal(y, y_g) and torch.equal(h, h_g)
    for saved in (h, None):  # int32 rows too; without the saved hidden it is recomputed through rows
        got = rg.grouped_lora_linear_backward_ref(go, tokens, offsets, wl, fmt, a, b, saved, 2.0, compute,
                                                  rows=rows.int())
        want = rg.grouped_lora_linear_backward_ref(go, x, offsets, wl, fmt, a, b, h_g, 2.0, compute)
        assert got[0].shape == x.shape  # grad_input per grouped row: the caller sums it into the tokens
        assert all(torch.equal(u, v) for u, v in zip(got, want))


ROWS_CASES = [*((f, "bf16") for f in KERNEL_FORMATS), ("fp8_block", "fp8")]


@pytest.mark.parametrize("fmt,compute", ROWS_CASES)
def test_grouped_kernel_reads_rows_through_the_index(fmt, compute) -> None:
    tokens, rows, offsets, wl, a, b, go = _routed_case(fmt)
    s_rows = rows.shape[0]
    y, h = grouped.grouped_lora_linear(tokens, offsets, wl, fmt, a, b, 2.0, compute, rows=rows)
    y_r, h_r = rg.grouped_lora_linear_ref(tokens, offsets, wl, fmt, a, b, 2.0, compute, rows=rows)
    assert y.shape == (s_rows, 96) and h.shape == (s_rows, 4)
    assert sqnr(h, h_r) > FLOOR
    assert sqnr(y, y_r) > FLOOR

    gi, ga, gb = grouped.grouped_lora_linear_backward(go, tokens, offsets, wl, fmt, a, b, h, 2.0, compute,
                                                      rows=rows.int())
    gi_r, ga_r, gb_r = rg.grouped_lora_linear_backward_ref(go, tokens, offsets, wl, fmt, a, b, h_r, 2.0, compute,
                                                           rows=rows)
    assert gi.shape == (s_rows, 192) and gi.dtype == tokens.dtype and ga.shape == a.shape and gb.shape == b.shape
    assert sqnr(gi, gi_r) > FLOOR
    assert sqnr(ga, ga_r) > FLOOR
    assert sqnr(gb, gb_r) > FLOOR
    assert not ga[[0, 4]].any() and not gb[[0, 4]].any()


@pytest.mark.parametrize("compute,fmt", [("bf16", "bf16"), pytest.param("fp8", "fp8_block", marks=pytest.mark.slow)])
def test_grouped_kernel_with_rows_is_the_kernel_on_the_gathered_copy(compute, fmt) -> None:
    """Reading through the index changes which memory a tile loads, nothing else: bit for bit the
    kernels on `tokens[rows]`, the recomputed hidden (no saved one) included (one format per compute:
    the gather is the A operand's, the same code for every weight format). FP8: the T tokens are
    quantized once and their values and per-row block scales read through the index, which equals
    quantizing the gathered copy."""
    tokens, rows, offsets, wl, a, b, go = _routed_case(fmt, r=16)
    y, h = grouped.grouped_lora_linear(tokens, offsets, wl, fmt, a, b, 2.0, compute, rows=rows)
    y_g, h_g = grouped.grouped_lora_linear(tokens[rows], offsets, wl, fmt, a, b, 2.0, compute)
    assert torch.equal(y, y_g) and torch.equal(h, h_g)
    got = grouped.grouped_lora_linear_backward(go, tokens, offsets, wl, fmt, a, b, None, 2.0, compute, rows=rows)
    want = grouped.grouped_lora_linear_backward(go, tokens[rows], offsets, wl, fmt, a, b, h_g, 2.0, compute)
    assert all(torch.equal(u, v) for u, v in zip(got, want))


def test_each_row_takes_its_own_experts_weight() -> None:
    """Experts that differ by their LoRA only: expert e adds 400 to column 16 e (x = 1, A_e = 1/K, so
    hidden = 1 exactly); a tile mapped to the wrong expert, or a row left out, shows by its column."""
    counts = [7, 0, 9, 16]
    x, offsets, wl, a, b, _ = _case(counts, 64, 128, 4, "bf16", seed=5)
    x = torch.ones_like(x)
    a = torch.full_like(a, 1 / 128)
    b = torch.zeros_like(b)
    b[torch.arange(4), torch.arange(4) * 16] = 100.0
    y, h = grouped.grouped_lora_linear(x, offsets, wl, "bf16", a, b, 1.0)
    assert torch.equal(h, torch.ones_like(h))
    expected = torch.repeat_interleave(torch.tensor([0, 2, 3]), torch.tensor([7, 9, 16])) * 16
    assert torch.equal((y.float().abs() > 100).nonzero()[:, 1].cpu(), expected)


@pytest.mark.parametrize("compute,fmt", [("bf16", "nf4"), ("fp8", "fp8_block")])
def test_without_lora_and_without_tokens(compute, fmt) -> None:
    x, offsets, wl, a, b, go = _case([2, 9], 64, 128, 4, fmt, seed=6)
    y, h = grouped.grouped_lora_linear(x, offsets, wl, fmt, None, None, 1.0, compute)
    y_r, _ = rg.grouped_lora_linear_ref(x, offsets, wl, fmt, None, None, 1.0, compute)
    assert h.shape == (11, 0) and sqnr(y, y_r) > FLOOR
    gi, ga, gb = grouped.grouped_lora_linear_backward(go, x, offsets, wl, fmt, None, None, None, 1.0, compute)
    assert ga is None and gb is None
    gi_r = rg.grouped_lora_linear_backward_ref(go, x, offsets, wl, fmt, None, None, None, 1.0, compute)[0]
    assert sqnr(gi, gi_r) > FLOOR
    none = _offsets([0, 0])
    y0, h0 = grouped.grouped_lora_linear(x[:0], none, wl, fmt, a, b, 1.0, compute)
    assert y0.shape == (0, 64) and h0.shape == (0, 4)
    gi0, ga0, gb0 = grouped.grouped_lora_linear_backward(go[:0], x[:0], none, wl, fmt, a, b, h0, 1.0, compute)
    assert gi0.shape == (0, 128) and not ga0.any() and not gb0.any()


def test_refusals_say_what_to_do() -> None:
    x, offsets, wl, a, b, _ = _case([3, 4], 64, 128, 4, "bf16", seed=7)
    # FP8 compute: fp8_block weights only (the others run bf16 compute); NVFP4 compute nowhere.
    for fmt, compute in (("bf16", "fp8"), ("nf4", "fp8"), ("nvfp4", "fp8"), ("fp8_block", "nvfp4")):
        wq = rg.quantize_grouped_weight_ref(wl[0], fmt)
        with pytest.raises(ValueError, match=f"fp8 compute .* for fp8_block weights only; got compute '{compute}' "
                                             f"with weight_format '{fmt}'"):
            grouped.grouped_lora_linear(x, offsets, wq, fmt, a, b, 1.0, forward=compute)
        with pytest.raises(ValueError, match="for fp8_block weights only"):
            grouped.grouped_lora_linear_backward(x[:, :64], x, offsets, wq, fmt, a, b, None, 1.0, grad_input=compute)
    with pytest.raises(ValueError, match="valid pairs"):
        grouped.grouped_lora_linear(x, offsets, rg.quantize_grouped_weight_ref(wl[0], "fp8_row"), "fp8_row", a, b, 1.0)
    with pytest.raises(ValueError, match="int32"):
        grouped.grouped_lora_linear(x, offsets.long(), wl, "bf16", a, b, 1.0)
    with pytest.raises(ValueError, match="NVFP4's activation tensor scale"):
        rg.grouped_lora_linear_ref(x, offsets, wl, "bf16", a, b, 1.0, forward="nvfp4")
    with pytest.raises(ValueError, match="end at T=7"):
        rg.grouped_lora_linear_ref(x, _offsets([3, 3]), wl, "bf16", a, b, 1.0)
    with pytest.raises(ValueError, match=r"\(E=2, r, K=128\)"):
        rg.grouped_lora_linear_ref(x, offsets, wl, "bf16", a[:, :, :64], b, 1.0)
    nf4 = rg.quantize_grouped_weight_ref(torch.randn(2, 64, 96).bfloat16(), "nf4")
    with pytest.raises(ValueError, match="divisible by 64"):
        grouped.grouped_lora_linear(torch.randn(7, 96).bfloat16(), offsets, nf4, "nf4", None, None, 1.0)
    # A gathered input: offsets end at S = len(rows), the index is integer and in range (the reference
    # reads it; the kernels trust its values and check its type), grad_output has S rows.
    rows = torch.tensor([0, 2, 2, 1, 0, 1, 2, 0, 1])
    with pytest.raises(ValueError, match=r"end at S = len\(rows\)=9"):
        rg.grouped_lora_linear_ref(x[:3], offsets, wl, "bf16", a, b, 1.0, rows=rows)
    with pytest.raises(ValueError, match=r"values in \[0, 3\)"):
        rg.grouped_lora_linear_ref(x[:3], _offsets([4, 5]), wl, "bf16", a, b, 1.0, rows=rows + 1)
    with pytest.raises(ValueError, match="int32 or int64"):
        rg.grouped_lora_linear_ref(x[:3], _offsets([4, 5]), wl, "bf16", a, b, 1.0, rows=rows.float())
    with pytest.raises(ValueError, match="int32 or int64"):
        grouped.grouped_lora_linear(x[:3], _offsets([4, 5]), wl, "bf16", a, b, 1.0, rows=rows.view(3, 3))
    with pytest.raises(ValueError, match=r"grad_output \(9, N\)"):
        grouped.grouped_lora_linear_backward(torch.randn(3, 64), x[:3], _offsets([4, 5]), wl, "bf16", a, b, None,
                                             1.0, rows=rows)


# ---------------------------------------------------------------------------- PEFT's semantics


def _tiny_qwen3_moe_with_lora():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=True, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=[],
                           target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    model = peft.get_peft_model(model, lora)
    block = model.base_model.model.model.layers[0].mlp
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # PEFT starts with B = 0; make the LoRA term larger than the base weight's
        block.gate.weight.normal_(0, 1, generator=gen)
        for p in block.experts.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model, block


def _wrapper(block, parameter_name: str):
    """PEFT nests one ParamWrapper per targeted parameter; find the one of `parameter_name`."""
    layer = block.experts
    while getattr(layer, "parameter_name", None) != parameter_name:
        layer = layer.base_layer
    return layer


def test_peft_target_parameters_semantics() -> None:
    """A PEFT-wrapped Qwen3-MoE block equals two grouped references given the same routing, forward and
    LoRA gradients, when PEFT's factors are read by `lora_factors_from_peft`; read the other way
    (B expert-major like A) they do not."""
    from peft import get_peft_model_state_dict

    model, block = _tiny_qwen3_moe_with_lora()
    keys = {k.split("mlp.experts.", 1)[1]: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()
            if ".layers.0." in k}
    # The saved keys name the parameter only by nesting: the inner wrapper is gate_up_proj (E=4, r=4).
    assert keys == {"base_layer.lora_A.weight": (16, 64), "base_layer.lora_B.weight": (64, 16),
                    "lora_A.weight": (16, 32), "lora_B.weight": (64, 16)}
    experts = block.experts.get_base_layer()
    gu, dn = _wrapper(block, "gate_up_proj"), _wrapper(block, "down_proj")
    num_e, top_k = experts.num_experts, 2
    s = gu.scaling["default"]
    assert s == dn.scaling["default"] == 2.0  # lora_alpha / r

    hs = torch.randn(1, 9, 64, generator=torch.Generator().manual_seed(2)).bfloat16()
    gout = torch.randn(9, 64, generator=torch.Generator().manual_seed(3)).bfloat16()
    y_peft = block(hs).view(9, 64)
    (y_peft.float() * gout.float()).sum().backward()

    with torch.no_grad():
        _, weights, idx = block.gate(hs.view(9, 64))
    expert_ids, perm = torch.sort(idx.reshape(-1), stable=True)
    offsets = _offsets(torch.bincount(expert_ids, minlength=num_e).tolist())
    x = hs.view(9, 64)[perm // top_k]
    route_w = weights.reshape(-1)[perm].to(torch.bfloat16)

    def moe(a_gu, b_gu, a_dn, b_dn):
        """The block by the grouped reference, and its LoRA gradients (chain rule through SwiGLU)."""
        w_gu, w_dn = [experts.gate_up_proj.detach()], [experts.down_proj.detach()]
        y1, h1 = rg.grouped_lora_linear_ref(x, offsets, w_gu, "bf16", a_gu, b_gu, s)
        y1 = y1.requires_grad_()
        gate, up = y1.chunk(2, dim=-1)
        act = experts.act_fn(gate) * up
        y2, h2 = rg.grouped_lora_linear_ref(act.detach(), offsets, w_dn, "bf16", a_dn, b_dn, s)
        out = torch.zeros(9, 64).index_add_(0, perm // top_k, (y2 * route_w[:, None]).float()).bfloat16()
        g2 = (gout[perm // top_k] * route_w[:, None]).bfloat16()
        g_act, ga_dn, gb_dn = rg.grouped_lora_linear_backward_ref(g2, act.detach(), offsets, w_dn, "bf16",
                                                                  a_dn, b_dn, h2, s)
        (g1,) = torch.autograd.grad(act, y1, g_act)
        _, ga_gu, gb_gu = rg.grouped_lora_linear_backward_ref(g1, x, offsets, w_gu, "bf16", a_gu, b_gu, h1, s)
        return out, (ga_gu, gb_gu, ga_dn, gb_dn)

    def factors(layer, grad: bool = False):
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        return lora_factors_from_peft(a.grad if grad else a.detach(), b.grad if grad else b.detach(), num_e)

    y_ref, grads = moe(*factors(gu), *factors(dn))
    assert sqnr(y_ref, y_peft.detach()) > 38  # 45.7 dB measured
    for mine, peft_grad in zip(grads, (*factors(gu, True), *factors(dn, True))):
        assert sqnr(mine, peft_grad) > 38  # 44.8-48.0 dB measured

    def expert_major_b(layer):  # the wrong reading: B's columns e*r:(e+1)*r as expert e's
        a, _ = factors(layer)
        bw = layer.lora_B["default"].weight.detach()
        return a, bw.reshape(bw.shape[0], num_e, -1).permute(1, 0, 2)

    y_wrong, _ = moe(*expert_major_b(gu), *expert_major_b(dn))
    assert sqnr(y_wrong, y_peft.detach()) < 15  # -3.6 dB measured
