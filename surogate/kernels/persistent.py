"""The persistent fused GEMM-LoRA kernel for Hopper: TMA loads, warp specialization, LoRA epilogue.

`out = GEMM(A, W) * scales (+ bias) + H @ U^T`, the same math as `_lora_gemm_kernel` (lora_linear.py)
for the three operand families that run native MMAs on sm_90: bf16 x bf16, E4M3/E5M2 x E4M3 with
row / channel scales (fp8), E4M3 x E4M3 with 1x128 / 128x128 block scales (qfp8). What differs is
how the work is scheduled, after Triton's tutorial 09 ("persistent matmul"):

- persistent: one program per SM (`NUM_SMS`); each walks the output tiles `start, start + NUM_SMS,
  ...` in GROUP_M-swizzled order, so the programs running together share weight tiles in L2, and
  no program pays a launch or a prologue per tile;
- TMA: A and W are read through device-side tensor descriptors (`tl.make_tensor_descriptor`) into
  swizzled shared memory, both K-major where wgmma wants it (the forward weight (N, K) as stored,
  the FP8 dgrad's cached K-major transpose; the bf16 dgrad reads W (N, K) with N as the reduction,
  which bf16 wgmma takes MN-major); the output tile is written by a TMA store;
- warp specialization (`WARP_SPECIALIZE`, `tl.range(..., warp_specialize=True)`): on sm_90 Triton
  3.6 and 3.9 split the tile loop into a producer warpgroup issuing TMA loads and two consumer
  warpgroups (half of BLOCK_M each) running wgmma and the epilogue, with `setmaxnreg` moving
  registers to the consumers. It needs num_warps=4 (the kernel then has 12 warps) and device-side
  descriptors: with host-side `TensorDescriptor`s the split fails to compile (3.9: the consumers'
  half-tile loads no longer match the host block shape; 3.6: the descriptor store). Hence the
  device-side descriptors, and `compat.ensure_tma_allocator()` for the scratch they are written to.
  What is read by pointer (the FP8 scales, the bias) is indexed from pid_m / pid_n, not from the TMA
  coordinates: the split rebases those for the second consumer and would offset such indices twice
  (see the tile loop; run 54's wrong FP8 numbers).

The activation arrives already quantized by its producer (`quantize_fp8_rowwise` /
`quantize_fp8_block`, or the FX producer pass's fused RMSNorm / SwiGLU); `H = lora_hidden` (M, r)
is computed beforehand as for the other kernels. The LoRA up-projection is one more MMA step after the
K loop, `acc += H[tile rows] @ U^T[:, tile cols]`, with both read through TMA: U^T (r, N) row-major,
lora_scale folded in (in the forward by the kernel that casts the FP32 factors, `lora_factors.py`; else by
the launcher). (Read by pointers, as `_lora_epilogue` does, that second dot
made the warp-specialized build fail in both Tritons.)
`TMA=False` reads the same tiles with masked pointer loads (unaligned shapes; the tests check both
paths under the interpreter, bit for bit against `_lora_gemm_kernel`).

Routing: `variants.PERSISTENT_SM90` sends the variants marked `persistent` here on sm_90 where the H200
measurement (bench/fused_kernels.py --persistent) found it faster: bf16 from 4096 rows, row-scaled fp8 from 1024
(with the unspecialized configs only: the warp-specialized ones gave NaN losses under CUDA graphs, runs 63-70).
Without a LoRA term this kernel runs bf16 at 0.98-1.02x of torch.mm and row-scaled FP8 at 1.07-1.15x of
`_scaled_mm` on the 8B shapes (bench/gemm_ceiling.py, run 151).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from surogate.compat import ensure_tma_allocator
from surogate.kernels import tuning
from surogate.kernels.configs import block_r, interpreting
from surogate.kernels.lora_linear import _block_fp8_step, _gemm_metadata, lora_up_rows
from surogate.kernels.variants import A_BF16, A_FP8_BLOCK, A_FP8_ROW, W_BF16, W_FP8_BLOCK, W_FP8_ROW, Gemm, Variant


@triton.jit
def _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of output tile `tile_id`, grouped GROUP_M tiles along M (as `_tile_ids`)."""
    group = GROUP_M * num_pid_n
    first_m = (tile_id // group) * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    return first_m + (tile_id % group) % size_m, (tile_id % group) // size_m


@triton.jit
def _operand(ptr, n_rows, n_cols, stride, R: tl.constexpr, C: tl.constexpr, TMA: tl.constexpr):
    """A row-major (n_rows, n_cols) operand read in [R, C] tiles: its TMA descriptor, or the pointer."""
    if TMA:
        return tl.make_tensor_descriptor(ptr, shape=[n_rows, n_cols], strides=[stride, 1], block_shape=[R, C])
    else:
        return ptr


@triton.jit
def _tile(src, row0, col0, n_rows, n_cols, stride, R: tl.constexpr, C: tl.constexpr, TMA: tl.constexpr):
    """The [R, C] tile at (row0, col0) of an `_operand`: one TMA load, or masked pointer loads
    (zeros outside the operand, as TMA fills them)."""
    if TMA:
        return src.load([row0, col0])
    else:
        rows = row0 + tl.arange(0, R)
        cols = col0 + tl.arange(0, C)
        mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
        return tl.load(src + rows[:, None].to(tl.int64) * stride + cols[None, :], mask=mask, other=0.0)


@triton.jit(launch_metadata=_gemm_metadata)
def _persistent_lora_gemm_kernel(
    a_ptr, as_ptr, w_ptr, ws_ptr, h_ptr, ut_ptr, bias_ptr, out_ptr,
    M, N, K, R,
    stride_am, stride_asm, stride_ask, stride_w0, stride_ws0, stride_ws1, stride_hm, stride_ut, stride_om,
    A_MODE: tl.constexpr, W_MODE: tl.constexpr, TRANS_W: tl.constexpr,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, TMA: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, FLATTEN: tl.constexpr,
    K_UNROLL: tl.constexpr,
):
    """out[M, N] = sum_k A[m, k] W'[k, n] (scaled) (+ bias[n]) + H[m, :] U[n, :]^T, tile by tile.

    A (M, K) and W have unit stride along their last dim. W' is W^T (W stored (N, K): the forward
    weight, the FP8 dgrad's K-major copy) unless TRANS_W (W stored (K, N): the bf16 dgrad through
    the forward weight). Modes as `_lora_gemm_kernel`: A_MODE 0 bf16 / 1 FP8 per row / 2 FP8 1x128;
    W_MODE 0 bf16 / 1 FP8 per output channel / 2 FP8 128x128.
    """
    a_src = _operand(a_ptr, M, K, stride_am, BLOCK_M, BLOCK_K, TMA)
    if TRANS_W:
        w_src = _operand(w_ptr, K, N, stride_w0, BLOCK_K, BLOCK_N, TMA)
    else:
        w_src = _operand(w_ptr, N, K, stride_w0, BLOCK_N, BLOCK_K, TMA)
    out_src = _operand(out_ptr, M, N, stride_om, BLOCK_M, BLOCK_N, TMA)
    if HAS_LORA:
        h_src = _operand(h_ptr, M, R, stride_hm, BLOCK_M, BLOCK_R, TMA)
        ut_src = _operand(ut_ptr, R, N, stride_ut, BLOCK_R, BLOCK_N, TMA)

    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    # Warp specialization splits the loop around TMA loads: the pointer path runs unspecialized.
    for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS, flatten=FLATTEN,
                            warp_specialize=WARP_SPECIALIZE and TMA):
        pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M  # TMA coordinates of the tile
        off_n = pid_n * BLOCK_N
        # Indices of what is read by pointer (row / channel / block scales, bias, the pointer path): from
        # pid_m / pid_n in int64, never from the TMA coordinates off_m / off_n. Root cause (H200, run 54): on
        # sm_90 the warp-specialized build splits BLOCK_M between two consumer warpgroups, and Triton's data
        # partitioning (3.6 and 3.9) rebases the descriptor coordinate off_m by BLOCK_M / 2 for the second one
        # *and* maps every use of that same value to the rebased one, while it also slices the arange to
        # [BLOCK_M / 2, BLOCK_M): `off_m + tl.arange(0, BLOCK_M)` became off_m + BLOCK_M / 2 + [BLOCK_M / 2,
        # BLOCK_M) there, so the second half of every tile took the scales of the rows BLOCK_M / 2 further on
        # (the next tile's, or row 0 past M): fp8 22-23 dB. A base that is not a descriptor coordinate is not
        # remapped (tests/test_kernels_persistent.py checks the sm_90 TTGIR for it).
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        rows_m = tl.where(mask_m, offs_m, 0)
        cols_n = tl.where(mask_n, offs_n, 0)
        col0 = pid_n.to(tl.int64) * BLOCK_N  # = off_n for the block scales, never a rebased coordinate

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in tl.range(k_tiles, loop_unroll_factor=K_UNROLL):
            k0 = ki * BLOCK_K
            a = _tile(a_src, off_m, k0, M, K, stride_am, BLOCK_M, BLOCK_K, TMA)
            if TRANS_W:
                w = _tile(w_src, k0, off_n, K, N, stride_w0, BLOCK_K, BLOCK_N, TMA)
            else:
                w = tl.trans(_tile(w_src, off_n, k0, N, K, stride_w0, BLOCK_N, BLOCK_K, TMA))
            if UPCAST:  # the interpreter's bf16 tl.dot is wrong; fp32 is exact enough for tests
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            if A_MODE == 2:  # block-scaled FP8: each 128-deep product promoted with both block scales
                acc = _block_fp8_step(acc, a, w, as_ptr, ws_ptr, rows_m, cols_n, k0, col0, stride_asm,
                                      stride_ask, stride_ws0, stride_ws1, BLOCK_N, False)
            else:
                acc = tl.dot(a, w, acc)

        # Row / channel scales after the loop: per-row activation and per-output-channel weight scales.
        if A_MODE == 1:
            acc = acc * tl.load(as_ptr + rows_m * stride_asm)[:, None]
        if W_MODE == 1:
            acc = acc * tl.load(ws_ptr + cols_n * stride_ws0)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols_n).to(tl.float32)[None, :]
        if HAS_LORA:  # one more MMA step: H[tile rows, :r] @ U^T[:r, tile cols], both through TMA
            h = _tile(h_src, off_m, 0, M, R, stride_hm, BLOCK_M, BLOCK_R, TMA)
            ut = _tile(ut_src, 0, off_n, R, N, stride_ut, BLOCK_R, BLOCK_N, TMA)
            if UPCAST:
                h = h.to(tl.float32)
                ut = ut.to(tl.float32)
            acc = tl.dot(h, ut, acc)
        out = acc.to(out_ptr.dtype.element_ty)
        if TMA:
            out_src.store([off_m, off_n], out)
        else:
            tl.store(out_src + rows_m[:, None] * stride_om + offs_n[None, :], out,
                     mask=mask_m[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------- launchers

# The variants this kernel runs (variants.Variant.persistent), by (A_MODE, W_MODE): the config family.
FAMILIES = {(A_BF16, W_BF16): "persistent_bf16", (A_FP8_ROW, W_FP8_ROW): "persistent_fp8",
            (A_FP8_BLOCK, W_FP8_BLOCK): "persistent_fp8_block"}


@functools.lru_cache(maxsize=None)
def num_sms(index: int) -> int:
    """SMs of CUDA device `index` (the persistent grid), cached: asked on every launch."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 3  # the interpreter: fewer programs than tiles, so every program walks several
    return num_sms(device.index if device.index is not None else torch.cuda.current_device())


def tma_ok(*operands: torch.Tensor | None) -> bool:
    """Whether TMA can read (and write) these 2-D operands: unit inner stride, 16-byte aligned bases and
    row strides (K % 16 for FP8, % 8 for bf16; the output's N % 8; LoRA rank % 8). None: absent."""
    return all(t is None or (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
                             and (t.stride(0) * t.element_size()) % 16 == 0) for t in operands)


def launch_persistent_gemm(a: torch.Tensor, a_scale: torch.Tensor | None, a_mode: int,
                           w: torch.Tensor, w_scale: torch.Tensor | None, w_mode: int, trans_w: bool, n_out: int,
                           hidden: torch.Tensor | None, up: torch.Tensor | None, bias: torch.Tensor | None,
                           lora_scale: float, *, ut: torch.Tensor | None = None, tma: bool | None = None,
                           config: triton.Config | None = None,
                           out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Run `_persistent_lora_gemm_kernel`: the arguments of `lora_linear.launch_lora_gemm` for the
    modes in `FAMILIES`. `w` is (n_out, K) K-major, or (K, n_out) with `trans_w` (bf16 only);
    `ut`: U^T (r, n_out) row-major with lora_scale folded in, when the caller made it already (the forward's
    `lora_factors`, with the casts of the factors), else made here from `up`; `tma=None` uses TMA where
    `tma_ok`; `config` runs that config instead of the tuned one (tests). Returns `out (M, n_out)`."""
    M, K = a.shape
    N = n_out
    family = FAMILIES[(a_mode, w_mode)]
    if trans_w and a_mode != A_BF16:
        raise ValueError("the FP8 persistent kernels read the weight K-major (the dgrad's cached transpose)")
    out = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return out
    has_lora = hidden is not None
    r = hidden.shape[1] if has_lora else 0
    # U^T (r, N) row-major, lora_scale folded in: the epilogue's MMA step reads it in [BLOCK_R, BLOCK_N] tiles.
    if has_lora and ut is None:
        ut = lora_up_rows(up, lora_scale)
    tma = tma_ok(a, w, out, hidden, ut) if tma is None else tma
    if tma:
        ensure_tma_allocator()
    dummy = out  # any pointer for arguments a mode ignores
    h = hidden if has_lora else dummy
    ut = ut if has_lora else dummy
    as_ = a_scale if a_scale is not None else dummy
    ws = w_scale if w_scale is not None else dummy
    sms = _sms(a.device)
    if config is None:
        run = tuning.runner(_persistent_lora_gemm_kernel, family, a.device,
                            (a_mode, w_mode, trans_w, has_lora, bias is not None, tma))
    else:
        run = lambda grid, **kw: tuning.launch(_persistent_lora_gemm_kernel, grid, config, kw)  # noqa: E731
    grid = lambda meta: (min(sms, triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])),)  # noqa: E731
    run(grid, a_ptr=a, as_ptr=as_, w_ptr=w, ws_ptr=ws, h_ptr=h, ut_ptr=ut,
        bias_ptr=bias if bias is not None else dummy, out_ptr=out, M=M, N=N, K=K, R=r,
        stride_am=a.stride(0), stride_asm=as_.stride(0) if as_.dim() > 0 else 0,
        stride_ask=as_.stride(1) if as_.dim() > 1 else 0, stride_w0=w.stride(0),
        stride_ws0=ws.stride(0) if ws.dim() > 0 else 0, stride_ws1=ws.stride(1) if ws.dim() > 1 else 0,
        stride_hm=h.stride(0), stride_ut=ut.stride(0), stride_om=out.stride(0),
        A_MODE=a_mode, W_MODE=w_mode, TRANS_W=trans_w, HAS_LORA=has_lora, HAS_BIAS=bias is not None,
        TMA=tma, UPCAST=interpreting(), BLOCK_R=block_r(r), NUM_SMS=sms)
    return out


def _operands(v: Variant, aq, weight) -> tuple:
    """(a, a_scale, w, w_scale) of a variant's call: the activation as its quantizer left it and the
    weight list entries the variant's Triton launcher reads (fp8_row dgrad: the cached K-major
    transpose and its scales; fp8_block dgrad: the K-major copy launch.py made)."""
    a, a_scale = aq[0], (aq[1] if len(aq) > 1 else None)
    if v.gemm is Gemm.GRAD_INPUT and v.w_mode == W_FP8_ROW:
        return a, a_scale, weight[2], weight[3]
    return a, a_scale, weight[0], (weight[1] if len(weight) > 1 else None)


def persistent_output(v: Variant, aq, weight, k, hidden, up, bias, lora_scale, ut=None) -> torch.Tensor:
    """The forward of a `persistent` variant: `lora_linear.<launcher>`'s arguments, and `ut` (U^T, lora_scale
    folded in) where the caller made it with the factors' casts (`launch_persistent_gemm`)."""
    a, a_scale, w, w_scale = _operands(v, aq, weight)
    return launch_persistent_gemm(a, a_scale, v.a_mode, w, w_scale, v.w_mode, v.trans_w, w.shape[0], hidden, up,
                                  bias, lora_scale, ut=ut)


def persistent_grad_input(v: Variant, aq, weight, k, gh, lora_a, lora_scale) -> torch.Tensor:
    """The dgrad of a `persistent` variant: `grad_input.<launcher>`'s arguments; U = lora_a^T (K, r)."""
    a, a_scale, w, w_scale = _operands(v, aq, weight)
    up = None if lora_a is None else lora_a.t()
    return launch_persistent_gemm(a, a_scale, v.a_mode, w, w_scale, v.w_mode, v.trans_w, k, gh, up, None,
                                  lora_scale)
