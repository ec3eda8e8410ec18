"""`save_fp8_inputs` compiled by Inductor for CUDA (marked `gpu`; deselected without CUDA).

On the CPU (tests/test_save_fp8.py) only LoRA A's gradients change, to exactly what the op gives for the
dequantized FP8 input. Here the kernel that reads the FP8 copy (kernels/grad_lora_fp8.py) against its formula, and
Inductor compiles the forward without the bf16 inputs kept (the RMSNorm / SwiGLU kernels no longer write them for
the backward) and the backward with A's gradient from the copy: the forward keeps less,
the loss and B's gradients follow the run that keeps bf16 (Inductor may fuse differently: a tight closeness,
not equality), and A's gradients stay as close to eager PEFT's as they were. qfp8 runs its SwiGLU forward op,
whose FP8 outputs the backward then keeps (passes/swiglu.py's `quantize_in_swiglu_forward`).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, when run as a script
from tiny_qwen3 import VOCAB, cuda_lora_qwen3  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("fmt", ["fp8_row", "fp8_block"])
@pytest.mark.parametrize("m,k,r", [(4096, 12288, 16), (1000, 4000, 24), (37, 384, 8)], ids=str)
def test_the_kernel_on_cuda_against_its_formula(fmt, m, k, r):
    """`grad_lora_a_fp8` against `s * gh^T @ dequantize(data, scale)` in FP32 (cuBLAS, the same bf16 values):
    the sums in another order only. 1000 x 4000: rows not a multiple of the 64-row tile, a ragged 1 x 128 block."""
    from surogate.kernels.grad_lora_fp8 import grad_lora_a_fp8
    from surogate.kernels.reference import dequantize_input_q, input_quantizer

    gen = torch.Generator(device="cuda").manual_seed(m)
    x = (torch.randn(m, k, device="cuda", generator=gen) * 3).bfloat16()
    gh = torch.randn(m, r, device="cuda", generator=gen).bfloat16()
    data, scale = input_quantizer("fp8", fmt)(x)
    got = grad_lora_a_fp8(gh, data, scale, 2.0, torch.float32)
    want = (gh.float().t() @ dequantize_input_q([data, scale], torch.bfloat16).float()) * 2.0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def _step(recipe: str | None, save: bool):
    """(loss, {A, B}: flat LoRA grads, report, bytes the forward keeps) of the second step on fixed ids."""
    import surogate

    torch._dynamo.reset()
    model = cuda_lora_qwen3()
    if recipe is not None:
        model = surogate.compile(model, recipe=recipe, recompute_producers=False, save_fp8_inputs=save)
    ids = torch.randint(0, VOCAB, (2, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()  # compiles; the next forward is measured
    model.zero_grad(set_to_none=True)
    before = torch.cuda.memory_allocated()
    loss = model(input_ids=ids, labels=ids).loss
    kept = torch.cuda.memory_allocated() - before
    loss.backward()
    params = dict(model.named_parameters())
    grads = {f: torch.cat([params[n].grad.flatten().float() for n in sorted(params) if f"lora_{f}" in n])
             for f in "AB"}
    return loss.item(), grads, str(getattr(model, "surogate_report", "")), kept


@pytest.mark.parametrize("recipe", ["fp8", "qfp8"])
def test_fp8_copies_on_cuda_keep_less_and_move_only_lora_a(recipe):
    _, g_eager, _, _ = _step(None, False)
    loss_off, g_off, _, kept_off = _step(recipe, False)
    loss_on, g_on, report, kept_on = _step(recipe, True)
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a, b, dim=0).item()  # noqa: E731
    rel = lambda g, f: ((g[f] - g_eager[f]).norm() / g_eager[f].norm()).item()  # noqa: E731
    print(f"{recipe}: kept {kept_off} -> {kept_on} bytes, loss {loss_off} / {loss_on}, "
          f"cos B {cos(g_on['B'], g_off['B'])} A {cos(g_on['A'], g_off['A'])}, "
          f"relative to eager PEFT: A {rel(g_off, 'A')} -> {rel(g_on, 'A')}, "
          f"B {rel(g_off, 'B')} -> {rel(g_on, 'B')}")
    assert "kept for the backward in FP8" in report, report
    # The CPU partition says 16% fewer bytes per layer; this tiny model's run also holds the LM head's and the
    # loss's tensors (run 139: 8.6% fewer for fp8, 7.7% for qfp8).
    assert kept_on < 0.95 * kept_off, (kept_on, kept_off)
    assert abs(loss_on - loss_off) <= 1e-3 * abs(loss_off)
    assert cos(g_on["B"], g_off["B"]) > 0.9999
    assert cos(g_on["A"], g_off["A"]) > 0.999
    assert rel(g_on, "A") < 1.5 * rel(g_off, "A") + 1e-3, (rel(g_on, "A"), rel(g_off, "A"))


def test_auto_keeps_fp8_copies_for_fp8_and_none_for_qfp8():
    """`save_fp8_inputs="auto"` on a GPU with memory to spare: fp8 keeps its producers (recompute "auto"), so their
    FP8 copies are kept instead; qfp8 rebuilds them, and keeps no copy."""
    import surogate

    reports = {}
    for recipe in ("fp8", "qfp8"):
        torch._dynamo.reset()
        model = surogate.compile(cuda_lora_qwen3(), recipe=recipe, save_fp8_inputs="auto")
        ids = torch.randint(0, VOCAB, (2, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        model(input_ids=ids, labels=ids).loss.backward()
        reports[recipe] = str(model.surogate_report)
    assert "save_fp8_inputs auto: on" in reports["fp8"] and "kept for the backward in FP8" in reports["fp8"]
    assert "save_fp8_inputs auto: off" in reports["qfp8"] and "kept for the backward in FP8" not in reports["qfp8"]
