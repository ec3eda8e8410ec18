"""Block-scaled FP8 GEMM (E4M3, 1x128 activation x 128x128 weight blocks) through cuBLASLt on sm_90.

On the H100 cuBLAS runs these shapes at ~1100 TFLOP/s; the Triton block kernel, which must scale
and add every 128-deep product in registers without warp specialisation, reaches ~600
(bench/results/gemm_configs.md). So on Hopper the qfp8 forward and dgrad call cuBLAS through torch's
`scaled_mm`, and the LoRA term follows as a second cuBLAS GEMM accumulating into the output
(`addmm_`, one more read and write of it, ~15% of the GEMM). Elsewhere, or for shapes cuBLAS
refuses, the Triton kernel runs; `configs.FP8_BLOCK_GEMM_OVERRIDE = "triton"` forces it for measurement.
"""

from __future__ import annotations

import torch

from surogate.compat import block_scaled_mm
from surogate.kernels import configs

_PROBED: dict[int, bool] = {}  # device index -> cuBLASLt took a block-scaled GEMM


def _probe(device: torch.device) -> bool:
    """One tiny block-scaled GEMM, once per device: the cuBLASLt version decides, and only a call tells."""
    scaled_mm, scaling = block_scaled_mm()
    a = torch.zeros(128, 512, device=device, dtype=torch.float8_e4m3fn)
    b = torch.zeros(128, 512, device=device, dtype=torch.float8_e4m3fn)
    sa = torch.ones(4, 128, device=device).t()
    sb = torch.ones(1, 4, device=device).t()
    try:
        scaled_mm(a, b.t(), sa, scaling.BlockWise1x128, sb, scaling.BlockWise128x128, output_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError, ValueError):
        return False
    return True


def usable(a: torch.Tensor, n_out: int, k_red: int) -> bool:
    """Whether `block_fp8_gemm` can run here: sm_90, a torch and cuBLASLt with block scaling, K a
    multiple of 512 (cuBLAS reads the weight scales in groups of 4 blocks along K), N a multiple
    of 16 and M of 4 (the activation scales' column stride, M floats, must be 16-byte aligned:
    cuBLASLt answered NOT_SUPPORTED for M = 123 and 777 on the H100 and took 776, 780, 784)."""
    override = configs.FP8_BLOCK_GEMM_OVERRIDE
    if override == "triton" or configs.interpreting() or not a.is_cuda or block_scaled_mm() is None:
        return False
    if torch.cuda.get_device_capability(a.device)[0] != 9 or k_red % 512 or n_out % 16 or a.shape[0] % 4 \
            or a.shape[0] == 0:
        return False
    index = a.device.index if a.device.index is not None else torch.cuda.current_device()
    if index not in _PROBED:
        if torch.cuda.is_current_stream_capturing():  # never probe inside a CUDA graph capture
            return False
        _PROBED[index] = _probe(a.device)
    return _PROBED[index]


def block_fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                   hidden: torch.Tensor | None, up: torch.Tensor | None, bias: torch.Tensor | None,
                   lora_scale: float) -> torch.Tensor:
    """`a (M, K) @ b (N, K)^T` with E4M3 1x128 scales `a_scale (M, K/128)` and 128x128 `b_scale
    (N/128, K/128)` (b K-major: the forward weight, or the dgrad's transposed copy), + bias +
    lora_scale * hidden @ up^T; bf16 (M, N)."""
    scaled_mm, scaling = block_scaled_mm()
    m = a.shape[0]
    if a_scale.stride(0) != 1 and m > 1:  # cuBLAS reads activation scales M-contiguous
        a_scale = a_scale.t().contiguous().t()
    out = scaled_mm(a, b.t(), a_scale, scaling.BlockWise1x128, b_scale.contiguous().t(), scaling.BlockWise128x128,
                    output_dtype=torch.bfloat16)
    if bias is not None:
        out.add_(bias.to(out.dtype))
    if hidden is not None:
        out.addmm_(hidden, up.t(), alpha=lora_scale)
    return out
