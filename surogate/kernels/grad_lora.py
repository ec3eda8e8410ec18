"""LoRA weight gradients: `grad_lora_a`, `grad_lora_b` and the hidden gradient both need.

With `g = grad_output (M, N)`, `x = lora_input (M, K)`, `h = lora_hidden (M, r)`:
    grad_lora_hidden = g @ lora_b            (M, r)
    grad_lora_b      = s * g^T @ h           (N, r)
    grad_lora_a      = s * grad_lora_hidden^T @ x   (r, K)
These are skinny GEMMs (one side is r = 8..64) whose cost is reading `g` and `x` once, so
`grad_lora` is three cuBLAS calls; a Triton version (one pass over `g` for both) was not written
or measured (docs/kernels.md). FP32 accumulate, bf16 operands, results in the masters'
dtype.
"""

from __future__ import annotations

import torch


def grad_lora(grad_output: torch.Tensor, lora_input: torch.Tensor, lora_hidden: torch.Tensor,
              lora_a: torch.Tensor, lora_b: torch.Tensor, lora_scale: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """2-D operands in, `(grad_lora_a, grad_lora_b, grad_lora_hidden)` out.

    `grad_lora_hidden` is unscaled and in the compute dtype; the caller folds `lora_scale`
    into the dgrad epilogue.
    """
    dtype = grad_output.dtype
    gh = grad_output @ lora_b.to(dtype)
    grad_b = (grad_output.t() @ lora_hidden.to(dtype)).float() * lora_scale
    grad_a = (gh.t() @ lora_input.to(dtype)).float() * lora_scale
    return grad_a.to(lora_a.dtype), grad_b.to(lora_b.dtype), gh
