"""The persistent TMA kernel (surogate/kernels/persistent.py): numbers, routing switch, SASS.

On CPU the kernel runs under TRITON_INTERPRET=1 with both its TMA path (device-side tensor
descriptors: Triton 3.9's interpreter runs them) and its pointer path. With the interpreter's single
config both accumulate the same K steps in the same order as `_lora_gemm_kernel`, so the outputs are
equal bit for bit, and both sit above the GEMM SQNR floor against the plain-torch reference. What the
interpreter cannot show (warp specialization, wgmma, the real TMA engine) is checked in the sm_90
SASS of ahead-of-time builds: HGMMA / QGMMA, UTMALDG / UTMASTG, setmaxnreg, no spills, shared memory
within the SM's 227 KB, for every config the tuner may pick; and in their TTGIR, that the two consumer
warpgroups of a warp-specialized build index their pointer-loaded rows once (bench/NOTES.md, run 54).
Reads past the scale tensors (none: indices are clamped as in `_lora_gemm_kernel`) are checked with
NaN-poisoned neighbours under the interpreter.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from numerics import lora_gemm_case, sqnr
from surogate.kernels import catalog, configs, launch, lora_linear, persistent, variants
from surogate.kernels import reference as ref
from surogate.kernels.aot import build_many
from surogate.kernels.plan import plan
from surogate.kernels.quantize import quantize_fp8_block, quantize_fp8_rowwise
from surogate.kernels.variants import A_BF16, A_FP8_BLOCK, A_FP8_ROW, W_BF16, W_FP8_BLOCK, W_FP8_ROW

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOOR = 40.0  # dB, as tests/test_kernels_gemm.py: FP32 summation order + the final bf16 rounding
SMEM_SM90 = 232448  # bytes of shared memory one block may have on an H100 / H200
RECIPES = {"bf16": ("bf16", "bf16"), "fp8": ("fp8", "fp8_row"), "qfp8": ("fp8", "fp8_block")}


def _case(m: int, n: int, k: int, r: int, fmt: str, seed: int):
    return lora_gemm_case(m, n, k, r, fmt, seed, DEVICE)


def _operands(mode: str, x, go, wl):
    """(forward args, dgrad args) of launch_lora_gemm for one operand family: a, a_scale, a_mode, w,
    w_scale, w_mode, trans_w. The dgrad reads the K-major weight copies the FP8 recipes use."""
    if mode == "bf16":
        return (x, None, A_BF16, wl[0], None, W_BF16, False), (go, None, A_BF16, wl[0], None, W_BF16, True)
    if mode == "fp8":
        xq, xs, _ = quantize_fp8_rowwise(x, "e4m3")
        gq, gs, _ = quantize_fp8_rowwise(go, "e5m2")
        return ((xq, xs, A_FP8_ROW, wl[0], wl[1], W_FP8_ROW, False),
                (gq, gs, A_FP8_ROW, wl[2], wl[3], W_FP8_ROW, False))
    xq, xs = quantize_fp8_block(x, (1, 128), "e4m3")
    gq, gs = quantize_fp8_block(go, (1, 128), "e4m3")
    w_t = wl[0].t().contiguous()  # what launch.py's transpose_fp8 makes for the dgrad
    return ((xq, xs, A_FP8_BLOCK, wl[0], wl[1], W_FP8_BLOCK, False),
            (gq, gs, A_FP8_BLOCK, w_t, wl[1].t(), W_FP8_BLOCK, False))


# ------------------------------------------------------------------ numbers (interpreter or GPU)

@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointers"])
@pytest.mark.parametrize("mode", ["bf16", "fp8", "qfp8"])
@pytest.mark.parametrize("m", [1, 37])
def test_persistent_equals_the_fused_kernel_bit_for_bit(mode, m, tma) -> None:
    """Forward and dgrad, M not a multiple of the tile, N and K not multiples of BLOCK_N / BLOCK_K:
    equal to `_lora_gemm_kernel` (interpreter: the same K steps in the same order) and above the floor
    against the reference GEMM of the dequantized operands."""
    n, k, r = 80, 144, 16
    x, w, a, b, bias, go, wl = _case(m, n, k, r, RECIPES[mode][1], seed=m)
    fwd, dgrad = _operands(mode, x, go, wl)
    hidden = (x @ a.bfloat16().t())
    gh = (go @ b.bfloat16())
    for (aa, a_s, a_mode, ww, w_s, w_mode, trans), n_out, h, up, bb in (
            (fwd, n, hidden, b.bfloat16(), bias), (dgrad, k, gh, a.bfloat16().t(), None)):
        family = {"bf16": "bf16", "fp8": "fp8", "qfp8": "fp8_block"}[mode]
        got = persistent.launch_persistent_gemm(aa, a_s, a_mode, ww, w_s, w_mode, trans, n_out, h, up, bb, 2.0, tma=tma)
        want = lora_linear.launch_lora_gemm(aa, a_s, a_mode, ww, w_s, w_mode, trans, n_out, h, up, bb, 2.0,
                                            family=family)
        assert got.shape == want.shape == (m, n_out) and got.dtype == torch.bfloat16
        if DEVICE == "cpu":
            assert torch.equal(got, want)
        assert sqnr(got, want) > FLOOR


def _poisoned(t: torch.Tensor | None) -> torch.Tensor | None:
    """`t`'s values in a view of a larger buffer whose other elements are NaN (0x7F, an E4M3 NaN, for FP8),
    with `t`'s layout (row-major, or the M-contiguous transpose of 1x128 scales) and 16-byte aligned base
    and row stride (what TMA needs): any read past `t`'s extent returns NaN. (The interpreter converts
    E4M3 0x7F to 480, not NaN: under it only the scales', bias' and bf16 operands' poison shows.)"""
    if t is None:
        return None
    fp8 = t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    if t.dim() == 2 and t.stride(0) == 1 and t.stride(1) != 1:  # M-contiguous block scales
        return _poisoned(t.t().contiguous()).t()
    rows, cols = (1, t.shape[0]) if t.dim() == 1 else t.shape
    buf = torch.empty((rows + 6, (cols + 32 + 15) // 16 * 16), dtype=t.dtype, device=t.device)
    if fp8:
        buf.view(torch.uint8).fill_(0x7F)
    else:
        buf.fill_(float("nan"))
    view = buf[3:3 + rows, 16:16 + cols]
    view.copy_(t.reshape(rows, cols))
    return view[0] if t.dim() == 1 else view


@pytest.mark.parametrize("mode", ["bf16", "fp8", "qfp8"])
def test_reads_nothing_past_its_operands_and_scales(mode) -> None:
    """Every operand, scale and bias in a NaN-filled neighbourhood, shapes with M, N and K tails (K % 128
    = 16 with BLOCK_K 128), the family's first sm_90 tile (the GPU's BLOCK sizes): a read past a tensor
    (an unmasked scale load, a TMA box beyond its descriptor) would make the output non-finite, which the
    interpreter's own allocations could otherwise hide."""
    m, n, k, r = 70, 272, 400, 16
    x, w, a, b, bias, go, wl = _case(m, n, k, r, RECIPES[mode][1], seed=5)
    fwd, dgrad = _operands(mode, x, go, wl)
    hidden = x @ a.bfloat16().t()
    gh = go @ b.bfloat16()
    family = {"bf16": "bf16", "fp8": "fp8", "qfp8": "fp8_block"}[mode]
    config = configs.get_configs(persistent.FAMILIES[(fwd[2], fwd[5])], "sm_90")[0]
    for (aa, a_s, a_mode, ww, w_s, w_mode, trans), n_out, h, up, bb in (
            (fwd, n, hidden, b.bfloat16(), bias), (dgrad, k, gh, a.bfloat16().t(), None)):
        want = lora_linear.launch_lora_gemm(aa, a_s, a_mode, ww, w_s, w_mode, trans, n_out, h, up, bb, 2.0,
                                            family=family)
        for tma in (True, False):
            got = persistent.launch_persistent_gemm(
                _poisoned(aa), _poisoned(a_s), a_mode, _poisoned(ww), _poisoned(w_s), w_mode, trans, n_out,
                _poisoned(h), up, _poisoned(bb), 2.0, tma=tma, config=config)
            assert torch.isfinite(got).all(), f"{mode} n_out={n_out} tma={tma}: a read past an operand"
            # Interpreter: the same sums up to FP32 order (BLOCK_K 128 here, 64 there); GPU: the GEMM floor.
            assert sqnr(got, want) > (90 if DEVICE == "cpu" else FLOOR)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_the_switch_routes_the_op_to_the_persistent_kernel(recipe, monkeypatch) -> None:
    """With `variants.PERSISTENT_SM90` True, the op's forward and dgrad run the persistent kernel (the
    launcher's trace says so) and match the reference; by default, at these few rows, nothing routes to it."""
    compute, fmt = RECIPES[recipe]
    x, w, a, b, bias, go, wl = _case(37, 96, 256, 16, fmt, seed=7)
    with variants.trace() as off:
        y_off, h = launch.lora_linear_cuda(x, wl, fmt, a, b, None, bias, 2.0, compute, compute)
        gi_off = launch.lora_linear_backward_cuda(go, x, wl, fmt, a, b, None, h, 2.0, compute)[0]
    assert variants.Engine.PERSISTENT not in {r.engine for r in off}
    monkeypatch.setattr(variants, "PERSISTENT_SM90", True)
    monkeypatch.setattr(variants, "PERSISTENT_BIAS", True)  # the kernel's bias epilogue, under the interpreter
    with variants.trace() as on:
        y, h = launch.lora_linear_cuda(x, wl, fmt, a, b, None, bias, 2.0, compute, compute)
        gi = launch.lora_linear_backward_cuda(go, x, wl, fmt, a, b, None, h, 2.0, compute)[0]
    if DEVICE == "cpu" or torch.cuda.get_device_capability() == (9, 0):
        assert [r.engine for r in on] == [variants.Engine.PERSISTENT] * 2
        assert str(on[0]) == f"persistent_{on[0].variant.kernel}"
    y_r, h_r = ref.lora_linear_ref(x, wl, fmt, a, b, None, bias, 2.0, compute, compute)
    gi_r = ref.lora_linear_backward_ref(go, x, wl, fmt, a, b, None, h_r, 2.0, compute)[0]
    assert sqnr(y, y_r) > FLOOR and sqnr(gi, gi_r) > FLOOR
    if DEVICE == "cpu":  # the interpreter runs one config: the same sums as the Triton route
        assert torch.equal(y, y_off) and torch.equal(gi, gi_off)


def test_the_launcher_keeps_large_ranks_and_biases_off_the_persistent_kernel(monkeypatch) -> None:
    """The op passes its LoRA rank and whether it adds a bias to the route: at rank 136 (BLOCK_R 256) forward and
    dgrad take the Triton kernel even with every persistent variant switched on; so does a forward with a bias
    while PERSISTENT_BIAS is off."""
    monkeypatch.setattr(variants, "PERSISTENT_SM90", True)
    x, w, a, b, bias, go, wl = _case(37, 96, 256, 136, "fp8_row", seed=3)
    with variants.trace() as ran:
        y, h = launch.lora_linear_cuda(x, wl, "fp8_row", a, b, None, None, 2.0, "fp8", "fp8")
        launch.lora_linear_backward_cuda(go, x, wl, "fp8_row", a, b, None, h, 2.0, "fp8")
    assert h.shape[-1] == 136 > variants.PERSISTENT_MAX_RANK
    assert [r.engine for r in ran] == [variants.Engine.TRITON] * 2
    # ... and a forward with a bias at rank 16 with variants.PERSISTENT_BIAS off; its dgrad has none.
    x, w, a, b, bias, go, wl = _case(37, 96, 256, 16, "fp8_row", seed=3)
    monkeypatch.setattr(variants, "PERSISTENT_BIAS", False)
    with variants.trace() as ran:
        y, h = launch.lora_linear_cuda(x, wl, "fp8_row", a, b, None, bias, 2.0, "fp8", "fp8")
        launch.lora_linear_backward_cuda(go, x, wl, "fp8_row", a, b, None, h, 2.0, "fp8")
    assert bias is not None and [r.engine for r in ran] == [variants.Engine.TRITON, variants.Engine.PERSISTENT]


def test_route_sends_bf16_and_fp8_to_the_persistent_kernel_on_sm90_from_the_measured_rows(monkeypatch) -> None:
    """The default (PERSISTENT_SM90 a mapping): row-scaled fp8 from 1024 rows and bf16 from 4096, forward and
    dgrad, where TMA can read the operands (fp8 was off it in runs 63-70 for NaN losses that came from the
    warp-specialized configs, no longer offered); block-scaled FP8 keeps cuBLASLt (it lost there on the H200).
    True sends every persistent variant at any row count (the rank, bias and TMA limits still apply), False none."""
    fp8 = variants.variant("output", "fp8", "fp8_row")
    fp8_dgrad = variants.variant("grad_input", "fp8", "fp8_row")
    bf16_dgrad = variants.variant("grad_input", "bf16", "bf16")
    qfp8 = variants.variant("grad_input", "fp8", "fp8_block")
    nf4 = variants.variant("output", "bf16", "nf4")
    assert [variants.persistent_min_rows(v) for v in (fp8, fp8_dgrad, bf16_dgrad)] == [1024, 1024, 4096]
    assert variants.persistent_min_rows(qfp8) is None and variants.persistent_min_rows(nf4) is None
    persistent_engine, triton_engine = variants.Engine.PERSISTENT, variants.Engine.TRITON
    assert variants.route(fp8, "sm_90", 1024, 4096, 4096).engine is persistent_engine
    assert variants.route(fp8_dgrad, "sm_90", 1024, 4096, 4096).engine is persistent_engine
    assert variants.route(fp8, "sm_90", 1023, 4096, 4096).engine is triton_engine
    assert variants.route(fp8, "sm_89", 16384, 4096, 4096).engine is triton_engine
    assert variants.route(bf16_dgrad, "sm_90", 4096, 4096, 4096).engine is persistent_engine  # ahead of cuBLAS
    assert variants.route(bf16_dgrad, "sm_90", 4095, 4096, 4096).engine is variants.Engine.CUBLAS
    assert variants.route(qfp8, "sm_90", 4096, 4096, 4096).engine is variants.Engine.CUBLAS
    # qnf4 dequantizes into a bf16 scratch from 128 rows and runs the bf16 route: from 4096 rows the persistent kernel.
    scratch = variants.route(nf4, "sm_90", 4096, 4096, 4096)
    assert scratch.scratch and scratch.engine is persistent_engine
    # LoRA ranks up to 128 (BLOCK_R <= 128, ranks 8-128 ran on the H200); larger ones keep the other routes.
    assert variants.route(bf16_dgrad, "sm_90", 4096, 4096, 4096, rank=128).engine is persistent_engine
    assert variants.route(bf16_dgrad, "sm_90", 4096, 4096, 4096, rank=256).engine is variants.Engine.CUBLAS
    bf16 = variants.variant("output", "bf16", "bf16")
    assert "M >= 4096 and LoRA rank <= 128: the persistent TMA kernel (persistent_lora_linear_bf16)" in str(
        plan("bf16", "sm_90"))
    assert "M >= 1024 and LoRA rank <= 128: the persistent TMA kernel (persistent_grad_input_fp8)" in str(
        plan("fp8", "sm_90"))
    assert "persistent" not in str(plan("qfp8", "sm_90")) and "persistent" not in str(plan("fp8", "sm_89"))
    monkeypatch.setattr(variants, "PERSISTENT_SM90", True)
    assert variants.route(fp8, "sm_90", 16, 4096, 4096).engine is persistent_engine  # every row count
    assert variants.route(qfp8, "sm_90", 16, 4096, 4096).engine is persistent_engine
    assert variants.route(nf4, "sm_90", 64, 4096, 4096).engine is triton_engine  # no persistent variant
    assert variants.route(fp8, "sm_100", 4096, 4096, 4096).engine is triton_engine
    assert variants.route(fp8, "sm_90", 4096, 4096, 4100).engine is triton_engine  # K % 16: no TMA
    assert variants.route(fp8, "sm_90", 4096, 4100, 4096).engine is triton_engine  # N % 8
    assert variants.route(fp8, "sm_90", 4096, 4096, 4096, rank=129).engine is triton_engine
    # A forward that adds a bias (Qwen2's q/k/v) takes it too, unless PERSISTENT_BIAS is switched off.
    assert variants.route(bf16, "sm_90", 4096, 1024, 1024, rank=16, bias=True).engine is persistent_engine
    assert variants.route(fp8, "sm_90", 4096, 4096, 4096, rank=16, bias=True).engine is persistent_engine
    text = str(plan("fp8", "sm_90"))
    assert "M >= 1 and LoRA rank <= 128: the persistent TMA kernel (persistent_lora_linear_fp8)" in text
    assert "M >= 1 and LoRA rank <= 128: the persistent TMA kernel (persistent_grad_input_fp8)" in text
    monkeypatch.setattr(variants, "PERSISTENT_BIAS", False)
    assert variants.route(fp8, "sm_90", 4096, 4096, 4096, rank=16, bias=True).engine is triton_engine
    assert "M >= 1 and LoRA rank <= 128, no bias: the persistent TMA kernel (persistent_lora_linear_fp8)" in str(
        plan("fp8", "sm_90"))
    monkeypatch.setattr(variants, "PERSISTENT_SM90", False)
    assert variants.route(bf16_dgrad, "sm_90", 4096, 4096, 4096).engine is variants.Engine.CUBLAS
    assert variants.route(fp8, "sm_90", 4096, 4096, 4096).engine is triton_engine
    assert "persistent" not in str(plan("bf16", "sm_90")) and "persistent" not in str(plan("fp8", "sm_90"))
    assert {v.kernel for v in variants.VARIANTS if v.persistent} == {
        "lora_linear_bf16", "lora_linear_fp8", "lora_linear_fp8_block", "grad_input_bf16", "grad_input_fp8",
        "grad_input_fp8_block"}


def test_warp_specialized_configs_only_on_a_triton_whose_specialized_builds_ran_right_on_a_gpu(monkeypatch) -> None:
    """A clean specialized build proved nothing on the H200 (run 55), nor did a clean soak (runs 65-70: Triton 3.6's
    gave NaN in training under CUDA graphs), so the families offer warp-specialized configs only on the Tritons
    listed in compat.WARP_SPECIALIZE_CHECKED_TRITON: none today, the list drives the choice."""
    import triton

    from surogate import compat

    def specialized_configs() -> set[str]:
        return {family for family in persistent.FAMILIES.values()
                if any(c.kwargs["WARP_SPECIALIZE"] for c in configs.get_configs(family, "sm_90"))}

    assert compat.WARP_SPECIALIZE_CHECKED_TRITON == ()
    for version in ("3.6.0", "3.6.1", "3.7.0", "3.9.0"):
        monkeypatch.setattr(triton, "__version__", version)
        assert compat.warp_specialize_checked.__wrapped__() is False, version
    monkeypatch.setattr(compat, "WARP_SPECIALIZE_CHECKED_TRITON", ((3, 7),))
    monkeypatch.setattr(triton, "__version__", "3.7.2")
    assert compat.warp_specialize_checked.__wrapped__() is True
    monkeypatch.setattr(configs, "PERSISTENT_WARP_SPECIALIZE", False)
    assert specialized_configs() == set()
    assert all(configs.get_configs(family, "sm_90") for family in persistent.FAMILIES.values())
    monkeypatch.setattr(configs, "PERSISTENT_WARP_SPECIALIZE", True)
    assert specialized_configs() == {"persistent_bf16", "persistent_fp8"}  # fp8_block: its 128x128 ones are out
    monkeypatch.setattr(configs, "PERSISTENT_WARP_SPECIALIZE", None)
    assert bool(specialized_configs()) is compat.warp_specialize_checked()


def test_configs_are_for_sm90_only() -> None:
    """sm_100 builds of this kernel came out without MMA or TMA instructions for some tiles: refused."""
    for family in set(persistent.FAMILIES.values()):
        assert configs.get_configs(family, "sm_90")
        for arch in ("sm_89", "sm_100", "sm_120"):
            with pytest.raises(ValueError, match="sm_90 only"):
                configs.get_configs(family, arch)


def test_tma_needs_aligned_row_strides() -> None:
    x = torch.zeros(8, 136, dtype=torch.bfloat16)
    assert persistent.tma_ok(x, None)
    assert persistent.tma_ok(x[:, :130])  # a narrower view: its row stride is still aligned
    assert not persistent.tma_ok(x[:, 1:])  # base not 16-byte aligned
    assert not persistent.tma_ok(torch.zeros(8, 4, dtype=torch.bfloat16))  # rank 4: 8-byte rows
    assert not persistent.tma_ok(x.t())  # inner stride not 1


# ---------------------------------------------------------------------- SASS of sm_90 builds

def _partitions(ttgir: str) -> dict[str, str]:
    """The regions of a `ttg.warp_specialize` (default: the TMA producer; partition0, 1: the consumers),
    by name, as TTGIR text."""
    out, name, lines = {}, None, []
    for line in ttgir.splitlines():
        m = re.match(r"\s*(default|partition\d+)\s*[({]", line)
        if m:
            if name:
                out[name] = "\n".join(lines)
            name, lines = m.group(1), []
        elif name:
            lines.append(line)
    if name:
        out[name] = "\n".join(lines)
    return out


def _rebased_pointer_indices(ttgir: str) -> list[str]:
    """Consumer values `%v = arith.addi %x, %cN_i32 : i32` (a tile coordinate rebased by a constant: what
    Triton's data partitioning makes of a TMA coordinate for the second consumer warpgroup) that feed a
    `tt.splat`, i.e. pointer indices built on the rebased coordinate. The partitioning also slices the
    `tl.arange` those indices add, so such a use counts the half-tile offset twice (run 54's H200 bug)."""
    bad = []
    for name, text in _partitions(ttgir).items():
        rebased = re.findall(r"(%[\w.]+) = arith\.addi %[\w.]+, %c\d+_i32[\w.]* (?:\{[^}]*\} )?: i32\s*(?:loc\(.*\))?$",
                             text, re.M)
        bad += [f"{name} splats {v}" for v in rebased if re.search(rf"tt\.splat {re.escape(v)}\b", text)]
    return bad


def test_rebased_pointer_indices_flags_a_splatted_rebased_coordinate() -> None:
    """The TTGIR signature of run 54's bug (HEAD's partition1, abridged) is flagged; the fixed form, where
    the rebased coordinate only feeds the TMA store and the rows come from pid_m, is not."""
    head = """    partition1(%arg0: i32) num_warps(4) {
      %offs_m = tt.make_range {end = 128 : i32, start = 64 : i32} : tensor<64xi32>
        %off_m = arith.muli %121, %c128_i32_18 {async_task_id = array<i32: 2>} : i32
        %123 = arith.addi %off_m, %c64_i32_16 {async_task_id = array<i32: 2>} : i32
        %offs_m_29 = tt.splat %123 {async_task_id = array<i32: 2>} : i32 -> tensor<64xi32>
        ttng.async_tma_copy_local_to_global %out_src_23[%123, %off_n] %131
"""
    fixed = head.replace("tt.splat %123", "tt.splat %offs_m_32")
    assert _rebased_pointer_indices(head) == ["partition1 splats %123"]
    assert _rebased_pointer_indices(fixed) == []


def _requests(all_configs: bool):
    out = []
    for spec in catalog.persistent_specs():
        family = persistent.FAMILIES[(spec.constexprs["A_MODE"], spec.constexprs["W_MODE"])]
        cands = configs.get_configs(family, "sm_90")
        for c in cands if all_configs else cands[:1]:
            out.append((spec, c, dataclasses.replace(spec, config=lambda arch, c=c: c).request("sm_90")))
    return out


def _check_sm90(requests) -> list[str]:
    problems = []
    for (spec, c, _), build in zip(requests, build_many([r for _, _, r in requests])):
        what = f"{spec.name} {c.kwargs} warps={c.num_warps} stages={c.num_stages}: {build.summary()}"
        bad = spec.check(build)  # HGMMA / QGMMA on the spec's operand types, no slower MMA class
        ops = build.opcodes if build.ok else {}
        if build.ok:
            if not ops.get("UTMALDG") or not ops.get("UTMASTG"):
                bad.append("no TMA load / store")
            if build.spills:
                bad.append("spills")
            if build.shared_bytes > SMEM_SM90:
                bad.append(f"{build.shared_bytes} B of shared memory")
            if c.kwargs["WARP_SPECIALIZE"] and not ops.get("USETMAXREG"):
                bad.append("not warp-specialized (no setmaxnreg)")
            if c.kwargs["WARP_SPECIALIZE"] and "partition1" not in _partitions(build.ttgir):
                bad.append("no second consumer partition in the TTGIR")  # the check below would be vacuous
            for use in _rebased_pointer_indices(build.ttgir):
                bad.append(f"double-offset pointer rows: {use}")
        problems += [f"{what}: {p}" for p in bad]
    return problems


@pytest.fixture
def specialized(monkeypatch):
    """The warp-specialized configs in the families whatever this Triton (compat.warp_specialize_checked),
    so that their builds are checked here on every Triton."""
    monkeypatch.setattr(configs, "PERSISTENT_WARP_SPECIALIZE", True)


def test_first_configs_build_for_sm90_with_wgmma_and_tma(specialized) -> None:
    """The first (default) config of each persistent variant: QGMMA / HGMMA, TMA loads and stores, warp
    specialization where the config asks for it, no spills, shared memory that fits, and no consumer
    warpgroup indexing its scales from a rebased TMA coordinate (`_rebased_pointer_indices`)."""
    reqs = _requests(all_configs=False)
    assert len(reqs) == 6
    assert _check_sm90(reqs) == []


@pytest.mark.slow
def test_every_config_builds_for_sm90_with_wgmma_and_tma(specialized) -> None:
    """Every config the tuner may pick on sm_90 (a config that does not fit would only be skipped there)."""
    assert _check_sm90(_requests(all_configs=True)) == []
