"""The bf16 LoRA linear as one cuBLAS GEMM over the widened reduction, on the GPU (marked `gpu`).

(1) The op on real shapes: `wide.output` / `wide.grad_input` against PEFT's eager formula in FP32 (SQNR), and
against the persistent / Triton route the op takes without wide operands (the same inputs, one rounding apart).
(2) A tiny Qwen3 compiled for bf16 with `wide_lora` on and off (rows = 2 x 1024, at the arch's minimum): the wide
route ran (variants.trace), the losses of 3 optimizer steps agree, and the LoRA gradients of the first step are
at a cosine >= 0.9999 of the other route's.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, when run as a script
from tiny_qwen3 import VOCAB, cuda_lora_qwen3  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def wide_on_sm90(monkeypatch):
    from surogate.kernels import variants

    monkeypatch.setattr(variants, "WIDE_SM", dict(variants.WIDE_SM_CANDIDATE))


def _sqnr(y: torch.Tensor, ref: torch.Tensor) -> float:
    err = (y.float() - ref.float()).pow(2).sum().clamp_min(1e-30)
    return float(10 * torch.log10(ref.float().pow(2).sum() / err))


@pytest.mark.parametrize("shape", [(4096, 6144, 4096, 48), (2048, 4096, 12288, 16), (1024, 1024, 2048, 8)],
                         ids=lambda s: "x".join(map(str, s)))
def test_the_wide_gemm_matches_the_formula_and_the_other_route(shape):
    from surogate.kernels import launch, variants, wide
    from surogate.recipes.recipe import Compute, WeightFormat

    m, n, k, r = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=g) / k ** 0.5).bfloat16()
    a = torch.randn(r, k, device="cuda", generator=g) / k ** 0.5
    b = torch.randn(n, r, device="cuda", generator=g) * 0.1
    go = torch.randn(m, n, device="cuda", generator=g).bfloat16()
    s = 2.0
    weight = wide.reserve(w.clone(), wide.spare_for(r))
    xw = torch.cat([x, torch.full((m, wide.spare_for(r)), float("nan"), device="cuda", dtype=x.dtype)], -1)
    gw = torch.cat([go, torch.full((m, wide.spare_for(r)), float("nan"), device="cuda", dtype=x.dtype)], -1)
    with variants.trace() as ran:
        out, hidden = launch.lora_linear_cuda(xw[:, :k], [weight], WeightFormat.BF16, a, b, None, None, s,
                                              Compute.BF16, Compute.BF16, input_q=[xw])
        dx, da, db, _ = launch.lora_linear_backward_cuda(gw[:, :n], xw[:, :k], [weight], WeightFormat.BF16, a, b,
                                                         None, hidden, s, Compute.BF16, grad_output_q=[gw])
    assert [t.engine for t in ran] == [variants.Engine.CUBLAS_WIDE] * 2, [str(t) for t in ran]
    ref_out = x.float() @ w.float().t() + s * (x.float() @ a.t()) @ b.t()
    ref_dx = go.float() @ w.float() + s * (go.float() @ b) @ a
    assert _sqnr(out, ref_out) > 45 and _sqnr(dx, ref_dx) > 45
    with variants.trace() as ran:
        out2, _ = launch.lora_linear_cuda(x, [w], WeightFormat.BF16, a, b, None, None, s, Compute.BF16, Compute.BF16)
        dx2, da2, db2, _ = launch.lora_linear_backward_cuda(go, x, [w], WeightFormat.BF16, a, b, None, hidden, s,
                                                            Compute.BF16)
    assert all(t.engine is not variants.Engine.CUBLAS_WIDE for t in ran)
    assert _sqnr(out, out2) > 45 and _sqnr(dx, dx2) > 45
    assert torch.equal(da, da2) and torch.equal(db, db2)  # the LoRA gradients read the same g and x
    assert torch.equal(weight, w)


def _run(wide_lora: bool, rows: int = 1024):
    import surogate
    from surogate.kernels import variants

    torch._dynamo.reset()
    model = surogate.compile(cuda_lora_qwen3(), recipe="bf16", wide_lora=wide_lora)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    gen = torch.Generator(device="cuda").manual_seed(1)
    losses, first_grads = [], None
    with variants.trace() as ran:
        for _ in range(3):
            ids = torch.randint(0, VOCAB, (2, rows), device="cuda", generator=gen)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            if first_grads is None:
                first_grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    return losses, first_grads, {t.engine for t in ran}, str(model.surogate_report)


def test_a_compiled_model_runs_wide_and_trains_as_without():
    from surogate.kernels import variants

    losses, grads, engines, report = _run(True)
    plain_losses, plain_grads, plain_engines, _ = _run(False)
    assert variants.Engine.CUBLAS_WIDE in engines and variants.Engine.CUBLAS_WIDE not in plain_engines
    assert "input stored with" in report and "stored with spare columns" in report
    assert losses == pytest.approx(plain_losses, rel=2e-3)
    for name, grad in grads.items():
        cos = torch.nn.functional.cosine_similarity(grad.flatten(), plain_grads[name].flatten(), dim=0)
        assert cos > 0.9999, (name, float(cos))
