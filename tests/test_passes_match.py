"""Pass 1 (match) on small Dynamo graphs of PEFT LoRA linears: counts, what is read, and refusals."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from surogate.ops.modules import SurogateLinear
from surogate.passes import PassContext
from surogate.passes.capture import capture_graph
from surogate.passes.match import match_lora_linears


class Proj(nn.Module):
    def __init__(self, k: int = 32, n: int = 48, bias: bool = False) -> None:
        super().__init__()
        self.q = nn.Linear(k, n, bias=bias)
        self.plain = nn.Linear(n, n, bias=False)

    def forward(self, x):
        return self.plain(self.q(x))


def _peft(dropout: float = 0.0, lora_bias: bool = False, bias: bool = False, recipe: str | None = None):
    torch.manual_seed(0)
    model = get_peft_model(Proj(bias=bias).to(torch.bfloat16),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q"], lora_dropout=dropout,
                                      lora_bias=lora_bias, init_lora_weights=False))
    if recipe is not None:
        layer = model.base_model.model.q
        layer.base_layer = SurogateLinear.from_linear(layer.base_layer, recipe)
    return model


def _match(model):
    x = torch.randn(3, 5, 32, dtype=torch.bfloat16)
    gm, _ = capture_graph(model, x)
    ctx = PassContext("bf16", "cpu")
    return match_lora_linears(gm, ctx), ctx


def test_match_peft_linear_reads_scale_format_and_input():
    n, ctx = _match(_peft())
    assert n == 1 and not ctx.report.fallbacks
    m = ctx.matches[0]
    assert m.scale == 2.0 and m.weight_format == "bf16" and m.dropout is None and m.bias is None
    assert m.name.endswith("q")
    assert m.input is m.dead[-1].args[0]  # the base GEMM's own input


def test_match_with_dropout_and_bias():
    n, ctx = _match(_peft(dropout=0.1, bias=True))
    assert n == 1
    assert ctx.matches[0].dropout is not None and ctx.matches[0].bias is not None


@pytest.mark.parametrize("recipe,fmt,fwd", [("qfp8", "fp8_block", "fp8"), ("qnf4", "nf4", "bf16")])
def test_match_surogate_base_layer(recipe, fmt, fwd):
    n, ctx = _match(_peft(recipe=recipe))
    assert n == 1
    m = ctx.matches[0]
    assert (m.weight_format, m.forward) == (fmt, fwd)
    assert len(m.weight) == {"fp8_block": 2, "nf4": 5}[fmt]


def test_lora_bias_is_reported_not_matched():
    n, ctx = _match(_peft(lora_bias=True))
    assert n == 0
    assert len(ctx.report.fallbacks) == 1
    name, reason = ctx.report.fallbacks[0]
    assert name.endswith("q") and "bias" in reason
    assert "fallback" in str(ctx.report)


def test_plain_linear_is_not_a_target():
    torch.manual_seed(0)
    gm, _ = capture_graph(Proj().to(torch.bfloat16), torch.randn(2, 32, dtype=torch.bfloat16))
    ctx = PassContext("bf16", "cpu")
    assert match_lora_linears(gm, ctx) == 0 and not ctx.report.linears


class DroppedProj(Proj):
    """A dropout of the model's own before the target (T5's `wo`, Whisper's `fc2`, ModernBERT's `Wo`)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.drop = nn.Dropout(p)

    def forward(self, x):
        return self.plain(self.q(self.drop(x)))


@pytest.mark.parametrize("p, lora_dropout", [(0.0, 0.0), (0.1, 0.0), (0.1, 0.2)])
def test_a_models_dropout_before_the_layer_is_its_input(p, lora_dropout):
    """Both the base layer and the LoRA branch read the dropout's output: that is the layer's input, and only the
    LoRA branch's own dropout is the match's. Before, the walk down the LoRA branch went past the model's dropout
    too, and such layers were left unfused ("the LoRA branch does not read the base layer's input")."""
    torch.manual_seed(0)
    model = get_peft_model(DroppedProj(p).to(torch.bfloat16).train(),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q"], lora_dropout=lora_dropout,
                                      init_lora_weights=False))
    n, ctx = _match(model)
    assert n == 1 and not ctx.report.fallbacks, str(ctx.report)
    m = ctx.matches[0]
    assert (m.dropout is not None) == (lora_dropout > 0)
    assert m.input is m.dead[-1].args[0]
