"""Gradient producer fusion on the GPU (marked `gpu`; deselected without CUDA).

(1) Eager, the traceable gradient quantizers write the bytes of the Triton quantizers the dgrad runs, so
`lora_linear_backward_cuda` with `grad_output_q` from them equals the call without it bit for bit (on the
Triton route and, for fp8_block on sm_90, the cuBLAS one).
(2) A tiny Qwen3 compiled by Inductor for fp8 and qfp8 with `grad_producer` on and off: the forward is the
same graph, so the loss is equal; the LoRA gradients differ only where Inductor's fused quantizer and the
Triton one round an exact FP8 tie apart (Inductor's division is approximate, tests/gpu/test_producer_gpu.py),
bounded at a cosine of 0.9999, and are no further from eager PEFT than with the option off.
(3) The separate gradient quantize kernel is gone: the backward launches no Triton quantize kernel with the
option on (it does with it off; qfp8's q/k/v cat and block input are the exceptions, quantized by the op), and fewer kernels in all (fp8: the quantize rides in the producers' kernels;
qfp8: the gate/up gradient's in surogate::swiglu_backward).
"""

from __future__ import annotations

import os
import sys
from collections import Counter

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, when run as a script
from bit_compare import bits as _bits  # noqa: E402
from tiny_qwen3 import VOCAB, cuda_lora_qwen3  # noqa: E402

pytestmark = pytest.mark.gpu
FORMATS = ["fp8_row", "fp8_block"]
# (M, N, K, r): the block dgrad of the first runs on cuBLAS on sm_90 (M % 4, N % 512, K % 16), the second
# (odd M, N not a multiple of 128) on the Triton kernel everywhere.
SHAPES = [(1000, 1536, 2048, 16), (123, 1000, 384, 8)]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_lora_linear_backward_cuda_with_grad_output_q_equals_without(fmt, shape):
    from surogate import ops
    from surogate.kernels import launch
    from surogate.kernels.quantize import quantize_weight

    m, n, k, r = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    wl = quantize_weight((torch.randn(n, k, device="cuda", generator=g) / k ** 0.5).bfloat16(), fmt)
    a = torch.randn(r, k, device="cuda", generator=g) / k ** 0.5
    b = torch.randn(n, r, device="cuda", generator=g) * 0.1
    go = (torch.randn(m, n, device="cuda", generator=g) * torch.logspace(-3, 3, n, device="cuda")).bfloat16()
    go[1] = 0.0  # an all-zero row: scale 1
    h = launch.lora_linear_cuda(x, wl, fmt, a, b, None, None, 2.0, "fp8", "fp8")[1]
    grad_output_q = list(ops.grad_output_quantizer("fp8", fmt)(go))
    want = launch.lora_linear_backward_cuda(go, x, wl, fmt, a, b, None, h, 2.0, "fp8")
    got = launch.lora_linear_backward_cuda(go, x, wl, fmt, a, b, None, h, 2.0, "fp8", grad_output_q)
    for got_, want_ in zip(got, want):
        assert (got_ is None) == (want_ is None)
        if got_ is not None:
            assert torch.equal(_bits(got_), _bits(want_))
    with pytest.raises(TypeError, match="want data float8"):
        launch.lora_linear_backward_cuda(go, x, wl, fmt, a, b, None, h, 2.0, "fp8", [go, grad_output_q[1]])


def _step(recipe: str | None, grad_producer: bool = True):
    """(loss, flat LoRA grads, report, backward Triton quantize launches, backward kernel names) of a tiny
    Qwen3: compiled for `recipe` (Inductor), or eager PEFT for None. The second step is the one measured."""
    import surogate
    from surogate.kernels import launch

    torch._dynamo.reset()
    model = cuda_lora_qwen3()
    if recipe is not None:
        model = surogate.compile(model, recipe=recipe, grad_producer=grad_producer)
    ids = torch.randint(0, VOCAB, (2, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()  # compiles (and autotunes)
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    quantize_calls = []
    quantize = launch._quantize

    def counting(t, how):
        quantize_calls.append(how)
        return quantize(t, how)

    torch.cuda.synchronize()
    launch._quantize = counting
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            loss.backward()
            torch.cuda.synchronize()
    finally:
        launch._quantize = quantize
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not e.name.startswith(("Memcpy", "Memset"))]
    quantize_kernels = [name for name in kernels if "_quantize_fp8" in name]
    params = dict(model.named_parameters())
    grads = torch.cat([params[n].grad.flatten().float() for n in sorted(n for n in params if "lora_" in n)])
    report = str(getattr(model, "surogate_report", ""))
    return loss.item(), grads, report, (len(quantize_calls), len(quantize_kernels)), kernels


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("recipe", ["fp8", "qfp8"])
def test_qwen3_grad_producer_on_follows_off_and_drops_the_quantize_kernel(recipe, monkeypatch):
    from surogate.passes import swiglu

    # qfp8's SwiGLU forward op comes with grad_producer (passes/swiglu.py) and rounds h's E4M3 ties apart from
    # Inductor's: off here, so that both sides run the same forward graph (test_swiglu_gpu.py compares it).
    monkeypatch.setattr(swiglu, "FORWARD_OP", False)
    _, g_eager, _, _, _ = _step(None)
    loss_on, g_on, report, quantize_on, kernels_on = _step(recipe, True)
    loss_off, g_off, report_off, quantize_off, kernels_off = _step(recipe, False)
    assert "(grad_producer)" in report and "(grad_producer off)" in report_off
    assert loss_on == loss_off  # the forward is the same graph
    cosine = torch.nn.functional.cosine_similarity(g_on, g_off, dim=0).item()
    assert cosine > 0.995, cosine  # as the forward's producer test; measured 0.99990 (qfp8, H200, run 54)
    assert _rel(g_on, g_eager) < 1.05 * _rel(g_off, g_eager), (_rel(g_on, g_eager), _rel(g_off, g_eager))
    # Off, every dgrad quantizes its gradient with the Triton kernel; on, none does, but for qfp8's gradients that no
    # kernel produces, q/k/v's cat and down_proj's graph input: the op's quantizer reads them (passes/
    # op_grad_quantize.py), two a layer.
    assert quantize_off[0] > 0 and quantize_off[1] == quantize_off[0], quantize_off
    assert quantize_on == ((0, 0) if recipe == "fp8" else (4, 4)), quantize_on
    # ... and the quantize is not a kernel of its own in Inductor's code either where a producer can take it:
    # fp8 launches fewer kernels in all. qfp8's q/k/v cat, RMSNorm backward (a row reduction) and graph input have
    # no producer that takes a 1 x 128 amax (docs/compile.md): one Inductor kernel each in place of the Triton one
    # (193 and 193 launches, run 58). Its gate/up gradient is quantized by surogate::swiglu_backward, which also
    # computes it (passes/swiglu.py, on with grad_producer): one kernel a layer where the SwiGLU backward and a
    # quantize ran, so qfp8 launches fewer too. On a failure the message names the kernels each side launches
    # more often (Counter differences).
    more_on, more_off = Counter(kernels_on) - Counter(kernels_off), Counter(kernels_off) - Counter(kernels_on)
    fewer = len(kernels_on) < len(kernels_off)
    assert fewer, (len(kernels_on), len(kernels_off), dict(more_on), dict(more_off))
