"""surogate/passes/member_quantize.py: the 1x128 FP8 gradient quantize of a concatenated gradient, per member.

The per-member function against the twin it replaces (bit for bit, layout included); which backward ops the
pass rewrites and which it leaves; that Inductor's Triton scheduler then plans the quantize into the SwiGLU
backward of the tiny Qwen3 (no kernel of its own reading the cat back); and a compiled qfp8 model's loss and
gradients through Inductor on the CPU, with the pass and without, bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from bit_compare import bits
from numerics import odd_values
from torch.fx.experimental.proxy_tensor import make_fx

from surogate import ops
from surogate.kernels import reference as ref
from surogate.passes import member_quantize, post_grad

BACKWARD = torch.ops.surogate.lora_linear_backward.default
CONCAT = torch.ops.surogate.concat.default


@pytest.mark.parametrize("widths", [(128, 256), (384, 128, 128), (256, 256)], ids=str)
@pytest.mark.parametrize("lead", [(6,), (2, 5)], ids=str)
def test_members_quantized_apart_equal_the_twin_on_their_cat(widths, lead):
    members = [odd_values((*lead, w), seed=w + i) for i, w in enumerate(widths)]
    members[-1].view(-1)[3] = float("inf")  # a block with Inf gets the NaN scale in both
    data, scale = member_quantize.quantize_members(*members)
    want_data, want_scale = ref.quantize_fp8_block_ref(torch.cat(members, -1))
    assert data.shape == want_data.shape and data.stride() == want_data.stride()
    assert scale.shape == want_scale.shape and scale.stride() == want_scale.stride()
    assert torch.equal(bits(data), bits(want_data)) and torch.equal(bits(scale), bits(want_scale))


def _backward_graph(widths, fmt="fp8_block", dim=-1, quantized=True):
    """A traced backward like a fused GEMM's: a cat of computed gradients read by the op (with its
    gradient quantized by the twin, as grad_producer puts it) -> (graph module, example inputs)."""
    n, k = sum(widths), 128
    weight = ops.prepare_weight(torch.randn(n, k).bfloat16() / 16, fmt)
    quantizer = ops.grad_output_quantizer("fp8", fmt)

    def backward(x, weight, *parts):
        g = torch.cat([p * 2 for p in parts], dim)
        g_q = list(quantizer(g)) if quantized else None
        return BACKWARD(g, x, weight, fmt, None, None, None, None, 1.0, "fp8", g_q)[0]

    parts = [odd_values((2, 8, w), seed=w) for w in widths]
    if dim != -1:
        parts = [odd_values((2, 8 // len(widths), n), seed=i) for i in range(len(widths))]
    inputs = [odd_values((2, 8, k), seed=1), weight, *parts]
    return make_fx(backward, tracing_mode="fake")(*inputs), inputs


def test_the_pass_rewrites_a_block_aligned_cat_and_keeps_the_bits():
    gm, inputs = _backward_graph((256, 128))
    want = gm(*inputs)
    assert member_quantize.quantize_per_member(gm.graph) == 1
    gm.graph.lint()
    gm.recompile()
    op = next(n for n in gm.graph.nodes if n.target is BACKWARD)
    data, scale = op.args[10]
    assert data.target is torch.ops.aten.as_strided.default and data.args[0].target is CONCAT
    assert not any(n.target is torch.ops.aten.amax.default and n.args[0] is op.args[0] for n in gm.graph.nodes)
    assert sum(n.target is torch.ops.aten.amax.default for n in gm.graph.nodes) == 2  # one per member
    assert torch.equal(bits(gm(*inputs)), bits(want))
    assert member_quantize.quantize_per_member(gm.graph) == 0  # safe on a graph it has processed


@pytest.mark.parametrize("case", ["a member not whole blocks wide", "the fp8_row dgrad (a scale per row)",
                                  "no grad_output_q", "a cat along rows"])
def test_the_pass_leaves_what_it_cannot_split(case):
    kwargs = {"a member not whole blocks wide": {"widths": (192, 64)},
              "the fp8_row dgrad (a scale per row)": {"widths": (256, 128), "fmt": "fp8_row"},
              "no grad_output_q": {"widths": (256, 128), "quantized": False},
              "a cat along rows": {"widths": (256, 256), "dim": 1}}[case]
    gm, _ = _backward_graph(**kwargs)
    before = [n.target for n in gm.graph.nodes]
    assert member_quantize.quantize_per_member(gm.graph) == 0
    assert [n.target for n in gm.graph.nodes] == before


def test_inductor_plans_the_gate_up_quantize_into_the_swiglu_backward():
    """With the post-grad passes as compile runs them, the tiny Qwen3's qfp8 backward has no kernel that
    reduces over the whole gate/up gradient (M x 2 x 512, 1x128 blocks); the SwiGLU backward's kernel stores both
    bf16 halves and both FP8 halves. Before the pass: a kernel of its own (bench/results/profile_8b_h200.md)."""
    pytest.importorskip("triton")
    from inductor_kernels import tiny_qwen3_kernels
    from torch._inductor import config
    from test_passes_concat import _numel

    counts = []
    inner = post_grad.post_grad_pass()

    class Counting(type(inner)):
        def __call__(self, graph):
            counts.append(post_grad.run(graph))

    with config.patch(post_grad_custom_post_pass=Counting()):
        _, backward = tiny_qwen3_kernels("qfp8")
    assert [c["member_quantize"] for c in counts] == [0, 2]  # forward: none; backward: q/k/v and gate/up
    rows, inter = 2 * 128, 512
    whole_cat = [k for k in backward if k.reductions and _numel(k.group) * 128 == rows * 2 * inter]
    assert whole_cat == [], backward
    swiglu = [k for k in backward if _numel(k.group) * 128 == rows * inter and k.reductions == 2]
    assert len(swiglu) == 1 and swiglu[0].dtypes.count(torch.bfloat16) == 2, backward
    assert swiglu[0].dtypes.count(torch.float8_e4m3fn) == 2, backward


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd is returning a function")
def test_a_compiled_qfp8_model_through_inductor_gets_the_same_bits_with_the_pass(monkeypatch):
    import transformers as T

    import surogate
    from surogate.compiler import _attach_lora

    monkeypatch.setenv("SUROGATE_CPU_BACKEND", "inductor")
    rewritten = []

    def step(on: bool):
        torch._dynamo.reset()
        torch.manual_seed(0)
        cfg = T.Qwen3Config(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=64, vocab_size=512)
        model = _attach_lora(T.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16),
                             {"r": 8, "lora_alpha": 16, "init_lora_weights": False})
        original = member_quantize.quantize_per_member
        monkeypatch.setattr(member_quantize, "quantize_per_member",
                            lambda g: rewritten.append(original(g) if on else 0) or rewritten[-1])
        compiled = surogate.compile(model, recipe="qfp8", arch="cpu")
        ids = torch.randint(0, 512, (2, 128), generator=torch.Generator().manual_seed(1))
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters() if p.grad is not None]

    (loss_on, grads_on), (loss_off, grads_off) = step(True), step(False)
    torch._dynamo.reset()
    assert sum(rewritten) == 2  # the pass ran where it could (q/k/v and gate/up)
    assert torch.equal(loss_on, loss_off) and len(grads_on) == len(grads_off) == 14
    assert all(torch.equal(a, b) for a, b in zip(grads_on, grads_off))


def test_switching_it_off_changes_inductors_cache_key_and_the_bench_modifier_does(monkeypatch):
    from bench_module import load_bench

    on = post_grad.post_grad_pass().uuid()
    monkeypatch.setattr(member_quantize, "ENABLED", False)
    assert post_grad.post_grad_pass().uuid() != on  # a cached graph of the other setting is never served
    gm, _ = _backward_graph((256, 128))
    assert member_quantize.quantize_per_member(gm.graph) == 0
    assert load_bench("tps").surogate_system("surogate:qfp8+catquantize") == ("qfp8", {"member_quantize": False})
