"""surogate's chunked gated delta rule (surogate/ops/delta_rule.py) against transformers' PyTorch rule (the
reference: the same algorithm with a Python loop over chunks) and the token-by-token recurrence (first principles),
forward and the gradients of all five inputs, on the CPU (the pass over chunks: the torch twins here; the Triton
kernels against those twins: tests/test_kernels_delta_scan.py)."""

from __future__ import annotations

import pytest
import torch

from surogate.ops.delta_rule import chunk_gated_delta_rule

qwen3_5 = pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")


def _inputs(batch, length, key_heads, heads, dk, dv, reset_at=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, length, key_heads, dk, generator=gen) for _ in range(2))
    v = torch.randn(batch, length, heads, dv, generator=gen)
    g = -torch.rand(batch, length, heads, generator=gen) * 0.5
    if reset_at is not None:
        g[:, reset_at] = -100.0  # a packed example starting there (ops/linear_attention.py's RESET)
    beta = torch.rand(batch, length, heads, generator=gen)
    return [t.requires_grad_() for t in (q, k, v, g, beta)]


def _reference(q, k, v, g, beta, l2norm):
    heads = v.shape[2]
    if k.shape[2] != heads:  # transformers 5.17 repeats in the layer, later ones in the rule: the same heads
        q, k = (x.repeat_interleave(heads // k.shape[2], dim=2) for x in (q, k))
    rule = getattr(qwen3_5.torch_chunk_gated_delta_rule, "__wrapped__", qwen3_5.torch_chunk_gated_delta_rule)
    return rule(q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=l2norm)[0]


@pytest.mark.parametrize("length, key_heads, l2norm, reset_at", [(150, 3, True, 70), (64, 3, False, None),
                                                                  (37, 1, True, 5), (200, 2, True, 128)])
def test_rule_and_gradients_equal_transformers_rule(length, key_heads, l2norm, reset_at):
    """Lengths off the 64-token chunk (padding), grouped value heads, a segment reset inside a chunk and on a chunk
    boundary."""
    ours = _inputs(2, length, key_heads, 4 if key_heads != 3 else 3, 32, 48, reset_at)
    ref = [t.detach().clone().requires_grad_() for t in ours]
    out, expected = chunk_gated_delta_rule(*ours, use_qk_l2norm=l2norm), _reference(*ref, l2norm)
    assert out.shape == expected.shape == ours[2].shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(out)
    for a, b, name in zip(torch.autograd.grad(out, ours, grad), torch.autograd.grad(expected, ref, grad), "qkvgb"):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_rule_is_the_token_by_token_recurrence_and_a_reset_forgets_the_state():
    """First principles: S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T, o_t = S_t^T q_t / sqrt(Dk);
    q and k of unit length (the models' l2norm: beta |k|^2 <= 1 keeps the state bounded); and after a reset the output
    equals the rule on the tail alone."""
    q, k, v, g, beta = (t.detach() for t in _inputs(1, 90, 2, 2, 16, 16, reset_at=40, seed=3))
    q, k = (x / x.norm(dim=-1, keepdim=True) for x in (q, k))
    out = chunk_gated_delta_rule(q, k, v, g, beta)
    state, expected = torch.zeros(2, 16, 16), []
    for t in range(90):
        decay = g[0, t].exp()[:, None, None]
        kt, vt, qt = k[0, t], v[0, t], q[0, t] * 16 ** -0.5
        predicted = torch.einsum("hkv,hk->hv", state * decay, kt)
        state = state * decay + beta[0, t][:, None, None] * torch.einsum("hk,hv->hkv", kt, vt - predicted)
        expected.append(torch.einsum("hkv,hk->hv", state, qt))
    torch.testing.assert_close(out[0], torch.stack(expected), rtol=1e-4, atol=1e-5)
    tail = chunk_gated_delta_rule(q[:, 40:], k[:, 40:], v[:, 40:], g[:, 40:], beta[:, 40:])
    torch.testing.assert_close(out[:, 40:], tail, rtol=1e-4, atol=1e-5)


def test_value_heads_not_a_multiple_of_key_heads_is_a_clear_error():
    q, k, v, g, beta = _inputs(1, 16, 2, 3, 16, 16)
    with pytest.raises(ValueError, match="3 value heads are not a multiple of 2 key heads"):
        chunk_gated_delta_rule(q, k, v, g, beta)
