"""The cross-entropy kernel (surogate/kernels/cross_entropy.py) against its plain-torch twin, and that twin
against torch's own cross_entropy and autograd.

Runs on CPU under TRITON_INTERPRET=1 (tests/conftest.py sets it before Triton loads): loss, lse and the
gradient it writes over the logits, for bf16 and FP32 logits, softcap on and off, ignored rows (a chunk of
only ignored rows too), V not a multiple of BLOCK_V, and Gemma's 262,144-token vocabulary.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # conftest sets it too; here so the file also runs alone
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from surogate.kernels.cross_entropy import cross_entropy, get_cross_entropy_configs  # noqa: E402
from surogate.kernels.reference import IGNORE_INDEX, cross_entropy_ref  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# The gradient is FP32 math rounded once to the logits' dtype in both. exp differs by an FP32 ulp or so
# between the kernel (GPU: ex2.approx; interpreter: numpy) and torch, and the FP32 sums run in another
# order, so a value near a rounding boundary may land one ulp away: one bf16 ulp is 2**-7 relative at
# most. Probabilities below 1e-9 (logits 20 below the max) are compared absolutely.
GRAD_TOL = {torch.bfloat16: dict(rtol=2**-7, atol=1e-9), torch.float32: dict(rtol=1e-5, atol=1e-9)}


def _case(rows: int, vocab: int, dtype: torch.dtype, seed: int = 0, ignore: tuple[int, ...] = (1,)):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g) * 4).to(dtype)
    # Logits far above exp's FP32 range (88), so that only a running max keeps the sums finite: row 2 has
    # them in its first block (later blocks must not lower the max), row 3 in its last (earlier sums rescaled).
    if rows > 2:
        logits[2, :5] = 200.0
    if rows > 3:
        logits[3, -5:] = 200.0
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[0] = vocab - 1  # the last column, in the last (partial) block
    labels[[i for i in ignore if i < rows]] = IGNORE_INDEX
    return logits.to(DEV), labels.to(DEV)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("softcap", [0.0, 3.0])
@pytest.mark.parametrize("rows, vocab, block_v", [(5, 37, None), (7, 1000, 128), (3, 262144, None)])
def test_kernel_matches_reference(dtype, softcap, rows, vocab, block_v):
    logits, labels = _case(rows, vocab, dtype)
    got, want = logits.clone(), logits.clone()
    scale = torch.tensor(1 / 3, device=DEV)  # the loss's 1 / n_tokens
    loss, lse = cross_entropy(got, labels, softcap, True, grad_scale=scale, block_v=block_v)
    ref_loss, ref_lse = cross_entropy_ref(want, labels, softcap, True, grad_scale=scale)
    # FP32 reductions over up to 262,144 terms in another order (per block, online).
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, **GRAD_TOL[dtype])
    ignored = labels == IGNORE_INDEX
    assert not loss[ignored].any() and not lse[ignored].any() and not got[ignored].any()
    assert (loss[~ignored] > 0).all()


def test_without_gradient_reads_only_and_gives_the_same_loss():
    logits, labels = _case(6, 1000, torch.bfloat16, seed=3)
    kept = logits.clone()
    loss, lse = cross_entropy(logits, labels, 0.0, False, block_v=256)
    assert torch.equal(logits, kept)  # nothing written
    grad_loss, grad_lse = cross_entropy(kept.clone(), labels, 0.0, True, block_v=256)
    assert torch.equal(loss, grad_loss) and torch.equal(lse, grad_lse)


def test_a_chunk_of_ignored_rows_is_all_zeros():
    logits, labels = _case(4, 300, torch.bfloat16, ignore=(0, 1, 2, 3))
    loss, lse = cross_entropy(logits, labels, 2.0, True, block_v=128)
    assert not loss.any() and not lse.any() and not logits.any()


def test_label_outside_the_vocabulary_gives_nan_not_a_wild_read():
    logits, labels = _case(3, 50, torch.float32)
    labels[0], labels[2] = 50, -7
    loss, _ = cross_entropy(logits, labels, 0.0, False)
    assert loss[[0, 2]].isnan().all() and loss[1] == 0  # row 1 is ignored


def test_launcher_refuses_what_the_kernel_cannot_read():
    logits, labels = _case(4, 40, torch.bfloat16)
    with pytest.raises(ValueError, match="row-major"):
        cross_entropy(logits.t().contiguous().t(), labels)
    with pytest.raises(ValueError, match="row-major"):
        cross_entropy(logits.to(torch.int32), labels)
    with pytest.raises(ValueError, match="int64"):
        cross_entropy(logits, labels.int())
    empty = logits[:0]
    assert cross_entropy(empty, labels[:0])[0].shape == (0,)
    assert get_cross_entropy_configs(vocab=37)["BLOCK_V"] == 64
    assert get_cross_entropy_configs(vocab=151936)["BLOCK_V"] == 4096


@pytest.mark.parametrize("softcap", [0.0, 30.0, 3.0])
def test_reference_is_torch_cross_entropy_and_its_gradient(softcap):
    """The twin against an independent statement: F.cross_entropy of the FP32 (capped) logits and autograd."""
    logits, labels = _case(9, 257, torch.float32, seed=5, ignore=(1, 4))
    x = logits.cpu().double().requires_grad_()
    capped = torch.tanh(x / softcap) * softcap if softcap else x
    per_row = F.cross_entropy(capped, labels.cpu(), reduction="none", ignore_index=IGNORE_INDEX)
    per_row.sum().backward()
    got = logits.clone()
    loss, lse = cross_entropy_ref(got, labels, softcap, True)
    torch.testing.assert_close(loss.cpu().double(), per_row.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.cpu().double(), x.grad, rtol=1e-5, atol=1e-7)
    valid = labels.cpu() != IGNORE_INDEX
    torch.testing.assert_close(lse.cpu().double()[valid], torch.logsumexp(capped, -1).detach()[valid])
