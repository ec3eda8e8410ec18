"""Gradient producer fusion: an FP8 dgrad's gradient quantized by the kernel that produces it.

The backward op takes the gradient pre-quantized (`grad_output_q`); while torch.compile traces the backward,
the op's autograd formula puts the traceable twin of the op's gradient quantizer into the graph and passes
its outputs (`surogate.compile(..., grad_producer=True)`; off by default). On CPU everything here is bit-exact:
the twin equals the quantizer the dgrad reference (and the CUDA path, in the Triton interpreter) runs, so
the op with `grad_output_q` equals the op without, and a compiled model's gradients are the same with the
option on and off. (On CUDA, Inductor fuses the twin into the gradient's producer:
tests/gpu/test_grad_producer_gpu.py.)
"""

from __future__ import annotations

import importlib
from unittest import mock

import pytest
import torch
from bench_module import load_bench
from bit_compare import bits
from numerics import lora_op_case, odd_values
from tiny_qwen3 import cpu_lora_qwen3
from torch.fx.experimental.proxy_tensor import make_fx

import surogate
from surogate import ops
from surogate.compat import compiling
from surogate.kernels import launch
from surogate.kernels import reference as ref
from surogate.kernels.variants import Gemm, Quantizer, variant
from surogate.recipes.formats import FP8_ACTIVATION_BLOCK, GRAD_FP8_ELEMENT

lora_linear_ops = importlib.import_module("surogate.ops.lora_linear")  # the module (ops.lora_linear: the function)
FORMATS = ["fp8_row", "fp8_block"]  # the weight formats of fp8 and qfp8, the recipes with an FP8 dgrad
ELEMENT = {"fp8_row": torch.float8_e5m2, "fp8_block": torch.float8_e4m3fn}


def _dgrad_reference_quantize(g: torch.Tensor, fmt: str):
    """What `reference_linear.dgrad_base` quantizes the gradient to (the definition)."""
    g2 = g.reshape(-1, g.shape[-1])
    if fmt == "fp8_block":
        return ref.quantize_fp8_ref(g2, GRAD_FP8_ELEMENT[fmt], "block", FP8_ACTIVATION_BLOCK)
    return ref.quantize_fp8_ref(g2, GRAD_FP8_ELEMENT[fmt], "row")


# --- the twin quantizer ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(5, 123), (123,), (2, 3, 128), (7, 300), (130, 260)], ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
def test_twin_equals_the_dgrad_quantizer_bitwise(fmt, shape):
    g = odd_values(shape, seed=sum(shape))
    data, scale = ops.grad_output_quantizer("fp8", fmt)(g)
    want = _dgrad_reference_quantize(g, fmt)
    groups = -(-shape[-1] // 128) if fmt == "fp8_block" else 1
    assert data.dtype == ELEMENT[fmt] and data.shape == g.shape
    assert scale.dtype == torch.float32 and scale.shape == (*shape[:-1], groups)
    assert torch.equal(bits(data.reshape(want.data.shape)), bits(want.data))
    assert torch.equal(bits(scale.reshape(want.scale.shape)), bits(want.scale))
    if fmt == "fp8_block" and len(shape) == 2 and groups > 1:
        assert scale.stride() == (1, shape[0])  # M-contiguous, as the Triton quantizer stores 1x128 scales


@pytest.mark.parametrize("shape", [(5, 123), (7, 300)], ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
def test_twin_equals_the_quantizer_the_cuda_backward_runs(fmt, shape):
    """`launch._quantize` with the dgrad variant's quantizer: the Triton kernel (here in the interpreter)."""
    g = odd_values(shape, seed=shape[0])
    twin = ops.grad_output_quantizer("fp8", fmt)(g)
    triton = launch._quantize(g, variant(Gemm.GRAD_INPUT, "fp8", fmt).quantizer)
    for got, want in zip(twin, triton):
        assert got.shape == want.shape and torch.equal(bits(got), bits(want))
    if fmt == "fp8_block" and shape[-1] > 128:  # the scales' layout too (data: read through its strides)
        assert twin[1].stride() == triton[1].stride()


def test_the_twin_follows_the_kernel_table():
    assert ref.GRAD_OUTPUT_Q_QUANTIZERS == {Quantizer.FP8_ROW_E5M2: ref.quantize_fp8_rowwise_e5m2_ref,
                                            Quantizer.FP8_BLOCK_E4M3: ref.quantize_fp8_block_ref}
    for fmt in FORMATS:
        v = variant(Gemm.GRAD_INPUT, "fp8", fmt)
        assert v.takes_grad_output_q
        assert ops.grad_output_quantizer("fp8", fmt) is ref.GRAD_OUTPUT_Q_QUANTIZERS[v.quantizer]
    # bf16 dgrads (also of quantized weights, dequantized in the kernel) and NVFP4 ones take no grad_output_q
    for compute, fmt in [("bf16", "bf16"), ("bf16", "fp8_block"), ("bf16", "nf4"), ("nvfp4", "nvfp4"),
                         ("nvfp4", "nvfp4_cached"), ("fp8", "nf4")]:
        assert ops.grad_output_quantizer(compute, fmt) is None, (compute, fmt)


# --- the backward op's grad_output_q ---------------------------------------------------------------------

def _case(k: int = 200, n: int = 300, r: int = 4):
    return lora_op_case(k, n, r)


@pytest.mark.parametrize("lora", ["lora", "lora_input", "none"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_backward_op_with_grad_output_q_equals_the_op_without(fmt, lora):
    x, w, a, b, go = _case()
    weight = ops.prepare_weight(w, fmt)
    lora_input = x * 0.5 if lora == "lora_input" else None
    a, b = (None, None) if lora == "none" else (a, b)
    hidden = None if a is None else ref.lora_linear_ref(x, weight, fmt, a, b, lora_input, None, 2.0, "fp8", "fp8")[1]
    args = (x, weight, fmt, a, b, lora_input, hidden, 2.0, "fp8")
    without = torch.ops.surogate.lora_linear_backward(go, *args)
    with_q = torch.ops.surogate.lora_linear_backward(go, *args, list(ops.grad_output_quantizer("fp8", fmt)(go)))
    for got, want in zip(with_q, without):
        assert torch.equal(bits(got), bits(want))
    # and the dgrad GEMM does read it: a plain linear given Q(2 g) returns the dgrad of 2 g
    plain = (x, weight, fmt, None, None, None, None, 1.0, "fp8")
    q2 = list(ops.grad_output_quantizer("fp8", fmt)(go * 2))
    got = torch.ops.surogate.lora_linear_backward(go, *plain, q2)[0]
    assert torch.equal(got, torch.ops.surogate.lora_linear_backward(go * 2, *plain)[0])
    assert not torch.equal(got, torch.ops.surogate.lora_linear_backward(go, *plain)[0])


def test_backward_op_keeps_its_schema_default_and_passes_opcheck():
    assert "Tensor[]? grad_output_q=None" in str(torch.ops.surogate.lora_linear_backward.default._schema)
    x, w, a, b, go = _case(k=128, n=256)
    weight = ops.prepare_weight(w, "fp8_row")
    hidden = ref.lora_linear_ref(x, weight, "fp8_row", a, b, None, None, 2.0, "fp8", "fp8")[1]
    args = (go, x, weight, "fp8_row", a, b, None, hidden, 2.0, "fp8",
            list(ops.grad_output_quantizer("fp8", "fp8_row")(go)))
    torch.library.opcheck(torch.ops.surogate.lora_linear_backward, args, test_utils=("test_faketensor",))


def test_backward_op_fake_matches_a_transposed_input():
    """An input that is a transposed view (Falcon-Mamba's x_proj reads one): the fake promised the input's strides
    (`empty_like`), the implementation returns the GEMM's contiguous gradient, and Inductor's stride assertion
    failed in the backward."""
    x, w, a, b, go = _case(k=128, n=256)
    x = x.transpose(1, 2).contiguous().transpose(1, 2)
    assert not x.is_contiguous()
    weight = ops.prepare_weight(w, "bf16")
    hidden = ref.lora_linear_ref(x, weight, "bf16", a, b, None, None, 2.0, "bf16", "bf16")[1]
    args = (go, x, weight, "bf16", a, b, x * 0.5, hidden, 2.0, "bf16")
    torch.library.opcheck(torch.ops.surogate.lora_linear_backward, args, test_utils=("test_faketensor",))


def test_bad_grad_output_q_says_what_is_wrong():
    x, w, a, b, go = _case()
    row, block = ops.prepare_weight(w, "fp8_row"), ops.prepare_weight(w, "fp8_block")
    data, scale = ops.grad_output_quantizer("fp8", "fp8_row")(go)
    bdata, bscale = ops.grad_output_quantizer("fp8", "fp8_block")(go)

    def run(weight, fmt, compute, grad_output_q):
        return torch.ops.surogate.lora_linear_backward(go, x, weight, fmt, None, None, None, None, 1.0, compute,
                                                       grad_output_q)

    with pytest.raises(TypeError, match="want data float8_e5m2 and scale float32, got torch.float8_e4m3fn"):
        run(row, "fp8_row", "fp8", [bdata, scale])  # the qfp8 element for the fp8_row dgrad
    with pytest.raises(TypeError, match="want data float8_e4m3fn and scale float32, got torch.bfloat16"):
        run(block, "fp8_block", "fp8", [go, bscale])  # the unquantized gradient
    with pytest.raises(TypeError, match="scale float32, got .* and torch.bfloat16"):
        run(row, "fp8_row", "fp8", [data, scale.bfloat16()])
    with pytest.raises(ValueError, match=r"want data \(M=10, N=300\) and scale \(M, 1\)"):
        run(row, "fp8_row", "fp8", [data[..., :128], scale])
    with pytest.raises(ValueError, match=r"scale \(M, 3\)"):  # a row-wise scale for the 1x128 kernel
        run(block, "fp8_block", "fp8", [bdata, scale])
    with pytest.raises(ValueError, match="holds \\[data, scale\\]"):
        run(row, "fp8_row", "fp8", [data])
    with pytest.raises(ValueError, match="quantize_fp8_rowwise_e5m2_ref"):  # the message names the twin
        run(row, "fp8_row", "fp8", [data[:1], scale])
    for weight, fmt, compute in [(ops.prepare_weight(w, "bf16"), "bf16", "bf16"), (block, "fp8_block", "bf16"),
                                 (ops.prepare_weight(w, "nvfp4"), "nvfp4", "nvfp4")]:
        with pytest.raises(ValueError, match="only taken by the FP8 dgrad kernels"):
            run(weight, fmt, compute, [data, scale])


# --- the autograd formula: the twin only while compiling ---------------------------------------------------

def _forward(x, a, b, weight, fmt):
    return ops.lora_linear(x, weight, fmt, a, b, None, None, 2.0, "fp8", "fp8")


def _grads(y, x, a, b):
    return torch.autograd.grad(y.float().square().sum(), (x, a, b))


def _backward_calls(fn) -> list:
    """The `grad_output_q` the autograd formula passes, for every backward `fn()` runs or traces."""
    calls = []
    chosen = lora_linear_ops._grad_output_q

    def spy(*args):
        calls.append(chosen(*args))
        return calls[-1]

    with mock.patch.object(lora_linear_ops, "_grad_output_q", spy):
        fn()
    return calls


@pytest.mark.parametrize("fmt", FORMATS)
def test_eager_and_plain_tracing_backward_quantize_nothing_in_the_graph(fmt):
    x, w, a, b, _ = _case()
    weight = ops.prepare_weight(w, fmt)
    x, a, b = (t.requires_grad_() for t in (x, a, b))
    assert not compiling()
    assert _backward_calls(lambda: _grads(_forward(x, a, b, weight, fmt), x, a, b)) == [None]
    # make_fx outside torch.compile (no compile session): the traced backward leaves the quantize to the op
    gm = make_fx(lambda *t: _grads(_forward(*t, weight, fmt), *t))(x, a, b)
    backward_ops = [n for n in gm.graph.nodes if n.target is torch.ops.surogate.lora_linear_backward.default]
    assert len(backward_ops) == 1
    args = backward_ops[0].args  # (..., grad_input, grad_output_q, lora_a_cast, lora_b_cast)
    assert len(args) == 13 and args[10] is None  # no grad_output_q; the forward's casts of the factors
    assert all(isinstance(t, torch.fx.Node) for t in args[11:])
    assert not [n for n in gm.graph.nodes if n.target is torch.ops.aten.amax.default]


@pytest.mark.parametrize("fmt", FORMATS)
def test_compiled_backward_passes_the_twin_unless_switched_off(fmt):
    x, w, a, b, _ = _case()
    weight = ops.prepare_weight(w, fmt)
    x, a, b = (t.requires_grad_() for t in (x, a, b))
    want = _grads(_forward(x, a, b, weight, fmt), x, a, b)
    for on in (True, False):
        torch._dynamo.reset()
        fn = torch.compile(lambda *t: _forward(*t, weight, fmt), backend="aot_eager", fullgraph=True)
        with ops.grad_producer(on):  # AOTAutograd traces the backward when the forward compiles
            calls = _backward_calls(lambda: fn(x, a, b))
        got = _grads(fn(x, a, b), x, a, b)
        assert all(torch.equal(g, w_) for g, w_ in zip(got, want))
        assert calls and all((c is not None) == on for c in calls), calls
        if on:  # traced: the twin's outputs (fake tensors) in the kernel's formats
            assert calls[0][0].dtype == ELEMENT[fmt] and calls[0][1].dtype == torch.float32
    torch._dynamo.reset()


# --- a compiled tiny Qwen3 -------------------------------------------------------------------------------

def _is_fp8_cast(node) -> bool:
    return node.op == "call_function" and node.target is torch.ops.aten._to_copy.default \
        and node.kwargs.get("dtype") in (torch.float8_e4m3fn, torch.float8_e5m2)


def _qwen3(recipe: str, grad_producer: bool):
    """(loss, LoRA grads, report, backward graphs) of a compiled 2-layer Qwen3: aot_eager with its
    backward graphs recorded; the SwiGLU product as the model wrote it (passes/swiglu.py, which needs
    grad_producer, computes the SwiGLU gradient with one rounding: tests/test_swiglu.py)."""
    from torch._functorch.aot_autograd import aot_module_simplified

    from surogate.passes import swiglu

    backward_graphs = []
    lookup = torch._dynamo.lookup_backend

    def recording(name):
        if name != "aot_eager":
            return lookup(name)
        return lambda gm, inputs: aot_module_simplified(
            gm, inputs, fw_compiler=lambda fw, _: fw, bw_compiler=lambda bw, _: backward_graphs.append(bw) or bw)

    model = cpu_lora_qwen3()
    compiled = surogate.compile(model, recipe=recipe, arch="cpu", grad_producer=grad_producer)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with mock.patch.object(torch._dynamo, "lookup_backend", recording), mock.patch.object(swiglu, "ENABLED", False):
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
    grads = {n: p.grad for n, p in compiled.named_parameters() if "lora_" in n}
    return loss.detach(), grads, str(compiled.surogate_report), backward_graphs


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd is returning a function")
# qfp8: gate+up fuse horizontally; q/k/v (N = 64, 32, 32) do not (fp8_block members need N % 128 == 0)
@pytest.mark.parametrize("recipe, n_ops", [("fp8", 7), ("qfp8", 6)])
def test_qwen3_grad_producer_on_equals_off_and_puts_the_twin_into_the_backward(recipe, n_ops):
    loss, grads, report, graphs = _qwen3(recipe, True)
    loss_off, grads_off, report_off, graphs_off = _qwen3(recipe, False)
    assert torch.equal(loss, loss_off)
    assert grads.keys() == grads_off.keys() and len(grads) == 28
    assert all(torch.equal(grads[k], grads_off[k]) for k in grads)
    assert "quantized in the kernel that produces it (grad_producer)" in report
    assert "quantizes its gradient itself (grad_producer off)" in report_off
    (bw,), (bw_off,) = graphs, graphs_off  # one block graph serves both layers
    backward_ops = [n for n in bw.graph.nodes if n.target is torch.ops.surogate.lora_linear_backward.default]
    assert len(backward_ops) == n_ops
    element = ELEMENT[surogate.recipes.get(recipe).weight_format.value]
    for op in backward_ops:  # every dgrad reads the twin's outputs, computed from its own gradient
        data, scale = op.args[10]
        assert data.meta["val"].dtype == element and scale.meta["val"].dtype == torch.float32
        cast = data
        while not _is_fp8_cast(cast):  # fp8_block: the cast, then views of its (padded) tiles
            assert cast.target in VIEWS, cast.target
            cast = cast.args[0]
        assert op.args[0] in _ancestors(cast)
    assert len([n for n in bw.graph.nodes if _is_fp8_cast(n)]) == n_ops
    assert sum(n.target is torch.ops.aten.amax.default for n in bw.graph.nodes) == n_ops
    off_ops = [n for n in bw_off.graph.nodes if n.target is torch.ops.surogate.lora_linear_backward.default]
    assert len(off_ops) == n_ops and all(len(n.args) < 11 or n.args[10] is None for n in off_ops)
    assert not [n for n in bw_off.graph.nodes if _is_fp8_cast(n) or n.target is torch.ops.aten.amax.default]


VIEWS = (torch.ops.aten.view.default, torch.ops.aten.slice.Tensor, torch.ops.aten.reshape.default,
         torch.ops.aten._unsafe_view.default, torch.ops.aten.alias.default, torch.ops.aten.as_strided.default)


def _ancestors(node) -> list:
    seen, todo = [], list(node.all_input_nodes)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.append(n)
            todo.extend(n.all_input_nodes)
    return seen


# --- the option on the way in ----------------------------------------------------------------------------

def test_bench_modifier_turns_it_off():
    tps = load_bench("tps")
    assert tps.surogate_system("surogate:qfp8+nogradproducer") == ("qfp8", {"grad_producer": False})
    assert tps.surogate_system("surogate:qfp8+gradproducer") == ("qfp8", {"grad_producer": True})


# --- what Inductor's Triton scheduler makes of it (CUDA's fusions, planned on the CPU) -----------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_the_twin_rides_in_the_producers_kernel_as_inductor_plans_it_for_triton(fmt):
    """A SwiGLU-backward-like producer, the twin on its output and the dgrad reading both: one Triton kernel
    computes the gradient, its amax(es), the FP8 data and the scales. The gradient is (2, s, N) with s dynamic,
    as in a compiled block. fp8_block used to take two: the dgrad (exact strides) copied a reshape of the
    unrealized 1x128 tiles into a (2, s, N) buffer whose loop reads the scale at `n // 128`, which the
    scheduler does not fuse with the (M*N/128, 128) amax (run 56: qfp8 backward 8 kernels more with the
    option on); the data is now an `as_strided` view of the realized tiles."""
    pytest.importorskip("triton")
    from inductor_kernels import triton_kernels

    n, k = 256, 128
    weight = ops.prepare_weight(torch.randn(n, k).bfloat16() / 16, fmt)
    quantizer = ops.grad_output_quantizer("fp8", fmt)

    def dgrad(h, gate, x):
        g = (h.float() * torch.sigmoid(gate.float())).bfloat16()  # the producer (pointwise)
        return torch.ops.surogate.lora_linear_backward(g, x, weight, fmt, None, None, None, None, 1.0, "fp8",
                                                       list(quantizer(g)))[0]

    h, gate, x = torch.randn(2, 64, n).bfloat16(), torch.randn(2, 64, n).bfloat16(), torch.randn(2, 64, k).bfloat16()
    for t in (h, gate, x):
        torch._dynamo.mark_dynamic(t, 1)
    kernels = triton_kernels(dgrad, h, gate, x)
    assert len(kernels) == 1, kernels
    assert kernels[0].writes(ELEMENT[fmt]) and kernels[0].reductions == 1, kernels


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd is returning a function")
@pytest.mark.parametrize("recipe", ["fp8", "qfp8"])
def test_qwen3_backward_with_grad_producer_plans_no_more_kernels(recipe):
    """The CPU twin of the GPU test's kernel count: with the option on, the backward's Inductor kernels less
    one Triton quantize launch per FP8 dgrad (gone from the op) are no more than with it off. Run 56 on the
    H200: qfp8 201 launches on against 193 off (this count: 25 - 4 against 17; now 21 - 4 against 17).
    qfp8's four dgrads read a gradient from a RMSNorm backward (a row reduction of another shape than the
    1x128 amax), from a cat (q/k/v, gate/up) or from the block's input, so no quantize shares a producer's
    kernel here; fp8's seven do (strictly fewer)."""
    pytest.importorskip("triton")
    from inductor_kernels import tiny_qwen3_kernels

    on = tiny_qwen3_kernels(recipe, grad_producer=True)[1]
    off = tiny_qwen3_kernels(recipe, grad_producer=False)[1]
    quantize_launches = {"fp8": 7, "qfp8": 4}[recipe]  # one per FP8 dgrad of the block, with it off
    assert len(on) - quantize_launches <= len(off), (len(on), len(off))
    if recipe == "fp8":
        assert len(on) - quantize_launches < len(off), (len(on), len(off))
