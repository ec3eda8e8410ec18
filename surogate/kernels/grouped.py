"""Grouped GEMM kernels for the experts of a MoE block: one launch per GEMM over all experts.

`_grouped_lora_gemm_kernel` is `_lora_gemm_kernel` (lora_linear.py) with a tile schedule over
groups: the tokens are sorted by expert, `offsets (E+1,)` bounds the groups, and each program
finds its (expert, M tile) from `offsets` itself (`_group_tile`), so the launcher needs neither
the group sizes on the host (no sync: the grid comes from T and E alone) nor a tile table built by
another launch. The grid is an upper bound, `cdiv(T, BLOCK_M) + E` M tiles (each group adds at
most one partial tile) times the N tiles; programs past the real tile count return at once.
Each tile runs the dense kernel's K step on its expert's weight, `_k_step` (the weight tile by
`_weight_tile`: bf16 as stored; fp8_block, nf4, nvfp4 decoded in registers for a bf16 MMA; or block FP8
as stored for an FP8 MMA whose product `_block_fp8_step` scales by the activation's 1x128 and the
weight's 128x128 block scales), and the dense `_lora_epilogue` (the per-expert LoRA up-projection
accumulated into the GEMM accumulator); `_tile_ids` gives the L2-friendly
program order over the virtual (M tile, N tile) grid.

One call of the grouped LoRA linear is three launches, as the dense op's Triton route:
- forward: `hidden = x @ A_e^T` (this kernel with the bf16 `A (E, r, K)` as the weight, N = r),
  then `out = x @ W_e^T + s * hidden @ B_e^T`;
- dgrad: `gh = g @ B_e` (this kernel over `B^T` as a strided view), then
  `grad_input = g @ W_e + s * gh @ A_e` with W read transposed (`TRANS_W`);
- LoRA gradients: `_grouped_wgrad_kernel`, one program per (expert, tile of the (I, J) output)
  looping over the expert's tokens: `grad_lora_b[e] = s g_e^T hidden_e`, `grad_lora_a[e] = s gh_e^T x_e`.

Gathered input (`rows`, the `GATHER` constexpr): for top-k routing the grouped rows are the tokens
repeated k times in expert order, `x = input[rows]`. Instead of that (S, K) copy (S = T*k rows, the
largest activation of a MoE model, and kept for the backward), the kernels take the tokens `(T, K)`
and the index `rows (S,)`: each A tile loads its BLOCK_M row ids once and reads the token rows
through them (the forward base GEMM and `hidden = x @ A_e^T`; `grad_lora_a`'s x operand). Everything
else is per grouped row as before: `out`, `hidden`, `g`, `grad_input` have S rows; the dgrad's A
operand is the gradient, already per grouped row, so it needs no gather, and summing `grad_input`
back into the tokens is the caller's (one `index_add_`).

Modes, quantizer and config family come from the dense variant table (`grouped_variant`, which is
`variants.variant(gemm, compute, format)` for the pairs the grouped kernel runs): bf16 compute runs the
bf16-compute row of each format (bf16, dequant fp8_block / nf4 / nvfp4); fp8 compute runs the
block-FP8 row of fp8_block weights (A_MODE / W_MODE 2, family `fp8_block`), as the dense op does:
- forward: x quantized to E4M3 per 1x128 block (`quantize_fp8_block`, the dense launcher's
  quantizer) once over the (T, K) tokens; with `rows` the tiles read the FP8 values and their per-row
  scales through the index, which is exactly quantizing the gathered rows. The LoRA `hidden` still
  reads the bf16 x, as the reference does;
- dgrad: the gradient E4M3 per 1x128 along N, against a K-major copy of the stacked weight blocks
  made per call (`transpose_fp8` over the flat (E*N, K) stack, E*N*K bytes transient; the scales a
  transposed view), as the dense dgrad (FP8 MMAs want the reduction contiguous). That copy is 5.6% of
  a Qwen3-30B-A3B qfp8 step (bench/results/profile_30b_a3b.md). `FP8_DGRAD_READS_STORED_STACK = True`
  reads the stored stack instead (`TRANS_W`: Triton transposes each tile through shared memory), the
  same products in the same order (equal bit for bit under the interpreter). On the H200 it is slower:
  a backward of 1.40 ms against the copy's 0.89 at the 30B gate_up shape (bench/results/
  grouped_kernels_h200.md), so the copy is the default; the switch stays for archs whose FP8 MMAs may read
  a transposed operand more cheaply (sm_100, not measured);
so it computes `grouped_lora_linear_ref(..., "fp8")` to FP32 accumulation order. NVFP4 MMAs are not
built. Tested under the Triton interpreter and on the H200 (tests/gpu/test_moe_gpu.py, bench/NOTES.md
run 47); compiled ahead of time for the four archs (kernels/catalog.py, their SASS MMA class checked in
tests/test_aot_sass.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from surogate.kernels import tuning
from surogate.kernels.configs import block_r, interpreting
from surogate.kernels.launch import _quantize
from surogate.kernels.lora_linear import (
    _gemm_metadata,
    _k_step,
    _lora_epilogue,
    _prescale,
    _tile_ids,
)
from surogate.kernels.reference_grouped import grouped_out_features
from surogate.kernels.transpose import transpose_fp8
from surogate.kernels.variants import (  # GROUPED_FP8_FORMATS, grouped_compute: re-exported (__all__)
    A_BF16,
    GROUPED_FP8_FORMATS,
    W_BF16,
    Gemm,
    Quantizer,
    Variant,
    grouped_compute,
    grouped_variant,
)
from surogate.recipes.recipe import Compute, WeightFormat

__all__ = ["GROUPED_FP8_FORMATS", "grouped_compute", "grouped_lora_linear", "grouped_lora_linear_backward",
           "grouped_variant", "launch_grouped_gemm", "launch_grouped_wgrad"]


@triton.jit
def _group_tile(offsets_ptr, E, tile, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """(expert, first row, end row) of virtual M tile `tile`; expert >= E when past the last tile.

    The groups' tile counts are summed in registers (E <= BLOCK_E lanes, one load of offsets); the
    expert is the number of groups whose tiles all lie before `tile`. Empty groups have no tile,
    so they are skipped; O(E) work per program, nothing written to memory.
    """
    e = tl.arange(0, BLOCK_E)
    start = tl.load(offsets_ptr + e, mask=e < E, other=0)
    end = tl.load(offsets_ptr + e + 1, mask=e < E, other=0)
    tiles = tl.cdiv(end - start, BLOCK_M)
    last = tl.cumsum(tiles, 0)  # tiles of groups 0..e
    expert = tl.sum((last <= tile).to(tl.int32), 0)
    here = e == expert
    row0 = tl.sum(tl.where(here, start + (tile - (last - tiles)) * BLOCK_M, 0), 0)
    row_end = tl.sum(tl.where(here, end, 0), 0)
    return expert, row0, row_end


@triton.jit(launch_metadata=_gemm_metadata)
def _grouped_lora_gemm_kernel(
    a_ptr, as_ptr, rows_ptr, offsets_ptr, w_ptr, ws_ptr, aux0_ptr, aux1_ptr, aux2_ptr, h_ptr, u_ptr, out_ptr,
    M, N, K, R, E, Kw,
    stride_am, stride_ak, stride_asm, stride_ask, stride_we, stride_w0, stride_w1, stride_wse, stride_ws0,
    stride_ws1, stride_aux0e, stride_aux1e, stride_aux2e,
    stride_hm, stride_hr, stride_ue, stride_un, stride_ur, stride_om, stride_on,
    A_MODE: tl.constexpr, W_MODE: tl.constexpr, TRANS_W: tl.constexpr, HAS_LORA: tl.constexpr, GATHER: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[t, N] = A[t, :K] W_e'[K, N] + H[t, :r] U_e[N, :r]^T for each row t of group e.

    A is bf16 (A_MODE 0), or E4M3 with one FP32 scale per 1x128 block (A_MODE 2, scales `as (rows,
    ceil(K/128))`; with W_MODE 2, W_e block FP8 with 128x128 scales, both applied to every 128 of K as
    the dense kernel does). M = T rows sorted by expert; with GATHER, A row t (and its scales) is
    `a[rows[t]]` (M = len(rows) grouped rows, `a` the unsorted tokens: per-row scales gather exactly),
    everything else stays indexed by t. W_e is expert e's slice of the stacked weight (its own pointer
    offsets by `stride_*e`), in the dense kernel's coordinates: W_e' = W_e^T (N, K) stored, or W_e
    itself when TRANS_W (dgrad). U_e is pre-scaled by lora_scale.
    """
    tiles_m = tl.cdiv(M, BLOCK_M) + E  # an upper bound: each group adds at most one partial tile
    tile, pid_n = _tile_ids(tiles_m * BLOCK_M, N, BLOCK_M, BLOCK_N, GROUP_M)
    expert, row0, row_end = _group_tile(offsets_ptr, E, tile, BLOCK_M, BLOCK_E)
    if expert >= E:
        return
    e64 = expert.to(tl.int64)
    w_ptr += e64 * stride_we
    ws_ptr += e64 * stride_wse
    aux0_ptr += e64 * stride_aux0e
    aux1_ptr += e64 * stride_aux1e
    aux2_ptr += e64 * stride_aux2e

    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < row_end
    mask_n = offs_n < N
    rows_m = tl.where(mask_m, offs_m, 0).to(tl.int64)
    cols_n = tl.where(mask_n, offs_n, 0)
    if GATHER:  # the tile's token ids, loaded once: A row t is token rows[t]
        a_rows = tl.load(rows_ptr + rows_m, mask=mask_m, other=0).to(tl.int64)
    else:
        a_rows = rows_m

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # the dense kernel's K step, on this expert's weight and the tile's rows
        acc = _k_step(acc, a_ptr, a_rows, mask_m, k0, offs_k, offs_n, mask_n, cols_n, stride_am, stride_ak,
                      w_ptr, ws_ptr, aux0_ptr, aux1_ptr, aux2_ptr, as_ptr, K, N, Kw, pid_n * BLOCK_N, stride_w0,
                      stride_w1, stride_ws0, stride_ws1, stride_asm, stride_ask, BLOCK_K, BLOCK_N, A_MODE, W_MODE,
                      TRANS_W, UPCAST, False)

    if HAS_LORA:
        acc = _lora_epilogue(acc, h_ptr, u_ptr + e64 * stride_ue, rows_m, cols_n, mask_m, mask_n, R,
                             stride_hm, stride_hr, stride_un, stride_ur, BLOCK_R, UPCAST)
    out = out_ptr + rows_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _grouped_wgrad_kernel(p_ptr, q_ptr, rows_ptr, offsets_ptr, out_ptr, I, J, scale,
                          stride_pt, stride_pi, stride_qt, stride_qj, stride_oe, stride_oi, stride_oj,
                          GATHER: tl.constexpr, UPCAST: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr,
                          BLOCK_J: tl.constexpr):
    """out[e] = scale * P[group e]^T @ Q[group e]: (I, J) per expert, FP32, summed over its tokens.

    One program per (expert, I tile, J tile) walks the expert's rows; an empty group stores zeros.
    With GATHER, Q row t is `q[rows[t]]` (the tokens through the gather index; P is per grouped row).
    The LoRA factor gradients are skinny (r = 16 on one side), so this is bound by reading P and Q.
    """
    e = tl.program_id(0)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = tl.program_id(2) * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_i = offs_i < I
    mask_j = offs_j < J
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        mask_t = rows < end
        r64 = tl.where(mask_t, rows, 0).to(tl.int64)
        p = tl.load(p_ptr + r64[:, None] * stride_pt + offs_i[None, :] * stride_pi,
                    mask=mask_t[:, None] & mask_i[None, :], other=0.0)
        if GATHER:
            q_rows = tl.load(rows_ptr + r64, mask=mask_t, other=0).to(tl.int64)
        else:
            q_rows = r64
        q = tl.load(q_ptr + q_rows[:, None] * stride_qt + offs_j[None, :] * stride_qj,
                    mask=mask_t[:, None] & mask_j[None, :], other=0.0)
        if UPCAST:
            p = p.to(tl.float32)
            q = q.to(tl.float32)
        acc = tl.dot(tl.trans(p), q, acc)
    out = out_ptr + e.to(tl.int64) * stride_oe + offs_i[:, None] * stride_oi + offs_j[None, :] * stride_oj
    tl.store(out, acc * scale, mask=mask_i[:, None] & mask_j[None, :])


# ----------------------------------------------------------------------------- launchers


def _strides(t: torch.Tensor | None, dims: int) -> tuple[int, ...]:
    """The first `dims` strides of `t` (0 for a missing tensor or dim): a mode ignores them."""
    if t is None:
        return (0,) * dims
    return tuple(t.stride(i) if i < t.dim() else 0 for i in range(dims))


def launch_grouped_gemm(a: torch.Tensor, offsets: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor | None,
                        w_mode: int, trans_w: bool, n_out: int, hidden: torch.Tensor | None,
                        up: torch.Tensor | None, lora_scale: float, *, aux: Sequence[torch.Tensor | None] = (None,) * 3,
                        kw: int = 0, family: str, rows: torch.Tensor | None = None, a_scale: torch.Tensor | None = None,
                        a_mode: int = A_BF16) -> torch.Tensor:
    """Run `_grouped_lora_gemm_kernel`: `a (T, K)` sorted by expert, `w` stacked `(E, ...)` in the
    dense kernel's per-expert coordinates, `hidden (T, r)`, `up (E, n_out, r)` (any strides).

    `a` is bf16 (`a_mode` A_BF16), or for A_FP8_BLOCK E4M3 with `a_scale (T, ceil(K/128))` FP32 (as
    `quantize_fp8_block` leaves them, any strides; read per row, through `rows` with a gather).

    `w_scale` and the three `aux` tensors are stacked per expert too (dim 0 is E; the nf4 code
    table included). `kw` is K for the flat nf4 layout. Returns `out (T, n_out)` bf16; no host sync.
    With `rows (S,)` (int32, or int64; values trusted) the grouped rows are `a[rows]`, read through
    the index (GATHER): `a` is then the unsorted tokens, and `offsets`, `hidden` and `out` have S rows.
    """
    T, K = a.shape
    E = w.shape[0]
    gather = rows is not None
    M = rows.shape[0] if gather else T
    out = torch.empty((M, n_out), dtype=torch.bfloat16, device=a.device)
    if M == 0 or n_out == 0:
        return out
    has_lora = hidden is not None
    r = hidden.shape[1] if has_lora else 0
    up = _prescale(up, lora_scale) if has_lora else None
    dummy = out  # any pointer for an argument the mode ignores
    as_ = a_scale if a_scale is not None else dummy
    sasm, sask = _strides(a_scale, 2)
    ws = w_scale if w_scale is not None else dummy
    aux0, aux1, aux2 = (t if t is not None else dummy for t in aux)
    h = hidden if has_lora else dummy
    u = up if has_lora else dummy
    swe, sw0, sw1 = (w.stride(0), 0, 0) if w.dim() == 2 else _strides(w, 3)  # nf4: flat bytes per expert
    swse, sws0, sws1 = _strides(w_scale, 3)
    sue, sun, sur = _strides(up, 3)
    run = tuning.runner(_grouped_lora_gemm_kernel, family, a.device, (a_mode, w_mode, trans_w, has_lora, gather))
    run(lambda meta: ((triton.cdiv(M, meta["BLOCK_M"]) + E) * triton.cdiv(n_out, meta["BLOCK_N"]),),
        a_ptr=a, as_ptr=as_, rows_ptr=rows if gather else offsets, offsets_ptr=offsets, w_ptr=w, ws_ptr=ws,
        aux0_ptr=aux0, aux1_ptr=aux1, aux2_ptr=aux2, h_ptr=h, u_ptr=u, out_ptr=out, M=M, N=n_out, K=K, R=r, E=E,
        Kw=kw, stride_am=a.stride(0), stride_ak=a.stride(1), stride_asm=sasm, stride_ask=sask, stride_we=swe,
        stride_w0=sw0, stride_w1=sw1,
        stride_wse=swse, stride_ws0=sws0, stride_ws1=sws1, stride_aux0e=_strides(aux[0], 1)[0],
        stride_aux1e=_strides(aux[1], 1)[0], stride_aux2e=_strides(aux[2], 1)[0],
        stride_hm=h.stride(0), stride_hr=h.stride(1) if has_lora else 0,
        stride_ue=sue, stride_un=sun, stride_ur=sur, stride_om=out.stride(0), stride_on=out.stride(1),
        A_MODE=a_mode, W_MODE=w_mode, TRANS_W=trans_w, HAS_LORA=has_lora, GATHER=gather, UPCAST=interpreting(),
        BLOCK_R=block_r(r),
        BLOCK_E=triton.next_power_of_2(E))
    return out


# Fixed tiles of the LoRA-gradient kernel (not tuned yet): one side is the rank (<= 64 in one tile).
_WGRAD_BLOCKS = {"BLOCK_T": 32, "BLOCK_I": 64, "BLOCK_J": 64}


def launch_grouped_wgrad(p: torch.Tensor, q: torch.Tensor, offsets: torch.Tensor, scale: float,
                         out_dtype: torch.dtype, *, rows: torch.Tensor | None = None) -> torch.Tensor:
    """`out[e] = scale * p[group e]^T @ q[group e]`, `(E, I, J)` in `out_dtype`: p (T, I), q (T, J).

    With `rows (S,)` (values trusted) q's grouped rows are `q[rows]` (q the unsorted tokens, read
    through the index) and p has S rows."""
    I, J, E = p.shape[1], q.shape[1], offsets.shape[0] - 1
    out = torch.empty((E, I, J), dtype=torch.float32, device=p.device)
    if E == 0 or I == 0 or J == 0:
        return out.to(out_dtype)
    b = _WGRAD_BLOCKS
    grid = (E, triton.cdiv(I, b["BLOCK_I"]), triton.cdiv(J, b["BLOCK_J"]))
    gather = rows is not None
    _grouped_wgrad_kernel[grid](p, q, rows if gather else offsets, offsets, out, I, J, float(scale), p.stride(0),
                                p.stride(1), q.stride(0), q.stride(1), out.stride(0), out.stride(1), out.stride(2),
                                GATHER=gather, UPCAST=interpreting(), **b)
    return out.to(out_dtype)


def _weight_operands(weight: Sequence[torch.Tensor], fmt: WeightFormat, k: int) -> dict:
    """The grouped weight list as the kernel's (w, w_scale, aux, kw) arguments, per format."""
    if fmt is WeightFormat.BF16:
        return {"w": weight[0], "w_scale": None}
    if fmt is WeightFormat.FP8_BLOCK:
        return {"w": weight[0], "w_scale": weight[1]}
    if fmt in (WeightFormat.NVFP4, WeightFormat.NVFP4_CACHED):
        packed, block_scale, tensor_scale = weight
        return {"w": packed, "w_scale": block_scale, "aux": (tensor_scale, None, None)}
    packed, absmax_q, absmax_scale, absmax_offset, absmax_code = weight
    return {"w": packed, "w_scale": absmax_code, "aux": (absmax_q, absmax_scale, absmax_offset), "kw": k}


def _checked(input: torch.Tensor, offsets: torch.Tensor, weight: Sequence[torch.Tensor], fmt: WeightFormat,
             compute: str | Compute, gemm: Gemm) -> tuple[Variant, int, int, int]:
    """(variant, E, N, K) after the checks that need no host sync (the offsets' values are trusted)."""
    v = grouped_variant(gemm, compute, fmt)
    if input.dim() != 2:
        raise ValueError(f"want input (T, K): tokens sorted by expert, or the tokens a `rows` index gathers; "
                         f"got {tuple(input.shape)}")
    e, k = weight[0].shape[0], input.shape[1]
    if offsets.dtype != torch.int32 or offsets.shape != (e + 1,):
        raise ValueError(f"want offsets int32 (E+1,) = ({e + 1},); got {offsets.dtype} {tuple(offsets.shape)}")
    if triton.next_power_of_2(e) > 1024:
        raise ValueError(f"{e} experts: the in-kernel tile schedule holds at most 1024 groups")
    return v, e, grouped_out_features(weight, fmt, k), k


def _quantized(t: torch.Tensor, v: Variant) -> dict:
    """The A operand as the variant's quantizer leaves it (the dense launcher's Triton quantizers), as
    launch_grouped_gemm's (a, a_scale, a_mode). Every FP8 scale here is per row (1x128 blocks), so
    quantizing all T tokens once and reading them through `rows` equals quantizing the gathered rows."""
    aq = _quantize(t, v.quantizer)
    return {"a": aq[0], "a_scale": aq[1] if len(aq) > 1 else None, "a_mode": v.a_mode}


# The FP8 dgrad's weight operand: False = a K-major copy per call, True = the stored stack read transposed
# (TRANS_W; 1.4-1.6x slower backward on the H200, bench/NOTES.md run 51). bench/grouped_kernels.py times both.
FP8_DGRAD_READS_STORED_STACK = False


def _fp8_block_dgrad_operands(weight: Sequence[torch.Tensor]) -> dict:
    """The block-FP8 stack as the dgrad kernel reads it, per FP8_DGRAD_READS_STORED_STACK: (w, w_scale,
    trans_w). Stored: W_e (N, K) is the dgrad's (reduction, output) tile layout, so TRANS_W, and the
    (E, N/128, K/128) scales index (reduction block, output block), as `_block_fp8_step` reads them."""
    if FP8_DGRAD_READS_STORED_STACK:
        return {"w": weight[0], "w_scale": weight[1], "trans_w": True}
    return {**_k_major_fp8_block(weight), "trans_w": False}


def _k_major_fp8_block(weight: Sequence[torch.Tensor]) -> dict:
    """The kernel operands of a block-FP8 expert stack read K-major for the FP8 dgrad, as the dense dgrad
    (launch.py: `transpose_fp8` of the data, the scales a transposed view): FP8 MMAs want the reduction
    (here N) contiguous. One `transpose_fp8` over the flat (E*N, K) stack gives (K, E*N), where expert
    e's W_e^T is columns e*N:(e+1)*N: an (E, K, N) view with strides (N, E*N, 1). E*N*K bytes per call."""
    data, scale = weight
    e, n, k = data.shape
    w_t = transpose_fp8(data.reshape(e * n, k)).view(k, e, n).permute(1, 0, 2)
    return {"w": w_t, "w_scale": scale.transpose(1, 2)}  # scales (E, ceil(K/128), ceil(N/128)), a view


def _gather_index(rows: torch.Tensor | None, input: torch.Tensor) -> torch.Tensor | None:
    """`rows` as the kernels are built for it (the AOT catalog): contiguous int32. An int64 index is
    converted here, once per call (S * 4 bytes, no host sync); its values are trusted, not read."""
    if rows is None:
        return None
    if rows.dim() != 1 or rows.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"want rows a 1-D int32 or int64 index (S,) into the input's rows; got {rows.dtype} "
                         f"{tuple(rows.shape)}")
    if input.shape[0] >= 2 ** 31:
        raise ValueError(f"a gathered input has at most 2^31 - 1 rows (int32 row ids); got {input.shape[0]}")
    return rows.to(torch.int32).contiguous()


def grouped_lora_linear(input: torch.Tensor, offsets: torch.Tensor, weight: Sequence[torch.Tensor],
                        weight_format: str | WeightFormat, lora_a: torch.Tensor | None,
                        lora_b: torch.Tensor | None, lora_scale: float, forward: str | Compute = "bf16", *,
                        rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (output (S, N) bf16, lora_hidden (S, r)): `reference_grouped.grouped_lora_linear_ref` on Triton.

    Two launches: the per-expert down-projection `hidden = x @ A_e^T` (the grouped kernel with A as
    a bf16 weight), then the base GEMM with the up-projection `s * hidden @ B_e^T` in its epilogue.
    S = T; with `rows (S,)` both read `x = input[rows]` through the index (no gathered copy).
    `forward`: "bf16" (any format but fp8_row), or "fp8" for fp8_block weights (one more launch first:
    the T tokens quantized to E4M3 per 1x128 block; a block-scaled FP8 MMA). Other pairs: ValueError.
    """
    fmt = WeightFormat(weight_format)
    v, _, n, k = _checked(input, offsets, weight, fmt, forward, Gemm.OUTPUT)
    rows = _gather_index(rows, input)
    x = input.to(torch.bfloat16)
    has_lora = lora_a is not None and lora_b is not None
    hidden = up = None
    if has_lora:
        a16 = lora_a.to(torch.bfloat16)
        hidden = launch_grouped_gemm(x, offsets, a16, None, W_BF16, False, a16.shape[1], None, None, 1.0,
                                     family="bf16", rows=rows)
        up = lora_b.to(torch.bfloat16)
    out = launch_grouped_gemm(offsets=offsets, trans_w=v.trans_w, w_mode=v.w_mode, n_out=n, hidden=hidden, up=up,
                              lora_scale=lora_scale, family=v.family, rows=rows, **_quantized(x, v),
                              **_weight_operands(weight, fmt, k))
    return out, hidden if has_lora else x.new_empty((out.shape[0], 0))


def grouped_lora_linear_backward(grad_output: torch.Tensor, input: torch.Tensor, offsets: torch.Tensor,
                                 weight: Sequence[torch.Tensor], weight_format: str | WeightFormat,
                                 lora_a: torch.Tensor | None, lora_b: torch.Tensor | None,
                                 lora_hidden: torch.Tensor | None, lora_scale: float,
                                 grad_input: str | Compute = "bf16", *, rows: torch.Tensor | None = None
                                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """-> (grad_input (S, K), grad_lora_a (E, r, K), grad_lora_b (E, N, r)); no base-weight gradient.

    Four launches: `gh = g @ B_e` (grouped kernel over B^T, a strided view), the LoRA factor
    gradients (`_grouped_wgrad_kernel` twice), and the dgrad `g @ W_e + s * gh @ A_e` with the
    weight read transposed and `A_e^T` (a view) as the epilogue's U. S = T; with `rows (S,)`,
    `grad_lora_a` (and a recomputed hidden) read `x = input[rows]` through the index, and
    grad_input stays per grouped row, (S, K): the caller sums it into the tokens.
    `grad_input`: "bf16", or "fp8" for fp8_block weights (two more launches: the gradient quantized to
    E4M3 per 1x128 along N, and the K-major copy of the weight stack; a block-scaled FP8 MMA).
    """
    fmt = WeightFormat(weight_format)
    v, *_, k = _checked(input, offsets, weight, fmt, grad_input, Gemm.GRAD_INPUT)
    rows = _gather_index(rows, input)
    s_rows = input.shape[0] if rows is None else rows.shape[0]
    if grad_output.dim() != 2 or grad_output.shape[0] != s_rows:
        raise ValueError(f"want grad_output ({s_rows}, N), one row per grouped row; got {tuple(grad_output.shape)}")
    g = grad_output.to(torch.bfloat16)
    x = input.to(torch.bfloat16)
    has_lora = lora_a is not None and lora_b is not None
    grad_a = grad_b = gh = up = None
    if has_lora:
        b16, a16 = lora_b.to(torch.bfloat16), lora_a.to(torch.bfloat16)
        gh = launch_grouped_gemm(g, offsets, b16.transpose(1, 2), None, W_BF16, False, b16.shape[2], None, None,
                                 1.0, family="bf16")
        if lora_hidden is None:
            lora_hidden = launch_grouped_gemm(x, offsets, a16, None, W_BF16, False, a16.shape[1], None, None, 1.0,
                                              family="bf16", rows=rows)
        grad_b = launch_grouped_wgrad(g, lora_hidden.to(torch.bfloat16), offsets, lora_scale, lora_b.dtype)
        grad_a = launch_grouped_wgrad(gh, x, offsets, lora_scale, lora_a.dtype, rows=rows)
        up = a16.transpose(1, 2)  # U_e = A_e^T (K, r)
    # FP8: the gradient E4M3 per 1x128 along N, against the K-major copy of the weight blocks (the dense dgrad's).
    if v.quantizer is Quantizer.FP8_BLOCK_E4M3:
        w_ops = _fp8_block_dgrad_operands(weight)
    else:
        w_ops = {**_weight_operands(weight, fmt, k), "trans_w": v.trans_w}
    dx = launch_grouped_gemm(offsets=offsets, w_mode=v.w_mode, n_out=k, hidden=gh, up=up,
                             lora_scale=lora_scale, family=v.family, **_quantized(g, v), **w_ops)
    return dx.to(input.dtype), grad_a, grad_b

