"""Pass 3: horizontal fusion of linears sharing an input (pass 4, producer fusion: test_passes_producer.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn

from surogate.modules import SurogateLinear
from surogate.passes import PassContext, nodes, run_pipeline
from surogate.passes.capture import capture_graph


class Block(nn.Module):
    """RMSNorm (HF spelling) -> q, k, v; SwiGLU (gate, up) -> down."""

    def __init__(self, h: int = 128, n_kv: int = 128) -> None:
        super().__init__()
        self.norm, self.norm2 = nn.Parameter(torch.ones(h)), nn.Parameter(torch.full((h,), 0.5))
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(h, h, False), nn.Linear(h, n_kv, False), nn.Linear(h, n_kv, False)
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(h, 256, False), nn.Linear(h, 256, False), nn.Linear(256, h, False)

    def forward(self, x):
        h = self._rms(x, self.norm)
        a = self.q_proj(h) + self.k_proj(h).sum(-1, keepdim=True) + self.v_proj(h).view(*h.shape[:-1], -1, 16).sum(-1).sum(-1, keepdim=True)
        h = self._rms(a, self.norm2)
        return a + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))

    @staticmethod
    def _rms(x, weight):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return weight * (x.float() * torch.rsqrt(var + 1e-6)).to(x.dtype)


TARGETS = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]


def _model(recipe: str | None = None, dropout: float = 0.0, n_kv: int = 128):
    torch.manual_seed(0)
    model = get_peft_model(Block(n_kv=n_kv).to(torch.bfloat16),
                           LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=dropout,
                                      init_lora_weights=False))
    if recipe is not None:
        for name in TARGETS:
            layer = getattr(model.base_model.model, name)
            layer.base_layer = SurogateLinear.from_linear(layer.base_layer, recipe)
    return model


def _ops(gm) -> int:
    return sum(1 for n in gm.graph.nodes if nodes.is_surogate_op(n))


def _run(model, recipe: str, x, horizontal: bool = True):
    gm, inputs = capture_graph(model, x)
    ctx = PassContext(recipe, "cpu", options={"horizontal": horizontal})
    counts = run_pipeline(gm, ctx)
    return gm, inputs, counts, ctx.report


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("recipe", ["bf16", "qfp8"])
def test_horizontal_fuses_qkv_and_gate_up_with_same_numbers(recipe):
    model = _model(None if recipe == "bf16" else recipe)
    x = torch.randn(2, 3, 128, dtype=torch.bfloat16)
    gm0, inputs0, _, _ = _run(model, recipe, x, horizontal=False)
    gm1, inputs1, counts, report = _run(model, recipe, x)
    assert counts["rewrite"] == 6 and counts["horizontal"] == 2
    assert _ops(gm0) == 6 and _ops(gm1) == 3  # qkv + gate/up + down
    fused = [members for what, members in report.groups if what.startswith("one GEMM")]
    assert sorted(len(m) for m in fused) == [2, 3]

    out0 = gm0(*inputs0)[0]
    out0.float().square().sum().backward()
    ref = _grads(model)
    model.zero_grad()
    out1 = gm1(*inputs1)[0]
    # Same quantized operands, same per-column sums: the outputs are equal; gradients differ only by the
    # order in which bf16 partial gradients are summed (and, for FP8 dgrad, per-row grad scales of the group).
    assert torch.equal(out1, out0)
    out1.float().square().sum().backward()
    for name, g in _grads(model).items():
        assert ((g - ref[name]).norm() / ref[name].norm()).item() < 1e-2, name


def test_horizontal_refuses_dropout_and_unaligned_fp8_blocks():
    x = torch.randn(2, 3, 128, dtype=torch.bfloat16)
    gm, _, counts, report = _run(_model(dropout=0.1), "bf16", x)
    assert counts["horizontal"] == 0 and _ops(gm) == 6
    assert any("dropout" in what for what, _ in report.groups)
    gm, _, counts, report = _run(_model("qfp8", n_kv=64), "qfp8", x)
    assert counts["horizontal"] == 1  # gate/up fuse (N=256); q/k/v refused (k, v have N=64)
    assert any("N % 128" in what for what, _ in report.groups)


def test_horizontal_refuses_fp8_row():
    x = torch.randn(2, 3, 128, dtype=torch.bfloat16)
    gm, _, counts, report = _run(_model("fp8"), "fp8", x)
    assert counts["horizontal"] == 0 and _ops(gm) == 6
    assert any("per-member scales" in what for what, _ in report.groups)
