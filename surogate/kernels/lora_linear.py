"""Fused quantize-GEMM-LoRA kernels: `out = GEMM(A, W) * scales (+ bias) + s * H @ U^T`.

One Triton kernel, `_lora_gemm_kernel`, serves every forward and dgrad GEMM of a LoRA
linear; constexpr modes pick how the activation operand `A` and the weight operand `W`
are stored. Forward: `A = Q(input)`, `W` the (N, K) weight, `H = lora_hidden`, `U = lora_b`.
Dgrad (`grad_input.py`): `A = Q(grad_output)`, `W` read transposed, `H = grad_lora_hidden`,
`U = lora_a^T`. Keeping one kernel means one place for tiling, scales and the epilogue.

Weight modes that dequantize (nf4, nvfp4, fp8_block) do it in registers inside the K loop,
then run a bf16 MMA: the bf16 weight never exists in memory. The LoRA up-projection is a
second small MMA in the epilogue, on `lora_hidden` computed beforehand (one cuBLAS GEMM
reading the input once; see docs/kernels.md for why not in the main loop).

`lora_linear_nvfp4` (native NVFP4 x NVFP4 through `tl.dot_scaled`) is a separate kernel:
its operands are packed and its scales are per 16 along K.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from surogate.kernels import configs, tuning
from surogate.kernels.bits import e2m1_unpack_rows, nf4_value
from surogate.kernels.configs import block_r, interpreting
from surogate.kernels.variants import A_FP8_ROW, Variant


def _gemm_metadata(grid, kernel, args):
    """Flops and bytes for profilers (STYLE.md 3)."""
    m, n, k = args["M"], args["N"], args["K"]
    return {"name": f"{kernel.name} M={m} N={n} K={k}", "flops": 2.0 * m * n * k}


@triton.jit
def _dequant_tile(w_ptr, ws_ptr, aux0_ptr, aux1_ptr, aux2_ptr, rows, col0, n_rows, n_cols, Kw,
                  stride_w0, stride_ws0, stride_ws1, R: tl.constexpr, C: tl.constexpr, W_MODE: tl.constexpr):
    """fp32 tile W[rows, col0:col0+C] in W's own layout (rows = N, cols = K), dequantized in registers.

    Elements are read contiguously along K and scales once per group (128 / 64 / 16 along K),
    broadcast by a reshape, so the prologue costs a few ALU ops per element, not a gather each.
    fp8_block: E4M3 (N, K) x FP32 scale per 128x128.
    nf4: packed bytes of the flattened (N*K) weight, element 2i in the high nibble; absmax per 64
    = absmax_code[absmax_q] * absmax_scale[b // 256] + absmax_offset[b // 256] (bitsandbytes double quant);
    `ws_ptr` holds absmax_code; the 16 NF4 values are decoded by `nf4_value` (kernels/bits.py).
    nvfp4: packed (N, Kp/2), element 2i in the low nibble, E4M3 scale per 16 along K, FP32 tensor scale.
    """
    rmask = rows < n_rows
    r64 = tl.where(rmask, rows, 0).to(tl.int64)
    if W_MODE == 3:  # W_DEQ_FP8_BLOCK
        G: tl.constexpr = 128 if C >= 128 else C
        cols = col0 + tl.arange(0, C)
        v = tl.load(w_ptr + r64[:, None] * stride_w0 + cols[None, :],
                    mask=rmask[:, None] & (cols < n_cols)[None, :], other=0.0).to(tl.float32)
        grp = (col0 + tl.arange(0, C // G) * G) // 128
        sc = tl.load(ws_ptr + (r64 // 128)[:, None] * stride_ws0 + grp[None, :] * stride_ws1,
                     mask=rmask[:, None] & (grp * 128 < n_cols)[None, :], other=0.0)
    else:
        G: tl.constexpr = 64 if W_MODE == 4 else 16
        bcols = col0 // 2 + tl.arange(0, C // 2)
        bmask = rmask[:, None] & (bcols * 2 < n_cols)[None, :]
        if W_MODE == 4:  # W_DEQ_NF4
            byte = tl.load(w_ptr + r64[:, None] * (Kw // 2) + bcols[None, :], mask=bmask, other=0).to(tl.int32)
            codes = tl.reshape(tl.join(byte >> 4, byte & 15), (R, C))
            v = nf4_value(codes)
            blk = r64[:, None] * (Kw // 64) + (col0 // 64 + tl.arange(0, C // 64))[None, :]
            smask = rmask[:, None] & ((col0 + tl.arange(0, C // 64) * 64) < n_cols)[None, :]
            qabs = tl.load(aux0_ptr + blk, mask=smask, other=0).to(tl.int32)
            sc = (tl.load(ws_ptr + qabs) * tl.load(aux1_ptr + blk // 256, mask=smask, other=0.0)
                  + tl.load(aux2_ptr + blk // 256, mask=smask, other=0.0))
        else:  # W_DEQ_NVFP4
            byte = tl.load(w_ptr + r64[:, None] * stride_w0 + bcols[None, :], mask=bmask, other=0).to(tl.int32)
            codes = tl.reshape(tl.join(byte & 15, byte >> 4), (R, C))
            e = (codes >> 1) & 3
            m = (codes & 1).to(tl.float32)
            mag = tl.where(e == 0, 0.5 * m, (1.0 + 0.5 * m) * (1 << tl.maximum(e - 1, 0)).to(tl.float32))
            v = tl.where((codes & 8) != 0, -mag, mag)
            grp = col0 // 16 + tl.arange(0, C // 16)
            sc = tl.load(ws_ptr + r64[:, None] * stride_ws0 + grp[None, :] * stride_ws1,
                         mask=rmask[:, None] & (grp * 16 < n_cols)[None, :], other=0.0).to(tl.float32)
            sc = sc * tl.load(aux0_ptr)
    v = tl.reshape(v, (R, C // G, G)) * sc[:, :, None]
    return tl.reshape(v, (R, C))


@triton.jit
def _weight_tile(w_ptr, ws_ptr, aux0_ptr, aux1_ptr, aux2_ptr, kk, offs_n, k0, n0, mask_k, mask_n, K, N, Kw,
                 stride_w0, stride_w1, stride_ws0, stride_ws1, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                 W_MODE: tl.constexpr, TRANS_W: tl.constexpr):
    """The weight tile as [BLOCK_K, BLOCK_N] (reduction x output): dequantized in registers (in W's own
    layout) to bf16 for W_MODE >= 3, else loaded as stored. TRANS_W (dgrad): W's rows are the reduction."""
    if W_MODE >= 3:
        if TRANS_W:
            w = _dequant_tile(w_ptr, ws_ptr, aux0_ptr, aux1_ptr, aux2_ptr, kk, n0,
                              K, N, Kw, stride_w0, stride_ws0, stride_ws1, BLOCK_K, BLOCK_N, W_MODE)
        else:
            w = tl.trans(_dequant_tile(w_ptr, ws_ptr, aux0_ptr, aux1_ptr, aux2_ptr, offs_n, k0,
                                       N, K, Kw, stride_w0, stride_ws0, stride_ws1, BLOCK_N, BLOCK_K, W_MODE))
        w = w.to(tl.bfloat16)
    else:
        if TRANS_W:
            w_off = kk[:, None].to(tl.int64) * stride_w0 + offs_n[None, :] * stride_w1
        else:
            w_off = offs_n[None, :].to(tl.int64) * stride_w0 + kk[:, None] * stride_w1
        w = tl.load(w_ptr + w_off, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
    return w


@triton.jit
def _block_fp8_step(acc, a, w, as_ptr, ws_ptr, a_rows, cols_n, k0, n0, stride_asm, stride_ask, stride_ws0,
                    stride_ws1, BLOCK_N: tl.constexpr, TRANS_W: tl.constexpr):
    """acc + (a @ w) * a_scale[row, k0 // 128] * w_scale[n block, k0 // 128]: one K step of the
    block-scaled FP8 GEMM (A_MODE 2), the product promoted into the FP32 accumulator with both block
    scales. BLOCK_K divides 128, so the step lies in one 128-wide K block. `a_rows` are the rows of the
    activation's scales (the A rows the tile loaded: gathered ones for a grouped GATHER); `n0` is the
    tile's first output column. TRANS_W: the scales are indexed (K block, N block), else (N block, K block).
    """
    part = tl.dot(a, w)
    # Activation scales are stored M-contiguous (quantize_fp8_block): one coalesced load.
    a_blk_scale = tl.load(as_ptr + a_rows * stride_asm + (k0 // 128) * stride_ask)
    if BLOCK_N <= 128:  # the tile lies in one 128-wide weight block: one scale, one FMA a value
        n_blk = n0 // 128
        if TRANS_W:
            w_blk_scale = tl.load(ws_ptr + (k0 // 128) * stride_ws0 + n_blk * stride_ws1)
        else:
            w_blk_scale = tl.load(ws_ptr + n_blk * stride_ws0 + (k0 // 128) * stride_ws1)
        acc += part * (a_blk_scale * w_blk_scale)[:, None]
    else:
        if TRANS_W:
            w_blk_scale = tl.load(ws_ptr + (k0 // 128) * stride_ws0 + (cols_n // 128) * stride_ws1)
        else:
            w_blk_scale = tl.load(ws_ptr + (cols_n // 128) * stride_ws0 + (k0 // 128) * stride_ws1)
        acc += part * a_blk_scale[:, None] * w_blk_scale[None, :]
    return acc


@triton.jit
def _k_step(acc, a_ptr, a_rows, mask_m, k0, offs_k, offs_n, mask_n, cols_n, stride_am, stride_ak,
            w_ptr, ws_ptr, aux0_ptr, aux1_ptr, aux2_ptr, as_ptr, K, N, Kw, n0, stride_w0, stride_w1,
            stride_ws0, stride_ws1, stride_asm, stride_ask, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
            A_MODE: tl.constexpr, W_MODE: tl.constexpr, TRANS_W: tl.constexpr, UPCAST: tl.constexpr,
            FP8_PROMOTE: tl.constexpr):
    """One K step of the LoRA GEMM's base product, shared by the dense and the grouped kernel: the A tile
    of rows `a_rows` (gathered ones for a grouped GATHER), the weight tile (`_weight_tile`), then the MMA
    the modes say (block-scaled FP8 with both scales, fp8 promoted per tile on sm_90, or plain)."""
    kk = k0 + offs_k
    mask_k = kk < K
    a = tl.load(a_ptr + a_rows[:, None] * stride_am + kk[None, :] * stride_ak,
                mask=mask_m[:, None] & mask_k[None, :], other=0.0)
    w = _weight_tile(w_ptr, ws_ptr, aux0_ptr, aux1_ptr, aux2_ptr, kk, offs_n, k0, n0, mask_k, mask_n, K, N, Kw,
                     stride_w0, stride_w1, stride_ws0, stride_ws1, BLOCK_K, BLOCK_N, W_MODE, TRANS_W)
    if UPCAST:  # the interpreter's bf16 tl.dot is wrong; fp32 is exact enough for tests
        a = a.to(tl.float32)
        w = w.to(tl.float32)
    if A_MODE == 2:  # block-scaled FP8: promote every 128 of K with both block scales
        acc = _block_fp8_step(acc, a, w, as_ptr, ws_ptr, a_rows, cols_n, k0, n0, stride_asm, stride_ask,
                              stride_ws0, stride_ws1, BLOCK_N, TRANS_W)
    elif FP8_PROMOTE:  # fp8 on sm_90: add each tile's product in fp32 (max_num_imprecise_acc)
        acc += tl.dot(a, w)
    else:
        acc = tl.dot(a, w, acc)
    return acc


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program, grouped GROUP_M tiles along M so that programs running
    together share weight tiles in L2 (the Triton matmul tutorial's ordering)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    return first_m + (pid % group) % size_m, (pid % group) // size_m


@triton.jit
def _lora_epilogue(acc, h_ptr, u_ptr, rows_m, cols_n, mask_m, mask_n, R, stride_hm, stride_hr, stride_un,
                   stride_ur, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr):
    """acc + H[rows, :r] @ U[cols, :r]^T: the LoRA up-projection accumulated into the GEMM's own
    accumulator (U arrives pre-scaled by lora_scale: a second accumulator spilled registers)."""
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    h = tl.load(h_ptr + rows_m[:, None] * stride_hm + offs_r[None, :] * stride_hr,
                mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    u = tl.load(u_ptr + cols_n[None, :].to(tl.int64) * stride_un + offs_r[:, None] * stride_ur,
                mask=mask_r[:, None] & mask_n[None, :], other=0.0)
    if UPCAST:  # the interpreter's bf16 dot is wrong: compute in fp32 there
        h = h.to(tl.float32)
        u = u.to(tl.float32)
    return tl.dot(h, u, acc)


@triton.jit(launch_metadata=_gemm_metadata)
def _lora_gemm_kernel(
    a_ptr, as_ptr, w_ptr, ws_ptr, aux0_ptr, aux1_ptr, aux2_ptr,
    h_ptr, u_ptr, bias_ptr, out_ptr,
    M, N, K, R, Kw,
    stride_am, stride_ak, stride_asm, stride_ask,
    stride_w0, stride_w1, stride_ws0, stride_ws1,
    stride_hm, stride_hr, stride_un, stride_ur, stride_om, stride_on,
    lora_scale,
    A_MODE: tl.constexpr, W_MODE: tl.constexpr, TRANS_W: tl.constexpr,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, FP8_PROMOTE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out[M, N] = sum_k A[m, k] W'[k, n] (scaled) (+ bias[n]) + lora_scale * H[m, :] U[n, :]^T.

    W' is W^T when TRANS_W is False (W stored (N, K), the forward layout) and W itself when
    TRANS_W is True (W stored (K, N) in the kernel's terms: dgrad through the forward weight).
    """
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows_m = tl.where(mask_m, offs_m, 0).to(tl.int64)
    cols_n = tl.where(mask_n, offs_n, 0)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    for k0 in range(0, K, BLOCK_K):
        acc = _k_step(acc, a_ptr, rows_m, mask_m, k0, offs_k, offs_n, mask_n, cols_n, stride_am, stride_ak,
                      w_ptr, ws_ptr, aux0_ptr, aux1_ptr, aux2_ptr, as_ptr, K, N, Kw, pid_n * BLOCK_N, stride_w0,
                      stride_w1, stride_ws0, stride_ws1, stride_asm, stride_ask, BLOCK_K, BLOCK_N, A_MODE, W_MODE,
                      TRANS_W, UPCAST, FP8_PROMOTE)

    # Row / channel scales are loaded after the loop: held across it they spilled registers.
    if A_MODE == 1:  # per-row activation scale
        acc = acc * tl.load(as_ptr + rows_m * stride_asm)[:, None]
    if W_MODE == 1:  # per-output-channel weight scale
        acc = acc * tl.load(ws_ptr + cols_n * stride_ws0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols_n).to(tl.float32)[None, :]
    if HAS_LORA:
        acc = _lora_epilogue(acc, h_ptr, u_ptr, rows_m, cols_n, mask_m, mask_n, R, stride_hm, stride_hr,
                             stride_un, stride_ur, BLOCK_R, UPCAST)

    out = out_ptr + rows_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(launch_metadata=_gemm_metadata)
def _lora_gemm_nvfp4_kernel(
    a_ptr, as_ptr, a_ts_ptr, w_ptr, ws_ptr, w_ts_ptr, h_ptr, u_ptr, bias_ptr, out_ptr,
    M, N, K, R,
    stride_am, stride_asm, stride_wn, stride_wsn, stride_hm, stride_hr, stride_un, stride_ur,
    stride_om, stride_on, lora_scale,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """NVFP4 x NVFP4 block-scaled MMA (tl.dot_scaled, E4M3 scales per 16), both operands K-major.

    A: packed (M, K/2) uint8 + (M, K/16) E4M3; W: packed (N, K/2) + (N, K/16); K is the padded
    K (a multiple of 16). The two FP32 tensor scales are applied in the epilogue.
    """
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows_m = tl.where(mask_m, offs_m, 0).to(tl.int64)
    cols_n = tl.where(mask_n, offs_n, 0).to(tl.int64)
    offs_kb = tl.arange(0, BLOCK_K // 2)
    offs_ks = tl.arange(0, BLOCK_K // 16)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kb = k0 // 2 + offs_kb
        ks = k0 // 16 + offs_ks
        mkb = kb < K // 2
        mks = ks < K // 16
        a = tl.load(a_ptr + rows_m[:, None] * stride_am + kb[None, :], mask=mkb[None, :], other=0)
        a_s = tl.load(as_ptr + rows_m[:, None] * stride_asm + ks[None, :], mask=mks[None, :], other=0.0)
        w = tl.load(w_ptr + cols_n[None, :] * stride_wn + kb[:, None], mask=mkb[:, None], other=0)
        w_s = tl.load(ws_ptr + cols_n[:, None] * stride_wsn + ks[None, :], mask=mks[None, :], other=0.0)
        if UPCAST:  # the interpreter reads dot_scaled scales as E8M0: emulate with the E4M3 scales
            av = e2m1_unpack_rows(a, a_s, BLOCK_M, BLOCK_K)
            wv = e2m1_unpack_rows(tl.trans(w), w_s, BLOCK_N, BLOCK_K)
            acc += tl.dot(av, tl.trans(wv))
        else:
            acc = tl.dot_scaled(a, a_s, "e2m1", w, w_s, "e2m1", acc)
    acc = acc * (tl.load(a_ts_ptr) * tl.load(w_ts_ptr))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols_n).to(tl.float32)[None, :]
    if HAS_LORA:
        acc = _lora_epilogue(acc, h_ptr, u_ptr, rows_m, cols_n, mask_m, mask_n, R, stride_hm, stride_hr,
                             stride_un, stride_ur, BLOCK_R, UPCAST)
    out = out_ptr + rows_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------- launchers


def _runner(kernel, family: str, device: torch.device, modes: tuple):
    """`run(grid, **kw)`: the kernel with the config tuned for its shape bucket (`tuning.py`), one
    small config when interpreting. `modes` (the constexpr modes) keep each variant's tuning apart."""
    return tuning.runner(kernel, family, device, modes)


def _prescale(up: torch.Tensor, lora_scale: float) -> torch.Tensor:
    """lora_scale folded into the (small) up-projection, so the epilogue MMA accumulates straight
    into the GEMM accumulator: a second 128x256 fp32 accumulator spilled registers on sm_90.

    One elementwise kernel: ATen multiplies a bf16/fp16 tensor by a Python scalar in fp32 (the scalar
    read as fp32) and rounds once, the bits of `(up.float() * lora_scale).to(up.dtype)`, which took
    three kernels (two casts and the multiply) on every GEMM call (tests/test_launch_copies.py)."""
    if lora_scale == 1.0:
        return up
    return up * lora_scale


def lora_up_rows(up: torch.Tensor, lora_scale: float) -> torch.Tensor:
    """`_prescale(up, lora_scale).t().contiguous()`: U^T (r, N) row-major with lora_scale folded in, as the
    persistent kernel's TMA reads it, written by the multiply itself (one kernel, not the multiply and then
    a transposing copy). `up` is (N, r), any strides: the dgrad passes lora_a^T, whose U^T needs no copy at
    scale 1."""
    ut = up.t()
    if lora_scale == 1.0:
        return ut.contiguous()
    return torch.mul(ut, lora_scale, out=torch.empty(ut.shape, dtype=up.dtype, device=up.device))


def _grid(M: int, N: int):
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)


def launch_lora_gemm(a: torch.Tensor, a_scale: torch.Tensor | None, a_mode: int,
                     w: torch.Tensor, w_scale: torch.Tensor | None, w_mode: int, trans_w: bool, n_out: int,
                     hidden: torch.Tensor | None, up: torch.Tensor | None, bias: torch.Tensor | None,
                     lora_scale: float, *, aux: tuple = (None, None, None), kw: int = 0,
                     family: str, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Run `_lora_gemm_kernel` on 2-D operands: `a (M, K)`, `hidden (M, r)`, `up (n_out, r)`.

    `w` is read in its own coordinates (see `_dequant_tile`); `kw` is W's row length for the
    flattened nf4 layout; `family` is the variant's tile-config family. Returns `out (M, n_out)`.
    """
    M, K = a.shape
    N = n_out
    out = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return out
    dummy = out  # any pointer for arguments a mode ignores
    has_lora = hidden is not None
    r = hidden.shape[1] if has_lora else 0
    up = _prescale(up, lora_scale) if has_lora else None
    as_ = a_scale if a_scale is not None else dummy
    ws = w_scale if w_scale is not None else dummy
    aux0, aux1, aux2 = (t if t is not None else dummy for t in aux)
    h = hidden if has_lora else dummy
    u = up if has_lora else dummy
    if w.dim() == 1:  # nf4 packed bytes: strides unused
        sw0, sw1 = 0, 0
    else:
        sw0, sw1 = w.stride(0), w.stride(1)
    sws0, sws1 = (ws.stride(0), ws.stride(1) if ws.dim() > 1 else 0) if ws.dim() > 0 else (0, 0)
    promote = a_mode == A_FP8_ROW and not interpreting() and configs.FP8_PROMOTE
    run = _runner(_lora_gemm_kernel, family, a.device, (a_mode, w_mode, trans_w, has_lora, bias is not None))
    run(_grid(M, N),
        a_ptr=a, as_ptr=as_, w_ptr=w, ws_ptr=ws, aux0_ptr=aux0, aux1_ptr=aux1, aux2_ptr=aux2,
        h_ptr=h, u_ptr=u, bias_ptr=bias if bias is not None else dummy, out_ptr=out,
        M=M, N=N, K=K, R=r, Kw=kw,
        stride_am=a.stride(0), stride_ak=a.stride(1),
        stride_asm=as_.stride(0) if as_.dim() > 0 else 0, stride_ask=as_.stride(1) if as_.dim() > 1 else 0,
        stride_w0=sw0, stride_w1=sw1, stride_ws0=sws0, stride_ws1=sws1,
        stride_hm=h.stride(0), stride_hr=h.stride(1) if h.dim() > 1 else 0,
        stride_un=u.stride(0), stride_ur=u.stride(1) if u.dim() > 1 else 0,
        stride_om=out.stride(0), stride_on=out.stride(1), lora_scale=float(lora_scale),
        A_MODE=a_mode, W_MODE=w_mode, TRANS_W=trans_w, HAS_LORA=has_lora, HAS_BIAS=bias is not None,
        UPCAST=interpreting(), FP8_PROMOTE=promote, BLOCK_R=block_r(r))
    return out


def launch_nvfp4_gemm(a_packed, a_block_scale, a_tensor_scale, w_packed, w_block_scale, w_tensor_scale,
                      hidden, up, bias, lora_scale) -> torch.Tensor:
    """NVFP4 x NVFP4 through tl.dot_scaled; both operands packed (rows, Kp/2) with (rows, Kp/16) scales."""
    M, N, Kp = a_packed.shape[0], w_packed.shape[0], a_packed.shape[1] * 2
    out = torch.empty((M, N), dtype=torch.bfloat16, device=a_packed.device)
    has_lora = hidden is not None
    r = hidden.shape[1] if has_lora else 0
    h = hidden if has_lora else out
    u = _prescale(up, lora_scale) if has_lora else out
    run = _runner(_lora_gemm_nvfp4_kernel, "nvfp4", a_packed.device, (has_lora, bias is not None))
    run(_grid(M, N), a_ptr=a_packed, as_ptr=a_block_scale, a_ts_ptr=a_tensor_scale, w_ptr=w_packed,
        ws_ptr=w_block_scale, w_ts_ptr=w_tensor_scale, h_ptr=h, u_ptr=u,
        bias_ptr=bias if bias is not None else out, out_ptr=out, M=M, N=N, K=Kp, R=r,
        stride_am=a_packed.stride(0), stride_asm=a_block_scale.stride(0), stride_wn=w_packed.stride(0),
        stride_wsn=w_block_scale.stride(0), stride_hm=h.stride(0), stride_hr=h.stride(1),
        stride_un=u.stride(0), stride_ur=u.stride(1), stride_om=out.stride(0), stride_on=out.stride(1),
        lora_scale=float(lora_scale), HAS_LORA=has_lora, HAS_BIAS=bias is not None, UPCAST=interpreting(),
        BLOCK_R=block_r(r))
    return out


# Forward launchers, one per kernel variant (kernels/variants.py names them): `aq` is the activation
# as the variant's quantizer left it, `weight` the format's list, `k` the input's true K.


def variant_gemm(v: Variant, a, a_scale, w, w_scale, n_out, hidden, up, bias, lora_scale, **kw) -> torch.Tensor:
    return launch_lora_gemm(a, a_scale, v.a_mode, w, w_scale, v.w_mode, v.trans_w, n_out, hidden, up, bias,
                            lora_scale, family=v.family, **kw)


def lora_linear_bf16(v: Variant, aq, weight, k, hidden, lora_b, bias, lora_scale):
    """bf16 x bf16: x (M, K), w (N, K), hidden (M, r), lora_b (N, r)."""
    return variant_gemm(v, aq[0], None, weight[0], None, weight[0].shape[0], hidden, lora_b, bias, lora_scale)


def lora_linear_fp8(v: Variant, aq, weight, k, hidden, lora_b, bias, lora_scale):
    """E4M3 x E4M3: row scales x (M, 1) and per-channel w (N,), both applied in the epilogue."""
    return variant_gemm(v, aq[0], aq[1], weight[0], weight[1], weight[0].shape[0], hidden, lora_b, bias, lora_scale)


def lora_linear_fp8_block(v: Variant, aq, weight, k, hidden, lora_b, bias, lora_scale):
    """E4M3 1x128 activation blocks (M, ceil(K/128)) x 128x128 weight blocks, scaled per K step."""
    return variant_gemm(v, aq[0], aq[1], weight[0], weight[1], weight[0].shape[0], hidden, lora_b, bias, lora_scale)


def lora_linear_dequant_fp8_block(v: Variant, aq, weight, k, hidden, lora_b, bias, lora_scale):
    """bf16 x (block FP8 weight dequantized in registers)."""
    return variant_gemm(v, aq[0], None, weight[0], weight[1], weight[0].shape[0], hidden, lora_b, bias, lora_scale)


def lora_linear_dequant_nvfp4(v: Variant, aq, weight, k, hidden, lora_b, bias, lora_scale):
    """bf16 x (NVFP4 weight (N, K/2) dequantized in registers)."""
    packed, block_scale, tensor_scale = weight
    return variant_gemm(v, aq[0], None, packed, block_scale, packed.shape[0], hidden, lora_b, bias, lora_scale,
                 aux=(tensor_scale, None, None))


def lora_linear_dequant_nf4(v: Variant, aq, weight, k, hidden, lora_b, bias, lora_scale):
    """bf16 x (NF4 weight, double-quantized, dequantized in registers)."""
    packed, absmax_q, absmax_scale, absmax_offset, absmax_code = weight
    return variant_gemm(v, aq[0], None, packed, absmax_code, packed.numel() * 2 // k, hidden, lora_b, bias, lora_scale,
                 aux=(absmax_q, absmax_scale, absmax_offset), kw=k)


def lora_linear_nvfp4(v: Variant, aq, weight, k, hidden, lora_b, bias, lora_scale):
    """NVFP4 x NVFP4: the input packed (M, Kp/2) + scales, the weight's list (N, Kp/2) + scales."""
    return launch_nvfp4_gemm(*aq, *weight, hidden, lora_b, bias, lora_scale)
