"""Chunked LM head + cross-entropy: no LM-head GEMM in the backward, no FP32 logits on the GPU.

Why: at a 150k vocabulary the logits of one 2048-token sequence are 0.6 GB in bf16; HF computes them
all, upcasts them to FP32, and its backward reads them again. Here tokens go in chunks of
`chunk_rows(vocab)` rows, and while a gradient is needed the forward does a chunk's whole work:

    logits = hidden_c @ W^T (+ bias), in the model's dtype                   the one logits GEMM
    cross_entropy: loss per row; d loss / d logits written over the logits   one kernel, in place
    grad_hidden_c = dlogits @ W; grad_W += dlogits^T @ hidden_c (FP32) if W trains

The loss is the rows' sum times `scale` = 1 / token count (from the labels, a device tensor), so the
gradient is scaled in FP32 before its one rounding to the model's dtype, as in HF's autograd; the
backward only multiplies the kept gradients by the loss's incoming gradient (1 for `loss.backward()`).
Without a gradient (eval, `no_grad`) the loss-only op reads each chunk's logits once.
`surogate::lm_head_ce_fused` (loss and gradients) and `surogate::lm_head_ce` (loss only) are single
nodes for Dynamo, AOTAutograd and Inductor. On CUDA the cross-entropy is the Triton kernel of
`kernels/cross_entropy.py`; elsewhere (the CPU suite, CPU training) its twin
`reference.cross_entropy_ref`, the same math through a chunk-sized FP32 temporary.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from surogate.kernels.reference import IGNORE_INDEX, cross_entropy_ref

# Elements of one chunk's logits: 2**27 x 2 bytes = 256 MiB in bf16 (512 MiB for an FP32 model). The
# logits stay in the GEMM's dtype (no FP32 copy), so a chunk holds twice the rows the old FP32 budget
# (2**26 x 4 bytes) allowed in the same memory, and the GEMMs get a larger M: 883 rows at Qwen3's
# 151,936-token vocabulary, 512 at Gemma's 262,144. A heuristic, not a tuned value.
_CHUNK_ELEMENTS = 1 << 27

CrossEntropy = Callable[..., "tuple[Tensor, Tensor]"]  # (logits, labels, softcap, write_grad, grad_scale)


def chunk_rows(vocab: int) -> int:
    """Tokens per chunk so that one chunk's logits stay near `_CHUNK_ELEMENTS` elements."""
    return max(16, _CHUNK_ELEMENTS // max(vocab, 1))


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """One chunk's logits (rows, V), row-major, in the dtype of `hidden` and `weight` (already cast)."""
    return F.linear(hidden, weight, bias)


def _head(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The head's weight and bias in the activations' dtype, cast once per call (not per chunk)."""
    return weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype)


def _cuda_cross_entropy() -> CrossEntropy:
    from surogate.kernels.cross_entropy import cross_entropy

    return cross_entropy


# --- the loss alone (no gradient) ----------------------------------------------------------------

def _loss(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, softcap: float, chunk: int,
          ce: CrossEntropy) -> Tensor:
    w, b = _head(hidden, weight, bias)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        stop = min(start + chunk, hidden.shape[0])
        loss, _ = ce(_logits(hidden[start:stop], w, b), labels[start:stop], softcap, False, None)
        total += loss.sum()
    return total


@torch.library.custom_op("surogate::lm_head_ce", mutates_args=())
def _lm_head_ce(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, softcap: float,
                chunk: int) -> Tensor:
    """Sum of the token losses over non-ignored labels (FP32 scalar); CPU and default: the reference."""
    return _loss(hidden, weight, bias, labels, softcap, chunk, cross_entropy_ref)


@_lm_head_ce.register_kernel("cuda")
def _(hidden, weight, bias, labels, softcap, chunk):
    return _loss(hidden, weight, bias, labels, softcap, chunk, _cuda_cross_entropy())


@_lm_head_ce.register_fake
def _(hidden, weight, bias, labels, softcap, chunk):
    return hidden.new_empty((), dtype=torch.float32)


# --- loss and gradients in one forward -----------------------------------------------------------

def _fused(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, scale: Tensor, softcap: float,
           chunk: int, need_weight_grad: bool, ce: CrossEntropy) -> tuple[Tensor, Tensor, Tensor]:
    w, b = _head(hidden, weight, bias)
    total = hidden.new_zeros((), dtype=torch.float32)
    grad_hidden = hidden.new_empty(hidden.shape)
    grad_weight = weight.new_zeros(weight.shape, dtype=torch.float32) if need_weight_grad else weight.new_empty(0)
    for start in range(0, hidden.shape[0], chunk):
        stop = min(start + chunk, hidden.shape[0])
        h = hidden[start:stop]
        logits = _logits(h, w, b)
        loss, _ = ce(logits, labels[start:stop], softcap, True, scale)  # logits now hold d (loss * scale) / d logits
        total += loss.sum()
        torch.mm(logits, w, out=grad_hidden[start:stop])
        if need_weight_grad:
            if grad_weight.dtype == h.dtype:
                grad_weight.addmm_(logits.t(), h)
            else:  # a GEMM in the model's dtype (as HF's), its chunk sums accumulated in FP32
                grad_weight += logits.t() @ h
        del logits  # before the next chunk's logits exist: one chunk alive at a time
    return total * scale, grad_hidden, grad_weight


@torch.library.custom_op("surogate::lm_head_ce_fused", mutates_args=())
def _lm_head_ce_fused(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, scale: Tensor,
                      softcap: float, chunk: int, need_weight_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(loss = sum of the token losses x `scale` (FP32 scalars), its gradient w.r.t. hidden (hidden's dtype),
    w.r.t. weight (FP32, or an empty tensor unless `need_weight_grad`)); CPU and default: the reference."""
    return _fused(hidden, weight, bias, labels, scale, softcap, chunk, need_weight_grad, cross_entropy_ref)


@_lm_head_ce_fused.register_kernel("cuda")
def _(hidden, weight, bias, labels, scale, softcap, chunk, need_weight_grad):
    return _fused(hidden, weight, bias, labels, scale, softcap, chunk, need_weight_grad, _cuda_cross_entropy())


@_lm_head_ce_fused.register_fake
def _(hidden, weight, bias, labels, scale, softcap, chunk, need_weight_grad):
    return (hidden.new_empty((), dtype=torch.float32), hidden.new_empty(hidden.shape),
            weight.new_empty(weight.shape, dtype=torch.float32) if need_weight_grad else weight.new_empty(0))


def _setup_context(ctx, inputs, output) -> None:
    _, weight, _, _, _, _, _, need_weight_grad = inputs
    _, grad_hidden, grad_weight = output
    ctx.weight_dtype, ctx.need_weight_grad = weight.dtype, need_weight_grad
    ctx.mark_non_differentiable(grad_hidden, grad_weight)
    ctx.set_materialize_grads(False)  # no zero-filled (T, H) / (V, H) gradients for the outputs above
    ctx.save_for_backward(grad_hidden, grad_weight)


def _backward(ctx, grad_loss: Tensor | None, _grad_hidden: None, _grad_weight: None):
    if grad_loss is None:
        return (None,) * 8
    grad_hidden, grad_weight = ctx.saved_tensors
    # One kernel: a 0-dim FP32 factor leaves the result in hidden's dtype and the product is taken in FP32
    # (ATen's opmath), the same bits as upcast, multiply, downcast; exact for 1 and powers of two (1 / accum).
    grad_hidden = grad_hidden * grad_loss.float()
    grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype) if ctx.need_weight_grad else None
    return grad_hidden, grad_weight, None, None, None, None, None, None


torch.library.register_autograd("surogate::lm_head_ce_fused", _backward, setup_context=_setup_context)


def lm_head_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None,
                          softcap: float | None = None, num_items_in_batch: "int | Tensor | None" = None,
                          chunk: int | None = None, max_trained: int | None = None) -> Tensor:
    """HF's causal-LM loss of `hidden @ weight.T` against `labels` (shifted by one inside, -100 ignored).

    hidden (B, S, H) in the model dtype, labels (B, S) int. Mean over non-ignored tokens, or
    sum / `num_items_in_batch` when given (gradient accumulation), exactly as HF's ForCausalLMLoss.
    Gradients reach `hidden` and `weight` (not `bias`). Whether to compute them in the forward is
    decided here from grad mode and `requires_grad` (under torch.compile: once, at trace time).
    `max_trained`: a bound the caller guarantees on the tokens with a label in this call (the trainer's,
    from its data); the head then runs on `trained_rows` of them only (see there), not on every token.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must match the hidden states' leading dims "
                         f"{tuple(hidden.shape[:-1])}")
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1).to(hidden.device, torch.long)
    flat = hidden.reshape(-1, hidden.shape[-1])
    labelled = trained_rows(shifted, max_trained)
    # counted where the scale or the bound's check needs it (not on every call with num_items_in_batch)
    targets = (shifted != IGNORE_INDEX).sum() if num_items_in_batch is None or labelled is not None else None
    if labelled is not None:
        flat, shifted = flat.index_select(0, labelled), shifted.index_select(0, labelled)
    rows, cap = int(chunk or chunk_rows(weight.shape[0])), float(softcap or 0.0)
    # The loss is sum x scale, scale a device tensor: no host sync (CUDA graphs capture the step).
    if num_items_in_batch is None:  # a batch without targets has loss 0 (and zero gradients), not 0/0
        scale = 1.0 / targets.clamp(min=1).to(torch.float32)
    elif isinstance(num_items_in_batch, Tensor):
        scale = 1.0 / num_items_in_batch.to(hidden.device, torch.float32)
    else:  # a number: filled on the device, not copied from the host
        scale = torch.full((), 1.0 / num_items_in_batch, dtype=torch.float32, device=hidden.device)
    if labelled is not None:  # a broken bound left targets out: a NaN loss (the trainer stops on it), not a quiet one
        scale = torch.where(targets > labelled.numel(), torch.full_like(scale, float("nan")), scale)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        loss, _, _ = torch.ops.surogate.lm_head_ce_fused(flat, weight, bias, shifted, scale, cap, rows,
                                                         weight.requires_grad)
        return loss
    return torch.ops.surogate.lm_head_ce(flat, weight, bias, shifted, cap, rows) * scale


# Compacting the head's rows pays only below this share of the tokens (the gather and its scatter cost little,
# but a chunk's GEMMs shrink in proportion).
_COMPACT_BELOW = 0.9


def compacted_rows(tokens: int, max_trained: int | None) -> int | None:
    """How many rows the head runs on for `tokens` tokens of which at most `max_trained` have a label: that bound
    rounded up to a multiple of 64 (one row count per bound, so one graph), None where it is no gain."""
    if max_trained is None:
        return None
    rows = -(-max(int(max_trained), 1) // 64) * 64
    return rows if rows < _COMPACT_BELOW * tokens else None


def trained_rows(shifted: Tensor, max_trained: int | None) -> Tensor | None:
    """The positions of the tokens with a label, in order, padded to `compacted_rows` with the last position
    (whose shifted label is always ignored: no loss, no gradient); None: every row.

    Why: in chat and instruction data the prompt is masked, often most of the tokens, yet the LM head's GEMMs
    and cross-entropy ran on every token (a quarter of Qwen3-0.6B's linear FLOPs). `nonzero_static` has a fixed
    output size and no host sync (CUDA graphs capture it); the caller's bound keeps every labelled token in.
    """
    size = compacted_rows(shifted.numel(), max_trained)
    if size is None:
        return None
    last = shifted.numel() - 1
    return torch.nonzero_static(shifted != IGNORE_INDEX, size=size, fill_value=last).view(-1)
