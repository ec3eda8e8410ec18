"""`surogate::grouped_lora_linear`: the experts of a mixture-of-experts block as one op per GEMM.

The tokens, sorted by expert, form E contiguous groups (`offsets (E+1,)` int32, group e is rows
`offsets[e]:offsets[e+1]`); group e runs one dense LoRA linear against expert e's frozen weight:

    out[t] = Q(x[t]) @ W[e]^T + s * (x[t] @ A[e]^T) @ B[e]^T

The default (CPU) implementation is the plain-torch reference (`kernels.reference_grouped`), the
CUDA one the Triton grouped kernels (`kernels.grouped`: one launch per GEMM over all experts,
no host sync). As for the dense op, the schema carries the format and precisions as strings; the
traced wrapper `grouped_lora_linear` checks plain strings (Dynamo on torch 2.11 does not trace
Enum class calls). Contract: docs/moe.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from surogate.kernels import reference_grouped
from surogate.ops.lora_linear import _FORMATS, _LIST_LEN, _NF4, _assert_finite, _empty_if_none, _value
from surogate.recipes import Compute, WeightFormat

# The default compute: every weight format dequantized in registers to a bf16 MMA. fp8_block experts also
# run FP8 MMAs (compute "fp8"; `variants.grouped_compute` says which compute a recipe gets).
GROUPED_COMPUTE = Compute.BF16.value


def grouped_out_features(weight: Sequence[Tensor], weight_format: str, in_features: int) -> int:
    """N of the stacked (E, N, K) expert weights held in `weight` (NF4 keeps each expert flat)."""
    if _value(weight_format) == _NF4:
        return weight[0].shape[1] * 2 // in_features
    return weight[0].shape[1]


@torch.library.custom_op("surogate::grouped_lora_linear", mutates_args=())
def _grouped_op(input: Tensor, offsets: Tensor, weight: list[Tensor], weight_format: str, lora_a: Tensor | None,
                lora_b: Tensor | None, lora_scale: float, forward: str, rows: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
    """The CPU (and default) implementation: the plain-torch reference (reads the offsets on the host)."""
    _assert_finite(input, "the input")
    return reference_grouped.grouped_lora_linear_ref(input, offsets, weight, WeightFormat(weight_format), lora_a,
                                                     lora_b, lora_scale, Compute(forward), rows=rows)


@_grouped_op.register_kernel("cuda")
def _(input, offsets, weight, weight_format, lora_a, lora_b, lora_scale, forward, rows=None):
    from surogate.kernels import grouped

    _assert_finite(input, "the input")
    out, hidden = grouped.grouped_lora_linear(input, offsets, weight, WeightFormat(weight_format), lora_a, lora_b,
                                              lora_scale, Compute(forward), rows=rows)
    return out.to(input.dtype), hidden.to(input.dtype)


@_grouped_op.register_fake
def _(input, offsets, weight, weight_format, lora_a, lora_b, lora_scale, forward, rows=None):
    n = grouped_out_features(weight, weight_format, input.shape[-1])
    rank = 0 if lora_a is None else lora_a.shape[1]
    s = input.shape[0] if rows is None else rows.shape[0]
    return input.new_empty((s, n)), input.new_empty((s, rank))


@torch.library.custom_op("surogate::grouped_lora_linear_backward", mutates_args=())
def _grouped_backward_op(grad_output: Tensor, input: Tensor, offsets: Tensor, weight: list[Tensor],
                         weight_format: str, lora_a: Tensor | None, lora_b: Tensor | None,
                         lora_hidden: Tensor | None, lora_scale: float, grad_input: str, rows: Tensor | None = None
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (grad_input, grad_lora_a, grad_lora_b); absent LoRA gradients are empty tensors. With `rows`,
    grad_input is per grouped row (S, K): the autograd formula sums it into the tokens."""
    _assert_finite(grad_output, "the gradient")
    grads = reference_grouped.grouped_lora_linear_backward_ref(
        grad_output, input, offsets, weight, WeightFormat(weight_format), lora_a, lora_b, lora_hidden, lora_scale,
        Compute(grad_input), rows=rows)
    return tuple(_empty_if_none(g, grad_output).contiguous() for g in grads)


@_grouped_backward_op.register_kernel("cuda")
def _(grad_output, input, offsets, weight, weight_format, lora_a, lora_b, lora_hidden, lora_scale, grad_input,
      rows=None):
    from surogate.kernels import grouped

    _assert_finite(grad_output, "the gradient")
    grads = grouped.grouped_lora_linear_backward(grad_output, input, offsets, weight, WeightFormat(weight_format),
                                                 lora_a, lora_b, lora_hidden, lora_scale, Compute(grad_input),
                                                 rows=rows)
    return tuple(_empty_if_none(g, grad_output).contiguous() for g in grads)


@_grouped_backward_op.register_fake
def _(grad_output, input, offsets, weight, weight_format, lora_a, lora_b, lora_hidden, lora_scale, grad_input,
      rows=None):
    # Contiguous whatever the factors' strides (PEFT's B is a permuted view): both implementations return so.
    return (input.new_empty((grad_output.shape[0], input.shape[1])),
            grad_output.new_empty(0) if lora_a is None else lora_a.new_empty(lora_a.shape),
            grad_output.new_empty(0) if lora_b is None else lora_b.new_empty(lora_b.shape))


def _setup_context(ctx, inputs, output) -> None:
    input, offsets, weight, weight_format, lora_a, lora_b, lora_scale, forward, *rest = inputs
    rows = rest[0] if rest else None
    ctx.has_rows = rows is not None
    ctx.n_weight = len(weight)
    ctx.weight_format = weight_format
    ctx.lora_scale = lora_scale
    ctx.compute = forward
    ctx.has_lora = lora_a is not None
    saved = [input, offsets, *weight]
    if ctx.has_lora:
        saved += [lora_a, lora_b, output[1]]
    if ctx.has_rows:
        saved.append(rows)
    ctx.save_for_backward(*saved)


def _backward(ctx, grad_output: Tensor, grad_lora_hidden: Tensor | None):
    saved = list(ctx.saved_tensors)
    input, offsets, weight, rest = saved[0], saved[1], saved[2:2 + ctx.n_weight], saved[2 + ctx.n_weight:]
    rows = rest.pop() if ctx.has_rows else None
    lora_a, lora_b, lora_hidden = rest if ctx.has_lora else (None, None, None)
    g_input, g_a, g_b = torch.ops.surogate.grouped_lora_linear_backward(
        grad_output.contiguous(), input, offsets, weight, ctx.weight_format, lora_a, lora_b, lora_hidden,
        ctx.lora_scale, ctx.compute, rows)
    if ctx.has_rows:  # each token's rows (one per expert it was routed to), summed in FP32
        g_input = torch.zeros(input.shape, dtype=torch.float32, device=input.device).index_add_(
            0, rows, g_input.float()).to(input.dtype)
    grads = (g_input, None, [None] * ctx.n_weight, None, g_a if ctx.has_lora else None,
             g_b if ctx.has_lora else None, None, None, None)
    # The dispatcher drops a trailing argument equal to its default (rows=None) before autograd sees the call.
    return grads[:len(ctx.needs_input_grad)]


torch.library.register_autograd("surogate::grouped_lora_linear", _backward, setup_context=_setup_context)


def grouped_lora_linear(input: Tensor, offsets: Tensor, weight: Sequence[Tensor], weight_format: str = "bf16",
                        lora_a: Tensor | None = None, lora_b: Tensor | None = None, lora_scale: float = 1.0,
                        compute: str = GROUPED_COMPUTE, rows: Tensor | None = None) -> Tensor:
    """The grouped LoRA linear `(S, K) -> (S, N)`, differentiable in `input`, `lora_a (E, r, K)` and
    `lora_b (E, N, r)`; never in the frozen expert weights. `compute` is forward and dgrad precision.

    `rows (S,)` (int32 or int64): grouped row s is `input[rows[s]]`, read through the index by the kernels,
    so a MoE block passes its tokens `(T, K)` once instead of a copy per routed expert."""
    fmt = _value(weight_format)
    if fmt not in _FORMATS:
        raise ValueError(f"unknown weight_format {weight_format!r}; valid: {', '.join(sorted(_FORMATS))}")
    if len(weight) != _LIST_LEN[fmt]:
        raise ValueError(f"weight_format {fmt!r} takes {_LIST_LEN[fmt]} stacked tensors, got {len(weight)}; build "
                         "the list with surogate.ops.prepare_expert_weights")
    if input.dim() != 2 or not input.is_floating_point():
        raise ValueError(f"input must be a floating (T, K) tensor of tokens sorted by expert, got "
                         f"{input.dtype} {tuple(input.shape)}")
    e = weight[0].shape[0]
    if rows is not None and (rows.dim() != 1 or rows.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"rows must be a 1-D int32/int64 index into the input's rows, got {rows.dtype} "
                         f"{tuple(rows.shape)}")
    if offsets.dtype != torch.int32 or offsets.shape != (e + 1,):
        raise ValueError(f"offsets must be int32 (E+1,) = ({e + 1},), got {offsets.dtype} {tuple(offsets.shape)}")
    if (lora_a is None) != (lora_b is None):
        raise ValueError("pass both lora_a and lora_b, or neither")
    if lora_a is not None:
        n, k = grouped_out_features(weight, fmt, input.shape[1]), input.shape[1]
        if lora_a.shape[0] != e or lora_a.shape[2] != k or lora_b.shape != (e, n, lora_a.shape[1]):
            raise ValueError(f"expert LoRA shapes do not fit: want lora_a (E={e}, r, K={k}) and lora_b "
                             f"(E={e}, N={n}, r); got {tuple(lora_a.shape)} and {tuple(lora_b.shape)}")
    out, _ = torch.ops.surogate.grouped_lora_linear(input, offsets, list(weight), fmt, lora_a, lora_b,
                                                    float(lora_scale), _value(compute), rows)
    return out


def prepare_expert_weights(weight: Tensor, weight_format: "str | WeightFormat") -> list[Tensor]:
    """The stacked weight list of a frozen `(E, N, K)` expert stack in `weight_format`, each expert
    quantized on its own (the Triton quantizers on CUDA, the reference on the CPU; bit-identical)."""
    if weight.dim() != 3:
        raise ValueError(f"an expert weight stack is (E, N, K); got shape {tuple(weight.shape)}")
    if _value(weight_format) == WeightFormat.BF16.value:
        return [weight.detach()]  # the stack itself: no copy of the largest tensors of the model
    quantize = None
    if weight.is_cuda:
        from surogate.kernels import quantize as cuda_quantize

        def quantize(w, fmt):
            return list(cuda_quantize.quantize_weight(w, fmt))
    with torch.no_grad():
        return reference_grouped.quantize_grouped_weight_ref(weight, weight_format, quantize)
