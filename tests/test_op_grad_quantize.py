"""surogate/passes/op_grad_quantize.py: a qfp8 dgrad whose gradient no kernel of the graph produces (a cat, a graph
input) quantizes it with the op's own quantizer instead of a quantize in the graph. The rewrite on traced
backwards (same bits on the CPU: the op's reference quantizes as the twin did), what it leaves, Inductor's plan of
the tiny Qwen3's qfp8 backward, and the switch. The Triton quantizer's bits on the GPU:
tests/gpu/test_quantize_gpu.py."""

from __future__ import annotations

import pytest
import torch
from bit_compare import bits
from numerics import odd_values
from torch.fx.experimental.proxy_tensor import make_fx

from surogate import ops
from surogate.passes import op_grad_quantize, post_grad

BACKWARD = torch.ops.surogate.lora_linear_backward.default


def _backward_graph(fmt="fp8_block", quantized=True, gradient="cat"):
    """A traced backward whose gradient is a cat of computed members (q/k/v's), a graph input (down_proj's) or a
    computed tensor, quantized by the traced quantizer as grad_producer puts it, read by the op -> (graph module,
    example inputs)."""
    widths, k = (256, 128, 128), 128
    weight = ops.prepare_weight(torch.randn(sum(widths), k).bfloat16() / 16, fmt)
    quantizer = ops.grad_output_quantizer("fp8", fmt)

    def backward(x, weight, *parts):
        g = {"cat": lambda: torch.cat([p * 2 for p in parts], -1), "graph input": lambda: parts[0],
             "computed": lambda: torch.cat(parts, -1) * 2}[gradient]()
        g_q = list(quantizer(g)) if quantized else None
        return BACKWARD(g, x, weight, fmt, None, None, None, None, 1.0, "fp8", g_q)[0]

    parts = [odd_values((2, 8, sum(widths)), seed=2)] if gradient == "graph input" else \
        [odd_values((2, 8, w), seed=w + 1) for w in widths]
    inputs = [odd_values((2, 8, k), seed=1), weight, *parts]
    return make_fx(backward, tracing_mode="fake")(*inputs), inputs


@pytest.mark.parametrize("gradient", ["cat", "graph input"])
def test_an_unproduced_gradient_is_left_to_the_op_with_the_same_bits(gradient):
    gm, inputs = _backward_graph(gradient=gradient)
    want = gm(*inputs)
    assert op_grad_quantize.quantize_in_the_op(gm.graph) == 1
    gm.graph.lint()
    gm.recompile()
    op = next(n for n in gm.graph.nodes if n.target is BACKWARD)
    assert (op.args[10] if len(op.args) > 10 else op.kwargs.get("grad_output_q")) is None
    assert not any(n.target is torch.ops.aten.amax.default for n in gm.graph.nodes)  # the old quantize is gone
    assert torch.equal(bits(gm(*inputs)), bits(want))
    assert op_grad_quantize.quantize_in_the_op(gm.graph) == 0  # safe on a graph it has processed


@pytest.mark.parametrize("case", ["the fp8_row dgrad", "no grad_output_q", "a computed gradient"])
def test_other_dgrads_are_left(case):
    kwargs = {"the fp8_row dgrad": {"fmt": "fp8_row"}, "no grad_output_q": {"quantized": False},
              "a computed gradient": {"gradient": "computed"}}[case]
    gm, _ = _backward_graph(**kwargs)
    before = [(n.target, n.args) for n in gm.graph.nodes]
    assert op_grad_quantize.quantize_in_the_op(gm.graph) == 0
    assert [(n.target, n.args) for n in gm.graph.nodes] == before


def test_inductor_plans_no_kernel_reading_an_unproduced_gradient_back():
    """The tiny Qwen3's qfp8 backward (M = 2 x 128; q/k/v 256 + 128 + 128 wide, hidden 256): no 1 x 128 reduction over
    the q/k/v cat or down_proj's incoming gradient in Inductor's code (the op's Triton quantizer reads them), none
    over gate/up's (surogate::swiglu_backward quantizes it); o_proj's stays in the RMSNorm backward's graph."""
    pytest.importorskip("triton")
    from inductor_kernels import tiny_qwen3_post_grad
    from test_passes_concat import _numel

    counts, _, backward = tiny_qwen3_post_grad("qfp8")
    assert counts[1] == {"swiglu": 1, "swiglu_forward": 0, "op_grad_quantize": 2, "concat": 1}, counts
    rows = 2 * 128
    blocks = [_numel(k.group) * 128 // rows for k in backward if k.reductions and k.group[1] == 128]
    assert blocks == [256], backward  # o_proj's gradient (hidden 256) alone


def test_switching_it_off_changes_inductors_cache_key_and_the_bench_modifier_does(monkeypatch):
    from bench_module import load_bench

    on = post_grad.post_grad_pass().uuid()
    monkeypatch.setattr(op_grad_quantize, "ENABLED", False)
    assert post_grad.post_grad_pass().uuid() != on
    gm, _ = _backward_graph()
    assert op_grad_quantize.quantize_in_the_op(gm.graph) == 0
    assert load_bench("tps").surogate_system("surogate:qfp8+graphgradquantize") == ("qfp8", {"op_grad_quantize": False})
