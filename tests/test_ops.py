"""The op layer: schemas, fake impls, autograd and compile-traceability of surogate::lora_linear."""

from __future__ import annotations

import pytest
import torch

from surogate import ops
from surogate.kernels import reference
from surogate.recipes import get

# (recipe, weight_format, forward, grad_input) for every recipe that runs on the CPU reference.
RECIPES = [(name, get(name).weight_format.value, get(name).forward.value, get(name).grad_input.value)
           for name in ("bf16", "fp8", "fp4", "qfp8", "qfp8-bf16", "qfp4", "qnf4")]


def _case(m: int = 6, k: int = 128, n: int = 256, r: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, m, k, generator=g).to(torch.bfloat16)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(torch.bfloat16)
    a = torch.randn(r, k, generator=g) / k**0.5
    b = torch.randn(n, r, generator=g) * 0.1
    return x, w, a, b


@pytest.mark.parametrize("recipe, fmt, fwd, bwd", RECIPES)
def test_op_equals_reference_and_autograd_calls_reference_backward(recipe, fmt, fwd, bwd):
    x, w, a, b = _case()
    weight = ops.prepare_weight(w, fmt)
    want, hidden = reference.lora_linear_ref(x, weight, fmt, a, b, None, None, 2.0, fwd, bwd)

    x_ = x.clone().requires_grad_()
    a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
    got = ops.lora_linear(x_, weight, fmt, a_, b_, None, None, 2.0, fwd, bwd)
    assert torch.equal(got, want)

    grad_output = torch.randn_like(got)
    got.backward(grad_output)
    g_x, g_a, g_b, g_li = reference.lora_linear_backward_ref(grad_output, x, weight, fmt, a, b, None, hidden, 2.0,
                                                             bwd)
    assert g_li is None
    assert torch.equal(x_.grad, g_x)
    assert torch.equal(a_.grad, g_a) and a_.grad.dtype == torch.float32
    assert torch.equal(b_.grad, g_b)


@pytest.mark.parametrize("recipe, fmt, fwd, bwd", [RECIPES[0], RECIPES[3], RECIPES[6]])
def test_opcheck_schema_fake_and_autograd_registration(recipe, fmt, fwd, bwd):
    x, w, a, b = _case(m=3)
    weight = ops.prepare_weight(w, fmt)
    args = (x, weight, fmt, a.requires_grad_(), b.requires_grad_(), None, None, 2.0, fwd, bwd)
    # opcheck's schema test compares inputs with allclose, which float8 tensors do not implement on CPU.
    utils = ("test_faketensor", "test_autograd_registration")
    if fmt == "bf16" or fmt == "nf4":
        utils = ("test_schema", *utils)
    torch.library.opcheck(torch.ops.surogate.lora_linear, args, test_utils=utils)


def test_compiled_fullgraph_equals_eager_outputs_and_grads():
    x, w, a, b = _case()
    weight = ops.prepare_weight(w, "fp8_block")

    def step(x, a, b):
        return ops.lora_linear(x, weight, "fp8_block", a, b, None, None, 2.0, "fp8", "fp8")

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        x_, a_, b_ = (t.clone().requires_grad_() for t in (x, a, b))
        y = fn(x_, a_, b_)
        y.square().sum().backward()
        results.append((y, x_.grad, a_.grad, b_.grad))
    for eager, compiled in zip(*results):
        assert torch.equal(eager, compiled)


def test_lora_input_gets_the_lora_gradient_and_input_only_the_base_one():
    x, w, a, b = _case()
    weight = ops.prepare_weight(w, "bf16")
    x_ = x.clone().requires_grad_()
    dropped = (x * (torch.rand_like(x, dtype=torch.float32) > 0.5)).to(torch.bfloat16).requires_grad_()
    y = ops.lora_linear(x_, weight, "bf16", a, b, dropped, None, 2.0)
    y.sum().backward()
    base_only = torch.ones_like(y) @ w  # d(sum(x @ W.T))/dx in bf16
    torch.testing.assert_close(x_.grad.float(), base_only.float(), rtol=2e-2, atol=2e-2)
    assert dropped.grad is not None and dropped.grad.abs().sum() > 0


def test_plain_linear_without_lora_has_an_empty_hidden():
    x, w, _, _ = _case()
    out, hidden, a_cast, b_cast = torch.ops.surogate.lora_linear(x, [w], "bf16", None, None, None, None, 1.0, "bf16",
                                                                 "bf16")
    assert hidden.shape == (*x.shape[:-1], 0) and a_cast.numel() == b_cast.numel() == 0
    torch.testing.assert_close(out.float(), (x.float() @ w.float().T), rtol=1e-2, atol=1e-2)


def test_frozen_weight_and_bias_never_get_gradients():
    x, w, a, b = _case()
    w_ = w.clone().requires_grad_()
    bias = torch.zeros(w.shape[0], dtype=torch.bfloat16, requires_grad=True)
    y = ops.lora_linear(x, [w_], "bf16", a.requires_grad_(), b.requires_grad_(), None, bias, 1.0)
    y.sum().backward()
    assert w_.grad is None and bias.grad is None and a.grad is not None


@pytest.mark.parametrize("kwargs, message", [
    (dict(weight_format="int4"), "unknown weight_format"),
    (dict(forward="fp16"), "unknown forward precision"),
    (dict(weight_format="fp8_block"), "takes 2 tensors"),
    (dict(lora_b=None), "both lora_a and lora_b"),
])
def test_bad_arguments_say_what_to_do(kwargs, message):
    x, w, a, b = _case()
    args = dict(input=x, weight=[w], weight_format="bf16", lora_a=a, lora_b=b)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        ops.lora_linear(**args)


def test_mismatched_lora_shapes_are_refused():
    x, w, a, b = _case()
    with pytest.raises(ValueError, match="LoRA shapes do not fit"):
        ops.lora_linear(x, [w], "bf16", a, b[:, :2])


def test_check_finite_names_the_problem_and_is_off_by_default():
    x, w, a, b = _case()
    x[0, 0, 0] = float("nan")
    ops.lora_linear(x, [w], "bf16", a, b)  # off: no host sync, no error
    with ops.check_finite(), pytest.raises(FloatingPointError, match="NaN or Inf"):
        ops.lora_linear(x, [w], "bf16", a, b)


def test_prepare_weight_refuses_non_matrices_and_unknown_formats():
    with pytest.raises(ValueError, match="2-D"):
        ops.prepare_weight(torch.zeros(4), "bf16")
    with pytest.raises(ValueError, match="unknown weight_format"):
        ops.prepare_weight(torch.zeros(4, 4), "int8")
