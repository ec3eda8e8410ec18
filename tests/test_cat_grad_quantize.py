"""surogate/passes/cat_grad_quantize.py: a qfp8 dgrad whose gradient is a cat quantizes it with the op's own
quantizer instead of a quantize in the graph. The rewrite on traced backwards (same bits on the CPU: the op's
reference quantizes as the twin did), what it leaves, Inductor's plan of the tiny Qwen3's qfp8 backward, and the
switch. The Triton quantizer's bits on the GPU: tests/gpu/test_quantize_gpu.py."""

from __future__ import annotations

import pytest
import torch
from bit_compare import bits
from numerics import odd_values
from torch.fx.experimental.proxy_tensor import make_fx

from surogate import ops
from surogate.passes import cat_grad_quantize, post_grad

BACKWARD = torch.ops.surogate.lora_linear_backward.default


def _backward_graph(fmt="fp8_block", quantized=True, cat=True):
    """A traced backward like a fused q/k/v GEMM's: the members' gradients concatenated (or one gradient), quantized
    by the traced quantizer as grad_producer puts it, read by the op -> (graph module, example inputs)."""
    widths, k = (256, 128, 128), 128
    weight = ops.prepare_weight(torch.randn(sum(widths), k).bfloat16() / 16, fmt)
    quantizer = ops.grad_output_quantizer("fp8", fmt)

    def backward(x, weight, *parts):
        g = torch.cat([p * 2 for p in parts], -1) if cat else torch.cat(parts, -1) * 2
        g_q = list(quantizer(g)) if quantized else None
        return BACKWARD(g, x, weight, fmt, None, None, None, None, 1.0, "fp8", g_q)[0]

    inputs = [odd_values((2, 8, k), seed=1), weight, *[odd_values((2, 8, w), seed=w + 1) for w in widths]]
    return make_fx(backward, tracing_mode="fake")(*inputs), inputs


def test_a_cat_gradient_is_left_to_the_op_with_the_same_bits():
    gm, inputs = _backward_graph()
    want = gm(*inputs)
    assert cat_grad_quantize.quantize_cats_in_the_op(gm.graph) == 1
    gm.graph.lint()
    gm.recompile()
    op = next(n for n in gm.graph.nodes if n.target is BACKWARD)
    assert (op.args[10] if len(op.args) > 10 else op.kwargs.get("grad_output_q")) is None
    assert not any(n.target is torch.ops.aten.amax.default for n in gm.graph.nodes)  # the old quantize is gone
    assert torch.equal(bits(gm(*inputs)), bits(want))
    assert cat_grad_quantize.quantize_cats_in_the_op(gm.graph) == 0  # safe on a graph it has processed


@pytest.mark.parametrize("case", ["the fp8_row dgrad", "no grad_output_q", "a gradient that is no cat"])
def test_other_dgrads_are_left(case):
    kwargs = {"the fp8_row dgrad": {"fmt": "fp8_row"}, "no grad_output_q": {"quantized": False},
              "a gradient that is no cat": {"cat": False}}[case]
    gm, _ = _backward_graph(**kwargs)
    before = [(n.target, n.args) for n in gm.graph.nodes]
    assert cat_grad_quantize.quantize_cats_in_the_op(gm.graph) == 0
    assert [(n.target, n.args) for n in gm.graph.nodes] == before


def test_inductor_plans_no_kernel_reading_the_qkv_gradient_back():
    """The tiny Qwen3's qfp8 backward (M = 2 x 128; q/k/v 256 + 128 + 128 wide): no reduction over the q/k/v
    gradient's 1 x 128 blocks in Inductor's code (the op's Triton quantizer reads it), and none over gate/up's
    (surogate::swiglu_backward quantizes it)."""
    pytest.importorskip("triton")
    from inductor_kernels import tiny_qwen3_post_grad
    from test_passes_concat import _numel

    counts, backward = tiny_qwen3_post_grad("qfp8")
    assert counts[1] == {"swiglu": 1, "cat_grad_quantize": 1, "concat": 1}, counts
    rows = 2 * 128
    for width in (512, 2 * 512):  # q/k/v, gate/up
        assert not [k for k in backward if k.reductions and k.group[1] == 128 and _numel(k.group) * 128 == rows * width]


def test_switching_it_off_changes_inductors_cache_key_and_the_bench_modifier_does(monkeypatch):
    from bench_module import load_bench

    on = post_grad.post_grad_pass().uuid()
    monkeypatch.setattr(cat_grad_quantize, "ENABLED", False)
    assert post_grad.post_grad_pass().uuid() != on
    gm, _ = _backward_graph()
    assert cat_grad_quantize.quantize_cats_in_the_op(gm.graph) == 0
    assert load_bench("tps").surogate_system("surogate:qfp8+catgraphquantize") == ("qfp8", {"cat_grad_quantize": False})
