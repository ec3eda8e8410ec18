"""dgrad launchers: `grad_input = grad_output @ W (+ s * grad_lora_hidden @ lora_a)`.

They reuse `_lora_gemm_kernel` (lora_linear.py) with the weight read transposed, so tiling,
scales and the LoRA epilogue live in one place; the kernel table (variants.py) names one launcher
per dgrad variant, with its modes. The LoRA term rides in the epilogue:
`H = grad_lora_hidden = grad_output @ lora_b` (M, r) and `U = lora_a^T` (K, r) as a strided view.

FP8: E5M2 (fp8_row, "hybrid") or E4M3 (fp8_block) gradient x E4M3 weight. Hopper's FP8 wgmma
wants both operands K-major (here K is the GEMM's reduction dim, the weight's N), so `fp8_row`
uses the cached K-major transpose `w_t_fp8 (K, N)` from the weight list; `fp8_block` has no
cached transpose and makes one per call (`transpose_fp8`: N*K bytes read and written, ~5% of the
GEMM; launch.py makes it, since the cuBLAS route reads it too).

Each launcher takes `(v, aq, weight, k, gh, lora_a, lora_scale)`: the variant, the gradient as its
quantizer left it, the weight list (for fp8_block: the K-major copy and its scales), the true K.
"""

from __future__ import annotations

import torch

from surogate.kernels.lora_linear import launch_nvfp4_gemm, variant_gemm
from surogate.kernels.variants import Variant


def lora_up(lora_a: torch.Tensor | None) -> torch.Tensor | None:
    """lora_a (r, K) as the epilogue's U: a (K, r) view."""
    return None if lora_a is None else lora_a.t()


def grad_input_bf16(v: Variant, aq, weight, k, gh, lora_a, lora_scale):
    """dy (M, N) bf16, w (N, K) bf16 read transposed (bf16 wgmma takes an MN-major B)."""
    return variant_gemm(v, aq[0], None, weight[0], None, k, gh, lora_up(lora_a), None, lora_scale)


def grad_input_fp8(v: Variant, aq, weight, k, gh, lora_a, lora_scale):
    """E5M2 dy (M, N) with row scales (M, 1) x the cached K-major E4M3 transpose w_t (K, N), scales (K,)."""
    return variant_gemm(v, aq[0], aq[1], weight[2], weight[3], k, gh, lora_up(lora_a), None, lora_scale)


def grad_input_fp8_block(v: Variant, aq, weight, k, gh, lora_a, lora_scale):
    """E4M3 dy with 1x128 block scales along N (M, ceil(N/128)) x the K-major block-FP8 copy w_t (K, N)
    with its scales (K/128, N/128) view."""
    return variant_gemm(v, aq[0], aq[1], weight[0], weight[1], k, gh, lora_up(lora_a), None, lora_scale)


def grad_input_dequant_fp8_block(v: Variant, aq, weight, k, gh, lora_a, lora_scale):
    """bf16 dy x (block-FP8 weight dequantized in registers, read transposed)."""
    return variant_gemm(v, aq[0], None, weight[0], weight[1], k, gh, lora_up(lora_a), None, lora_scale)


def grad_input_dequant_nvfp4(v: Variant, aq, weight, k, gh, lora_a, lora_scale):
    """bf16 dy x (NVFP4 weight (N, Kp/2) dequantized in registers, read transposed)."""
    packed, block_scale, tensor_scale = weight
    return variant_gemm(v, aq[0], None, packed, block_scale, k, gh, lora_up(lora_a), None, lora_scale,
                 aux=(tensor_scale, None, None))


def grad_input_dequant_nf4(v: Variant, aq, weight, k, gh, lora_a, lora_scale):
    """bf16 dy x (NF4 weight dequantized in registers, read transposed)."""
    packed, absmax_q, absmax_scale, absmax_offset, absmax_code = weight
    return variant_gemm(v, aq[0], None, packed, absmax_code, k, gh, lora_up(lora_a), None, lora_scale,
                 aux=(absmax_q, absmax_scale, absmax_offset), kw=k)


def grad_input_nvfp4(v: Variant, aq, weight, k, gh, lora_a, lora_scale):
    """NVFP4 dy (M, N/2) x the NVFP4 K-major transpose of W (K, N/2), both scaled per 16 along N."""
    return launch_nvfp4_gemm(*aq, *weight, gh, lora_up(lora_a), None, lora_scale)
