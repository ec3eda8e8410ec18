"""kernels/lora_add.py under the interpreter: `out += bias + s * H @ U^T` in place, against the same sum in FP32
rounded once (what cuBLAS's addmm_ computes); which outputs it takes; and that the cuBLAS path hands it the add."""

from __future__ import annotations

import pytest
import torch
from numerics import rounded_once

from surogate.kernels import cublas, lora_add


def _want(out, hidden, up, bias, scale):
    acc = out.float()
    if bias is not None:
        acc = acc + bias.float()
    if hidden is not None:
        acc = acc + scale * (hidden.float() @ up.float().t())
    return acc.to(out.dtype)


def _inputs(m, n, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(m, n, generator=g).bfloat16()
    hidden = torch.randn(m, r, generator=g).bfloat16()
    up = torch.randn(n, r, generator=g).bfloat16()
    return out, hidden, up, torch.randn(n, generator=g)


@pytest.mark.parametrize("m,n,r", [(64, 256, 16), (37, 300, 8), (130, 96, 5), (8, 520, 64), (3, 17, 128)])
def test_adds_the_scaled_lora_term_rounded_once(m, n, r):
    out, hidden, up, _ = _inputs(m, n, r)
    out_before = out.clone()
    want = _want(out, hidden, up, None, 2.0)
    got = lora_add.lora_add_(out, hidden, up, None, 2.0, lora_add.Config(32, 64, 4))
    assert got.data_ptr() == out.data_ptr()  # in place
    # The r-term sum in another order than torch's FP32 matmul: the exact sum rounded once, almost all bit-equal.
    exact = out_before.double() + 2.0 * (hidden.double() @ up.double().t())
    magnitude = out_before.double().abs() + 2.0 * (hidden.double().abs() @ up.double().abs().t())
    assert rounded_once(got, exact, magnitude, r + 1) <= 1.0
    assert float((got != want).float().mean()) < 0.01


def test_bias_alone_and_with_the_lora_term_and_a_strided_up():
    out, hidden, lora_a_t, bias = _inputs(40, 72, 16, seed=1)
    lora_a = lora_a_t.t().contiguous()  # the dgrad's U: lora_a (r, K) read as its (K, r) view
    want = _want(out, hidden, lora_a.t(), bias, 0.5)
    got = lora_add.lora_add_(out.clone(), hidden, lora_a.t(), bias, 0.5, lora_add.Config(16, 32, 4))
    torch.testing.assert_close(got, want, rtol=2 ** -7, atol=0)
    out2 = out.clone()
    assert torch.equal(lora_add.lora_add_(out2, None, None, bias, 1.0), (out.float() + bias).bfloat16())
    assert torch.equal(lora_add.lora_add_(out.clone(), None, None, None, 1.0), out)  # nothing to add


def test_nan_in_the_term_reaches_the_output():
    out, hidden, up, _ = _inputs(16, 32, 16, seed=2)
    hidden[3, 0] = float("nan")
    got = lora_add.lora_add_(out, hidden, up, None, 1.0, lora_add.Config(16, 32, 4))
    assert bool(got[3].isnan().all()) and not bool(got[:3].isnan().any())


def test_takes_only_row_major_bf16_and_ranks_up_to_128():
    out, hidden, up, _ = _inputs(8, 16, 16)
    assert lora_add.takes(out, hidden) and lora_add.takes(out, None)
    assert not lora_add.takes(out.half(), hidden.half())
    assert not lora_add.takes(out.float(), None)
    assert not lora_add.takes(out.t(), hidden)
    assert not lora_add.takes(out, torch.zeros(8, 256, dtype=torch.bfloat16))
    assert not lora_add.takes(out, hidden.float())
    with pytest.raises(ValueError, match="row-major bf16"):
        lora_add.lora_add_(out.half(), hidden, up, None, 1.0)
    with pytest.raises(ValueError, match="do not fit"):
        lora_add.lora_add_(out, hidden, up[:8], None, 1.0)


def test_cublas_path_hands_the_add_to_the_kernel_on_the_gpu(monkeypatch):
    """On CUDA tensors `_add_lora_and_bias` calls the kernel (unless LORA_ADD_KERNEL is off); on the CPU, addmm_."""
    out, hidden, up, bias = _inputs(8, 16, 16)
    calls = []
    monkeypatch.setattr(lora_add, "lora_add_", lambda *a: calls.append(a) or a[0])
    cublas._add_lora_and_bias(out.clone(), hidden, up, bias, 2.0)
    assert not calls  # a CPU tensor
    fake = type("CudaOut", (), {"is_cuda": True, "dtype": torch.bfloat16, "stride": out.stride, "dim": out.dim})()
    cublas._add_lora_and_bias(fake, hidden, up, bias, 2.0)
    assert len(calls) == 1 and calls[0][4] == 2.0
    monkeypatch.setattr(cublas, "LORA_ADD_KERNEL", False)
    with pytest.raises(AttributeError):  # the addmm_ path, which the stand-in lacks
        cublas._add_lora_and_bias(fake, hidden, up, bias, 2.0)
