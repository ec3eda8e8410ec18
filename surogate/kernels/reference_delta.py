"""The plain-torch twins of `kernels/delta_scan.py`: the gated delta rule's sequential pass over chunks, forward and
backward (what runs off CUDA, and the definition the Triton kernels meet).

Per (batch, head) row of the flattened `BH` dimension, chunks i = 0..N-1 of C tokens, state S_0 = 0 (Dk x Dv):
  v_i     = u_i - W_i S_i                      the chunk's new values: what the state does not predict yet
  S_{i+1} = gamma_i S_i + Kd_i^T v_i           the state decayed over the chunk, plus the chunk's update
Backward, G_{i+1} the gradient of S_{i+1} from everything after chunk i (G_N = 0), given P_i (the gradient of v_i
from the chunk's own output) and R_i (the gradient of S_i from the chunk's own output):
  dv_i = P_i + Kd_i G_{i+1}
  G_i  = gamma_i G_{i+1} + R_i - W_i^T dv_i
Everything the rest of the rule needs from these (dW, dKd, dgamma) is a batched product of the returned tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor


def delta_scan_forward_ref(u: Tensor, w: Tensor, kd: Tensor, gamma: Tensor) -> tuple[Tensor, Tensor]:
    """u (BH, N, C, Dv), w and kd (BH, N, C, Dk), gamma (BH, N), FP32 -> (v (BH, N, C, Dv), the state each chunk
    reads, S_i (BH, N, Dk, Dv))."""
    bh, n, _, dv = u.shape
    state = u.new_zeros(bh, w.shape[-1], dv)
    v_new, states = torch.empty_like(u), u.new_empty(bh, n, w.shape[-1], dv)
    for i in range(n):
        states[:, i] = state
        v = torch.baddbmm(u[:, i], w[:, i], state, alpha=-1)
        v_new[:, i] = v
        state = torch.baddbmm(state * gamma[:, i, None, None], kd[:, i].transpose(1, 2), v)
    return v_new, states


def delta_scan_backward_ref(p: Tensor, r: Tensor, w: Tensor, kd: Tensor, gamma: Tensor) -> tuple[Tensor, Tensor]:
    """p (BH, N, C, Dv), r (BH, N, Dk, Dv), w and kd (BH, N, C, Dk), gamma (BH, N) -> (dv (BH, N, C, Dv), the
    gradient of the state after each chunk, G_{i+1} (BH, N, Dk, Dv))."""
    bh, n, _, dv_dim = p.shape
    grad_state = p.new_zeros(bh, w.shape[-1], dv_dim)
    dv, grad_next = torch.empty_like(p), torch.empty_like(r)
    for i in reversed(range(n)):
        grad_next[:, i] = grad_state
        d = torch.baddbmm(p[:, i], kd[:, i], grad_state)
        dv[:, i] = d
        grad_state = torch.baddbmm(grad_state * gamma[:, i, None, None] + r[:, i], w[:, i].transpose(1, 2), d,
                                   alpha=-1)
    return dv, grad_next
