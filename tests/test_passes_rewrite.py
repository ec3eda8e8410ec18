"""Pass 2 (rewrite): the matched LoRA linear becomes one surogate op; numbers, counts, refusals."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from surogate.ops.modules import SurogateLinear
from surogate.passes import PassContext, nodes, run_pipeline
from surogate.passes.capture import capture_graph
from surogate.passes.match import match_lora_linears
from surogate.passes.rewrite import rewrite_lora_linears, supports, why_not
from surogate.recipes import get


class Proj(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(32, 48, bias=True)

    def forward(self, x):
        return self.q(x)


def _model(dtype=torch.bfloat16, recipe: str | None = None, dropout: float = 0.0):
    torch.manual_seed(0)
    model = get_peft_model(Proj().to(dtype), LoraConfig(r=4, lora_alpha=8, target_modules=["q"],
                                                        lora_dropout=dropout, init_lora_weights=False))
    if recipe is not None:
        layer = model.base_model.model.q
        layer.base_layer = SurogateLinear.from_linear(layer.base_layer, recipe)
    return model


def _count(gm, pred) -> int:
    return sum(1 for n in gm.graph.nodes if pred(n))


def _lora_grads(model):
    return [p.grad.clone() for n, p in model.named_parameters() if "lora_" in n]


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


@pytest.mark.parametrize("recipe", [None, "qfp8", "qnf4"])
def test_rewrite_matches_eager_numbers_and_counts(recipe):
    model = _model(recipe=recipe)
    x = torch.randn(3, 5, 32, dtype=torch.bfloat16, requires_grad=True)
    eager = model(x)
    eager.float().square().sum().backward()
    ref_grads, ref_dx = _lora_grads(model), x.grad.clone()
    model.zero_grad(), x.grad.zero_()

    gm, inputs = capture_graph(model, x)
    counts = run_pipeline(gm, PassContext(recipe or "bf16", "cpu"))
    assert counts["match"] == 1 and counts["rewrite"] == 1
    assert _count(gm, nodes.is_surogate_op) == 1 and _count(gm, nodes.is_linear) == 0
    op = next(n for n in gm.graph.nodes if nodes.is_surogate_op(n))
    assert op.args[3] is not None and op.args[7] == 2.0  # LoRA A attached, scale read

    out = gm(*inputs)[0]
    assert out.dtype == torch.bfloat16 and out.shape == eager.shape
    assert _rel(out, eager) < 1e-2  # LoRA branch in bf16 (fused) vs FP32 (PEFT): bf16 rounding
    out.float().square().sum().backward()
    for g, ref in zip(_lora_grads(model), ref_grads):
        assert _rel(g, ref) < 2e-2
    assert _rel(x.grad, ref_dx) < 2e-2


def test_dropout_becomes_lora_input_only_in_training():
    model = _model(dropout=0.25)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    for training, has_input in ((True, True), (False, False)):
        model.train(training)
        gm, _ = capture_graph(model, x)
        run_pipeline(gm, PassContext("bf16", "cpu"))
        op = next(n for n in gm.graph.nodes if nodes.is_surogate_op(n))
        assert (op.args[5] is not None) is has_input


def test_checker_refuses_float32_activations():
    model = _model(dtype=torch.float32)
    x = torch.randn(2, 32)
    gm, inputs = capture_graph(model, x)
    before = _count(gm, nodes.is_linear)
    ctx = PassContext("bf16", "cpu")
    assert match_lora_linears(gm, ctx) == 1
    assert rewrite_lora_linears(gm, ctx) == 0
    assert _count(gm, nodes.is_linear) == before and _count(gm, nodes.is_surogate_op) == 0
    (name, reason), = ctx.report.fallbacks
    assert "bfloat16" in reason and name.endswith("q")
    assert torch.allclose(gm(*inputs)[0], model(x))


def test_checker_refuses_a_refused_plan(monkeypatch):
    # No (recipe, arch) pair of today's table is refused (FP4 is emulated where it is not native), so a
    # refusing plan stands in for the one a future arch without FP8 tensor cores would give.
    import types

    from surogate.kernels.plan import Support
    from surogate.passes import rewrite

    meta = {"input_dtype": torch.bfloat16, "lora_rank": 4, "lora_b_rank": 4}
    assert supports(get("fp8"), "sm_89", meta)  # sm_89 has FP8 tensor cores
    monkeypatch.setattr(rewrite, "plan", lambda recipe, arch: types.SimpleNamespace(support=Support.REFUSED))
    assert not supports(get("fp8"), "sm_89", meta)
    assert why_not(get("fp8"), "sm_89", meta) == "recipe fp8 is refused on sm_89"
    monkeypatch.undo()
    assert why_not(get("bf16"), "cpu", {**meta, "lora_b_rank": 8}) == "LoRA A and B ranks differ"
