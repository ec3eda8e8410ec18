"""Ahead-of-time builds for sm_89 / sm_90a / sm_100a / sm_120a and the MMA class in their SASS.

Three tiers: (1) the SASS parser, the catalog and `surogate info` without compiling anything;
(2) small probe GEMMs (bf16 and FP8 `tl.dot`, NVFP4 `tl.dot_scaled`) that pin down what
Triton emits per arch, so the arch table in surogate/recipes/arch.py is checked against the
compiler; (3) every kernel in the catalog, per arch: the MMA class it is sold on (and no
slower one), or for a quantizer: no MMA and no register spills.

Builds run in worker processes (the suite imports kernels under TRITON_INTERPRET=1), all of a
tier in one parallel batch, cached for the session; Triton's own cache makes reruns fast.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from types import MappingProxyType

import pytest
import triton
import triton.language as tl

from surogate.training import info
from surogate.kernels import catalog
from surogate.kernels.aot import Build, BuildRequest, build_in_process, build_many, mma_class, parse_sass
from surogate.kernels.catalog import KernelSpec
from surogate.recipes import ARCHS, Compute, names
from surogate.kernels.plan import Support, plan

ALL_ARCHS = tuple(ARCHS)


# ------------------------------------------------------------------------------------ probes

@triton.jit
def _probe_dot_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_bn, stride_cm,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C = A @ B^T, A (M, K) and B (N, K) both K-major: the layout every tensor core takes."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :]
    b_ptrs = b_ptr + rn[:, None] * stride_bn + rk[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = tl.load(a_ptrs, mask=rk[None, :] < K - k * BLOCK_K, other=0.0)
        b = tl.load(b_ptrs, mask=rk[None, :] < K - k * BLOCK_K, other=0.0)
        acc = tl.dot(a, tl.trans(b), acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], acc.to(tl.bfloat16),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _probe_nvfp4_kernel(a_ptr, b_ptr, as_ptr, bs_ptr, c_ptr, M, N, K, stride_am, stride_bn, stride_cm,
                        stride_asm, stride_bsn,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """NVFP4 C = A @ B^T: packed E2M1 (rows, K/2) with E4M3 scales per 16 along K."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rkp = tl.arange(0, BLOCK_K // 2)
    rks = tl.arange(0, BLOCK_K // 16)
    a_ptrs = a_ptr + rm[:, None] * stride_am + rkp[None, :]
    b_ptrs = b_ptr + rn[:, None] * stride_bn + rkp[None, :]
    as_ptrs = as_ptr + rm[:, None] * stride_asm + rks[None, :]
    bs_ptrs = bs_ptr + rn[:, None] * stride_bsn + rks[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, tl.cdiv(K, BLOCK_K)):
        acc = tl.dot_scaled(tl.load(a_ptrs), tl.load(as_ptrs), "e2m1",
                            tl.trans(tl.load(b_ptrs)), tl.load(bs_ptrs), "e2m1", acc)
        a_ptrs += BLOCK_K // 2
        b_ptrs += BLOCK_K // 2
        as_ptrs += BLOCK_K // 16
        bs_ptrs += BLOCK_K // 16
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], acc.to(tl.bfloat16),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


_INTS = MappingProxyType({"M": 4096, "N": 4096, "K": 4096, "stride_am": 4096, "stride_bn": 4096, "stride_cm": 4096})


def _probe(name: str, a: str, b: str, precision: Compute, operands: str | None, archs=ALL_ARCHS) -> KernelSpec:
    block_k = 64 if precision is Compute.BF16 else 128
    return KernelSpec(name, _probe_dot_kernel, {"a_ptr": a, "b_ptr": b, "c_ptr": "*bf16"},
                      {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": block_k}, (), precision, archs=archs,
                      ints=_INTS, operands=operands)


_NVFP4_SIG = {"a_ptr": "*u8", "b_ptr": "*u8", "as_ptr": "*fp8e4nv", "bs_ptr": "*fp8e4nv", "c_ptr": "*bf16"}
_NVFP4_INTS = {**_INTS, "stride_am": 2048, "stride_bn": 2048, "stride_asm": 256, "stride_bsn": 256}
PROBES = (
    _probe("probe_bf16", "*bf16", "*bf16", Compute.BF16, "F32.BF16"),
    _probe("probe_fp8", "*fp8e4nv", "*fp8e4nv", Compute.FP8, "F32.E4M3.E4M3"),
    _probe("probe_fp8_hybrid", "*fp8e5", "*fp8e4nv", Compute.FP8, "F32.E5M2.E4M3"),
    KernelSpec("probe_nvfp4", _probe_nvfp4_kernel, _NVFP4_SIG, {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128}, (),
               Compute.NVFP4, archs=("sm_100", "sm_120"), ints=_NVFP4_INTS),
    # Hopper has no FP4 tensor cores: tl.dot_scaled is emulated through bf16 wgmma (why plan() says EMULATED).
    KernelSpec("probe_nvfp4_emulated", _probe_nvfp4_kernel, _NVFP4_SIG,
               {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128}, (), Compute.BF16, archs=("sm_90",),
               ints=_NVFP4_INTS, operands="F32.BF16", config=lambda arch: {"num_warps": 8}),  # 4 warps spill
)

# The exact mnemonics Triton 3.6-3.9 emit for the probes (docs/aot.md records them).
PROBE_MNEMONICS = {
    ("probe_bf16", "sm_89"): "HMMA.16816.F32.BF16",
    ("probe_bf16", "sm_90"): "HGMMA.64x128x16.F32.BF16",
    ("probe_bf16", "sm_100"): "UTCHMMA",
    ("probe_bf16", "sm_120"): "HMMA.16816.F32.BF16",
    ("probe_fp8", "sm_89"): "QMMA.16832.F32.E4M3.E4M3",
    ("probe_fp8", "sm_90"): "QGMMA.64x128x32.F32.E4M3.E4M3",
    ("probe_fp8", "sm_100"): "UTCQMMA",
    ("probe_fp8", "sm_120"): "QMMA.16832.F32.E4M3.E4M3",
    ("probe_fp8_hybrid", "sm_89"): "QMMA.16832.F32.E5M2.E4M3",
    ("probe_fp8_hybrid", "sm_90"): "QGMMA.64x128x32.F32.E5M2.E4M3",
    ("probe_fp8_hybrid", "sm_100"): "UTCQMMA",
    ("probe_fp8_hybrid", "sm_120"): "QMMA.16832.F32.E5M2.E4M3",
    ("probe_nvfp4", "sm_100"): "UTCOMMA.4X",
    ("probe_nvfp4", "sm_120"): "OMMA.SF.16864.F32.E2M1.E2M1.UE4M3.4X",
    ("probe_nvfp4_emulated", "sm_90"): "HGMMA.64x128x16.F32.BF16",
}
PROBE_CASES = [(s, a) for s in PROBES for a in s.archs]


def _build_all(specs_and_archs: list[tuple[KernelSpec, str]]) -> dict[tuple[str, str], Build]:
    builds = build_many([s.request(a) for s, a in specs_and_archs], workers=os.cpu_count() or 1)
    return {(s.name, a): b for (s, a), b in zip(specs_and_archs, builds)}


def _selected(session: pytest.Session, test: str) -> list[tuple[KernelSpec, str]]:
    """The (spec, arch) cases of `test` that this session runs: `-k` selects what gets built."""
    cases = [(item.callspec.params["spec"], item.callspec.params["arch"]) for item in session.items
             if getattr(item, "originalname", None) == test and hasattr(item, "callspec")]
    return [(s, a) for s, a in cases if s is not None]


@pytest.fixture(scope="session")
def probe_builds(request) -> dict[tuple[str, str], Build]:
    return _build_all(_selected(request.session, "test_probe_gemm_emits_the_mma_class_of_the_arch_table"))


# The MoE grouped kernels built on every arch by default (12 builds, ~8 s on two cores with a cold Triton
# cache): a dequant-in-registers forward with the LoRA epilogue and x gathered by rows (as the MoE block
# runs it), the block-FP8 MMA dgrad (qfp8's experts, W read transposed: QGMMA on sm_90, QMMA on sm_89 /
# sm_120, UTCQMMA on sm_100, E4M3.E4M3) and the gathered factor-gradient kernel. The other weight modes,
# the bf16 dgrad, the FP8 forward, the ungathered kernels and the LoRA factor GEMMs are `slow`:
# pytest -m slow -k grouped tests/test_aot_sass.py.
GROUPED_DEFAULT = frozenset({"grouped_lora_linear_dequant_nf4_gather", "grouped_grad_input_fp8_block",
                             "grouped_grad_lora_gather"})


def _catalog_cases() -> list:
    def marks(s: KernelSpec) -> tuple:
        return (pytest.mark.slow,) if s.grouped and s.name not in GROUPED_DEFAULT else ()

    try:
        return [pytest.param(s, a, id=f"{s.name}-{a}", marks=marks(s)) for s in catalog.specs() for a in s.archs]
    except Exception as e:  # a kernel module that does not import: one failing case says why
        return [pytest.param(None, repr(e), id="catalog-import-error")]


CATALOG_CASES = _catalog_cases()


@pytest.fixture(scope="session")
def catalog_builds(request) -> dict[tuple[str, str], Build]:
    return _build_all(_selected(request.session, "test_kernel_compiles_to_its_mma_class"))


# ------------------------------------------------------------------- tier 1: no compiling

SASS = """
        /*0cb0*/                   HMMA.16816.F32.BF16 R48, R172.reuse, R20, R48 ;        /* 0x00000014ac30723c */
        /*0ce0*/              @!P0 HMMA.16816.F32.BF16 R32, R172.reuse, R68, R184 ;       /* 0x00000044ac20723c */
        /*3e40*/                   WARPGROUP.ARRIVE ;                                     /* 0x00000000000079c5 */
        /*3e50*/                   HGMMA.64x128x16.F32.BF16 R88, gdesc[UR8].tnspB, R88 ;  /* 0x41e00000085879f0 */
        /*0bd0*/                   UTCOMMA.4X gdesc[UR10], gdesc[UR12], tmem[UR6], tmem[UR16], idesc[UR17] ;
        /*0be0*/               @P1 STL [R1+0x4], R3 ;
        /*0bf0*/                   LDL R3, [R1+0x4] ;
        .section .text.kernel  HMMA not an instruction line
"""


def test_parse_sass_counts_opcodes_and_full_mma_mnemonics():
    opcodes, mma = parse_sass(SASS)
    assert mma == {"HMMA.16816.F32.BF16": 2, "HGMMA.64x128x16.F32.BF16": 1, "UTCOMMA.4X": 1}
    assert opcodes["WARPGROUP"] == 1 and opcodes["STL"] == 1 and opcodes["LDL"] == 1
    assert sum(opcodes.values()) == 7
    assert {mma_class(op) for op in mma} == {"HMMA", "HGMMA", "UTCOMMA"}


def test_catalog_names_are_unique_and_a_duplicate_is_refused():
    specs = catalog.specs()
    assert len({s.name for s in specs}) == len(specs)
    with pytest.raises(ValueError, match="twice"):
        catalog._check_unique([specs[0], specs[0]])
    with pytest.raises(KeyError, match="known: "):
        catalog.get("no_such_kernel")


def test_every_planned_kernel_is_in_the_catalog_with_the_plans_mma():
    """The names plan() reports are the catalog's, and both expect the same MMA class per arch."""
    seen = set()
    for recipe in names(include_aliases=False):
        for arch in ARCHS:
            p = plan(recipe, arch)
            for g in p.gemms:
                if g.support is Support.REFUSED or g.kernel in catalog.NOT_TRITON:
                    continue
                spec = catalog.get(g.kernel)
                assert arch in spec.archs, (g.kernel, arch)
                assert spec.expected_mma(arch) == g.mma, (g.kernel, arch)
                assert recipe in spec.recipes
                seen.add(g.kernel)
    gemms = {s.name for s in catalog.specs() if s.precision is not None and not s.grouped and not s.lora_branch}
    assert gemms == seen, "catalog GEMM kernels that no plan uses: " + ", ".join(sorted(gemms - seen))


def test_every_triton_kernel_of_the_kernel_modules_is_in_the_catalog():
    """A new `_*_kernel` that nobody added here would escape the SASS checks."""
    import importlib

    from surogate.kernels.aot import _fn_ref

    built = {_fn_ref(s.fn) for s in catalog.specs()}
    for module_name in catalog.KERNEL_MODULES:
        module = importlib.import_module(module_name)
        for attr, value in vars(module).items():
            if attr.startswith("_") and attr.endswith("_kernel") and hasattr(value, "fn"):
                assert _fn_ref(value) in built, f"{module_name}.{attr} is not in surogate/kernels/catalog.py"


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_every_spec_gives_every_kernel_argument_a_type(arch):
    """A kernel whose arguments changed fails here at once, without compiling."""
    from surogate.kernels.aot import _full_signature, _jit_function

    for spec in catalog.specs():
        if arch not in spec.archs:
            with pytest.raises(ValueError, match="does not run on"):
                spec.request(arch)
            continue
        request = spec.request(arch)
        fn = _jit_function(request.fn) or request.fn  # interpreted: .fn is the Python function
        signature, constexprs = _full_signature(fn, request)
        assert list(signature) == list(inspect.signature(fn.fn).parameters)


def test_grouped_kernels_are_the_variant_tables_rows_plus_the_lora_kernels():
    """One grouped GEMM per kernel of the variant table that the grouped op runs (forward and dgrad): the
    bf16-compute row of every format but fp8_row, and the fp8-compute row of fp8_block (block-scaled FP8
    MMA); recipes by their experts' format and the compute the grouped op runs them with (qfp8: fp8;
    qfp8-bf16: bf16). The LoRA factor GEMMs and gradients for every recipe; the kernels that read x also
    gathered (`_gather`: the forwards, hidden, grad_lora_a's wgrad); the row's MMA class on every arch."""
    from surogate.kernels import variants as V
    from surogate.ops.experts import experts_weight_format
    from surogate.recipes import WeightFormat, get

    grouped = {s.name: s for s in catalog.specs() if s.grouped}
    want = {}
    for gemm in (V.Gemm.OUTPUT, V.Gemm.GRAD_INPUT):
        for compute, fmt in [(c, f) for c in (Compute.BF16, Compute.FP8, Compute.NVFP4) for f in WeightFormat]:
            if fmt is WeightFormat.FP8_ROW or compute is Compute.NVFP4 or \
                    (compute is Compute.FP8 and fmt is not WeightFormat.FP8_BLOCK):
                with pytest.raises(ValueError):
                    V.grouped_variant(gemm, compute, fmt)
                continue
            v = V.grouped_variant(gemm, compute, fmt)
            assert v == V.variant(gemm, compute, fmt)
            gathers = (False, True) if gemm is V.Gemm.OUTPUT else (False,)
            for gather in gathers:
                name = f"grouped_{v.kernel}" + ("_gather" if gather else "")
                want.setdefault(name, (v, gather, set()))[2].add(fmt)
    every = set(names(include_aliases=False))
    lora = {"grouped_lora_hidden", "grouped_lora_hidden_gather", "grouped_lora_grad_hidden", "grouped_grad_lora",
            "grouped_grad_lora_gather"}
    stored = {"grouped_grad_input_fp8_block_stored"}  # the FP8 dgrad reading the stored stack (TRANS_W)
    assert set(grouped) == set(want) | lora | stored
    assert {"grouped_lora_linear_fp8_block", "grouped_lora_linear_fp8_block_gather",
            "grouped_grad_input_fp8_block"} <= set(grouped)
    s, copy = grouped["grouped_grad_input_fp8_block_stored"], grouped["grouped_grad_input_fp8_block"]
    assert s.constexprs["TRANS_W"] and not copy.constexprs["TRANS_W"] and s.recipes == copy.recipes == ("qfp8",)
    assert (s.ints["stride_w0"], s.ints["stride_w1"]) == (2048, 1)  # W_e (N, K) as stored, N the reduction

    def compute_of(recipe, gemm):
        r = get(recipe)
        return V.grouped_compute(r.forward if gemm is V.Gemm.OUTPUT else r.grad_input, experts_weight_format(r))

    for name, (v, gather, formats) in want.items():
        spec = grouped[name]
        assert tuple(spec.constexprs[m] for m in ("A_MODE", "W_MODE", "TRANS_W", "HAS_LORA", "GATHER")) == \
            (v.a_mode, v.w_mode, v.trans_w, True, gather), name
        assert set(spec.recipes) == {r for r in every if experts_weight_format(r) in formats
                                     and compute_of(r, v.gemm) is v.compute}, name
        assert spec.precision is v.compute and spec.operands == v.operands, name
    assert grouped["grouped_grad_input_fp8_block"].recipes == ("qfp8",)
    assert grouped["grouped_lora_linear_dequant_fp8_block"].recipes == ("qfp8-bf16",)
    for name in lora:
        assert set(grouped[name].recipes) == every
        assert grouped[name].constexprs["GATHER"] == name.endswith("_gather"), name
        assert grouped[name].precision is Compute.BF16 and grouped[name].constexprs.get("A_MODE", 0) == 0, name
    for spec in grouped.values():
        assert spec.archs == ALL_ARCHS, spec.name
        for arch in ALL_ARCHS:
            assert spec.recipes_on(arch) == spec.recipes
            assert spec.expected_mma(arch) == ARCHS[arch].mma(spec.precision)


_TRITON_TYPES = {"torch.bfloat16": "*bf16", "torch.float32": "*fp32", "torch.uint8": "*u8",
                 "torch.float8_e4m3fn": "*fp8e4nv", "torch.int32": "*i32"}


@pytest.mark.parametrize("fmt,compute", [("bf16", "bf16"), ("fp8_block", "bf16"), ("fp8_block", "fp8"),
                                         ("nvfp4", "bf16"), ("nf4", "bf16")])
def test_grouped_specs_match_what_the_launchers_pass(fmt, compute, monkeypatch):
    """Every launch of the grouped op (forward and backward, without and with a `rows` gather index,
    launches recorded, none run) has a catalog spec with its modes, its pointer types and the same
    integer arguments at 0 and at 1 (constexprs); and every spec is launched. FP8: the quantized A and
    its block scales, the dgrad's K-major copy of the stack and its transposed scales, or the stored stack
    (FP8_DGRAD_READS_STORED_STACK)."""
    import torch

    from surogate.kernels import grouped as G
    from surogate.kernels import reference_grouped as rg
    from surogate.kernels import tuning
    from surogate.kernels import variants as V

    launches = []
    monkeypatch.setattr(tuning, "runner", lambda kernel, *a: lambda grid, **kw: launches.append(kw))
    wgrad_args = list(inspect.signature(G._grouped_wgrad_kernel.fn).parameters)

    class _Wgrad:
        fn = G._grouped_wgrad_kernel.fn

        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append({**dict(zip(wgrad_args, args)), **kw})

    monkeypatch.setattr(G, "_grouped_wgrad_kernel", _Wgrad())
    torch.manual_seed(0)
    e, n, k, r = 3, 256, 192, 16
    offsets = torch.tensor([0, 5, 5, 37], dtype=torch.int32)
    x, g = torch.randn(37, k), torch.randn(37, n)
    weight = rg.quantize_grouped_weight_ref(torch.randn(e, n, k), fmt)
    a, b = torch.randn(e, r, k), torch.randn(e, n, r)
    G.grouped_lora_linear(x, offsets, weight, fmt, a, b, 2.0, compute)
    G.grouped_lora_linear_backward(g, x, offsets, weight, fmt, a, b, None, 2.0, compute)
    # Gathered: 37 grouped rows read from 20 tokens through an int64 index (the launcher passes int32).
    rows = torch.randint(0, 20, (37,))
    G.grouped_lora_linear(x[:20], offsets, weight, fmt, a, b, 2.0, compute, rows=rows)
    G.grouped_lora_linear_backward(g, x[:20], offsets, weight, fmt, a, b, None, 2.0, compute, rows=rows)
    stored = compute == "fp8"  # the FP8 dgrad also reading the stored stack (FP8_DGRAD_READS_STORED_STACK)
    if stored:
        monkeypatch.setattr(G, "FP8_DGRAD_READS_STORED_STACK", True)
        G.grouped_lora_linear_backward(g, x, offsets, weight, fmt, a, b, None, 2.0, compute)

    v = V.variant(V.Gemm.OUTPUT, compute, fmt)
    lora = {"grouped_lora_hidden", "grouped_lora_hidden_gather", "grouped_lora_grad_hidden", "grouped_grad_lora",
            "grouped_grad_lora_gather"}
    specs = [s for s in catalog.specs() if s.grouped and (s.name in lora or (
        s.constexprs.get("W_MODE"), s.constexprs.get("A_MODE")) == (v.w_mode, v.a_mode))]
    modes_of = ("A_MODE", "W_MODE", "TRANS_W", "HAS_LORA", "GATHER")

    def key(spec_or_kw):
        if isinstance(spec_or_kw, KernelSpec):
            s = spec_or_kw
            ints, types = s.ints, dict(s.signature)
            modes = tuple(s.constexprs.get(m) for m in modes_of)
        else:
            kw = spec_or_kw
            ints = {n: v for n, v in kw.items() if isinstance(v, int) and not isinstance(v, bool)
                    and n not in constexprs}
            types = {n: _TRITON_TYPES[str(v.dtype)] for n, v in kw.items() if isinstance(v, torch.Tensor)}
            modes = tuple(kw.get(m) for m in modes_of)
        zero_one = ({n for n, v in ints.items() if v == 0}, {n for n, v in ints.items() if v == 1})
        return modes, tuple(sorted(t for t in types.items() if t[1] != "fp32")), zero_one

    constexprs = {n for f in (G._grouped_lora_gemm_kernel.fn, _Wgrad.fn)
                  for n, p in inspect.signature(f).parameters.items() if "constexpr" in str(p.annotation)}
    spec_keys = {s.name: key(s) for s in specs}
    matched = set()
    # forward: hidden, base; backward: gh, hidden, 2 x wgrad, dgrad; twice (and the stored-stack backward)
    assert len(launches) == 14 + 5 * stored
    assert [kw["GATHER"] for kw in launches][:14] == [False] * 7 + [True, True, False, True, False, True, False]
    for kw in launches:
        hits = [name for name, sk in spec_keys.items() if sk == key(kw)]
        assert hits, f"no catalog spec for the launch {key(kw)}; specs: {spec_keys}"
        matched.update(hits)
    assert matched == set(spec_keys)


def _build(mma: dict[str, int], arch: str, stack: int = 0) -> Build:
    return Build("k", arch, ARCHS[arch].ptx_target, mma=mma, stack_bytes=stack)


def test_check_catches_a_missing_or_slower_mma_class_and_wrong_operands():
    fp8 = KernelSpec("k", None, {}, {}, (), Compute.FP8, operands="E5M2.E4M3")
    assert fp8.check(_build({"QGMMA.64x128x32.F32.E5M2.E4M3": 4, "HGMMA.64x16x16.F32.BF16": 1}, "sm_90")) == []
    assert "expected QGMMA" in fp8.check(_build({"QMMA.16832.F32.E5M2.E4M3": 8}, "sm_90"))[0]
    assert any("slow MMA" in p for p in fp8.check(_build({"QGMMA.64x128x32.F32.E5M2.E4M3": 4,
                                                            "HMMA.16816.F32.BF16": 2}, "sm_90")))
    assert "E5M2.E4M3 operands" in fp8.check(_build({"QMMA.16832.F32.E4M3.E4M3": 8}, "sm_89"))[0]
    assert fp8.check(_build({"UTCQMMA": 8}, "sm_100")) == []  # tcgen05 keeps operand types in idesc
    nvfp4 = KernelSpec("k", None, {}, {}, (), Compute.NVFP4)
    assert nvfp4.check(_build({"OMMA.SF.16864.F32.E2M1.E2M1.UE4M3.4X": 8}, "sm_120")) == []
    assert "block scaling" in nvfp4.check(_build({"OMMA.SF.16864.F32.E2M1.E2M1.E8": 8}, "sm_120"))[0]
    assert "block scaling" in nvfp4.check(_build({"UTCOMMA": 8}, "sm_100"))[0]
    quant = KernelSpec("k", None, {}, {}, (), None)
    assert quant.check(_build({}, "sm_89")) == []
    assert "expected no MMA" in quant.check(_build({"HMMA.16816.F32.BF16": 1}, "sm_89"))[0]
    failed = Build("k", "sm_90", "sm_90a", error="PTXASError: out of registers")
    assert "does not compile" in fp8.check(failed)[0]
    streaming = KernelSpec("k", None, {}, {}, (), Compute.BF16, streaming=True)  # lora_add: any tensor-core MMA
    assert streaming.check(_build({"HMMA.16816.F32.BF16": 8}, "sm_90")) == []
    assert "expected a tensor-core MMA" in streaming.check(_build({}, "sm_90"))[0]


def test_request_specializes_ones_and_marks_16_divisible_args():
    spec = _probe("p", "*bf16", "*bf16", Compute.BF16, None)
    spec = KernelSpec(spec.name, spec.fn, spec.signature, spec.constexprs, (), spec.precision,
                      ints={**_INTS, "stride_cm": 1, "M": 100})
    r = spec.request("sm_90")
    assert r.constexprs["stride_cm"] == 1 and "stride_cm" not in r.signature
    assert r.signature["M"] == "i32" and "M" not in r.divisible and "K" in r.divisible and "a_ptr" in r.divisible


def test_bad_requests_fail_with_a_clear_error_before_compiling():
    jit = triton.runtime.jit.JITFunction(_probe_dot_kernel.fn)  # compilable even under the interpreter
    base = dict(name="p", fn=jit, constexprs={"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, arch="sm_90")
    missing = build_in_process(BuildRequest(signature={"a_ptr": "*bf16"}, **base))
    assert not missing.ok and "argument 'b_ptr'" in missing.error and "add it to the signature" in missing.error
    unknown = build_in_process(BuildRequest(signature={"nope": "i32"}, **base))
    assert not unknown.ok and "['nope'] are not arguments" in unknown.error
    with pytest.raises(Exception, match="sm_91 is not supported"):
        build_many([BuildRequest(signature={}, **{**base, "arch": "sm_91"})])


def test_importing_info_needs_no_gpu_and_compiles_nothing():
    code = ("import sys, surogate.training.info, surogate.kernels.catalog, surogate.kernels.aot; "
            "print(sorted(m for m in ('torch', 'triton') if m in sys.modules))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "[]"


def test_recipe_table_says_native_emulated_or_reference():
    by_arch = {a: {r.recipe: r for r in info.recipe_table(a)} for a in (*ALL_ARCHS, "cpu")}
    assert by_arch["sm_90"]["fp8"].support == "native" and "QGMMA" in by_arch["sm_90"]["fp8"].output
    assert by_arch["sm_90"]["qfp4"].support == "emulated" and "no FP4 tensor cores" in by_arch["sm_90"]["qfp4"].note
    assert by_arch["sm_120"]["qfp4"].support == "native" and "OMMA" in by_arch["sm_120"]["qfp4"].output
    assert by_arch["sm_100"]["qnf4"].output.startswith("lora_linear_dequant_nf4 (bf16, UTCHMMA)")
    assert {r.support for r in by_arch["cpu"].values()} == {"reference"}
    assert list(by_arch["sm_89"]) == names(include_aliases=False)


def test_render_without_sass_lists_environment_recipes_and_every_kernel():
    text = info.render("sm_120", check_sass=False)
    for key in ("torch", "triton", "transformers", "peft", "cuda", "gpu"):
        assert f"\n  {key} " in text
    assert "recipes on sm_120" in text and "SASS not checked" in text
    rows = {line.split()[0] for line in text.split("kernels on sm_120")[1].splitlines()[3:] if line.strip()}
    for spec in catalog.specs():
        assert (spec.name in rows) == ("sm_120" in spec.archs), spec.name
    assert "grad_lora" in text and "cuBLAS" in text
    cpu = info.render("cpu")
    assert "no GPU here; pass --arch" in cpu and "reference" in cpu


def test_kernel_table_rows_from_builds(monkeypatch):
    """kernel_table turns builds into ok / WRONG rows with the problem and spills in the note."""
    import surogate.kernels.aot as aot

    def fake_build_many(requests, workers=None):
        mma = {"lora_linear_bf16": {"HMMA.16816.F32.BF16": 8}, "lora_linear_fp8": {"QGMMA.64x128x32.F32.E4M3.E4M3": 4}}
        return [Build(r.name, r.arch, "sm_90a", mma=mma.get(r.name, {}), stack_bytes=64 if r.name == "amax" else 0)
                for r in requests]

    monkeypatch.setattr(aot, "build_many", fake_build_many)
    rows = {r.kernel: r for r in info.kernel_table("sm_90")}
    assert rows["lora_linear_fp8"].ok is True and rows["lora_linear_fp8"].found_mma == "QGMMA"
    assert rows["lora_linear_bf16"].ok is False and "expected HGMMA" in rows["lora_linear_bf16"].note
    assert rows["amax"].ok is True and "spills: 64 B stack" in rows["amax"].note
    assert rows["grad_lora"].ok is None and rows["grad_lora"].expected_mma == "HGMMA"
    assert "lora_linear_nvfp4" not in rows  # not run on sm_90: the dequant kernel emulates it
    # MoE grouped kernels: the recipes whose experts they run (not in plan()), the arch's bf16 class
    assert rows["grouped_lora_linear_dequant_nf4"].recipes == ("qnf4",)
    assert rows["grouped_grad_lora"].recipes == tuple(names(include_aliases=False))
    assert rows["grouped_grad_lora"].expected_mma == "HGMMA" and "expected HGMMA" in rows["grouped_grad_lora"].note


# ------------------------------------------------------------ tier 2: probes, compiled

@pytest.mark.parametrize("spec,arch", PROBE_CASES, ids=[f"{s.name}-{a}" for s, a in PROBE_CASES])
def test_probe_gemm_emits_the_mma_class_of_the_arch_table(spec, arch, probe_builds):
    build = probe_builds[(spec.name, arch)]
    assert spec.check(build) == [], build.summary()
    assert build.target == ARCHS[arch].ptx_target  # read back from the cubin: "a" targets for wgmma/tcgen05
    want = PROBE_MNEMONICS[(spec.name, arch)]
    assert any(op.startswith(want) for op in build.mma), f"expected {want}: {build.summary()}"
    assert not build.spills, build.summary()


# ----------------------------------------------------- tier 3: every real kernel, per arch

@pytest.mark.parametrize("spec,arch", CATALOG_CASES)
def test_kernel_compiles_to_its_mma_class(spec, arch, catalog_builds):
    assert spec is not None, f"the kernel catalog does not import: {arch}"
    build = catalog_builds[(spec.name, arch)]
    assert spec.check(build) == [], build.summary()
    if spec.precision is None:  # quantizers: registers suffice for their tiles
        assert not build.spills, build.summary()
