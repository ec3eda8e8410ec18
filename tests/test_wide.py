"""The bf16 LoRA linear as one GEMM over the reduction widened by the rank (surogate/kernels/wide.py).

On the CPU the wide route runs through the CUDA launcher on CPU tensors (its GEMM is a plain `torch.mm`), and
the compile path runs with the arch table patched so that the CPU counts as a wide arch: the passes, the
weights stored wide and the compiled backward's wide gradients are the ones a GPU gets.
"""

from __future__ import annotations

import gc

import pytest
import torch

from surogate.kernels import launch, variants, wide
from surogate.kernels.reference import lora_linear_backward_ref, lora_linear_ref
from surogate.recipes.recipe import Compute, WeightFormat

M, K, N, R, SCALE = 1024, 64, 96, 16, 2.0


@pytest.fixture(autouse=True)
def wide_on_sm90(monkeypatch):
    """The wide route where it is a candidate (the launcher routes CPU tensors as sm_90)."""
    monkeypatch.setattr(variants, "WIDE_SM", dict(variants.WIDE_SM_CANDIDATE))


def _case(seed: int = 0, bias: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).bfloat16()
    w = (torch.randn(N, K, generator=g) / 8).bfloat16()
    a = torch.randn(R, K, generator=g) / 8
    b = torch.randn(N, R, generator=g) / 8
    go = torch.randn(M, N, generator=g).bfloat16()
    return x, w, a, b, go, (torch.randn(N, generator=g).bfloat16() if bias else None)


def _stored_wide(t: torch.Tensor, spare: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(t's view, the wide tensor): `t` stored with `spare` columns more, as a producer would write it."""
    stored = torch.cat([t, torch.full((*t.shape[:-1], spare), float("nan"), dtype=t.dtype)], -1)
    return stored[..., :t.shape[-1]], stored


@pytest.mark.parametrize("bias", [False, True])
def test_the_wide_gemm_computes_the_op(bias) -> None:
    x, w, a, b, go, bias_t = _case(bias=bias)
    weight = wide.reserve(w.clone(), wide.spare_for(R))
    xv, xw = _stored_wide(x, 16)  # NaN in the spare columns: the op must write them before the GEMM reads them
    with variants.trace() as ran:
        out, hidden = launch.lora_linear_cuda(xv, [weight], WeightFormat.BF16, a, b, None, bias_t, SCALE,
                                              Compute.BF16, Compute.BF16, input_q=[xw])
    assert [r.engine for r in ran] == [variants.Engine.CUBLAS_WIDE]
    ref, ref_hidden = lora_linear_ref(x, [w], WeightFormat.BF16, a, b, None, bias_t, SCALE, Compute.BF16,
                                      Compute.BF16)
    assert torch.equal(hidden, ref_hidden)
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)
    assert torch.isfinite(out).all()

    gv, gw = _stored_wide(go, 24)
    with variants.trace() as ran:
        dx, da, db, _ = launch.lora_linear_backward_cuda(gv, xv, [weight], WeightFormat.BF16, a, b, None, hidden,
                                                         SCALE, Compute.BF16, grad_output_q=[gw])
    assert [r.engine for r in ran] == [variants.Engine.CUBLAS_WIDE]
    rdx, rda, rdb, _ = lora_linear_backward_ref(go, x, [w], WeightFormat.BF16, a, b, None, hidden, SCALE,
                                                Compute.BF16)
    torch.testing.assert_close(dx.float(), rdx.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(da, rda, rtol=1e-2, atol=1e-1)
    torch.testing.assert_close(db, rdb, rtol=1e-2, atol=1e-1)
    # The frozen weight itself is untouched: only its spare columns and rows were written.
    assert torch.equal(weight, w)


def test_without_room_in_either_operand_the_op_takes_its_other_route() -> None:
    x, w, a, b, _, _ = _case()
    weight = wide.reserve(w.clone(), wide.spare_for(R))
    ref, _ = lora_linear_ref(x, [w], WeightFormat.BF16, a, b, None, None, SCALE, Compute.BF16, Compute.BF16)
    cases = [(weight, 8),  # the activation has 8 spare columns, the rank is 16
             (weight.contiguous(), 16),  # a copy of the weight: no spare columns (not reserved)
             (w, 16)]
    for wt, spare in cases:
        xv, xw = _stored_wide(x, spare)
        xw[..., K:] = 0
        with variants.trace() as ran:
            out, _ = launch.lora_linear_cuda(xv, [wt], WeightFormat.BF16, a, b, None, None, SCALE, Compute.BF16,
                                             Compute.BF16, input_q=[xw])
        assert all(r.engine is not variants.Engine.CUBLAS_WIDE for r in ran)
        torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)


def test_only_the_whole_reserved_view_has_spare_room() -> None:
    w = torch.randn(40, 32).bfloat16()
    view = wide.reserve(w, 16)
    assert torch.equal(view, w) and view.stride() == (48, 1)
    assert wide.reserved_spare(view) == 16
    assert wide.reserved_spare(view[:20]) == 0  # the rows after it are the other rows, not spare
    assert wide.reserved_spare(view[:, :16]) == 0
    assert wide.reserved_spare(view.contiguous()) == 0
    assert wide.reserved_spare(w) == 0
    with pytest.raises(ValueError, match="multiple of 8"):
        wide.reserve(w, 12)
    param = torch.nn.Parameter(torch.zeros(40, 32), requires_grad=False)
    param.data = wide.reserve(param.data, 8)  # the view's Python object is gone, its storage is the param's
    gc.collect()
    assert wide.reserved_spare(param) == 8
    other = torch.empty(40 * 40)  # strides that would fit, a storage of another size: never spare
    assert wide.reserved_spare(other.as_strided((40, 32), (40, 1))) == 0


def test_the_route_takes_wide_operands_only_where_the_table_says() -> None:
    v = variants.variant(variants.Gemm.OUTPUT, Compute.BF16, WeightFormat.BF16)
    fp8 = variants.variant(variants.Gemm.OUTPUT, Compute.FP8, WeightFormat.FP8_ROW)
    rows = variants.WIDE_SM_CANDIDATE["sm_90"]
    assert variants.route(v, "sm_90", rows, 4096, 4096, rank=16, wide=True).engine is variants.Engine.CUBLAS_WIDE
    assert variants.route(v, "sm_90", rows - 1, 4096, 4096, rank=16, wide=True).engine is not variants.Engine.CUBLAS_WIDE
    assert variants.route(v, "sm_90", rows, 4096, 4096, rank=None, wide=True).engine is not variants.Engine.CUBLAS_WIDE
    assert variants.route(v, "sm_89", rows, 4096, 4096, rank=16, wide=True).engine is not variants.Engine.CUBLAS_WIDE
    assert variants.route(v, "sm_90", rows, 4096, 4096, rank=16).engine is not variants.Engine.CUBLAS_WIDE
    assert not fp8.takes_wide


# --- compiled: the passes, the stored weights, the backward ----------------------------------------------------

def _tiny_qwen3(**compile_options):
    import transformers as T

    import surogate
    from surogate.compiler import _attach_lora

    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = T.Qwen3Config(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=64, vocab_size=512)
    model = _attach_lora(T.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16),
                         {"r": 8, "lora_alpha": 16, "init_lora_weights": False})
    return surogate.compile(model, recipe="bf16", arch="cpu", **compile_options)


def _step(model) -> tuple[float, dict]:
    ids = torch.randint(0, 512, (2, 128), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def cpu_is_wide(monkeypatch):
    monkeypatch.setattr(variants, "WIDE_SM", {"cpu": 1})


def test_compile_stores_weights_and_inputs_wide_and_trains_the_same(cpu_is_wide) -> None:
    model = _tiny_qwen3()
    loss, grads = _step(model)
    report = str(model.surogate_report)  # complete once Dynamo compiled the first forward
    assert "8 frozen weights stored with spare columns" in report  # 2 layers x (qkv, gate_up, o, down)
    wide_inputs = [line for line in report.splitlines() if "input stored with" in line]
    # q/k/v (rank 3 x 8) and gate/up (2 x 8) behind their RMSNorms, down behind the SwiGLU; o_proj's input is
    # the attention output's layout copy, which would be copied once more into a wide buffer: left as it is.
    assert len(wide_inputs) == 3 and not any("o_proj" in line for line in wide_inputs), wide_inputs
    assert any("24 spare columns" in line and "q_proj" in line for line in wide_inputs)
    layer = model.base_model.model.model.layers[0]
    assert wide.reserved_spare(layer.mlp.down_proj.base_layer.weight) == 8
    assert wide.reserved_spare(layer.self_attn.q_proj.base_layer.w0) == 24  # the packed q/k/v buffer

    plain_loss, plain_grads = _step(_tiny_qwen3(wide_lora=False))
    assert loss == plain_loss
    assert grads.keys() == plain_grads.keys()
    for name in grads:  # the reference ops read the same numbers: bit for bit
        assert torch.equal(grads[name], plain_grads[name]), name


def test_undo_gives_every_weight_its_own_contiguous_copy_back(cpu_is_wide) -> None:
    from surogate.weight_packing import _contiguous_weights

    model = _tiny_qwen3()
    layer = model.base_model.model.model.layers[0]
    before = layer.mlp.down_proj.base_layer.weight.clone()
    targets = [(n, m) for n, m in model.named_modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")]
    _contiguous_weights(targets)
    weight = layer.mlp.down_proj.base_layer.weight
    assert weight.is_contiguous() and torch.equal(weight, before)
    assert layer.self_attn.q_proj.base_layer.w0.is_contiguous()


def test_nf4_dequantizes_into_a_wide_scratch_and_runs_the_wide_gemm() -> None:
    from surogate import ops
    from surogate.kernels.dequantize import dequantize_nf4

    x, w, a, b, go, _ = _case()
    nf4 = ops.prepare_weight(w, "nf4")
    dense = dequantize_nf4(*nf4, shape=(N, K))
    into = wide.wide_scratch(N, K, 16, x.device)
    assert torch.equal(dequantize_nf4(*nf4, shape=(N, K), out=into), dense)  # the rows 16 further apart
    with pytest.raises(ValueError, match="unit column stride"):
        dequantize_nf4(*nf4, shape=(N, K), out=torch.empty(K, N, dtype=torch.bfloat16).t())
    xv, xw = _stored_wide(x, 16)
    with variants.trace() as ran:
        out, hidden = launch.lora_linear_cuda(xv, nf4, WeightFormat.NF4, a, b, None, None, SCALE, Compute.BF16,
                                              Compute.BF16, input_q=[xw])
        gv, gw = _stored_wide(go, 16)
        dx, _, _, _ = launch.lora_linear_backward_cuda(gv, xv, nf4, WeightFormat.NF4, a, b, None, hidden, SCALE,
                                                       Compute.BF16, grad_output_q=[gw])
    assert [(r.engine, r.scratch) for r in ran] == [(variants.Engine.CUBLAS_WIDE, True)] * 2
    ref, _ = lora_linear_ref(x, [dense], WeightFormat.BF16, a, b, None, None, SCALE, Compute.BF16, Compute.BF16)
    rdx, _, _, _ = lora_linear_backward_ref(go, x, [dense], WeightFormat.BF16, a, b, None, hidden, SCALE, Compute.BF16)
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(dx.float(), rdx.float(), rtol=1e-2, atol=1e-2)
