"""SwiGLU's backward as one op (kernels/swiglu.py, ops/swiglu.py, passes/swiglu.py).

The Triton kernel (under the interpreter) against its plain-torch twin and against autograd through the
model's own `silu(g) * u`; its FP8 outputs against `quantize_fp8_block_ref` of its bf16 gradient, bit for bit;
the op's fake against its implementation (opcheck); the torch-level pass's choices; the post-grad rewrite on a
traced backward; Inductor's plan of the tiny Qwen3's qfp8 backward; and a compiled qfp8 model through Inductor
on the CPU with the passes and without. tests/gpu/test_swiglu_gpu.py runs the kernel and the model on CUDA.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from bit_compare import bits
from numerics import odd_values
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from surogate import ops
from surogate.kernels import reference_swiglu
from surogate.kernels import swiglu as kernel
from surogate.kernels.reference_formats import quantize_fp8_block_ref
from surogate.ops.swiglu import swiglu, swiglu_backward_cuda, swiglu_forward_cuda, swiglu_fused
from surogate.passes import post_grad
from surogate.passes import swiglu as swiglu_pass

BF16 = torch.bfloat16
OP = torch.ops.surogate.swiglu_backward.default
FORWARD_OP = torch.ops.surogate.swiglu_forward.default
BACKWARD = torch.ops.surogate.lora_linear_backward.default


def assert_within_an_ulp(got: torch.Tensor, want: torch.Tensor, share: float = 1e-3) -> None:
    """The same bf16 values but for at most `share` of them one ulp apart (the interpreter's and CUDA's sigmoid
    are not torch's to the last FP32 bit), NaN where the other has NaN."""
    a, b = bits(got).int(), bits(want).int()
    assert torch.equal(got.isnan(), want.isnan())
    apart = (a - b).abs()
    assert apart.max() <= 1 and (apart > 0).float().mean() <= share, (apart > 0).sum()


def _strides(t: torch.Tensor) -> tuple[int, ...]:
    """The strides that matter: those of dimensions longer than 1."""
    return tuple(st for st, n in zip(t.stride(), t.shape) if n > 1)


def _operands(lead: tuple[int, ...], inter: int, seed: int, odd: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_h (..., I), gate_up (..., 2I)) bf16; `odd`: gate_up over a wide range with -0, zeros, NaN and Inf
    (numerics.odd_values), the blocks whose scales are 1 or NaN."""
    g = torch.Generator().manual_seed(seed)
    gate_up = odd_values((*lead, 2 * inter), seed) if odd else (torch.randn(*lead, 2 * inter, generator=g) * 3).to(BF16)
    return torch.randn(*lead, inter, generator=g).to(BF16), gate_up


ACTIVATIONS = pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
# (the kernels' name, the model's own torch function) of each gate
GATES = pytest.mark.parametrize("activation,act", [("silu", F.silu),
                                                   ("gelu_tanh", lambda g: F.gelu(g, approximate="tanh"))],
                                ids=["silu", "gelu_tanh"])


@pytest.mark.parametrize("lead,inter", [((40,), 256), ((2, 7), 128), ((3, 5), 384), ((1,), 128)], ids=str)
@pytest.mark.parametrize("odd", [False, True], ids=["normal", "odd values"])
@ACTIVATIONS
def test_the_kernel_gives_its_twins_bits_and_quantizes_its_own_gradient(lead, inter, odd, activation):
    grad_h, gate_up = _operands(lead, inter, seed=inter + len(lead), odd=odd)
    d, data, scale = swiglu_backward_cuda(grad_h, gate_up, activation, True)
    want_d, want_data, want_scale = reference_swiglu.swiglu_backward_ref(grad_h, gate_up, True, activation)
    assert_within_an_ulp(d, want_d)
    # the FP8 outputs are the 1x128 quantizer's of the gradient the kernel wrote, layout included
    q_data, q_scale = quantize_fp8_block_ref(d)
    assert data.shape == q_data.shape and data.stride() == q_data.stride()
    assert scale.shape == q_scale.shape and _strides(scale) == _strides(q_scale) == _strides(want_scale)
    assert torch.equal(bits(data), bits(q_data)) and torch.equal(bits(scale), bits(q_scale))
    plain, empty_data, empty_scale = swiglu_backward_cuda(grad_h, gate_up, activation, False)
    assert torch.equal(bits(plain), bits(d)) and empty_data.numel() == empty_scale.numel() == 0


@pytest.mark.parametrize("lead,inter", [((40,), 256), ((2, 7), 128), ((1,), 384)], ids=str)
@pytest.mark.parametrize("odd", [False, True], ids=["normal", "odd values"])
@ACTIVATIONS
def test_the_forward_kernel_gives_its_twins_h_and_quantizes_it(lead, inter, odd, activation):
    _, gate_up = _operands(lead, inter, seed=inter + 3, odd=odd)
    h, data, scale = swiglu_forward_cuda(gate_up, activation, True)
    want_h = reference_swiglu.swiglu_forward_ref(gate_up, False, activation)[0]
    assert_within_an_ulp(h, want_h)
    q_data, q_scale = quantize_fp8_block_ref(h)
    assert data.stride() == q_data.stride() and scale.shape == q_scale.shape and _strides(scale) == _strides(q_scale)
    assert torch.equal(bits(data), bits(q_data)) and torch.equal(bits(scale), bits(q_scale))
    plain, empty_data, _ = swiglu_forward_cuda(gate_up, activation, False)
    assert torch.equal(bits(plain), bits(h)) and empty_data.numel() == 0


def test_the_kernel_reads_a_gate_up_with_a_row_stride_of_its_own():
    grad_h, wide = _operands((24,), 384, seed=3)
    gate_up = wide[:, :256]  # rows 768 apart, as a slice of a wider buffer
    got = swiglu_backward_cuda(grad_h[:, :128], gate_up, "silu", True)
    want = swiglu_backward_cuda(grad_h[:, :128], gate_up.contiguous(), "silu", True)
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(got, want))


@GATES
def test_the_gradient_is_autograds_through_the_models_product_and_closer_to_fp32(activation, act):
    """Autograd of `act(g) * u` in bf16 rounds act(g) and dh * u on the way; the op rounds once, so it is nearer
    the FP32 gradient than eager bf16 is (first principles: autograd in FP32 of the same bf16 inputs). For the
    tanh GELU this checks the kernel's derivative against PyTorch's own GELU backward."""
    grad_h, gate_up = _operands((64,), 256, seed=5)

    def autograd(dtype):
        leaf = gate_up.to(dtype).requires_grad_()
        gate, up = leaf.split([256, 256], -1)
        (act(gate) * up).backward(grad_h.to(dtype))
        return leaf.grad.float()

    exact, eager = autograd(torch.float32), autograd(BF16)
    d = swiglu_backward_cuda(grad_h, gate_up, activation, False)[0].float()
    # GELU's derivative cancels near g = -3 (tiny values that eager's bf16 steps round differently): 2e-5 there
    torch.testing.assert_close(d, eager, rtol=2 ** -7, atol=1e-6 if activation == "silu" else 2e-5)
    # nearer FP32 by 0.8 (silu) or 0.9 (GELU, whose eager backward already computes a'(g) in FP32: one rounding less)
    assert (d - exact).abs().sum() < (0.8 if activation == "silu" else 0.9) * (eager - exact).abs().sum()


@pytest.mark.parametrize("case", ["I not whole blocks", "fp32", "grad_h of another width", "exact GELU"])
def test_shapes_the_kernel_cannot_take_get_a_clear_error(case):
    ones = lambda *shape, dtype=BF16: torch.ones(*shape, dtype=dtype)  # noqa: E731
    grad_h, gate_up = {"I not whole blocks": (ones(4, 96), ones(4, 192)),
                       "fp32": (ones(4, 128, dtype=torch.float32), ones(4, 256, dtype=torch.float32)),
                       "grad_h of another width": (ones(4, 256), ones(4, 256)),
                       "exact GELU": (ones(4, 128), ones(4, 256))}[case]
    with pytest.raises(ValueError, match="swiglu kernels"):
        kernel.swiglu_backward(grad_h, gate_up, activation="gelu" if case == "exact GELU" else "silu")


@pytest.mark.parametrize("quantize", [False, True])
@ACTIVATIONS
def test_the_ops_fakes_match_their_implementations(quantize, activation):
    grad_h, gate_up = _operands((2, 6), 128, seed=7)
    torch.library.opcheck(OP, (grad_h, gate_up, activation, quantize))
    torch.library.opcheck(FORWARD_OP, (gate_up, activation, quantize))


@ACTIVATIONS
def test_swiglu_fused_runs_the_forward_op_and_the_same_backward(activation):
    grad_h, gate_up = _operands((3, 4), 128, seed=10)
    leaf = gate_up.clone().requires_grad_()
    h = swiglu_fused(leaf, activation)
    assert torch.equal(bits(h), bits(reference_swiglu.swiglu_forward_ref(gate_up, False, activation)[0]))
    h.backward(grad_h)
    want = reference_swiglu.swiglu_backward_ref(grad_h, gate_up, False, activation)[0]
    assert torch.equal(bits(leaf.grad), bits(want))


@GATES
def test_swiglu_computes_the_models_product_and_differentiates_through_the_op(activation, act):
    grad_h, gate_up = _operands((3, 4), 128, seed=9)
    leaf = gate_up.clone().requires_grad_()
    h = swiglu(leaf, activation)
    gate, up = gate_up.chunk(2, -1)
    assert torch.equal(bits(h), bits(act(gate) * up))
    h.backward(grad_h)
    want = reference_swiglu.swiglu_backward_ref(grad_h, gate_up, False, activation)[0]
    assert torch.equal(bits(leaf.grad), bits(want))  # CPU: the twin


# --- The torch-level pass ---------------------------------------------------------------------------------------

def _compiled_swiglu_calls(recipe: str, model=None, **options) -> tuple[int, str, torch.Tensor, dict]:
    """(swiglu calls in the compiled block graphs, the report, the loss, the LoRA grads) of one training step of
    `model` (default: the CPU tiny Qwen3) compiled on the CPU."""
    from unittest import mock

    from tiny_qwen3 import cpu_lora_qwen3

    import surogate
    import surogate.passes as P
    from surogate.passes import nodes as N

    torch._dynamo.reset()
    calls = []
    original = swiglu_pass.use_swiglu_op

    def counting(gm, ctx):
        count = original(gm, ctx)
        calls.append(sum(N.is_swiglu(n) for n in gm.graph.nodes))
        return count

    pipeline = tuple((name, counting if name == "swiglu" else fn) for name, fn in P.PIPELINE)
    with mock.patch.object(P, "PIPELINE", pipeline), mock.patch("surogate.compiler.run_pipeline",
                                                                lambda gm, ctx: P.run_pipeline(gm, ctx, pipeline)):
        model = surogate.compile(model if model is not None else cpu_lora_qwen3(), recipe=recipe, arch="cpu",
                                 **options)
        ids = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(0))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    torch._dynamo.reset()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return sum(calls), str(model.surogate_report), loss.detach(), grads


def test_the_pass_puts_the_op_in_qfp8s_mlp_and_reports_it():
    calls, report, _, _ = _compiled_swiglu_calls("qfp8")
    assert calls == 1  # one block graph, shared by the layers: its gate/up product
    assert "surogate::swiglu_backward" in report


@pytest.mark.parametrize("recipe,options", [("bf16", {}), ("fp8", {}), ("qnf4", {}),
                                            ("qfp8", {"grad_producer": False}), ("qfp8", {"horizontal": False})],
                         ids=["bf16", "fp8 (row-scaled dgrad)", "qnf4", "qfp8 without grad_producer",
                              "qfp8 without horizontal fusion"])
def test_the_pass_leaves_products_whose_gradient_is_not_quantized_in_blocks(recipe, options):
    calls, report, _, _ = _compiled_swiglu_calls(recipe, **options)
    assert calls == 0 and "swiglu_backward" not in report


@pytest.mark.parametrize("name,calls", [("llama", 1), ("mistral", 1), ("qwen2", 1), ("phi3", 1), ("gemma2", 2),
                                       ("gemma3", 1)])
def test_other_architectures_get_the_op_where_their_mlp_is_swiglu_and_keep_their_loss(name, calls, monkeypatch):
    """Llama, Mistral, Qwen2 (gate_proj/up_proj fused horizontally) and Phi-3 (its own gate_up_proj, chunked, the
    product written `up * silu(gate)`) get the op in qfp8, and so do Gemma-2 and Gemma-3 (GeGLU: the tanh GELU)
    with `GEGLU` (on by default; none without). With the backward op and without: the same forward (the loss bit for
    bit), the gradients within the op's single rounding. With the forward op too (the default), h is rounded once
    where eager bf16 rounds act(g) first: the loss within 1e-3."""
    import transformers as T
    from test_compile_models import tiny_config

    from surogate.compiler import _attach_lora

    def model():
        torch.manual_seed(0)
        base = T.AutoModelForCausalLM.from_config(tiny_config(name)).to(BF16)
        return _attach_lora(base, {"r": 8, "lora_alpha": 16, "init_lora_weights": False})

    if name.startswith("gemma"):
        monkeypatch.setattr(swiglu_pass, "GEGLU", False)
        assert _compiled_swiglu_calls("qfp8", model())[0] == 0  # the GELU gate only with GEGLU
        monkeypatch.setattr(swiglu_pass, "GEGLU", True)
    found, report, loss_fused, grads_fused = _compiled_swiglu_calls("qfp8", model())
    assert found == calls and ("surogate::swiglu_forward" in report) == bool(calls)
    monkeypatch.setattr(swiglu_pass, "FORWARD_OP", False)
    found, report, loss_on, grads_on = _compiled_swiglu_calls("qfp8", model())
    monkeypatch.setattr(swiglu_pass, "ENABLED", False)
    _, _, loss_off, grads_off = _compiled_swiglu_calls("qfp8", model())
    assert found == calls and ("surogate::swiglu_backward" in report) == bool(calls)
    assert torch.equal(loss_on, loss_off)
    _assert_close_grads(grads_on, grads_off)
    assert abs(loss_fused - loss_off) <= 1e-3 * abs(loss_off)
    _assert_close_grads(grads_fused, grads_off)


def test_the_pass_matches_only_silu_of_the_first_half_times_the_second(monkeypatch):
    """Hand-made torch-level graphs: the product on the halves of a split, with the casts the models insert; not
    the halves swapped, not a split into unequal parts, not a cast to fp32 in between."""
    def graph(fn, width=256):
        gm = torch.fx.symbolic_trace(fn)
        x = torch.zeros(4, width, dtype=BF16)
        ShapeProp(gm).propagate(x)
        for n in gm.graph.nodes:
            tm = n.meta.get("tensor_meta")
            if isinstance(tm, TensorMetadata):
                n.meta["example_value"] = torch.empty(tm.shape, dtype=tm.dtype)
        return gm

    cases = {
        "the model's product": (lambda t: F.silu(torch.split(t, [128, 128], -1)[0].to(BF16))
                                * torch.split(t, [128, 128], -1)[1], False),
        "one split, casts": (lambda t: (lambda p: F.silu(p[0].to(BF16)) * p[1].to(BF16))(torch.split(t, 128, -1)),
                             True),
        "chunk": (lambda t: (lambda p: F.silu(p[0]) * p[1])(t.chunk(2, -1)), True),
        "halves swapped": (lambda t: (lambda p: F.silu(p[1]) * p[0])(torch.split(t, 128, -1)), False),
        "unequal parts": (lambda t: (lambda p: F.silu(p[0]) * p[1][..., :64])(torch.split(t, [64, 192], -1)), False),
        "fp32 in between": (lambda t: (lambda p: (F.silu(p[0].float()) * p[1].float()).to(BF16))(
            torch.split(t, 128, -1)), False),
        "tanh GELU (Gemma)": (lambda t: (lambda p: F.gelu(p[0], approximate="tanh") * p[1])(t.chunk(2, -1)), True),
        "exact GELU": (lambda t: (lambda p: F.gelu(p[0]) * p[1])(t.chunk(2, -1)), False),
    }
    monkeypatch.setattr(swiglu_pass, "GEGLU", True)
    for why, (fn, found) in cases.items():
        gm = graph(fn)
        sources = [swiglu_pass.gate_up_source(n) for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
        sources = [s for s in sources if s is not None]
        assert bool(sources) == found, why
        if sources:
            assert sources[0][1] == ("gelu_tanh" if "GELU" in why else "silu"), why


# --- The post-grad rewrite --------------------------------------------------------------------------------------

def _backward_graph(fmt="fp8_block", quantized=True):
    """A traced backward like qfp8's gate/up: the op's gradient, quantized by the traced quantizer as grad_producer
    puts it, read by the fused GEMM's backward -> (graph module, example inputs)."""
    inter, k = 128, 128
    weight = ops.prepare_weight(torch.randn(2 * inter, k).to(BF16) / 16, fmt)
    quantizer = ops.grad_output_quantizer("fp8", fmt)

    def backward(x, weight, grad_h, gate_up):
        g = OP(grad_h, gate_up, "silu", False)[0]
        g_q = list(quantizer(g)) if quantized else None
        return BACKWARD(g, x, weight, fmt, None, None, None, None, 1.0, "fp8", g_q)[0]

    grad_h, gate_up = _operands((2, 8), inter, seed=11)
    inputs = [torch.randn(2, 8, k).to(BF16), weight, grad_h, gate_up]
    return make_fx(backward, tracing_mode="fake")(*inputs), inputs


def test_the_rewrite_hands_the_dgrad_the_ops_fp8_and_keeps_the_bits():
    gm, inputs = _backward_graph()
    want = gm(*inputs)
    assert swiglu_pass.quantize_in_swiglu_backward(gm.graph) == 1
    gm.graph.lint()
    gm.recompile()
    producer = next(n for n in gm.graph.nodes if n.target is OP)
    backward = next(n for n in gm.graph.nodes if n.target is BACKWARD)
    assert producer.args[-1] is True and [a.args for a in backward.args[10]] == [(producer, 1), (producer, 2)]
    assert not any(n.target is torch.ops.aten.amax.default for n in gm.graph.nodes)  # the old quantize is gone
    assert torch.equal(bits(gm(*inputs)), bits(want))
    assert swiglu_pass.quantize_in_swiglu_backward(gm.graph) == 0  # safe on a graph it has processed


@pytest.mark.parametrize("case", ["the fp8_row dgrad (a scale per row)", "no grad_output_q"])
def test_the_rewrite_leaves_other_dgrads(case):
    kwargs = {"the fp8_row dgrad (a scale per row)": {"fmt": "fp8_row"}, "no grad_output_q": {"quantized": False}}
    gm, _ = _backward_graph(**kwargs[case])
    before = [(n.target, n.args) for n in gm.graph.nodes]
    assert swiglu_pass.quantize_in_swiglu_backward(gm.graph) == 0
    assert [(n.target, n.args) for n in gm.graph.nodes] == before


def test_inductor_plans_no_kernel_reading_the_gate_up_gradient_back():
    """The tiny Qwen3's qfp8 backward (M = 2 x 128, intermediate 512) with the post-grad passes as compile runs
    them: the op quantizes gate/up's gradient, so no kernel reduces over it (before: the SwiGLU backward and a
    1x128 quantize reading its output, bench/results/profile_8b_h200.md), and q/k/v's cat is the one concat."""
    pytest.importorskip("triton")
    from inductor_kernels import tiny_qwen3_post_grad
    from test_passes_concat import _numel

    counts, _, backward = tiny_qwen3_post_grad("qfp8")
    assert [c["swiglu"] for c in counts] == [0, 1] and counts[1]["concat"] == 1, counts
    rows, inter = 2 * 128, 512
    assert not [k for k in backward if k.reductions and _numel(k.group) * 128 == rows * 2 * inter], backward
    assert not [k for k in backward if _numel(k.group) == rows * inter and len(k.dtypes) >= 2], backward


def _compiled_qfp8_step(monkeypatch, **switches) -> tuple[torch.Tensor, dict, str]:
    """(loss, LoRA grads, report) of one step of a 2-layer Qwen3 (hidden 256, intermediate 512) compiled for qfp8
    through Inductor on the CPU, with passes/swiglu.py's `switches` (ENABLED, FORWARD_OP) set."""
    import transformers as T

    import surogate
    from surogate.compiler import _attach_lora

    monkeypatch.setenv("SUROGATE_CPU_BACKEND", "inductor")
    torch._dynamo.reset()
    torch.manual_seed(0)
    for name, value in switches.items():
        monkeypatch.setattr(swiglu_pass, name, value)
    cfg = T.Qwen3Config(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=64, vocab_size=512)
    model = _attach_lora(T.AutoModelForCausalLM.from_config(cfg).to(BF16),
                         {"r": 8, "lora_alpha": 16, "init_lora_weights": False})
    compiled = surogate.compile(model, recipe="qfp8", arch="cpu")
    ids = torch.randint(0, 512, (2, 128), generator=torch.Generator().manual_seed(1))
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    torch._dynamo.reset()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, str(compiled.surogate_report)


def _assert_close_grads(grads: dict, want: dict, cosine: float = 0.999) -> None:
    assert grads.keys() == want.keys() and grads
    for name, grad in grads.items():
        cos = F.cosine_similarity(grad.flatten().double(), want[name].flatten().double(), dim=0)
        assert cos > cosine, (name, cos.item())


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd is returning a function")
def test_a_compiled_qfp8_model_through_inductor_with_the_op_and_without(monkeypatch):
    """The backward op alone: the same forward (the loss bit for bit); gradients within the op's one rounding of each
    SwiGLU gradient."""
    loss_on, grads_on, report_on = _compiled_qfp8_step(monkeypatch, ENABLED=True, FORWARD_OP=False)
    loss_off, grads_off, _ = _compiled_qfp8_step(monkeypatch, ENABLED=False)
    assert "surogate::swiglu_backward" in report_on and len(grads_on) == 28
    assert torch.equal(loss_on, loss_off)
    _assert_close_grads(grads_on, grads_off)


def test_with_the_forward_op_inductor_plans_no_kernel_quantizing_h_and_the_backward_rebuilds_h_alone(monkeypatch):
    """FORWARD_OP (on by default): the tiny Qwen3's qfp8 forward gets down_proj's FP8 blocks of h from
    `surogate::swiglu_forward` (no 1 x 128 reduction over h, M x 512, in Inductor's forward plan); the backward's
    rebuilt h (recompute) is the op without the quantize."""
    pytest.importorskip("triton")
    from inductor_kernels import tiny_qwen3_post_grad
    from test_passes_concat import _numel

    rows, inter = 2 * 128, 512
    monkeypatch.setattr(swiglu_pass, "FORWARD_OP", False)
    _, forward_before, _ = tiny_qwen3_post_grad("qfp8")
    assert [k for k in forward_before if k.reductions and k.group[1] == 128 and _numel(k.group) * 128 == rows * inter]
    monkeypatch.setattr(swiglu_pass, "FORWARD_OP", True)
    counts, forward, _ = tiny_qwen3_post_grad("qfp8")
    assert [c["swiglu_forward"] for c in counts] == [1, 0], counts
    assert not [k for k in forward if k.reductions and k.group[1] == 128 and _numel(k.group) * 128 == rows * inter]


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd is returning a function")
def test_a_compiled_qfp8_model_through_inductor_with_the_forward_op_and_without(monkeypatch):
    """The op rounds h once, as Inductor's fused SwiGLU does: the loss within 1e-3, the gradients at cosine 0.999."""
    loss_on, grads_on, _ = _compiled_qfp8_step(monkeypatch, ENABLED=True, FORWARD_OP=True)
    loss_off, grads_off, _ = _compiled_qfp8_step(monkeypatch, ENABLED=True, FORWARD_OP=False)
    assert abs(loss_on - loss_off) <= 1e-3 * abs(loss_off)
    _assert_close_grads(grads_on, grads_off)


def test_switching_it_off_changes_inductors_cache_key_and_the_bench_modifier_does(monkeypatch):
    from bench_module import load_bench

    on = post_grad.post_grad_pass().uuid()
    monkeypatch.setattr(swiglu_pass, "ENABLED", False)
    assert post_grad.post_grad_pass().uuid() != on  # a cached graph of the other setting is never served
    gm, _ = _backward_graph()
    assert swiglu_pass.quantize_in_swiglu_backward(gm.graph) == 0
    assert load_bench("tps").surogate_system("surogate:qfp8+noswiglu") == ("qfp8", {"swiglu_op": False})
    monkeypatch.setattr(swiglu_pass, "ENABLED", True)
    monkeypatch.setattr(swiglu_pass, "FORWARD_OP", False)
    off_forward = post_grad.post_grad_pass().uuid()
    assert off_forward != on
    monkeypatch.setattr(swiglu_pass, "GEGLU", False)
    assert post_grad.post_grad_pass().uuid() not in (on, off_forward)
    assert load_bench("tps").surogate_system("surogate:qfp8+nogeglu") == ("qfp8", {"geglu": False})
    assert load_bench("tps").surogate_system("surogate:qfp8+noswiglufwd") == ("qfp8", {"swiglu_forward_op": False})
