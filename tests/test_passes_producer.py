"""Pass 4, producer fusion: the traceable FP8 quantizers, the op's `input_q`, the pass, a compiled Qwen3.

On CPU everything here is bit-exact: the traceable quantizers equal `quantize_fp8_ref`, so the op with
`input_q` equals the op without, and a model compiled with producer fusion equals one without.
(On CUDA, Inductor compiles the quantizer into the producer's kernel: tests/gpu/test_producer_gpu.py.)
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from bit_compare import bits
from numerics import lora_op_case, odd_values
from tiny_qwen3 import cpu_lora_qwen3
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx
from toy_layers import rms_norm

import surogate
from surogate import ops
from surogate.kernels import reference as ref
from surogate.ops.modules import SurogateLinear
from surogate.passes import PIPELINE, PassContext, nodes, producer, run_pipeline
from surogate.passes.capture import capture_graph

QUANTIZERS = tuple(ref.INPUT_Q_QUANTIZERS.values())


# --- the traceable quantizers -------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(5, 123), (123,), (2, 3, 128), (7, 300), (130, 260)], ids=str)
@pytest.mark.parametrize("element", ["e4m3", "e5m2"])
def test_traceable_quantizers_equal_the_reference_bitwise(shape, element):
    x = odd_values(shape, seed=sum(shape))
    data, scale = ref.quantize_fp8_rowwise_ref(x, element)
    want = ref.quantize_fp8_ref(x, element, "row")
    assert torch.equal(bits(data), bits(want.data)) and torch.equal(bits(scale), bits(want.scale))
    assert scale.shape == (*shape[:-1], 1)
    for block in [(1, 128)] + ([(128, 128)] if len(shape) == 2 else []):
        data, scale = ref.quantize_fp8_block_ref(x, block, element)
        want = ref.quantize_fp8_ref(x, element, "block", block)
        assert torch.equal(bits(data), bits(want.data))
        assert torch.equal(bits(scale.reshape(want.scale.shape)), bits(want.scale))
        if block == (1, 128):  # the Triton launcher's layout: the input's leading dims
            assert scale.shape == (*shape[:-1], -(-shape[-1] // 128))


@pytest.mark.parametrize("quantizer", QUANTIZERS, ids=lambda f: f.__name__)
def test_traceable_quantizers_trace_to_plain_aten_ops_with_a_symbolic_row_count(quantizer):
    x = odd_values((2, 5, 300), seed=1)
    gm = make_fx(lambda t: quantizer(t), tracing_mode="symbolic")(x)
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.amax.default in targets  # one reduction, the rest pointwise and views
    assert all(getattr(t, "namespace", "aten") in ("aten", "prims") for t in targets
               if isinstance(t, torch._ops.OpOverload))
    y = odd_values((3, 7, 300), seed=2)  # another row count through the same graph
    for got, want in zip(gm(y), quantizer(y)):
        assert torch.equal(bits(got), bits(want))


def test_traceable_quantizers_refuse_bad_arguments():
    with pytest.raises(ValueError, match="unknown FP8 element"):
        ref.quantize_fp8_rowwise_ref(torch.ones(2, 4), "e3m4")
    with pytest.raises(ValueError, match="two positive ints"):
        ref.quantize_fp8_block_ref(torch.ones(2, 4), (0, 128))
    with pytest.raises(TypeError, match="float32/bfloat16"):
        ref.quantize_fp8_rowwise_ref(torch.ones(2, 4, dtype=torch.int32))


# --- the op's input_q --------------------------------------------------------------------------------

def _case(k: int = 200, n: int = 256, r: int = 4):
    return lora_op_case(k, n, r)[:4]


@pytest.mark.parametrize("fmt", ["fp8_row", "fp8_block"])
def test_op_with_input_q_equals_the_op_without_outputs_and_grads(fmt):
    x, w, a, b = _case()
    weight = ops.prepare_weight(w, fmt)
    results = []
    for given in (False, True):
        x_, a_, b_ = (t.clone().requires_grad_() for t in (x, a, b))
        input_q = list(ref.input_quantizer("fp8", fmt)(x_)) if given else None
        y = ops.lora_linear(x_, weight, fmt, a_, b_, None, None, 2.0, "fp8", "fp8", input_q)
        y.float().square().sum().backward()
        results.append((y, x_.grad, a_.grad, b_.grad))
    for without, with_q in zip(*results):
        assert torch.equal(with_q, without)
    # and the GEMM does read it: a plain linear given Q(2x) computes Q(2x) @ W.T
    x2 = x * 2
    got = ops.lora_linear(x, weight, fmt, forward="fp8", input_q=ref.input_quantizer("fp8", fmt)(x2))
    assert torch.equal(got, ops.lora_linear(x2, weight, fmt, forward="fp8"))


def test_input_q_gets_no_gradient_and_the_op_keeps_its_schema_default():
    x, w, a, b = _case()
    weight = ops.prepare_weight(w, "fp8_block")
    data, scale = ref.quantize_fp8_block_ref(x)
    scale.requires_grad_()  # were the scale differentiable, nothing may flow into it
    out = torch.ops.surogate.lora_linear(x, weight, "fp8_block", a.requires_grad_(), b, None, None, 2.0, "fp8",
                                         "fp8", [data, scale])[0]
    out.float().sum().backward()
    assert scale.grad is None and a.grad is not None
    assert "Tensor[]? input_q=None" in str(torch.ops.surogate.lora_linear.default._schema)


def test_opcheck_with_input_q():
    x, w, a, b = _case(k=128)
    weight = ops.prepare_weight(w, "fp8_row")
    args = (x, weight, "fp8_row", a.requires_grad_(), b.requires_grad_(), None, None, 2.0, "fp8", "fp8",
            list(ref.quantize_fp8_rowwise_ref(x)))
    torch.library.opcheck(torch.ops.surogate.lora_linear, args, test_utils=("test_faketensor",
                                                                          "test_autograd_registration"))


@pytest.mark.parametrize("call", ["wrapper", "op"])
def test_bad_input_q_says_what_is_wrong(call):
    x, w, a, b = _case()
    fp8_row, bf16 = ops.prepare_weight(w, "fp8_row"), ops.prepare_weight(w, "bf16")
    data, scale = ref.quantize_fp8_rowwise_ref(x)

    def run(weight, fmt, fwd, input_q):
        if call == "wrapper":  # validate() before the op
            return ops.lora_linear(x, weight, fmt, a, b, None, None, 2.0, fwd, fwd, input_q)
        return torch.ops.surogate.lora_linear(x, weight, fmt, a, b, None, None, 2.0, fwd, fwd, input_q)  # the impl

    with pytest.raises(TypeError, match="want data float8_e4m3fn"):
        run(fp8_row, "fp8_row", "fp8", [x, scale])
    with pytest.raises(ValueError, match=r"want data \(M=10, K=200\) and scale \(M, 1\)"):
        run(fp8_row, "fp8_row", "fp8", [data[:, :4], scale[:, :4]])
    with pytest.raises(ValueError, match=r"scale \(M, 2\)"):  # a row-wise input_q for the 1x128 kernel
        run(ops.prepare_weight(w, "fp8_block"), "fp8_block", "fp8", [data, scale])
    with pytest.raises(ValueError, match="holds \\[data, scale\\]"):
        run(fp8_row, "fp8_row", "fp8", [data])
    with pytest.raises(ValueError, match="only taken by the FP8 forward kernels"):
        run(bf16, "bf16", "bf16", [data, scale])
    with pytest.raises(ValueError, match="only taken by the FP8 forward kernels"):
        run(ops.prepare_weight(w, "nvfp4"), "nvfp4", "nvfp4", [data, scale])


# --- the pass on a small graph -------------------------------------------------------------------------

class Block(nn.Module):
    """A graph input -> in_proj; RMSNorm -> q, k; tanh(q) * k -> o ("other"); RMSNorm -> gate, up; SwiGLU -> down."""

    def __init__(self, h: int = 128) -> None:
        super().__init__()
        self.norm, self.norm2 = nn.Parameter(torch.ones(h)), nn.Parameter(torch.full((h,), 0.5))
        self.in_proj, self.q_proj, self.k_proj, self.o_proj = (nn.Linear(h, h, False) for _ in range(4))
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(h, 256, False), nn.Linear(h, 256, False), \
            nn.Linear(256, h, False)

    def forward(self, x):
        h = rms_norm(x + self.in_proj(x), self.norm)
        o = self.o_proj(torch.tanh(self.q_proj(h)) * self.k_proj(h))
        h = rms_norm(o, self.norm2)
        return o + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))



TARGETS = ["in_proj", "q_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(recipe: str):
    torch.manual_seed(0)
    model = get_peft_model(Block().to(torch.bfloat16),
                           LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    if recipe != "bf16":
        for name in TARGETS:
            layer = getattr(model.base_model.model, name)
            layer.base_layer = SurogateLinear.from_linear(layer.base_layer, recipe)
    return model


def _compile(model, recipe: str, producer_on: bool = True, pipeline=PIPELINE):
    gm, inputs = capture_graph(model, torch.randn(2, 3, 128, generator=torch.Generator().manual_seed(3)).bfloat16())
    ctx = PassContext(recipe, "cpu", options={"producer": producer_on})
    counts = run_pipeline(gm, ctx, pipeline)
    return gm, inputs, counts, ctx


def _quantize_nodes(gm) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in QUANTIZERS]


def _input_q(op):
    return nodes.arg(op, 10, "input_q")


def _step(gm, inputs, model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = gm(*inputs)[0]
    out.float().square().sum().backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("recipe, n_ops", [("fp8", 7), ("qfp8", 5)])  # qfp8: q+k and gate+up fuse horizontally
def test_pass_shares_one_quantize_per_input_and_keeps_the_numbers(recipe, n_ops):
    model = _model(recipe)
    gm, inputs, counts, ctx = _compile(model, recipe)
    ops_ = [n for n in gm.graph.nodes if nodes.is_surogate_op(n)]
    assert len(ops_) == n_ops and counts["producer"] == 4
    quantize = _quantize_nodes(gm)
    assert len(quantize) == 4 and len({q.args[0] for q in quantize}) == 4  # one per distinct input
    want = ref.input_quantizer("fp8", ops_[0].args[2])
    for op in ops_:
        if op.args[0].op == "placeholder":  # in_proj reads the graph input: the op quantizes it
            assert _input_q(op) is None
            continue
        data, scale = _input_q(op)
        assert nodes.is_getitem(data, 0) and nodes.is_getitem(scale, 1) and data.args[0] is scale.args[0]
        assert data.args[0].target is want and data.args[0].args[0] is op.args[0]
    if recipe == "fp8":  # q and k are separate ops reading one RMSNorm output: one quantize node
        q_op, k_op = (next(o for o in ops_ if name in producer._consumer_name(o)) for name in ("q_proj", "k_proj"))
        assert _input_q(q_op)[0] is _input_q(k_op)[0]
    whats = {what.split(":")[0]: what for what, _ in ctx.report.groups if "quantized GEMM" in what}
    assert set(whats) == {"rmsnorm -> quantized GEMM", "other -> quantized GEMM", "swiglu -> quantized GEMM",
                          "graph input -> quantized GEMM"}
    assert whats["other -> quantized GEMM"] == "other -> quantized GEMM: quantize in the producer's kernel"
    assert "fused" in whats["swiglu -> quantized GEMM"] and "not fused" in whats["graph input -> quantized GEMM"]

    out, grads = _step(gm, inputs, model)
    gm_off, inputs_off, counts_off, _ = _compile(model, recipe, producer_on=False)
    assert counts_off["producer"] == 0 and not _quantize_nodes(gm_off)
    out_off, grads_off = _step(gm_off, inputs_off, model)
    assert torch.equal(out, out_off)
    assert grads.keys() == grads_off.keys() and all(torch.equal(grads[k], grads_off[k]) for k in grads)


def test_pass_is_idempotent():
    gm, _, _, ctx = _compile(_model("qfp8"), "qfp8")
    code, groups = gm.code, list(ctx.report.groups)
    assert producer.fuse_producers(gm, ctx) == 0
    gm.recompile()
    assert gm.code == code and ctx.report.groups == groups


@pytest.mark.parametrize("recipe", ["bf16", "qnf4", "fp4"])
def test_pass_leaves_bf16_nvfp4_and_dequant_graphs_untouched(recipe):
    gm, _, counts, ctx = _compile(_model(recipe), recipe)
    without = tuple(p for p in PIPELINE if p[0] != "producer")
    gm_ref, _, _, _ = _compile(_model(recipe), recipe, pipeline=without)
    assert counts["producer"] == 0 and not _quantize_nodes(gm) and gm.code == gm_ref.code
    reported = [what for what, _ in ctx.report.groups if "quantized GEMM" in what]
    if recipe == "fp4":  # NVFP4 forward: reported with the reason
        assert reported and all("not fused" in w and "NVFP4" in w for w in reported)
    else:  # bf16 GEMMs: nothing to quantize, nothing to report
        assert not reported


def test_checker():
    meta = {"kind": "rmsnorm", "forward": "fp8", "weight_format": "fp8_row"}
    assert producer.supports(None, "cpu", meta)
    assert producer.supports(None, "sm_90", {**meta, "kind": "other", "weight_format": "fp8_block"})
    assert "bf16" in producer.why_not(None, "cpu", {**meta, "forward": "bf16", "weight_format": "nf4"})
    assert "NVFP4" in producer.why_not(None, "sm_90", {**meta, "forward": "nvfp4", "weight_format": "nvfp4"})
    assert "no fp8 forward kernel" in producer.why_not(None, "cpu", {**meta, "weight_format": "nf4"})
    for kind in ("graph input", "GEMM output"):
        assert kind in producer.why_not(None, "cpu", {**meta, "kind": kind})


def test_input_kind():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    w = g.placeholder("w")
    lin = g.call_function(F.linear, (x, w))
    other = g.call_method("contiguous", (g.call_method("transpose", (lin, 1, 2)),))
    swiglu = g.call_function(operator.mul, (g.call_function(F.silu, (lin,)), x))
    kinds = [producer.input_kind(n) for n in (x, lin, other, swiglu)]
    assert kinds == ["graph input", "GEMM output", "other", "swiglu"]


# --- a compiled tiny Qwen3 ------------------------------------------------------------------------------

def _qwen3(recipe: str, producer_on: bool):
    model = cpu_lora_qwen3()
    compiled = surogate.compile(model, recipe=recipe, arch="cpu", producer=producer_on)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in compiled.named_parameters() if "lora_" in n}
    return loss.detach(), grads, compiled.surogate_report


# qfp8 only (each recipe is two compiles): fp8's row quantizer, its q/k/v sharing one quantize and its
# numbers with the pass on and off are test_pass_shares_one_quantize_per_input_and_keeps_the_numbers[fp8-7]'s,
# and the Qwen3 graph's producers (HF's RMSNorm, the attention output, SwiGLU) are found alike for both.
@pytest.mark.parametrize("recipe", ["qfp8"])
def test_qwen3_reports_fused_producers_and_equals_producer_fusion_off(recipe):
    loss, grads, report = _qwen3(recipe, True)
    loss_off, grads_off, report_off = _qwen3(recipe, False)
    fused = sorted(what.split(" ")[0] for what, _ in report.groups
                   if "quantized GEMM: fused" in what or "producer's kernel" in what)
    assert fused == ["other", "rmsnorm", "rmsnorm", "swiglu"], str(report)  # qkv, o_proj, gate/up, down
    assert report.counts["producer"] == 4 * report.graphs and report_off.counts["producer"] == 0
    assert all("producer fusion off" in what for what, _ in report_off.groups if "quantized GEMM" in what)
    assert torch.equal(loss, loss_off)
    assert grads.keys() == grads_off.keys() and all(torch.equal(grads[k], grads_off[k]) for k in grads)
