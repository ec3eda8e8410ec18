"""Chunked LM head + cross-entropy against HF's ForCausalLMLoss: loss and gradients, odd chunkings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss

from surogate.ops.loss import chunk_rows, lm_head_cross_entropy


def _data(b=2, s=7, h=24, v=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, s, h, generator=g).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.3).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, v, (b, s), generator=g)
    labels[0, :3] = -100
    return hidden, weight, labels


def _hf(hidden, weight, labels, softcap=None, num_items=None):
    logits = F.linear(hidden, weight)
    if softcap:
        logits = torch.tanh(logits.float() / softcap) * softcap
    return ForCausalLMLoss(logits, labels, vocab_size=weight.shape[0], num_items_in_batch=num_items)


@pytest.mark.parametrize("chunk", [1, 5, 14, 1000])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_matches_hf_loss_and_grads(chunk, softcap):
    hidden, weight, labels = _data()
    ref = _hf(hidden, weight, labels, softcap)
    ref.backward()
    ref_gh, ref_gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    loss = lm_head_cross_entropy(hidden, weight, labels, softcap=softcap, chunk=chunk)
    loss.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    # bf16 grads: the last GEMM rounds to bf16 in both; allow one bf16 ulp.
    torch.testing.assert_close(hidden.grad, ref_gh, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(weight.grad, ref_gw, rtol=1e-2, atol=1e-3)


def test_num_items_in_batch_and_frozen_head():
    hidden, weight, labels = _data(seed=1)
    weight.requires_grad_(False)
    ref = _hf(hidden, weight, labels, num_items=torch.tensor(40))
    loss = lm_head_cross_entropy(hidden, weight, labels, num_items_in_batch=torch.tensor(40), chunk=3)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    loss.backward()
    assert hidden.grad is not None and weight.grad is None


def test_bias_and_all_ignored():
    hidden, weight, labels = _data(seed=2)
    bias = torch.randn(weight.shape[0]).to(torch.bfloat16)
    ref = ForCausalLMLoss(F.linear(hidden, weight, bias), labels, vocab_size=weight.shape[0])
    torch.testing.assert_close(lm_head_cross_entropy(hidden, weight, labels, bias=bias, chunk=4), ref,
                               rtol=1e-5, atol=1e-5)
    # HF returns 0/0 = NaN for a batch without targets, which poisons accumulated gradients; here: 0, no gradient.
    h = hidden.detach().clone().requires_grad_(True)  # a leaf: a non-leaf's .grad is always None
    empty = lm_head_cross_entropy(h, weight, torch.full_like(labels, -100))
    empty.backward()
    assert empty.item() == 0.0 and (h.grad is None or not h.grad.any())


def test_shape_error_and_chunk_heuristic():
    hidden, weight, labels = _data()
    with pytest.raises(ValueError, match="labels"):
        lm_head_cross_entropy(hidden, weight, labels[:, :3])
    assert chunk_rows(151936) * 151936 <= 1 << 26 and chunk_rows(10) >= 16


def test_opcheck():
    hidden, weight, labels = _data(b=1, s=5)
    shifted = labels.reshape(-1)
    torch.library.opcheck(torch.ops.surogate.lm_head_ce.default,
                          (hidden.reshape(-1, hidden.shape[-1]), weight, None, shifted, 0.0, 2),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
