"""Cross-entropy of one chunk of LM-head logits, with its gradient written over the logits.

Why: the logits are the largest tensor of a training step (tokens x a 150k-260k vocabulary). The
torch formulation reads them in FP32 again and again (an upcast copy, log-sum-exp, exp, scatter,
mask, scale, downcast), and its backward recomputes them with a second LM-head GEMM. Here one
program per row reads the logits as the GEMM wrote them (bf16, or the model's dtype) once for the
loss and once more to overwrite them, in place, with d loss_row / d logits, which the dgrad GEMM
reads next (the fused linear cross-entropy idea of Liger-Kernel; `surogate/ops/loss.py` runs both
GEMMs around this kernel in the forward, so the backward has no GEMM left).

Per row, with x the row's logits in FP32 (after the softcap `tanh(x / c) * c` when c > 0):
  pass 1: online max m and sum d of exp(x - m) over BLOCK_V-wide column blocks; lse = m + log d;
          loss = lse - x[label]                                  (0 where label == IGNORE_INDEX)
  pass 2: x[:] = (softmax(x) - onehot(label)) * grad_scale, times (1 - tanh(x / c)^2) when capped
          (0 if ignored); grad_scale is the loss's 1 / n_tokens, applied in FP32 before the one
          rounding to the logits' dtype, as in HF's autograd.
Ignored rows load nothing: their loads are masked off, and pass 2 writes zeros. A label outside
[0, V) gives a NaN loss (raising would need a host sync). `write_grad=False` skips pass 2 (eval).
Its plain-torch twin, the definition this kernel meets, is `reference.cross_entropy_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from surogate.kernels.bits import round_bf16
from surogate.kernels.reference import IGNORE_INDEX

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _metadata(grid, kernel, args):
    """Bytes for profilers (STYLE.md 3): the logits read once, or read twice and written once."""
    rows, vocab = grid[0], args["V"]
    passes = 3 if args["WRITE_GRAD"] else 1
    return {"name": f"cross_entropy [{rows}x{vocab}]",
            "bytes": rows * vocab * args["logits_ptr"].element_size() * passes}


@triton.jit
def _tanh(y):
    """tanh in FP32 from one exp of a non-positive number (no overflow; libdevice's tanh is not in
    the interpreter). Absolute error ~1e-7, far below the bf16 rounding of the logits it caps."""
    e = tl.exp(-2.0 * tl.abs(y))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(y < 0, -t, t)


@triton.jit(launch_metadata=_metadata)
def _cross_entropy_kernel(logits_ptr, labels_ptr, grad_scale_ptr, loss_ptr, lse_ptr, V, stride_row, softcap,
                          inv_softcap,
                          IGNORE_INDEX: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr,
                          ROUND_BF16: tl.constexpr, BLOCK_V: tl.constexpr):
    """One row: loss and lse, then (WRITE_GRAD) the gradient over the row's logits."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row)
    valid = label != IGNORE_INDEX
    in_vocab = (label >= 0) & (label < V)
    n_read = tl.where(valid, V, 0)  # columns to read: none for an ignored row

    # The label's logit, read before pass 1: that pass's reductions synchronize every warp of the
    # program, so no warp can reach pass 2 and overwrite it while another still has to read it.
    picked = tl.load(row_ptr + label, mask=valid & in_vocab, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        picked = _tanh(picked * inv_softcap) * softcap

    # Pass 1: running max m and sum d of exp(x - m), rescaled whenever the max grows (FP32). m starts at
    # the lowest finite float, not -inf: an ignored row (all -inf) then never computes -inf - -inf.
    m = -3.4028234663852886e38
    d = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_read
        x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            x = _tanh(x * inv_softcap) * softcap
        x = tl.where(mask, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(tl.where(valid, d, 1.0))  # an ignored row's d is 0; its lse is dropped below

    loss = tl.where(in_vocab, lse - picked, float("nan"))
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    tl.store(lse_ptr + row, tl.where(valid, lse, 0.0))

    # Pass 2: d loss / d logits over the logits, in their dtype.
    if WRITE_GRAD:
        lse = tl.where(valid, lse, 0.0)
        scale = tl.load(grad_scale_ptr)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            x = tl.load(row_ptr + cols, mask=cols < n_read, other=0.0).to(tl.float32)
            onehot = tl.where(cols == label, 1.0, 0.0)
            if HAS_SOFTCAP:
                t = _tanh(x * inv_softcap)
                grad = (tl.exp(t * softcap - lse) - onehot) * (1.0 - t * t)
            else:
                grad = tl.exp(x - lse) - onehot
            grad = tl.where(valid, grad * scale, 0.0)
            if ROUND_BF16:  # the interpreter's fp32 -> bf16 cast truncates; round to nearest even first
                grad = round_bf16(grad)
            tl.store(row_ptr + cols, grad, mask=mask)


def get_cross_entropy_configs(arch: str | None = None, vocab: int = 151936) -> dict:
    """4096 columns a step, 8 warps (16 elements a thread). Not tuned: a memory-bound row per program,
    and a chunk of ~900 rows is about one wave of 8 programs per SM on an H100/H200."""
    return dict(BLOCK_V=min(4096, triton.next_power_of_2(max(vocab, 16))), num_warps=8)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, softcap: float = 0.0, write_grad: bool = True,
                  grad_scale: torch.Tensor | None = None, block_v: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, lse), each (rows,) FP32, of the rows of `logits` (rows, V) against `labels` (rows,) int64
    (IGNORE_INDEX = -100: loss, lse and gradient 0). With `write_grad` the logits are overwritten by
    d loss_row / d logits (pre-softcap) times `grad_scale` (an FP32 scalar tensor, read on the device:
    no host sync; None: 1). `block_v` overrides the config (tests)."""
    if logits.dim() != 2 or logits.dtype not in _DTYPES or (logits.shape[1] > 1 and logits.stride(1) != 1):
        raise ValueError(f"cross_entropy takes (rows, V) row-major logits in {_DTYPES}, got "
                         f"{tuple(logits.shape)} {logits.dtype} strides {logits.stride()}")
    if labels.shape != logits.shape[:1] or labels.dtype != torch.int64:
        raise ValueError(f"labels must be ({logits.shape[0]},) int64, got {tuple(labels.shape)} {labels.dtype}")
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return loss, lse
    cfg = get_cross_entropy_configs(vocab=vocab)
    if block_v is not None:
        cfg["BLOCK_V"] = block_v
    if grad_scale is None:
        grad_scale = torch.ones((), dtype=torch.float32, device=logits.device)
    _cross_entropy_kernel[(rows,)](
        logits, labels.contiguous(), grad_scale.float(), loss, lse, vocab, logits.stride(0), float(softcap),
        1.0 / softcap if softcap > 0 else 0.0,
        IGNORE_INDEX=IGNORE_INDEX, HAS_SOFTCAP=softcap > 0, WRITE_GRAD=write_grad,
        ROUND_BF16=logits.dtype == torch.bfloat16, **cfg)
    return loss, lse
