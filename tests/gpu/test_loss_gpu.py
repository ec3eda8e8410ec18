"""The LM-head cross-entropy on a GPU (marked `gpu`; deselected without CUDA): the compiled Triton kernel at
real vocabulary sizes against its plain-torch twin, and the fused op against HF's loss and gradients,
with the memory it needs. The CPU suite checks the same math under the interpreter on small shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss

from surogate.kernels.cross_entropy import cross_entropy
from surogate.kernels.reference import IGNORE_INDEX, cross_entropy_ref
from surogate.ops.loss import chunk_rows, lm_head_cross_entropy

pytestmark = pytest.mark.gpu
DEV = "cuda"


def kernel_against_reference(rows: int, vocab: int, softcap: float, dtype: torch.dtype, device: str = DEV) -> None:
    g = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(rows, vocab, generator=g) * 3).to(dtype).to(device)
    labels = torch.randint(0, vocab, (rows,), generator=g).to(device)
    labels[::3] = IGNORE_INDEX
    scale = torch.tensor(1 / 1000, device=device)
    got, want = logits.clone(), logits.clone()
    loss, lse = cross_entropy(got, labels, softcap, True, grad_scale=scale)
    ref_loss, ref_lse = cross_entropy_ref(want, labels, softcap, True, grad_scale=scale)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)  # FP32 sums in another order
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    # ex2.approx against torch's exp: an FP32 ulp or two before the one rounding to the logits' dtype
    torch.testing.assert_close(got, want, rtol=2**-7 if dtype == torch.bfloat16 else 1e-5, atol=1e-12)
    assert not got[labels == IGNORE_INDEX].any()
    loss_only, _ = cross_entropy(logits.clone(), labels, softcap, False)
    assert torch.equal(loss_only, loss)


@pytest.mark.parametrize("rows, vocab, softcap, dtype", [
    (chunk_rows(151936), 151936, 0.0, torch.bfloat16),  # a Qwen3 chunk
    (chunk_rows(262144), 262144, 30.0, torch.bfloat16),  # a Gemma chunk, softcapped
    (77, 32003, 0.0, torch.float32),  # an FP32 model, V not a multiple of the block
])
def test_kernel_matches_reference(rows, vocab, softcap, dtype):
    kernel_against_reference(rows, vocab, softcap, dtype)


def fused_against_hf(tokens: int, hidden_size: int, vocab: int, device: str = DEV) -> None:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, tokens, hidden_size, generator=g).to(torch.bfloat16).to(device).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=g) * 0.02).to(torch.bfloat16).to(device)
    labels = torch.randint(0, vocab, (1, tokens), generator=g).to(device)
    labels[:, : tokens // 4] = IGNORE_INDEX  # a masked prompt
    ref = ForCausalLMLoss(F.linear(hidden, weight).float(), labels, vocab_size=vocab)
    (ref_grad,) = torch.autograd.grad(ref, [hidden])
    loss = lm_head_cross_entropy(hidden, weight, labels)
    (grad,) = torch.autograd.grad(loss, [hidden])
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-4)
    # Both round (p - y) / n to bf16 before the dgrad GEMM, and its output once: an ulp apart at most each.
    assert (grad.float() - ref_grad.float()).norm() <= 2**-7 * ref_grad.float().norm()
    torch.testing.assert_close(grad, ref_grad, rtol=2**-6, atol=2**-8 * ref_grad.abs().max().item())


def test_fused_matches_hf_at_qwen3_size():
    fused_against_hf(4096, 1024, 151936)


def test_fused_peak_memory_is_a_chunk_not_the_logits():
    tokens, hidden_size, vocab = 8192, 1024, 151936
    hidden = torch.randn(1, tokens, hidden_size, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, device=DEV, dtype=torch.bfloat16) * 0.02
    labels = torch.randint(0, vocab, (1, tokens), device=DEV)
    lm_head_cross_entropy(hidden, weight, labels).backward()  # warm-up: kernel build, cuBLAS workspaces
    hidden.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    lm_head_cross_entropy(hidden, weight, labels).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    # One chunk's bf16 logits (256 MiB) plus grad_hidden twice (16 MiB each): far below the 2.5 GB of the
    # whole bf16 logits, let alone HF's FP32 copy and gradient (10 GB).
    assert peak < 400 * 2**20, f"{peak / 2**20:.0f} MiB"
