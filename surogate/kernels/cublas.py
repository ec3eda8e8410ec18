"""The LoRA-linear GEMMs that cuBLAS runs faster than our Triton kernels, with the LoRA term added after.

Measured on the H100 (bench/results/gemm_configs.md, kernels.md):
- block-scaled FP8 (E4M3, 1x128 activation x 128x128 weight blocks) on sm_90: cuBLASLt ~1100 TFLOP/s
  through torch's `scaled_mm`; the Triton block kernel, which must scale and add every 128-deep
  product in registers without warp specialisation, ~600;
- bf16 with a long reduction (K >= 4096, the 8B shapes): the Triton kernel is at 0.80-0.97x of
  cuBLAS + a separate LoRA GEMM; at the 0.6B shapes it is 1.0-1.4x faster (the fused LoRA epilogue
  saves a pass over the output), so those stay on Triton.
The LoRA term (and the bias) is one more pass over the output: on the GPU `lora_add.lora_add_` (one read
and write at the copy rate), elsewhere or where it does not take the shape `addmm_`. Which shapes go here
is the kernel table's rule (`variants.CublasRule`, applied by `variants.route`); this module answers only
whether cuBLAS can run at all (`available`) and runs it.
`configs.FORCE_TRITON_GEMMS = True` runs Triton everywhere, for measurement and tests.
"""

from __future__ import annotations

import torch

from surogate.compat import block_scaled_mm
from surogate.kernels import configs, lora_add
from surogate.kernels.variants import CublasRule

_PROBED: dict[int, bool] = {}  # device index -> cuBLASLt took a block-scaled GEMM
# The LoRA term added by kernels/lora_add.py on the GPU; False: by cuBLAS's addmm_ (bench/tps.py "+addmm").
LORA_ADD_KERNEL: bool = True


def _add_lora_and_bias(out: torch.Tensor, hidden: torch.Tensor | None, up: torch.Tensor | None,
                       bias: torch.Tensor | None, lora_scale: float) -> torch.Tensor:
    """out + bias + lora_scale * hidden @ up^T, in place (hidden (M, r), up (N, r))."""
    if LORA_ADD_KERNEL and out.is_cuda and lora_add.takes(out, hidden):
        return lora_add.lora_add_(out, hidden, up, bias, lora_scale)
    if bias is not None:
        out.add_(bias.to(out.dtype))
    if hidden is not None:
        out.addmm_(hidden, up.t(), alpha=lora_scale)
    return out


def _on_cuda(a: torch.Tensor) -> bool:
    return a.is_cuda and not configs.FORCE_TRITON_GEMMS and not configs.interpreting()


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


def available(a: torch.Tensor, rule: CublasRule) -> bool:
    """Whether cuBLAS can run a GEMM of `rule` on `a`'s device at all (the shape is `variants.route`'s
    business): a CUDA tensor, not the interpreter nor `FORCE_TRITON_GEMMS`; for block-scaled FP8 also
    a torch and cuBLASLt with block scaling, probed once per device (never inside a graph capture)."""
    if rule is CublasRule.NEVER or not _on_cuda(a):
        return False
    if rule is CublasRule.BF16_LONG_REDUCTION:
        return a.dtype == torch.bfloat16
    if rule in (CublasRule.ROW_FP8_FWD_SM90, CublasRule.ROW_FP8_DGRAD_SM90):  # torch._scaled_mm's row scaling
        return True
    if block_scaled_mm() is None:
        return False
    index = a.device.index if a.device.index is not None else torch.cuda.current_device()
    if configs.device_arch(index) != "sm_90":  # the only arch where it was measured faster
        return False
    if index not in _PROBED:
        if torch.cuda.is_current_stream_capturing():
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
    if a_scale.stride(0) != 1 and a.shape[0] > 1:  # cuBLAS reads activation scales M-contiguous
        a_scale = a_scale.t().contiguous().t()
    out = scaled_mm(a, b.t(), a_scale, scaling.BlockWise1x128, b_scale.contiguous().t(), scaling.BlockWise128x128,
                    output_dtype=torch.bfloat16)
    return _add_lora_and_bias(out, hidden, up, bias, lora_scale)


def row_fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                 hidden: torch.Tensor | None, up: torch.Tensor | None, bias: torch.Tensor | None,
                 lora_scale: float) -> torch.Tensor:
    """`a (M, K) @ b (N, K)^T` with FP8 row scales `a_scale (M, 1)` and per-output-channel `b_scale (N,)` (b
    K-major: the forward weight, or the dgrad's cached transpose), + bias + lora_scale * hidden @ up^T; bf16
    (M, N). cuBLASLt takes E4M3 x E4M3 and E5M2 x E4M3 (the dgrad) and applies both scales in its epilogue."""
    if a.stride(1) != 1:  # cuBLASLt reads the activation row-major
        a = a.contiguous()
    out = torch._scaled_mm(a, b.t(), scale_a=a_scale.float().reshape(-1, 1).contiguous(),
                           scale_b=b_scale.float().reshape(1, -1).contiguous(), out_dtype=torch.bfloat16)
    return _add_lora_and_bias(out, hidden, up, bias, lora_scale)


def bf16_gemm(a: torch.Tensor, b: torch.Tensor, hidden: torch.Tensor | None, up: torch.Tensor | None,
              bias: torch.Tensor | None, lora_scale: float) -> torch.Tensor:
    """`a (M, K) @ b (N, K)^T` (b may be a transposed view) + bias + lora_scale * hidden @ up^T; bf16 (M, N)."""
    return _add_lora_and_bias(a @ b.t(), hidden, up, bias, lora_scale)
