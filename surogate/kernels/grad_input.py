"""dgrad kernels: `grad_input = grad_output @ W (+ s * grad_lora_hidden @ lora_a)`.

They reuse `_lora_gemm_kernel` (lora_linear.py) with the weight read transposed, so tiling,
scales and the LoRA epilogue live in one place. The LoRA term rides in the epilogue:
`H = grad_lora_hidden = grad_output @ lora_b` (M, r) and `U = lora_a^T` (K, r) as a strided view.

FP8: E5M2 (fp8_row, "hybrid") or E4M3 (fp8_block) gradient x E4M3 weight. Hopper's FP8 wgmma
wants both operands K-major (here K is the GEMM's reduction dim, the weight's N), so `fp8_row`
uses the cached K-major transpose `w_t_fp8 (K, N)` from the weight list; `fp8_block` has no
cached transpose and makes one per call on the GPU (`transpose_fp8`: N*K bytes read and
written, ~5% of the GEMM). On sm_90 its GEMM then runs on cuBLAS (cublas.py).
"""

from __future__ import annotations

import torch

from surogate.kernels import cublas
from surogate.kernels.configs import interpreting
from surogate.kernels.lora_linear import (
    A_BF16,
    A_FP8_BLOCK,
    A_FP8_ROW,
    W_BF16,
    W_DEQ_FP8_BLOCK,
    W_DEQ_NF4,
    W_DEQ_NVFP4,
    W_FP8_BLOCK,
    W_FP8_ROW,
    code_table,
    launch_lora_gemm,
    lora_linear_nvfp4,
)
from surogate.kernels.transpose import transpose_fp8


def _up(lora_a: torch.Tensor | None) -> torch.Tensor | None:
    return None if lora_a is None else lora_a.t()  # (K, r) view: the epilogue's U


def grad_input_bf16(dy, w, gh, lora_a, lora_scale):
    """dy (M, N) bf16, w (N, K) bf16 read transposed (bf16 wgmma takes an MN-major B); cuBLAS for long N."""
    if cublas.bf16_usable(dy, w.shape[0]):
        return cublas.bf16_gemm(dy, w.t(), gh, _up(lora_a), None, lora_scale)
    return launch_lora_gemm(dy, None, A_BF16, w, None, W_BF16, True, w.shape[1], gh, _up(lora_a), None, lora_scale)


def grad_input_fp8(dy_fp8, dy_scale, w_t_fp8, w_t_scale, gh, lora_a, lora_scale):
    """E5M2 dy (M, N) with row scales (M, 1) x the K-major E4M3 transpose w_t (K, N), scales (K,)."""
    return launch_lora_gemm(dy_fp8, dy_scale, A_FP8_ROW, w_t_fp8, w_t_scale, W_FP8_ROW, False, w_t_fp8.shape[0],
                            gh, _up(lora_a), None, lora_scale)


def grad_input_fp8_block(dy_fp8, dy_scale, w_fp8, w_scale, gh, lora_a, lora_scale):
    """E4M3 dy with 1x128 block scales along N (M, ceil(N/128)) x 128x128-block E4M3 w (N, K)."""
    if interpreting():  # exercise the strided (transposed) read; on a GPU, make W K-major first
        return launch_lora_gemm(dy_fp8, dy_scale, A_FP8_BLOCK, w_fp8, w_scale, W_FP8_BLOCK, True, w_fp8.shape[1],
                                gh, _up(lora_a), None, lora_scale)
    w_t = transpose_fp8(w_fp8)
    if cublas.block_fp8_usable(dy_fp8, w_t.shape[0], w_t.shape[1]):
        return cublas.block_fp8_gemm(dy_fp8, dy_scale, w_t, w_scale.t(), gh, _up(lora_a), None, lora_scale)
    return launch_lora_gemm(dy_fp8, dy_scale, A_FP8_BLOCK, w_t, w_scale.t(), W_FP8_BLOCK, False, w_t.shape[0],
                            gh, _up(lora_a), None, lora_scale)


def grad_input_dequant_fp8_block(dy, w_fp8, w_scale, gh, lora_a, lora_scale):
    """bf16 dy x (block-FP8 weight dequantized in registers, read transposed)."""
    return launch_lora_gemm(dy, None, A_BF16, w_fp8, w_scale, W_DEQ_FP8_BLOCK, True, w_fp8.shape[1],
                            gh, _up(lora_a), None, lora_scale)


def grad_input_dequant_nvfp4(dy, packed, block_scale, tensor_scale, k, gh, lora_a, lora_scale):
    """bf16 dy x (NVFP4 weight (N, Kp/2) dequantized in registers, read transposed); k = true K."""
    return launch_lora_gemm(dy, None, A_BF16, packed, block_scale, W_DEQ_NVFP4, True, k, gh, _up(lora_a), None,
                            lora_scale, aux=(tensor_scale, None, None), table=code_table("e2m1", dy.device))


def grad_input_dequant_nf4(dy, nf4: list, shape, gh, lora_a, lora_scale):
    """bf16 dy x (NF4 weight dequantized in registers, read transposed); `nf4` is the weight list."""
    packed, absmax_q, absmax_scale, absmax_offset, absmax_code = nf4
    n, k = shape
    return launch_lora_gemm(dy, None, A_BF16, packed, absmax_code, W_DEQ_NF4, True, k, gh, _up(lora_a), None,
                            lora_scale, aux=(absmax_q, absmax_scale, absmax_offset),
                            table=code_table("nf4", dy.device), kw=k)


def grad_input_nvfp4(dy_packed, dy_block_scale, dy_tensor_scale, w_t_packed, w_t_block_scale, w_t_tensor_scale,
                     gh, lora_a, lora_scale):
    """NVFP4 dy (M, N/2) x NVFP4 K-major transpose of W (K, N/2), both scaled per 16 along N."""
    return lora_linear_nvfp4(dy_packed, dy_block_scale, dy_tensor_scale, w_t_packed, w_t_block_scale,
                             w_t_tensor_scale, gh, _up(lora_a), None, lora_scale)


GRAD_INPUT_LAUNCHERS = {
    "grad_input_bf16": grad_input_bf16,
    "grad_input_fp8": grad_input_fp8,
    "grad_input_fp8_block": grad_input_fp8_block,
    "grad_input_dequant_fp8_block": grad_input_dequant_fp8_block,
    "grad_input_dequant_nvfp4": grad_input_dequant_nvfp4,
    "grad_input_dequant_nf4": grad_input_dequant_nf4,
    "grad_input_nvfp4": grad_input_nvfp4,
}
