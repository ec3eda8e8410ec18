"""The one table of kernel variants: what runs for each GEMM of a LoRA linear, and the shape rule.

A LoRA linear has three GEMMs: the output (forward), grad_input (dgrad) and grad_lora (the LoRA
factors' gradients, always three skinny bf16 cuBLAS GEMMs). For output and grad_input, one row of
`VARIANTS` per (GEMM, compute, weight format) says everything the rest of the code needs:

- the Triton kernel specialization and its constexpr modes (`A_MODE`, `W_MODE`, `TRANS_W`) and
  config family: what `launch.py` runs, what the AOT catalog builds and `surogate info` lists;
- how the activation operand is quantized (`Quantizer`), and which forwards take it pre-quantized
  from their producer (`takes_input_q`: the FX producer pass reads this);
- the shape rule (`CublasRule`, `scratch`) under which the call runs on cuBLAS instead, or
  dequantizes the weight once into a bf16 scratch buffer and then runs as bf16.

`grouped_variant(...)` is the row the MoE grouped kernels (kernels/grouped.py) run for a (GEMM,
compute, format), `grouped_compute(...)` the compute they have for a recipe's compute on a format.
`route(...)` applies the rule to one call's shape. `plan()` (kernels/plan.py) and the CUDA launcher
(kernels/launch.py) both call it, so what the plan names is what runs; `trace()` records what the
launcher actually ran, for tests and `surogate info`. This module is pure data: importing it
imports neither Triton nor the kernels.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from surogate.recipes.recipe import Compute, WeightFormat


class Gemm(str, enum.Enum):
    """The role of a GEMM in a LoRA linear."""

    OUTPUT = "output"  # x @ W^T + s * (x @ A^T) @ B^T
    GRAD_INPUT = "grad_input"  # dy @ W + s * (dy @ B) @ A
    GRAD_LORA = "grad_lora"  # dA, dB: three skinny bf16 GEMMs on cuBLAS (kernels/grad_lora.py)


class Engine(str, enum.Enum):
    """Who computes the GEMM."""

    TRITON = "triton"  # the fused kernel: base GEMM + LoRA up-projection in its epilogue
    PERSISTENT = "persistent"  # sm_90: the persistent TMA / warp-specialized kernel (kernels/persistent.py)
    CUBLAS = "cublas"  # cuBLAS GEMM, then the LoRA term by a second GEMM into the output (addmm_)
    REFERENCE = "reference"  # no GPU: the plain-torch reference


class Quantizer(str, enum.Enum):
    """How the activation operand (input, or grad_output in a dgrad) is quantized before the GEMM."""

    NONE = "none"  # bf16 operand
    FP8_ROW_E4M3 = "fp8_row_e4m3"  # E4M3, one FP32 scale per row
    FP8_ROW_E5M2 = "fp8_row_e5m2"  # E5M2 (a gradient's range), one scale per row
    FP8_BLOCK_E4M3 = "fp8_block_e4m3"  # E4M3, one scale per 1x128 (M-contiguous scales)
    NVFP4 = "nvfp4"  # E2M1, E4M3 per 16, FP32 tensor scale (round to nearest)
    NVFP4_SR = "nvfp4_sr"  # the same with stochastic rounding (gradients)


class CublasRule(str, enum.Enum):
    """When a call goes to cuBLAS (measured faster there on the H100, docs/kernels.md)."""

    NEVER = "never"
    BF16_LONG_REDUCTION = "bf16_long_reduction"  # bf16 with a reduction >= BF16_CUBLAS_MIN_K
    BLOCK_FP8_SM90 = "block_fp8_sm90"  # sm_90, M % 4 == 0, reduction % 512 == 0, output % 16 == 0
    ROW_FP8_FWD_SM90 = "row_fp8_fwd_sm90"  # row-scaled fp8 forward, sm_90, only while in FP8_ROW_CUBLAS
    ROW_FP8_DGRAD_SM90 = "row_fp8_dgrad_sm90"  # row-scaled fp8 dgrad, sm_90, only while in FP8_ROW_CUBLAS


# Operand modes of `_lora_gemm_kernel`: the single place where formats become constexpr integers.
A_BF16, A_FP8_ROW, A_FP8_BLOCK = 0, 1, 2
W_BF16, W_FP8_ROW, W_FP8_BLOCK, W_DEQ_FP8_BLOCK, W_DEQ_NF4, W_DEQ_NVFP4 = 0, 1, 2, 3, 4, 5

# bf16 GEMMs whose reduction is at least this long go to cuBLAS: at the 8B shapes the Triton kernel
# ran at 0.80-0.97x of cuBLAS + a LoRA addmm; at the 0.6B shapes (K = 1024-3072) it is 1.0-1.4x
# faster (the fused LoRA epilogue saves a pass over the output).
BF16_CUBLAS_MIN_K = 4096
# From this many rows on, dequantizing formats dequantize the weight once into a transient bf16
# buffer and run the bf16 route: above it every M tile decoding the same weight tile again makes the
# fused kernel ALU-bound (qnf4 ran at 0.3x of bf16 on an H100), while one dequantization pass costs
# ~2% of the GEMM. Below it the GEMM is bound by reading the weight, and the packed one is 2-4x smaller.
DEQUANT_SCRATCH_MIN_ROWS = 128

# Where the persistent TMA kernel (kernels/persistent.py) runs on sm_90, ahead of cuBLAS and of
# `_lora_gemm_kernel`, wherever TMA can read the operands (`persistent_takes`): a mapping from variant kernel
# name to the fewest rows it is routed at, True (every `persistent` variant at any row count: tests,
# benchmarks) or False (none). Measured on the H200 at the 8B shapes (bench/results/kernels_persistent_h200.md,
# bench/NOTES.md runs 54-56): row-scaled fp8 beat `_lora_gemm_kernel` from M = 1024 (the whole op 5-25%
# faster, forward and dgrad; only the small kv forward lost at 1024); bf16 beat cuBLAS + LoRA addmm from
# M = 4096 (2-10%) but mostly lost at 1024, where its 128-row tiles leave SMs idle; block-scaled FP8 (qfp8)
# lost to cuBLASLt everywhere and keeps it. `plan()` and the launcher both read it.
# Row-scaled fp8 was off it in runs 63-70: bench/fidelity.py's fp8 fine-tune (2 x 512 rows) hit NaN losses on it.
# The cause was the warp-specialized configs under CUDA graphs (compat.warp_specialize_checked: none are offered
# since); with the unspecialized ones that fine-tune trains to the other route's eval loss (3.7916 both, run 70)
# and 8B fp8 runs at 21,368 tokens/s against 18,951 off the route (runs 68, 71).
PERSISTENT_SM90: "bool | Mapping[str, int]" = MappingProxyType(
    {"lora_linear_fp8": 1024, "grad_input_fp8": 1024, "lora_linear_bf16": 4096, "grad_input_bf16": 4096})
# Which row-scaled fp8 GEMMs go to cuBLAS on sm_90 (`torch._scaled_mm` with row / channel scales, then the LoRA
# `addmm_`, as qfp8's block-scaled route) where the persistent kernel does not take them: none. Measured on the
# H200 with the persistent route off (run 68, 8B): the Triton kernel 18,951 tokens/s, the dgrad on cuBLAS 19,443,
# both on cuBLAS 19,772; the persistent route, which takes these GEMMs from 1,024 rows, 21,368 (run 71). Below
# that the whole op was not measured. Eval loss with either on cuBLAS: 3.7916 / 3.7919, the Triton route's 3.7916
# (run 69). `bench/tps.py ...+nopersistent+fp8cublas` (both) / `+fp8cublasdgrad` runs the A/B.
FP8_ROW_CUBLAS: frozenset = frozenset()
# The largest LoRA rank the persistent kernel takes (any routing). Its LoRA step stages H and U^T tiles of
# BLOCK_R = max(16, next power of two) columns in shared memory: at 64 and 128 the 128x256 configs need 263-361 KB
# (sm_90 has 227), so tuning skips them and an untuned launch (SUROGATE_AUTOTUNE=0, a capture before any tuning)
# takes the first config that fits (`tuning.Tuner.run`). On the H200 (run 58) ranks 32, 64 and 128 with a bias
# matched the reference at 53-77 dB. Above 128 (BLOCK_R 256) no config is known to fit: the other routes.
PERSISTENT_MAX_RANK = 128
# Whether a forward with a bias (Qwen2's q/k/v) may take the persistent kernel: its HAS_BIAS epilogue matched the
# reference on the H200 (run 58, bf16 and fp8, ranks 32-128).
PERSISTENT_BIAS = True


def persistent_min_rows(v: "Variant") -> int | None:
    """The fewest rows at which PERSISTENT_SM90 routes `v` to the persistent kernel; None: never."""
    if not v.persistent or PERSISTENT_SM90 is False:
        return None
    return 1 if PERSISTENT_SM90 is True else PERSISTENT_SM90.get(v.kernel)


# The tensors of each weight format's list, in order (docs/internals.md).
WEIGHT_LISTS: dict[WeightFormat, tuple[str, ...]] = {
    WeightFormat.BF16: ("weight",),
    WeightFormat.FP8_ROW: ("data", "scale", "data_t", "scale_t"),
    WeightFormat.FP8_BLOCK: ("data", "block_scale"),
    WeightFormat.NVFP4: ("packed", "block_scale", "tensor_scale"),
    WeightFormat.NVFP4_CACHED: ("packed", "block_scale", "tensor_scale"),
    WeightFormat.NF4: ("packed", "absmax_q", "absmax_scale", "absmax_offset", "absmax_code"),
}


@dataclass(frozen=True)
class Variant:
    """One kernel variant: a (GEMM, compute, weight format) and how it runs."""

    gemm: Gemm
    compute: Compute
    weight_format: WeightFormat
    kernel: str  # the Triton kernel specialization's name (catalog, AOT builds, SASS checks, plan)
    launcher: str  # the function in kernels/lora_linear.py or grad_input.py that launches it
    family: str  # tile-config family (kernels/configs.py)
    quantizer: Quantizer  # of the activation operand
    a_mode: int | None = None  # constexpr modes of _lora_gemm_kernel; None: the NVFP4 kernel
    w_mode: int | None = None
    trans_w: bool = False  # the kernel reads W transposed (dgrad through the (N, K) weight)
    cublas: CublasRule = CublasRule.NEVER
    scratch: bool = False  # dequantizing weight: at M >= DEQUANT_SCRATCH_MIN_ROWS dequantize once, run bf16
    persistent: bool = False  # kernels/persistent.py can run it (sm_90; where: PERSISTENT_SM90)
    operands: str | None = None  # operand types in the SASS MMA mnemonic, e.g. "E4M3.E4M3"
    what: str = ""

    @property
    def weight_list(self) -> tuple[str, ...]:
        return WEIGHT_LISTS[self.weight_format]

    @property
    def takes_input_q(self) -> bool:
        """Whether this forward reads its input pre-quantized (`input_q`) when its producer emits it."""
        return self.gemm is Gemm.OUTPUT and self.quantizer in (Quantizer.FP8_ROW_E4M3, Quantizer.FP8_BLOCK_E4M3)

    @property
    def persistent_kernel(self) -> str:
        """The name of this variant's specialization of the persistent kernel (catalog, plan)."""
        return f"persistent_{self.kernel}"

    @property
    def takes_grad_output_q(self) -> bool:
        """Whether this dgrad reads its gradient pre-quantized (`grad_output_q`) when the kernel that
        produces the gradient emits it (the FP8 dgrads: E5M2 per row, E4M3 per 1x128)."""
        return self.gemm is Gemm.GRAD_INPUT and self.quantizer in (Quantizer.FP8_ROW_E5M2, Quantizer.FP8_BLOCK_E4M3)

    def describe_rule(self, arch: str) -> str:
        """The shape rule on `arch` as one line of text (plan, `surogate info`), in `route`'s order of precedence."""
        if self.scratch:
            bf16 = variant(self.gemm, Compute.BF16, WeightFormat.BF16)
            return (f"M >= {DEQUANT_SCRATCH_MIN_ROWS}: weight dequantized to a bf16 scratch, then the bf16 route "
                    f"({bf16.describe_rule(arch)}); else this Triton kernel")
        parts = []
        rows = persistent_min_rows(self)
        if rows is not None and arch == "sm_90":
            bias = "" if PERSISTENT_BIAS or self.gemm is Gemm.GRAD_INPUT else ", no bias"
            parts.append(f"M >= {rows} and LoRA rank <= {PERSISTENT_MAX_RANK}{bias}: the persistent TMA kernel "
                         f"({self.persistent_kernel}) where TMA can read the operands")
        if self.cublas is CublasRule.BF16_LONG_REDUCTION:
            parts.append(f"cuBLAS + LoRA addmm where the reduction is >= {BF16_CUBLAS_MIN_K}")
        if self.cublas is CublasRule.BLOCK_FP8_SM90 and arch == "sm_90":
            parts.append("cuBLASLt block-scaled FP8 + LoRA addmm where M % 4 == 0, "
                         "the reduction % 512 == 0 and the output % 16 == 0")
        if self.cublas in FP8_ROW_CUBLAS and arch == "sm_90":
            parts.append("cuBLASLt row-scaled FP8 + LoRA addmm where the reduction and the output % 16 == 0")
        if not parts:
            return "always this Triton kernel"
        return "; else ".join(parts) + "; else this Triton kernel"


def _v(gemm, compute, fmt, kernel, launcher, family, quantizer, a_mode=None, w_mode=None, trans_w=False, **kw):
    return Variant(gemm, compute, fmt, kernel, launcher, family, quantizer, a_mode, w_mode, trans_w, **kw)


_O, _G = Gemm.OUTPUT, Gemm.GRAD_INPUT
_BF16, _FP8, _FP4 = Compute.BF16, Compute.FP8, Compute.NVFP4
_W = WeightFormat
_LONG_K, _SM90 = CublasRule.BF16_LONG_REDUCTION, CublasRule.BLOCK_FP8_SM90
_ROW_FWD, _ROW_DGRAD = CublasRule.ROW_FP8_FWD_SM90, CublasRule.ROW_FP8_DGRAD_SM90

VARIANTS: tuple[Variant, ...] = (
    # ---- output (forward)
    _v(_O, _BF16, _W.BF16, "lora_linear_bf16", "lora_linear_bf16", "bf16", Quantizer.NONE, A_BF16, W_BF16,
       cublas=_LONG_K, operands="BF16", persistent=True, what="forward: bf16 x bf16 + LoRA epilogue"),
    _v(_O, _FP8, _W.FP8_ROW, "lora_linear_fp8", "lora_linear_fp8", "fp8", Quantizer.FP8_ROW_E4M3, A_FP8_ROW,
       W_FP8_ROW, cublas=_ROW_FWD, operands="E4M3.E4M3", persistent=True,
       what="forward: E4M3 x E4M3, row/channel scales"),
    _v(_O, _FP8, _W.FP8_BLOCK, "lora_linear_fp8_block", "lora_linear_fp8_block", "fp8_block",
       Quantizer.FP8_BLOCK_E4M3, A_FP8_BLOCK, W_FP8_BLOCK, cublas=_SM90, operands="E4M3.E4M3", persistent=True,
       what="forward: E4M3 x E4M3, 1x128 / 128x128 block scales"),
    _v(_O, _BF16, _W.FP8_BLOCK, "lora_linear_dequant_fp8_block", "lora_linear_dequant_fp8_block", "dequant",
       Quantizer.NONE, A_BF16, W_DEQ_FP8_BLOCK, scratch=True, operands="BF16",
       what="forward: block-FP8 weight dequantized in registers, bf16 MMA"),
    _v(_O, _BF16, _W.NVFP4, "lora_linear_dequant_nvfp4", "lora_linear_dequant_nvfp4", "dequant", Quantizer.NONE,
       A_BF16, W_DEQ_NVFP4, scratch=True, operands="BF16",
       what="forward: NVFP4 weight dequantized in registers, bf16 MMA"),
    _v(_O, _BF16, _W.NVFP4_CACHED, "lora_linear_dequant_nvfp4", "lora_linear_dequant_nvfp4", "dequant",
       Quantizer.NONE, A_BF16, W_DEQ_NVFP4, scratch=True, operands="BF16",
       what="forward: NVFP4 weight dequantized in registers, bf16 MMA"),
    _v(_O, _BF16, _W.NF4, "lora_linear_dequant_nf4", "lora_linear_dequant_nf4", "dequant", Quantizer.NONE,
       A_BF16, W_DEQ_NF4, scratch=True, operands="BF16",
       what="forward: NF4 weight dequantized in registers, bf16 MMA"),
    _v(_O, _FP4, _W.NVFP4, "lora_linear_nvfp4", "lora_linear_nvfp4", "nvfp4", Quantizer.NVFP4,
       what="forward: NVFP4 x NVFP4 block-scaled MMA (tl.dot_scaled)"),
    _v(_O, _FP4, _W.NVFP4_CACHED, "lora_linear_nvfp4", "lora_linear_nvfp4", "nvfp4", Quantizer.NVFP4,
       what="forward: NVFP4 x NVFP4 block-scaled MMA (tl.dot_scaled)"),
    # ---- grad_input (dgrad)
    _v(_G, _BF16, _W.BF16, "grad_input_bf16", "grad_input_bf16", "bf16", Quantizer.NONE, A_BF16, W_BF16, True,
       cublas=_LONG_K, operands="BF16", persistent=True, what="dgrad: bf16 grad x bf16 weight read transposed"),
    _v(_G, _FP8, _W.FP8_ROW, "grad_input_fp8", "grad_input_fp8", "fp8", Quantizer.FP8_ROW_E5M2, A_FP8_ROW,
       W_FP8_ROW, cublas=_ROW_DGRAD, operands="E5M2.E4M3", persistent=True,
       what="dgrad: E5M2 grad x cached K-major E4M3 transpose"),
    _v(_G, _FP8, _W.FP8_BLOCK, "grad_input_fp8_block", "grad_input_fp8_block", "fp8_block",
       Quantizer.FP8_BLOCK_E4M3, A_FP8_BLOCK, W_FP8_BLOCK, cublas=_SM90, operands="E4M3.E4M3", persistent=True,
       what="dgrad: E4M3 1x128 grad x block-FP8 weight made K-major (transpose_fp8)"),
    _v(_G, _BF16, _W.FP8_BLOCK, "grad_input_dequant_fp8_block", "grad_input_dequant_fp8_block", "dequant",
       Quantizer.NONE, A_BF16, W_DEQ_FP8_BLOCK, True, scratch=True, operands="BF16",
       what="dgrad: block-FP8 weight dequantized, read transposed"),
    _v(_G, _BF16, _W.NVFP4, "grad_input_dequant_nvfp4", "grad_input_dequant_nvfp4", "dequant", Quantizer.NONE,
       A_BF16, W_DEQ_NVFP4, True, scratch=True, operands="BF16",
       what="dgrad: NVFP4 weight dequantized, read transposed"),
    _v(_G, _BF16, _W.NVFP4_CACHED, "grad_input_dequant_nvfp4", "grad_input_dequant_nvfp4", "dequant",
       Quantizer.NONE, A_BF16, W_DEQ_NVFP4, True, scratch=True, operands="BF16",
       what="dgrad: NVFP4 weight dequantized, read transposed"),
    _v(_G, _BF16, _W.NF4, "grad_input_dequant_nf4", "grad_input_dequant_nf4", "dequant", Quantizer.NONE, A_BF16,
       W_DEQ_NF4, True, scratch=True, operands="BF16", what="dgrad: NF4 weight dequantized, read transposed"),
    _v(_G, _FP4, _W.NVFP4, "grad_input_nvfp4", "grad_input_nvfp4", "nvfp4", Quantizer.NVFP4_SR,
       what="dgrad: NVFP4 grad (stochastic rounding) x NVFP4 K-major weight transpose"),
    _v(_G, _FP4, _W.NVFP4_CACHED, "grad_input_nvfp4", "grad_input_nvfp4", "nvfp4", Quantizer.NVFP4_SR,
       what="dgrad: NVFP4 grad (stochastic rounding) x NVFP4 K-major weight transpose"),
)

_BY_KEY: dict[tuple[Gemm, Compute, WeightFormat], Variant] = {(v.gemm, v.compute, v.weight_format): v
                                                               for v in VARIANTS}
# Member by value or by member, without calling the Enum class (traceable by Dynamo on torch 2.11).
_COMPUTE_OF = {**{c.value: c for c in Compute}, **{c: c for c in Compute}}
_FORMAT_OF = {**{f.value: f for f in WeightFormat}, **{f: f for f in WeightFormat}}


def weight_format_of(weight_format: "WeightFormat | str") -> WeightFormat:
    """The `WeightFormat` of a member or its value; an unknown one lists the valid ones."""
    try:
        return _FORMAT_OF[weight_format]
    except (KeyError, TypeError):
        valid = ", ".join(f.value for f in WeightFormat)
        raise ValueError(f"unknown weight_format {weight_format!r}; valid: {valid}") from None


def variant(gemm: "Gemm | str", compute: "Compute | str", weight_format: "WeightFormat | str") -> Variant:
    """The variant of one (GEMM, compute, weight format); an impossible pair lists the valid ones."""
    try:
        return _BY_KEY[(Gemm(gemm), Compute(compute), WeightFormat(weight_format))]
    except (KeyError, ValueError):
        valid = ", ".join(f"({v.compute.value}, {v.weight_format.value})" for v in VARIANTS if v.gemm == gemm)
        raise ValueError(f"no {getattr(gemm, 'value', gemm)} kernel for compute {getattr(compute, 'value', compute)!r} "
                         f"with weight_format {getattr(weight_format, 'value', weight_format)!r}; "
                         f"valid pairs: {valid}") from None


# The weight formats whose MoE experts the grouped kernels (kernels/grouped.py) run with FP8 compute
# (block-scaled FP8 MMA): the activation quantized E4M3 per 1x128 block against the stored 128x128
# weight blocks. Every other format runs bf16 compute (dequantized in registers); fp8_row experts are
# not run at all.
GROUPED_FP8_FORMATS = frozenset({WeightFormat.FP8_BLOCK})


def grouped_compute(compute: str | Compute, weight_format: str | WeightFormat) -> Compute:
    """The compute the grouped kernels have for a recipe's `compute` on experts stored as `weight_format`:
    FP8 where they run it (`GROUPED_FP8_FORMATS`: fp8_block), bf16 otherwise (dequantized in registers)."""
    fp8 = Compute(compute) is Compute.FP8 and WeightFormat(weight_format) in GROUPED_FP8_FORMATS
    return Compute.FP8 if fp8 else Compute.BF16


def grouped_variant(gemm: Gemm | str, compute: str | Compute, weight_format: str | WeightFormat) -> Variant:
    """The dense variant-table row whose modes, quantizer and config family the grouped kernel runs for
    (gemm, compute, format): bf16 compute for bf16, fp8_block, nf4 and nvfp4 weights; fp8 compute for
    fp8_block weights (`GROUPED_FP8_FORMATS`). Anything else is a ValueError naming what is supported."""
    c, fmt = Compute(compute), WeightFormat(weight_format)
    if c is Compute.BF16 or (c is Compute.FP8 and fmt in GROUPED_FP8_FORMATS):
        return variant(gemm, c, fmt)  # raises for a format without a bf16-compute kernel (fp8_row)
    fp8 = ", ".join(sorted(f.value for f in GROUPED_FP8_FORMATS))
    raise ValueError(f"the grouped kernels run bf16 compute (weights dequantized in registers) for every format "
                     f"but fp8_row, and fp8 compute (block-scaled FP8 MMA) for {fp8} weights only; got compute "
                     f"{c.value!r} with weight_format {fmt.value!r} (docs/moe.md)")


@dataclass(frozen=True)
class Route:
    """What one call runs: the engine, the variant whose kernel runs, and whether the weight was first
    dequantized into a bf16 scratch buffer (then `variant` is the bf16 one)."""

    engine: Engine
    variant: Variant
    scratch: bool = False

    def __str__(self) -> str:
        what = {Engine.TRITON: self.variant.kernel, Engine.PERSISTENT: self.variant.persistent_kernel}.get(
            self.engine, f"cuBLAS ({self.variant.kernel}'s GEMM)")
        return f"dequantize to bf16, then {what}" if self.scratch else what


def cublas_takes(rule: CublasRule, arch: str, rows: int, n_out: int, k_red: int) -> bool:
    """Whether `rule` sends a GEMM of `rows` x `n_out` with reduction `k_red` on `arch` to cuBLAS.

    Block-scaled FP8: cuBLASLt reads the weight scales in groups of 4 blocks along K (K % 512), and
    the activation scales' column stride (M floats) must be 16-byte aligned (M % 4: it answered
    NOT_SUPPORTED for M = 123 and 777 on the H100 and took 776, 780, 784).
    """
    if rule is CublasRule.BF16_LONG_REDUCTION:
        return k_red >= BF16_CUBLAS_MIN_K
    if rule is CublasRule.BLOCK_FP8_SM90:
        return arch == "sm_90" and rows > 0 and rows % 4 == 0 and k_red % 512 == 0 and n_out % 16 == 0
    if rule in (CublasRule.ROW_FP8_FWD_SM90, CublasRule.ROW_FP8_DGRAD_SM90):  # cuBLASLt FP8: 16-byte leading dims
        return rule in FP8_ROW_CUBLAS and arch == "sm_90" and rows > 0 and k_red % 16 == 0 and n_out % 16 == 0
    return False


def persistent_takes(v: Variant, arch: str, rows: int, n_out: int, k_red: int, rank: int | None = None,
                     bias: bool = False) -> bool:
    """Whether the persistent TMA kernel runs a call of `v`: sm_90, a variant PERSISTENT_SM90 routes at these
    rows (`persistent_min_rows`), a LoRA `rank` of at most PERSISTENT_MAX_RANK (None: no LoRA term), no `bias`
    unless PERSISTENT_BIAS, and row strides TMA can read: the reduction a multiple of 16 elements (16 bytes of
    FP8; bf16 needs 8, 16 keeps one rule), the output's a multiple of 8 (16 bytes of bf16)."""
    min_rows = persistent_min_rows(v)
    return (arch == "sm_90" and min_rows is not None and rows >= max(min_rows, 1) and k_red % 16 == 0
            and n_out % 8 == 0 and (rank is None or rank <= PERSISTENT_MAX_RANK) and (PERSISTENT_BIAS or not bias))


def route(v: Variant, arch: str, rows: int, n_out: int, k_red: int,
          cublas: "bool | Callable[[CublasRule], bool]" = True, rank: int | None = None, bias: bool = False) -> Route:
    """The route of one call of `v` on `arch`: `rows` (M), `n_out` output columns, reduction `k_red`.

    `cublas` says whether cuBLAS can run a rule's GEMM here at all (False, or a function of the rule
    answering False: no GPU, the Triton interpreter, a cuBLASLt without block scaling,
    `configs.FORCE_TRITON_GEMMS`); then the Triton kernel runs instead. `rank`: the call's LoRA rank (None:
    no LoRA term) and `bias`: whether it adds one, both bounding the persistent kernel (`persistent_takes`).
    """
    if arch == "cpu":
        return Route(Engine.REFERENCE, v)
    if v.scratch and rows >= DEQUANT_SCRATCH_MIN_ROWS:
        bf16 = variant(v.gemm, Compute.BF16, WeightFormat.BF16)
        return Route(route(bf16, arch, rows, n_out, k_red, cublas, rank, bias).engine, bf16, scratch=True)
    if persistent_takes(v, arch, rows, n_out, k_red, rank, bias):
        return Route(Engine.PERSISTENT, v)
    if cublas_takes(v.cublas, arch, rows, n_out, k_red) and (cublas(v.cublas) if callable(cublas) else cublas):
        return Route(Engine.CUBLAS, v)
    return Route(Engine.TRITON, v)


def check_input_q(input_q, input, weight_format: "WeightFormat | str", forward: "Compute | str",
                  what: str | None = None):
    """Validate `input_q` (the op's pre-quantized input) against `input` (..., K) for the forward variant
    of (forward, weight_format); return it as (data (M, K), scale (M, groups)), the scale keeping its
    strides where it can (block scales are read M-contiguous)."""
    v = _BY_KEY.get((Gemm.OUTPUT, _COMPUTE_OF.get(forward), _FORMAT_OF.get(weight_format)))
    if v is None or not v.takes_input_q:
        raise ValueError(f"input_q is only taken by the FP8 forward kernels (forward='fp8' with weight_format "
                         f"'fp8_row' or 'fp8_block'); got forward={getattr(forward, 'value', forward)!r}, "
                         f"weight_format={getattr(weight_format, 'value', weight_format)!r}: pass input_q=None")
    return _check_quantized(input_q, input, v, f"input_q ({what or f'the {v.quantizer.value} quantizer of the input'})",
                            "input", "K")


def check_grad_output_q(grad_output_q, grad_output, weight_format: "WeightFormat | str",
                        grad_input: "Compute | str", what: str | None = None):
    """Validate `grad_output_q` (the backward op's pre-quantized gradient) against `grad_output` (..., N) for
    the dgrad variant of (grad_input, weight_format); return it as (data (M, N), scale (M, groups)), the
    scale keeping its strides where it can (block scales are read M-contiguous)."""
    v = _BY_KEY.get((Gemm.GRAD_INPUT, _COMPUTE_OF.get(grad_input), _FORMAT_OF.get(weight_format)))
    if v is None or not v.takes_grad_output_q:
        raise ValueError(f"grad_output_q is only taken by the FP8 dgrad kernels (grad_input='fp8' with weight_format "
                         f"'fp8_row' or 'fp8_block'); got grad_input={getattr(grad_input, 'value', grad_input)!r}, "
                         f"weight_format={getattr(weight_format, 'value', weight_format)!r}: pass grad_output_q=None")
    what = f"grad_output_q ({what or f'the {v.quantizer.value} quantizer of the gradient'})"
    return _check_quantized(grad_output_q, grad_output, v, what, "grad_output", "N")


# The FP8 element each activation quantizer writes (the others are not taken pre-quantized).
_FP8_ELEMENT_OF = {Quantizer.FP8_ROW_E4M3: "float8_e4m3fn", Quantizer.FP8_ROW_E5M2: "float8_e5m2",
                   Quantizer.FP8_BLOCK_E4M3: "float8_e4m3fn"}


def _check_quantized(quantized, operand, v: Variant, what: str, name: str, dim: str):
    """`quantized` = [data, scale] as `v.quantizer` leaves `operand` (..., D): data of its shape in the FP8
    element, fp32 scales (M, 1) per row or (M, ceil(D/128)) per 1x128 block; returned 2-D."""
    import torch

    if len(quantized) != 2:
        raise ValueError(f"{what} holds [data, scale]; got {len(quantized)} tensors")
    data, scale = quantized
    element = getattr(torch, _FP8_ELEMENT_OF[v.quantizer])
    d = operand.shape[-1]
    m = operand.numel() // d if d else 0
    groups = -(-d // 128) if v.quantizer is Quantizer.FP8_BLOCK_E4M3 else 1
    if data.dtype != element or scale.dtype != torch.float32:
        raise TypeError(f"{what}: want data {_FP8_ELEMENT_OF[v.quantizer]} and scale float32, got {data.dtype} "
                        f"and {scale.dtype}")
    if data.device != operand.device or scale.device != operand.device:
        raise ValueError(f"{what}: on {data.device}/{scale.device}, the {name} on {operand.device}")
    if data.shape[-1:] != (d,) or data.numel() != m * d or scale.numel() != m * groups \
            or (scale.dim() and scale.shape[-1] != groups):
        raise ValueError(f"{what}: for the {name} {tuple(operand.shape)} want data (M={m}, {dim}={d}) and scale "
                         f"(M, {groups}) (or the {name}'s leading dims), got {tuple(data.shape)} and "
                         f"{tuple(scale.shape)}")
    return data.reshape(m, d), scale.reshape(m, groups)


_trace: list[Route] | None = None


@contextlib.contextmanager
def trace() -> Iterator[list[Route]]:
    """Record the route of every GEMM the CUDA launcher runs inside the block (tests, benchmarks)."""
    global _trace
    previous, _trace = _trace, []
    try:
        yield _trace
    finally:
        _trace = previous


def record(r: Route) -> Route:
    """Called by the launcher once per GEMM it runs; free when no `trace()` is open."""
    if _trace is not None:
        _trace.append(r)
    return r
