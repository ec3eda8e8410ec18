"""The plain-torch twin of every surogate kernel: the numeric definition the Triton code must meet.

Bit-exact to DESIGN.md section 2 for the quantizers; the GEMM references multiply dequantized
operands in FP32. The code lives in small modules by concern, re-exported here:
- `reference_formats`: FP8 (tensor/row/block), NVFP4, OCP MX quantizers (and, re-exported from
  `qtensor`, where the containers and their decoders live, the dequantizers), and the
  traceable FP8 activation quantizers an FX pass puts into a graph (`quantize_fp8_rowwise_ref`,
  `quantize_fp8_block_ref`: the twins of the Triton `quantize_fp8_rowwise` / `quantize_fp8_block`;
  `quantize_fp8_rowwise_e5m2_ref`: the fp8_row dgrad's gradient quantizer);
- `reference_nf4`: bitsandbytes-compatible NF4 with double quantization;
- `reference_linear`: weight lists by `WeightFormat`, `lora_linear_ref` and its backward, and which
  forward takes a pre-quantized input (`input_quantizer`, `check_input_q`) and which dgrad a pre-quantized
  gradient (`grad_output_quantizer`, `check_grad_output_q`);
- here: `cross_entropy_ref`, the twin of `kernels/cross_entropy.py` (what the LM-head loss runs off CUDA).
"""

import torch

from surogate.kernels.reference_formats import (
    FP8_DTYPES,
    FP8_MAX,
    dequantize_fp8_ref,
    dequantize_mx_ref,
    dequantize_nvfp4_ref,
    e2m1_decode,
    e2m1_encode,
    pack_nibbles,
    quantize_fp8_block_ref,
    quantize_fp8_ref,
    quantize_fp8_rowwise_e5m2_ref,
    quantize_fp8_rowwise_ref,
    quantize_mx_ref,
    quantize_nvfp4_ref,
    unpack_nibbles,
)
from surogate.kernels.reference_linear import (
    GRAD_OUTPUT_Q_QUANTIZERS,
    INPUT_Q_QUANTIZERS,
    NVFP4_SR_SEED,
    check_grad_output_q,
    check_input_q,
    dequantize_input_q,
    dequantize_weight_ref,
    grad_output_quantizer,
    input_quantizer,
    lora_linear_backward_ref,
    lora_linear_ref,
    quantize_weight_ref,
)
from surogate.kernels.reference_nf4 import (
    dequantize_blockwise_8bit_ref,
    dequantize_nf4_ref,
    dynamic_map,
    nf4_code,
    quantize_blockwise_8bit_ref,
    quantize_nf4_ref,
)

IGNORE_INDEX = -100


def cross_entropy_ref(logits: torch.Tensor, labels: torch.Tensor, softcap: float = 0.0, write_grad: bool = True,
                      grad_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, lse), each (rows,) FP32, of `logits` (rows, V) against `labels` (-100: 0); with `write_grad` the
    logits are overwritten by d loss_row / d logits (pre-softcap) times `grad_scale` (FP32 scalar tensor or
    None), computed in FP32 and rounded to their dtype.

    Per row as the kernel: x = logits in FP32 (capped: tanh(x / c) * c), lse = logsumexp(x),
    loss = lse - x[label], gradient softmax(x) - onehot(label) (times 1 - tanh(x / c)^2); ignored rows 0.
    A label outside [0, V) raises here (`gather`); the kernel, which cannot raise without a sync, gives NaN.
    """
    x = logits.float()  # FP32 logits are `logits` itself: only written to when the gradient replaces them
    t = None
    if softcap > 0:
        t = torch.tanh(x / softcap)
        x = t * softcap
    valid = labels != IGNORE_INDEX
    index = labels.clamp(min=0).unsqueeze(1)
    lse = torch.logsumexp(x, dim=-1)
    loss = torch.where(valid, lse - x.gather(1, index).squeeze(1), 0.0)
    if write_grad:
        grad = x.sub_(lse.unsqueeze(1)).exp_()  # in place: x is a copy, or the FP32 logits this overwrites
        grad.scatter_add_(1, index, torch.full_like(grad[:, :1], -1.0))
        if t is not None:
            grad.mul_(t.mul_(t).neg_().add_(1.0))
        if grad_scale is not None:
            grad.mul_(grad_scale.float())
        logits.copy_(grad.masked_fill_(~valid.unsqueeze(1), 0.0))
    return loss, torch.where(valid, lse, 0.0)


__all__ = [
    "FP8_DTYPES", "FP8_MAX", "GRAD_OUTPUT_Q_QUANTIZERS", "IGNORE_INDEX", "INPUT_Q_QUANTIZERS", "NVFP4_SR_SEED",
    "check_grad_output_q", "check_input_q", "cross_entropy_ref", "dequantize_blockwise_8bit_ref", "dequantize_fp8_ref",
    "dequantize_input_q", "dequantize_mx_ref", "dequantize_nf4_ref",
    "dequantize_nvfp4_ref", "dequantize_weight_ref", "dynamic_map", "e2m1_decode", "e2m1_encode",
    "grad_output_quantizer", "input_quantizer", "lora_linear_backward_ref", "lora_linear_ref", "nf4_code",
    "pack_nibbles", "quantize_blockwise_8bit_ref", "quantize_fp8_block_ref", "quantize_fp8_ref",
    "quantize_fp8_rowwise_e5m2_ref", "quantize_fp8_rowwise_ref", "quantize_mx_ref", "quantize_nf4_ref",
    "quantize_nvfp4_ref", "quantize_weight_ref", "unpack_nibbles",
]
