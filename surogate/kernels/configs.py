"""Tile and tuning configs of the fused GEMM kernels, per architecture.

Each `get_<kernel family>_configs(arch)` returns the `triton.Config`s that autotuning picks
from (keyed on the problem shape); heuristics are named functions with a reason. Under
`TRITON_INTERPRET=1` one small config runs, so CPU tests stay fast.
"""

from __future__ import annotations

import functools

import triton

from surogate.compat import triton_interpreting

from surogate.recipes import ARCHS, normalize_arch

# Shared memory per block (bytes) the configs may plan for: Hopper/Blackwell datacenter parts
# have ~227 KB, Ada and consumer Blackwell ~99 KB.
_SMEM = {"sm_89": 99 * 1024, "sm_90": 227 * 1024, "sm_100": 227 * 1024, "sm_120": 99 * 1024}


def shared_memory_bytes(arch: str) -> int:
    """The most shared memory one program (CTA) may use on `arch`."""
    return _SMEM[normalize_arch(arch)]


def interpreting() -> bool:
    """True under the Triton CPU interpreter (tests): one small config, fp32 MMAs."""
    return triton_interpreting()


def interpret_config(family: str) -> dict:
    """The single config used under the interpreter: small tiles; N and K steps of 64 (one NF4 block).
    The persistent kernels' loop knobs are off there (the interpreter ignores them anyway)."""
    tiles = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4}
    if family.startswith("persistent"):
        tiles.update(WARP_SPECIALIZE=False, FLATTEN=False, K_UNROLL=1)
    return tiles


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int, group: int = 8) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
                         num_warps=warps, num_stages=stages)


def _fits(c: triton.Config, elem_bytes: float, arch: str) -> bool:
    """A config fits when its pipelined A and W tiles fit in the arch's shared memory."""
    kw = c.kwargs
    per_stage = (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * elem_bytes
    return per_stage * c.num_stages <= _SMEM[arch]


def get_lora_linear_bf16_configs(arch: str) -> list[triton.Config]:
    """bf16 x bf16 (also dgrad): wide N tiles feed wgmma/tcgen05 best; smaller tiles for Ada/sm_120."""
    arch = normalize_arch(arch)
    if arch in ("sm_90", "sm_100"):
        cands = [_cfg(128, 256, 64, 8, 3), _cfg(128, 256, 64, 8, 4), _cfg(128, 128, 64, 4, 4),
                 _cfg(128, 128, 64, 8, 4), _cfg(256, 128, 64, 8, 4)]
    else:
        cands = [_cfg(128, 128, 32, 4, 4), _cfg(128, 64, 64, 4, 3), _cfg(64, 128, 64, 4, 3)]
    return [c for c in cands if _fits(c, 2, arch)]


def get_lora_linear_fp8_configs(arch: str) -> list[triton.Config]:
    """FP8 x FP8 (row- or block-scaled): K step 128 (one FP8 block) so block scales are per step."""
    arch = normalize_arch(arch)
    if not ARCHS[arch].fp8_mma:
        raise ValueError(f"{arch} has no FP8 tensor cores; use a bf16 recipe")
    if arch in ("sm_90", "sm_100"):
        cands = [_cfg(128, 256, 128, 8, 3), _cfg(128, 256, 128, 8, 4), _cfg(128, 128, 128, 8, 4),
                 _cfg(128, 128, 128, 4, 5), _cfg(256, 128, 128, 8, 4)]
    else:
        cands = [_cfg(128, 128, 128, 4, 3), _cfg(128, 64, 128, 4, 3), _cfg(64, 128, 128, 4, 3)]
    return [c for c in cands if _fits(c, 1, arch)]


def get_lora_linear_fp8_block_configs(arch: str) -> list[triton.Config]:
    """Block-scaled FP8 (1x128 x 128x128): each K step's product is scaled into the accumulator,
    so a second accumulator-sized register tile is live and the MMA waits every step. Tiles of
    64 x 128 on 4 warps keep both in registers and fit 2-3 programs an SM, whose MMAs then overlap
    each other's scaling (the same reason DeepGEMM runs two math warpgroups)."""
    arch = normalize_arch(arch)
    if not ARCHS[arch].fp8_mma:
        raise ValueError(f"{arch} has no FP8 tensor cores; use a bf16 recipe")
    if arch in ("sm_90", "sm_100"):
        # Measured on the H100 over the 8B shapes (bench/results/gemm_configs.md): 128x64 wins the
        # forwards, 64x128 (group 16) the dgrads; 128x128 on 8 warps loses 10-30%, on 4 warps it spills.
        cands = [_cfg(128, 64, 128, 4, 4), _cfg(64, 128, 128, 4, 4, group=16), _cfg(64, 128, 128, 4, 3),
                 _cfg(64, 256, 128, 8, 3)]
    else:
        cands = [_cfg(64, 128, 128, 4, 3), _cfg(128, 64, 128, 4, 3), _cfg(64, 64, 128, 4, 3)]
    return [c for c in cands if _fits(c, 1, arch)]


def get_lora_linear_dequant_configs(arch: str) -> list[triton.Config]:
    """Dequant prologue + bf16 MMA: the weight tile is built in registers, so fewer warps idle
    on loads with more of them; the activation dominates shared memory."""
    arch = normalize_arch(arch)
    if arch in ("sm_90", "sm_100"):
        cands = [_cfg(128, 128, 64, 8, 3), _cfg(128, 256, 64, 8, 3), _cfg(256, 128, 64, 8, 3),
                 _cfg(128, 128, 128, 8, 3), _cfg(128, 128, 64, 4, 4)]
    else:
        cands = [_cfg(128, 128, 64, 4, 3), _cfg(64, 128, 64, 4, 3)]
    return [c for c in cands if _fits(c, 2, arch)]


def _pcfg(bm: int, bn: int, bk: int, ws: bool, stages: int, warps: int | None = None, group: int = 8,
          flatten: bool = False, unroll: int = 1) -> triton.Config:
    """A persistent-kernel config. Warp-specialized ones take num_warps=4: Triton's sm_90 pass then adds a
    producer warpgroup and runs two consumer warpgroups of BLOCK_M / 2 rows each (12 warps in all); with
    8 warps it silently builds the unspecialized kernel. `unroll`: the K loop's loop_unroll_factor (1: none).
    No config unrolls: at 2 the specialized build fails (3.9) and the unspecialized 128x256 one stages 360 KB
    of shared memory, so the knob stays for other tiles or Tritons."""
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group, "WARP_SPECIALIZE": ws,
                          "FLATTEN": flatten, "K_UNROLL": unroll}, num_warps=warps or (4 if ws else 8),
                         num_stages=stages)


def _fits_persistent(c: triton.Config, elem_bytes: float, arch: str) -> bool:
    """The pipelined A and W tiles plus the bf16 output tile the TMA store stages in shared memory. An
    estimate: the warp-specialized build keeps more (each consumer's output half, the LoRA tiles: 128x256
    bf16 at 3 stages took 267 KB), so tests/test_kernels_persistent.py checks every config's real
    shared memory in its sm_90 build."""
    kw = c.kwargs
    out_tile = kw["BLOCK_M"] * kw["BLOCK_N"] * 2
    return (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * elem_bytes * c.num_stages + out_tile <= _SMEM[arch]


# Whether the persistent families offer warp-specialized configs: None follows
# `compat.warp_specialize_checked()` (only Tritons whose specialized builds ran right on a GPU); True / False
# force it (tests that check the specialized builds' TTGIR and SASS on any Triton).
PERSISTENT_WARP_SPECIALIZE: bool | None = None


def _persistent_family(cands: list[triton.Config], elem_bytes: float, arch: str) -> list[triton.Config]:
    """The candidates that fit in shared memory, without the warp-specialized ones on a Triton whose
    specialized builds were never checked on a GPU (`PERSISTENT_WARP_SPECIALIZE`)."""
    from surogate.compat import warp_specialize_checked

    specialize = warp_specialize_checked() if PERSISTENT_WARP_SPECIALIZE is None else PERSISTENT_WARP_SPECIALIZE
    return [c for c in cands
            if _fits_persistent(c, elem_bytes, arch) and (specialize or not c.kwargs["WARP_SPECIALIZE"])]


def _persistent_archs(arch: str) -> str:
    """sm_90 only. The same kernel built for sm_100 (Triton 3.9) is not fit to run: 128x256 specialized
    and flattened builds came out without any MMA or TMA instruction (4 registers), and others spill;
    Blackwell needs its own tiles (tcgen05, tensor memory) and is left to the non-persistent kernel."""
    arch = normalize_arch(arch)
    if arch != "sm_90":
        raise ValueError(f"the persistent TMA kernels are built for sm_90 only, not {arch}")
    return arch


def _persistent_one_scale_family(bk: int, elem_bytes: float, arch: str) -> list[triton.Config]:
    """The bf16 and row-scaled FP8 families: the same tiles, a K step of 128 bytes (one TMA swizzle row)."""
    arch = _persistent_archs(arch)
    cands = [_pcfg(128, 256, bk, True, 2), _pcfg(128, 256, bk, False, 3),
             _pcfg(128, 128, bk, False, 4), _pcfg(256, 128, bk, True, 2),
             _pcfg(128, 256, bk, False, 3, flatten=True)]
    return _persistent_family(cands, elem_bytes, arch)


def get_persistent_bf16_configs(arch: str) -> list[triton.Config]:
    """Persistent bf16 (kernels/persistent.py): 128x256 tiles, the cuBLAS shape on Hopper, warp-specialized
    first (2 stages: 3 do not fit once specialized); K step 64. Flatten only unspecialized: with warp
    specialization it neither specializes nor fits in registers."""
    return _persistent_one_scale_family(64, 2, arch)


def get_persistent_fp8_configs(arch: str) -> list[triton.Config]:
    """Persistent FP8 with row / channel scales: the bf16 family's tiles, K step 128, scales in the epilogue."""
    return _persistent_one_scale_family(128, 1, arch)


def get_persistent_fp8_block_configs(arch: str) -> list[triton.Config]:
    """Persistent block-scaled FP8: K step 128 (one scale block), each step's product scaled into the
    accumulator, so two accumulator tiles are live: warp specialization gives each consumer warpgroup half
    of BLOCK_M (DeepGEMM's two math warpgroups), and the producer keeps the TMA loads ahead. But the only
    specialized tiles that fit, 128x128 at 3 or 4 stages, compute wrong sums on the H200 with Triton 3.6
    (`persistent_probe_configs`), so none is specialized for now. With Triton 3.9 they compute right and the
    tuner picks them, yet the op is no faster (0.59-0.77x cuBLASLt's GEMM alone at the 8B shapes against
    3.6's unspecialized 0.63-0.74x: bench/results/kernels_persistent_h200_triton39_ws.md): specialization
    does not lift this kernel past cuBLASLt, which keeps qfp8's GEMM."""
    arch = _persistent_archs(arch)
    cands = [_pcfg(128, 128, 128, False, 4), _pcfg(64, 128, 128, False, 4, warps=4)]
    return _persistent_family(cands, 1, arch)


def persistent_probe_configs(family: str) -> list[triton.Config]:
    """Warp-specialized 128x128 configs kept out of the persistent families. At 4 and 3 stages they computed
    wrong sums on the H200 (bench/NOTES.md run 55, Triton 3.6) in every family, bf16 included (so not the FP8
    scales), with non-finite outputs spread over both consumer warpgroups' rows; the specialized 128x256 and
    256x128 tiles at 2 stages were right. With Triton 3.9 all three (2 stages too) are right in every family
    (48-82 dB, the unspecialized configs' SQNR; run 155). tests/gpu/test_persistent_gpu.py runs
    all three and prints their numbers, to admit any that comes out right."""
    bk = 64 if family == "persistent_bf16" else 128
    return [_pcfg(128, 128, bk, True, stages) for stages in (4, 3, 2)]


def get_lora_linear_nvfp4_configs(arch: str) -> list[triton.Config]:
    """NVFP4 block-scaled MMA (sm_100/sm_120 only): K step 128 = 8 scale groups of 16."""
    arch = normalize_arch(arch)
    if not ARCHS[arch].fp4_mma:
        raise ValueError(f"{arch} has no FP4 tensor cores; NVFP4 recipes run emulated there (allow_emulation=True)")
    if arch == "sm_100":
        cands = [_cfg(128, 256, 128, 8, 3), _cfg(128, 128, 256, 4, 3), _cfg(128, 128, 128, 4, 4)]
    else:
        cands = [_cfg(128, 128, 128, 4, 3), _cfg(64, 128, 128, 4, 3)]
    return [c for c in cands if _fits(c, 0.5, arch)]


# Whether FP8 tile products are added in FP32 each K step rather than kept in the MMA (fp8_row).
# On sm_90 Triton accumulates FP8 wgmma products without FP32 promotion by default
# (max_num_imprecise_acc = 2**30); over long K that can lose bits. Promoting each K step breaks the
# wgmma accumulator chain: measured on the H100 (bench/NOTES.md runs 2-3) it cost 20-25% on 8B
# shapes while the unpromoted result stayed far above the FP8 quantization noise against the FP32
# reference, so it is off; bench/fused_kernels.py sets it to measure both sides.
FP8_PROMOTE: bool = False
# True runs the Triton kernels where cuBLAS would (kernels/cublas.py), for measurement and tests.
FORCE_TRITON_GEMMS: bool = False


@functools.lru_cache(maxsize=None)
def device_arch(index: int) -> str:
    """The arch of CUDA device `index`, cached: launchers ask on every call (host overhead)."""
    import torch

    return normalize_arch(torch.cuda.get_device_capability(index))


def block_r(r: int) -> int:
    """LoRA rank padded to an MMA-friendly power of two (>= 16)."""
    return max(16, triton.next_power_of_2(r))


FAMILIES = {
    "bf16": get_lora_linear_bf16_configs,
    "fp8": get_lora_linear_fp8_configs,
    "fp8_block": get_lora_linear_fp8_block_configs,
    "dequant": get_lora_linear_dequant_configs,
    "nvfp4": get_lora_linear_nvfp4_configs,
    "persistent_bf16": get_persistent_bf16_configs,
    "persistent_fp8": get_persistent_fp8_configs,
    "persistent_fp8_block": get_persistent_fp8_block_configs,
}


def get_configs(family: str, arch: str) -> list[triton.Config]:
    """Configs of one kernel family on `arch`."""
    try:
        return FAMILIES[family](arch)
    except KeyError:
        raise ValueError(f"unknown kernel family {family!r}; valid: {', '.join(FAMILIES)}") from None
