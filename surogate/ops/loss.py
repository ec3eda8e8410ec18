"""Chunked LM head + cross-entropy that never materialises the FP32 logits of a whole sequence.

Why: for a 150k vocabulary the FP32 logits of one 2048-token sequence are 1.2 GB, plus as much
again for their gradient; HF computes them all, upcasts, then reduces. Here the tokens are cut
into chunks of `chunk_rows(vocab)` rows: each chunk's logits are computed (bf16 GEMM, upcast as
HF does), reduced to its log-sum-exp and dropped; backward recomputes them chunk by chunk.
It is one `torch.library` op (`surogate::lm_head_ce`) with a fake impl and registered autograd,
so Dynamo, AOTAutograd and Inductor see one node.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
# Elements of FP32 logits held at once (2**26 x 4 bytes = 256 MiB); a heuristic, not a tuned value.
_CHUNK_ELEMENTS = 1 << 26


def chunk_rows(vocab: int) -> int:
    """Tokens per chunk so that one chunk's FP32 logits stay near `_CHUNK_ELEMENTS` elements."""
    return max(16, _CHUNK_ELEMENTS // max(vocab, 1))


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, softcap: float) -> Tensor:
    """FP32 logits of one chunk: the GEMM in the model's dtype, then upcast (as HF's loss does)."""
    logits = F.linear(hidden, weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype)).float()
    if softcap > 0:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


@torch.library.custom_op("surogate::lm_head_ce", mutates_args=())
def _lm_head_ce(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, softcap: float,
                chunk: int) -> tuple[Tensor, Tensor]:
    """(sum of token losses over non-ignored labels (fp32 scalar), per-token log-sum-exp (T,) fp32)."""
    total = hidden.new_zeros((), dtype=torch.float32)
    lse = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        stop = min(start + chunk, hidden.shape[0])
        logits = _logits(hidden[start:stop], weight, bias, softcap)
        lse_c = torch.logsumexp(logits, dim=-1)
        lse[start:stop] = lse_c
        lab = labels[start:stop]
        valid = lab != IGNORE_INDEX
        picked = logits.gather(1, lab.clamp(min=0).unsqueeze(1)).squeeze(1)
        total += torch.where(valid, lse_c - picked, 0.0).sum()
    return total, lse


@_lm_head_ce.register_fake
def _(hidden, weight, bias, labels, softcap, chunk):
    return hidden.new_empty((), dtype=torch.float32), hidden.new_empty(hidden.shape[0], dtype=torch.float32)


@torch.library.custom_op("surogate::lm_head_ce_backward", mutates_args=())
def _lm_head_ce_backward(grad_total: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                         lse: Tensor, softcap: float, chunk: int, need_weight_grad: bool) -> tuple[Tensor, Tensor]:
    """(grad_hidden, grad_weight or an empty tensor); logits are recomputed chunk by chunk."""
    grad_hidden = torch.empty_like(hidden)
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight_grad \
        else weight.new_empty(0)
    w = weight.to(hidden.dtype)
    for start in range(0, hidden.shape[0], chunk):
        stop = min(start + chunk, hidden.shape[0])
        h = hidden[start:stop]
        logits = _logits(h, weight, bias, softcap)
        lab = labels[start:stop]
        valid = (lab != IGNORE_INDEX).unsqueeze(1)
        grad = torch.exp(logits - lse[start:stop].unsqueeze(1))
        grad.scatter_add_(1, lab.clamp(min=0).unsqueeze(1), torch.full_like(grad[:, :1], -1.0))
        grad = torch.where(valid, grad, 0.0) * grad_total
        if softcap > 0:
            grad = grad * (1 - (logits / softcap) ** 2)
        grad_hidden[start:stop] = (grad.to(hidden.dtype) @ w).to(hidden.dtype)
        if need_weight_grad:
            grad_weight += grad.t() @ h.float()
    return grad_hidden, grad_weight.to(weight.dtype) if need_weight_grad else grad_weight


@_lm_head_ce_backward.register_fake
def _(grad_total, hidden, weight, bias, labels, lse, softcap, chunk, need_weight_grad):
    return torch.empty_like(hidden), (torch.empty_like(weight) if need_weight_grad else weight.new_empty(0))


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, bias, labels, softcap, chunk = inputs
    ctx.softcap, ctx.chunk = softcap, chunk
    ctx.need_weight_grad = weight.requires_grad
    ctx.save_for_backward(hidden, weight, bias, labels, output[1])


def _backward(ctx, grad_total: Tensor, grad_lse: Tensor | None):
    hidden, weight, bias, labels, lse = ctx.saved_tensors
    grad_hidden, grad_weight = torch.ops.surogate.lm_head_ce_backward(
        grad_total, hidden, weight, bias, labels, lse, ctx.softcap, ctx.chunk, ctx.need_weight_grad)
    return grad_hidden, (grad_weight if ctx.need_weight_grad else None), None, None, None, None


torch.library.register_autograd("surogate::lm_head_ce", _backward, setup_context=_setup_context)


def lm_head_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None,
                          softcap: float | None = None, num_items_in_batch: "int | Tensor | None" = None,
                          chunk: int | None = None) -> Tensor:
    """HF's causal-LM loss of `hidden @ weight.T` against `labels` (shifted by one inside, -100 ignored).

    hidden (B, S, H) in the model dtype, labels (B, S) int. Mean over non-ignored tokens, or
    sum / `num_items_in_batch` when given (gradient accumulation), exactly as HF's ForCausalLMLoss.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must match the hidden states' leading dims "
                         f"{tuple(hidden.shape[:-1])}")
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1).to(hidden.device, torch.long)
    flat = hidden.reshape(-1, hidden.shape[-1])
    rows = chunk or chunk_rows(weight.shape[0])
    total, _ = torch.ops.surogate.lm_head_ce(flat, weight, bias, shifted, float(softcap or 0.0), int(rows))
    if num_items_in_batch is None:  # a batch without targets has loss 0 (and zero gradients), not 0/0
        return total / (shifted != IGNORE_INDEX).sum().clamp(min=1)
    if isinstance(num_items_in_batch, Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
