"""The chunked gated delta rule (Gated DeltaNet: Qwen3.5, Qwen3-Next), transformers' PyTorch algorithm with its
sequential pass over chunks as one kernel each way.

transformers' `torch_chunk_gated_delta_rule` (what runs where flash-linear-attention is not installed, or refuses
to run: fla 0.6 raises on Hopper under Triton < 3.7.1) loops over 64-token chunks in Python, a few small GEMMs per
chunk, and autograd records every trip. Here the same math, in the same FP32 and the same order, is batched over
all chunks except that pass, which is `_ChunkScan`: forward `kernels/delta_scan.py` on CUDA (its twin
`kernels/reference_delta.py` elsewhere), and an explicit backward, a second scan from the last chunk to the first.

Per (batch, head), chunk i of C tokens, c the cumulative log-decay inside the chunk, D[t, s] = exp(c_t - c_s) for
s <= t (else 0):
  T = I + strictly_lower((beta k) k^T * D)            the UT transform of the chunk's delta updates
  u = T^-1 (beta v),  W = T^-1 (beta k exp(c))        new values, and the keys that read the previous state
  A = (q k^T) * D                                     attention inside the chunk (q scaled by Dk^-1/2)
  then the scan (reference_delta.py) with Kd = k exp(c_last - c), gamma = exp(c_last); out_i = q exp(c) S_i + A v_i.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from surogate.kernels.reference_delta import delta_scan_backward_ref, delta_scan_forward_ref


def _scans(device: torch.device):
    """(forward, backward) scan: the Triton kernels on CUDA, else their torch twins (tests/test_kernels_delta_scan.py
    runs the kernels against the twins under TRITON_INTERPRET=1)."""
    if device.type == "cuda":
        from surogate.kernels.delta_scan import delta_scan_backward, delta_scan_forward

        return delta_scan_forward, delta_scan_backward
    return delta_scan_forward_ref, delta_scan_backward_ref


class _ChunkScan(torch.autograd.Function):
    """(u, W, Qd, A, Kd, gamma) -> out, all (BH, N, ...) FP32: out_i = Qd_i S_i + A_i v_i over the scan's states."""

    @staticmethod
    def forward(ctx, u: Tensor, w: Tensor, qd: Tensor, a: Tensor, kd: Tensor, gamma: Tensor) -> Tensor:
        forward_scan, _ = _scans(u.device)
        v_new, states = forward_scan(u, w, kd, gamma)
        ctx.save_for_backward(w, qd, a, kd, gamma, v_new, states)
        return qd @ states + a @ v_new

    @staticmethod
    def backward(ctx, grad: Tensor):
        w, qd, a, kd, gamma, v_new, states = ctx.saved_tensors
        _, backward_scan = _scans(grad.device)
        grad = grad.contiguous()
        dv, grad_next = backward_scan((a.transpose(-1, -2) @ grad).contiguous(),
                                      (qd.transpose(-1, -2) @ grad).contiguous(), w, kd, gamma)
        states_t = states.transpose(-1, -2)
        return (dv, -(dv @ states_t), grad @ states_t, grad @ v_new.transpose(-1, -2),
                v_new @ grad_next.transpose(-1, -2), (states * grad_next).sum((-2, -1)))


def _l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """transformers' `l2norm` of the FLA convention: x / sqrt(sum x^2 + eps)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def chunk_gated_delta_rule(query: Tensor, key: Tensor, value: Tensor, g: Tensor, beta: Tensor,
                           use_qk_l2norm: bool = False, chunk_size: int = 64) -> Tensor:
    """query/key (B, S, Hk, Dk), value (B, S, H, Dv), g (log-decay, <= 0) and beta (B, S, H) -> (B, S, H, Dv) in the
    query's dtype, from an empty state: transformers' `torch_chunk_gated_delta_rule` without its cache arguments
    (H a multiple of Hk, as there)."""
    dtype = query.dtype
    batch, length, heads, dk = value.shape[:3] + key.shape[-1:]
    if key.shape[2] != heads:  # grouped value heads: each key head serves heads // key heads consecutive ones
        if heads % key.shape[2]:
            raise ValueError(f"gated delta rule: {heads} value heads are not a multiple of {key.shape[2]} key heads")
        query, key = (x.repeat_interleave(heads // key.shape[2], dim=2) for x in (query, key))
    dv = value.shape[-1]
    q, k, v, beta, g = (x.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format)
                        for x in (query, key, value, beta, g))
    if use_qk_l2norm:
        q, k = _l2norm(q), _l2norm(k)
    q = q * dk ** -0.5
    pad = (chunk_size - length % chunk_size) % chunk_size
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    beta, g = (F.pad(x, (0, pad)) for x in (beta, g))
    chunks = (length + pad) // chunk_size
    v_beta, k_beta = v * beta.unsqueeze(-1), k * beta.unsqueeze(-1)
    q, k, k_beta, v_beta = (x.reshape(batch * heads, chunks, chunk_size, x.shape[-1]) for x in (q, k, k_beta, v_beta))
    c = g.reshape(batch * heads, chunks, chunk_size).cumsum(-1)
    upper = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).triu(1)
    decay = (c.unsqueeze(-1) - c.unsqueeze(-2)).masked_fill(upper, float("-inf")).exp()
    transform = (k_beta @ k.transpose(-1, -2)) * decay
    attn = (q @ k.transpose(-1, -2)) * decay
    u = torch.linalg.solve_triangular(transform, v_beta, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(transform, k_beta * c.exp().unsqueeze(-1), upper=False, unitriangular=True)
    out = _ChunkScan.apply(u.contiguous(), w.contiguous(), q * c.exp().unsqueeze(-1), attn,
                           (k * (c[..., -1:] - c).exp().unsqueeze(-1)).contiguous(), c[..., -1].exp().contiguous())
    out = out.reshape(batch, heads, chunks * chunk_size, dv)[:, :, :length]
    return out.transpose(1, 2).to(dtype, memory_format=torch.contiguous_format)
