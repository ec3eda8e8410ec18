"""The ATen kernels a LoRA linear's CUDA implementation launches around its GEMMs: counted, and their bits.

On the H200 (bench/results/profile_8b_fp8_h200.md) one Qwen3-8B fp8 step ran 6,104 `bfloat16_copy` and
4,124 `direct_copy` kernels; 42 and 28 of them per layer and micro-step came from the launchers: per LoRA
linear the FP32 factors cast to bf16 in the forward and again in the backward, the lora_scale folded into
the up-projection as upcast, multiply, downcast (twice: forward and dgrad), a transposing copy of it for the
persistent kernel, and each LoRA gradient upcast before its scaling (bench/NOTES.md, "Copies in the fp8
step"). Now the forward casts both factors in one Triton launch (kernels/lora_factors.py, which also writes the
persistent kernel's U^T) and the op keeps the casts for its backward; every other scaling is one multiply.
These tests run the op's CUDA implementation on CPU tensors (Triton under the interpreter), so they see the same
ATen calls a GPU run makes, and pin them, and check that the bits did not move.
"""

from __future__ import annotations

import importlib
import operator

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from aten_launches import AtenLaunches
from numerics import lora_gemm_case
from surogate import ops
from surogate.kernels import grad_lora, launch, lora_factors, lora_linear, variants

L = importlib.import_module("surogate.ops.lora_linear")
F32, BF16 = torch.float32, torch.bfloat16
M, N, K, R = 40, 96, 128, 16  # distinct sizes: each tensor's shape says what it is


def _step(x, wl, a, b, go, scale=2.0, log=None):
    """The op's CUDA forward and backward as the autograd formula chains them (the forward's casts passed on);
    -> (output, grads, number of launches the forward made)."""
    y, h, a_cast, b_cast = L.lora_linear_cuda(x, wl, "fp8_row", a, b, None, None, scale, "fp8", "fp8")
    forward = 0 if log is None else len(log.elementwise())
    grads = L.lora_linear_backward_cuda(go, x, wl, "fp8_row", a, b, None, h, scale, "fp8", None,
                                        a_cast if a_cast.numel() else None, b_cast if b_cast.numel() else None)
    return y, grads, forward


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "triton"])
def test_an_fp8_lora_linear_launches_one_factor_kernel_and_three_or_four_multiplies(persistent, monkeypatch):
    """Forward: lora_a and lora_b cast to bf16 by one Triton launch (`lora_factors`), which for the persistent
    kernel also writes U^T with lora_scale folded in; on the Triton route lora_scale is folded into U by one
    multiply. Backward: no cast; each LoRA gradient upcast and scaled by one multiply; the dgrad's U one
    multiply. The forward's ATen launches fell from 3 (two casts and the multiply, U^T for the persistent
    kernel) to 0 on the persistent route and 1 on the Triton one, plus the one `lora_factors` launch. Before
    that: 14 launches on the Triton route, 15 on the persistent one (11 copies)."""
    monkeypatch.setattr(variants, "PERSISTENT_SM90", persistent)
    x, _, a, b, _, go, wl = lora_gemm_case(M, N, K, R, "fp8_row", seed=0, device="cpu")
    _step(x, wl, a, b, go)  # the scale tensor of the LoRA gradients is made once per device and scale
    fused = []  # the up_t_scale of each `lora_factors` launch: a Triton kernel, which AtenLaunches does not see
    monkeypatch.setattr(launch, "lora_factors", lambda *args: fused.append(args[3]) or lora_factors.lora_factors(*args))
    with variants.trace() as ran, AtenLaunches() as log:
        n_forward = _step(x, wl, a, b, go, log=log)[2]
    engine = variants.Engine.PERSISTENT if persistent else variants.Engine.TRITON
    assert [r.engine for r in ran] == [engine] * 2
    assert fused == [2.0 if persistent else None]
    launches = log.elementwise()
    listing = "\n".join(map(str, launches))
    assert not [x for x in launches if x.is_copy], listing
    forward, backward = launches[:n_forward], launches[n_forward:]
    if persistent:
        assert forward == [], listing
    else:  # U prescaled by one multiply
        assert [(x.name, x.inputs[0][0], x.dtype) for x in forward] == [("mul", (N, R), BF16)], listing
    assert [(x.name, x.inputs[0][:2], x.dtype) for x in backward] == [
        ("mul", ((N, R), BF16), F32), ("mul", ((R, K), BF16), F32),  # the LoRA gradients, scaled and upcast
        ("mul", ((R, K) if persistent else (K, R), BF16), BF16)], listing  # the dgrad's U = lora_a^T, prescaled


def test_the_backward_reads_the_casts_the_forward_made():
    """The autograd formula hands the backward op the forward op's outputs 2 and 3 (lora_a, lora_b in bf16)
    for FP32 masters, and nothing for bf16 masters (which need no cast; an op output may not alias them)."""
    x, _, a, b, _, _, wl = lora_gemm_case(M, N, K, R, "bf16", seed=1, device="cpu")
    for masters, cast in ((F32, True), (BF16, False)):
        a_, b_ = a.to(masters), b.to(masters)

        def step(x, a, b):
            y = ops.lora_linear(x, wl, "bf16", a, b, None, None, 2.0)
            return torch.autograd.grad(y.float().square().sum(), (x, a, b))

        gm = make_fx(step)(*(t.clone().requires_grad_() for t in (x, a_, b_)))
        fwd = [n for n in gm.graph.nodes if n.target is torch.ops.surogate.lora_linear.default]
        bwd = [n for n in gm.graph.nodes if n.target is torch.ops.surogate.lora_linear_backward.default]
        assert len(fwd) == len(bwd) == 1
        given = bwd[0].args[11:]
        if cast:
            assert [(n.target, n.args) for n in map(_saved, given)] == [(operator.getitem, (fwd[0], 2)),
                                                                        (operator.getitem, (fwd[0], 3))]
        else:  # None, or left out (the tracer drops trailing defaults)
            assert all(t is None for t in given)
        outputs = torch.ops.surogate.lora_linear(x, wl, "bf16", a_, b_, None, None, 2.0, "bf16", "bf16")
        assert [tuple(t.shape) for t in outputs[2:]] == ([(R, K), (N, R)] if cast else [(0,), (0,)])
        if cast:
            assert torch.equal(outputs[2], a.to(BF16)) and torch.equal(outputs[3], b.to(BF16))


def _saved(node: torch.fx.Node) -> torch.fx.Node:
    """The value a saved tensor was (make_fx traces autograd's saved tensors as detaches of it, torch 2.15 as
    aliases)."""
    while node.target in (torch.ops.aten.detach.default, torch.ops.aten.alias.default):
        node = node.args[0]
    return node


@pytest.mark.parametrize("masters", [F32, BF16], ids=["fp32_masters", "bf16_masters"])
def test_opcheck_with_the_casts_as_outputs(masters):
    x, _, a, b, _, _, wl = lora_gemm_case(6, N, K, 4, "bf16", seed=2, device="cpu")
    args = (x, wl, "bf16", a.to(masters).requires_grad_(), b.to(masters).requires_grad_(), None, None, 2.0, "bf16",
            "bf16")
    torch.library.opcheck(torch.ops.surogate.lora_linear, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "triton"])
@pytest.mark.parametrize("scale", [2.0, 0.37])
def test_the_op_path_has_the_bits_of_the_launcher_casting_itself(persistent, scale, monkeypatch):
    """The op's CUDA implementation (casts made once, passed to the backward) against the launcher given the FP32
    masters (casting them itself, as before): the same output and gradients, bit for bit; the LoRA gradients
    are `(bf16 product).float() * scale` exactly, in the masters' FP32."""
    monkeypatch.setattr(variants, "PERSISTENT_SM90", persistent)
    x, _, a, b, _, go, wl = lora_gemm_case(M, N, K, R, "fp8_row", seed=3, device="cpu")
    y, (dx, ga, gb, _), _ = _step(x, wl, a, b, go, scale)
    y0, h0 = launch.lora_linear_cuda(x, wl, "fp8_row", a, b, None, None, scale, "fp8", "fp8")
    dx0, ga0, gb0, _ = launch.lora_linear_backward_cuda(go, x, wl, "fp8_row", a, b, None, h0, scale, "fp8")
    for got, want in ((y, y0), (dx, dx0), (ga, ga0), (gb, gb0)):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert ga.dtype == gb.dtype == F32
    gh = go @ b.to(BF16)
    assert torch.equal(gb, (go.t() @ h0).float() * scale)
    assert torch.equal(ga, (gh.t() @ x).float() * scale)


@pytest.mark.parametrize("scale", [2.0, 0.37, 1 / 3, 1.0, 1e-3])
def test_one_kernel_scalings_have_the_bits_of_the_three_kernel_ones(scale):
    """`_prescale`, `lora_up_rows` and grad_lora's `_scaled` against the formulas they replace, over bf16 values
    from 1e-30 to 1e30 (products rounded once, in FP32, from the scale read as FP32)."""
    g = torch.Generator().manual_seed(4)
    up = (torch.randn(N, R, generator=g) * torch.logspace(-30, 30, R)).to(BF16)
    want = (up.float() * scale).to(BF16)
    assert torch.equal(lora_linear._prescale(up, scale), want)
    rows = lora_linear.lora_up_rows(up, scale)
    assert rows.is_contiguous() and torch.equal(rows, want.t())
    rows_t = lora_linear.lora_up_rows(up.t().contiguous().t(), scale)  # the dgrad's lora_a^T view
    assert rows_t.is_contiguous() and torch.equal(rows_t, want.t())
    got = grad_lora._scaled(up, scale, F32)
    assert got.dtype == F32 and torch.equal(got, up.float() * scale)
    assert torch.equal(grad_lora._scaled(up, scale, BF16), (up.float() * scale).to(BF16))


@pytest.mark.parametrize("persistent,routes,scalings", [
    (False, ["lora_linear_fp8", "grad_input_fp8"],
     ["(12288, 16)", "(12288, 16)", "(16, 4096)", "(4096, 16)"]),
    (True, ["persistent_lora_linear_fp8", "persistent_grad_input_fp8"],
     ["(12288, 16)", "(16, 4096)", "(16, 4096)"]),
])
def test_bench_copies_scales_one_linear_to_the_model_shape(persistent, routes, scalings, monkeypatch):
    """bench/copies.py runs the same step on the route the 8B gate_proj takes on sm_90 (fp8: the persistent
    kernel; `_lora_gemm_kernel` when PERSISTENT_SM90 keeps it off) and maps the shapes back. The factors'
    casts (and the persistent kernel's U^T) are one Triton launch now, not ATen ones: no row of their own."""
    from bench_module import load_bench

    copies = load_bench("copies")
    monkeypatch.setattr(variants, "PERSISTENT_SM90", persistent)
    rows, ran = copies.launches("fp8", 12288, 4096, 4096, 16, 2.0)
    assert ran == routes
    assert [(r["op"], r["inputs"][0]) for r in rows] == [("mul", f"{s} bfloat16") for s in scalings]
    assert rows[-1]["bytes"] == 16 * 4096 * (2 + 2)  # the dgrad's U, prescaled: bf16 read and written


def test_this_torch_has_the_fp32_out_gemm_the_cuda_gradients_use():
    """On CUDA each LoRA weight gradient is one `addmm(out_dtype=float32)` (`grad_lora._weight_grad`); the
    operator must exist in every supported torch, or the gradients fall back to the bf16 product silently.
    Its CPU kernel does not exist, so the CPU tests above run the fallback; the schema is checked here."""
    from surogate.compat import fp32_out_addmm

    assert fp32_out_addmm()
    schema = str(torch.ops.aten.addmm.dtype._schema)
    assert "ScalarType out_dtype" in schema and "Scalar beta" in schema and "Scalar alpha" in schema
