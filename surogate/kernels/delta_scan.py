"""The gated delta rule's sequential pass over chunks as one Triton kernel each way (forward, backward).

Why: the chunked rule (`ops/delta_rule.py`) is batched matrix work except for this pass, where chunk i needs the
state chunk i-1 left. In PyTorch it is a Python loop of a few small GEMMs per 64-token chunk: at 2,048 tokens, 32
trips and a few hundred kernel launches per layer and direction, each a fraction of the GPU. Here one program
holds a (Dk x BLOCK_V) slice of the state in registers and walks all chunks; a state column depends only on the
same value column, so slices of Dv run in parallel. The math, and the twins these kernels meet, are in
`kernels/reference_delta.py`. Operands are FP32; `tl.dot` runs them as TF32 on tensor cores (as FP32 GEMMs do
under `torch.backends.cuda.matmul.allow_tf32`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from surogate.compat import triton_interpreting


@triton.jit
def _scan_forward_kernel(u_ptr, w_ptr, kd_ptr, gamma_ptr, v_ptr, states_ptr, N,
                         C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BLOCK_K: tl.constexpr,
                         BLOCK_V: tl.constexpr, PRECISION: tl.constexpr):
    """Row `bh`, value columns [v0, v0 + BLOCK_V): v_i = u_i - W_i S_i, S_{i+1} = gamma_i S_i + Kd_i^T v_i."""
    bh, v0 = tl.program_id(0).to(tl.int64), tl.program_id(1) * BLOCK_V
    rc, rk, rv = tl.arange(0, C), tl.arange(0, BLOCK_K), v0 + tl.arange(0, BLOCK_V)
    mk, mv = rk < DK, rv < DV
    state = tl.zeros((BLOCK_K, BLOCK_V), tl.float32)
    for i in range(N):
        chunk = bh * N + i
        tl.store(states_ptr + chunk * DK * DV + rk[:, None] * DV + rv[None, :], state, mask=mk[:, None] & mv[None, :])
        w = tl.load(w_ptr + chunk * C * DK + rc[:, None] * DK + rk[None, :], mask=mk[None, :], other=0.0)
        u = tl.load(u_ptr + chunk * C * DV + rc[:, None] * DV + rv[None, :], mask=mv[None, :], other=0.0)
        v = u - tl.dot(w, state, input_precision=PRECISION)
        tl.store(v_ptr + chunk * C * DV + rc[:, None] * DV + rv[None, :], v, mask=mv[None, :])
        kd = tl.load(kd_ptr + chunk * C * DK + rc[:, None] * DK + rk[None, :], mask=mk[None, :], other=0.0)
        gamma = tl.load(gamma_ptr + chunk)
        state = state * gamma + tl.dot(tl.trans(kd), v, input_precision=PRECISION)


@triton.jit
def _scan_backward_kernel(p_ptr, r_ptr, w_ptr, kd_ptr, gamma_ptr, dv_ptr, grad_next_ptr, N,
                          C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_V: tl.constexpr, PRECISION: tl.constexpr):
    """Row `bh`, value columns [v0, v0 + BLOCK_V), chunks last to first: dv_i = P_i + Kd_i G_{i+1},
    G_i = gamma_i G_{i+1} + R_i - W_i^T dv_i."""
    bh, v0 = tl.program_id(0).to(tl.int64), tl.program_id(1) * BLOCK_V
    rc, rk, rv = tl.arange(0, C), tl.arange(0, BLOCK_K), v0 + tl.arange(0, BLOCK_V)
    mk, mv = rk < DK, rv < DV
    mkv = mk[:, None] & mv[None, :]
    grad = tl.zeros((BLOCK_K, BLOCK_V), tl.float32)
    for j in range(N):
        chunk = bh * N + (N - 1 - j)
        tl.store(grad_next_ptr + chunk * DK * DV + rk[:, None] * DV + rv[None, :], grad, mask=mkv)
        kd = tl.load(kd_ptr + chunk * C * DK + rc[:, None] * DK + rk[None, :], mask=mk[None, :], other=0.0)
        p = tl.load(p_ptr + chunk * C * DV + rc[:, None] * DV + rv[None, :], mask=mv[None, :], other=0.0)
        d = p + tl.dot(kd, grad, input_precision=PRECISION)
        tl.store(dv_ptr + chunk * C * DV + rc[:, None] * DV + rv[None, :], d, mask=mv[None, :])
        w = tl.load(w_ptr + chunk * C * DK + rc[:, None] * DK + rk[None, :], mask=mk[None, :], other=0.0)
        r = tl.load(r_ptr + chunk * DK * DV + rk[:, None] * DV + rv[None, :], mask=mkv, other=0.0)
        gamma = tl.load(gamma_ptr + chunk)
        grad = grad * gamma + r - tl.dot(tl.trans(w), d, input_precision=PRECISION)


def scan_config(dk: int, dv: int) -> dict[str, int]:
    """BLOCK_K, BLOCK_V, num_warps, num_stages of both scans: the whole key dimension in one block; value slices of
    32 columns (64 where the key block is small), so a 128 x 32 FP32 state slice sits in 4 warps' registers. One
    stage: the loop is a dependent chain with nothing to overlap, and its 64 x Dk FP32 loads pipelined 3 deep ask
    for 240 KB of shared memory at Dk = 128 (more than any GPU has; H200 run 114), 40-57 KB at one
    (tests/test_kernels_delta_scan.py builds them for every arch)."""
    block_k = max(16, triton.next_power_of_2(dk))
    block_v = min(max(16, triton.next_power_of_2(dv)), 64 if block_k <= 64 else 32)
    return {"BLOCK_K": block_k, "BLOCK_V": block_v, "num_warps": 4 if block_k <= 128 else 8, "num_stages": 1}


def _precision() -> str:
    """TF32 products on the GPU; exact FP32 under the interpreter, so that the tests meet the twins to 1e-5."""
    return "ieee" if triton_interpreting() else "tf32"


def _check(chunked: list[Tensor], gamma: Tensor, *others: Tensor) -> None:
    bh, n, c = chunked[0].shape[:3]
    if any(t.dtype != torch.float32 or not t.is_contiguous() for t in (*chunked, gamma, *others)):
        raise ValueError("delta_scan: operands must be contiguous FP32")
    if c < 16 or c & (c - 1):
        raise ValueError(f"delta_scan: the chunk size must be a power of two >= 16, not {c}")
    if gamma.shape != (bh, n):
        raise ValueError(f"delta_scan: gamma {tuple(gamma.shape)}, expected {(bh, n)}")


def delta_scan_forward(u: Tensor, w: Tensor, kd: Tensor, gamma: Tensor) -> tuple[Tensor, Tensor]:
    """`reference_delta.delta_scan_forward_ref` on CUDA (or under TRITON_INTERPRET=1): one launch."""
    _check([u, w, kd], gamma)
    bh, n, c, dv = u.shape
    dk = w.shape[-1]
    v_new, states = torch.empty_like(u), u.new_empty(bh, n, dk, dv)
    config = scan_config(dk, dv)
    _scan_forward_kernel[(bh, triton.cdiv(dv, config["BLOCK_V"]))](
        u, w, kd, gamma, v_new, states, n, C=c, DK=dk, DV=dv, PRECISION=_precision(), **config)
    return v_new, states


def delta_scan_backward(p: Tensor, r: Tensor, w: Tensor, kd: Tensor, gamma: Tensor) -> tuple[Tensor, Tensor]:
    """`reference_delta.delta_scan_backward_ref` on CUDA (or under TRITON_INTERPRET=1): one launch."""
    _check([p, w, kd], gamma, r)
    bh, n, c, dv = p.shape
    dk = w.shape[-1]
    dv_out, grad_next = torch.empty_like(p), torch.empty_like(r)
    config = scan_config(dk, dv)
    _scan_backward_kernel[(bh, triton.cdiv(dv, config["BLOCK_V"]))](
        p, r, w, kd, gamma, dv_out, grad_next, n, C=c, DK=dk, DV=dv, PRECISION=_precision(), **config)
    return dv_out, grad_next
