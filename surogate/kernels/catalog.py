"""The catalog of surogate's Triton kernels, as ahead-of-time builds see them.

Each `KernelSpec` names one kernel specialization (the names `plan()` reports for GEMMs; the MoE
grouped kernels, which `plan()` does not report, as `grouped_*`), the argument types and
representative constexprs (tiles from the kernel's own config function, LLM-sized integer
arguments), the recipes it serves and the MMA instruction class it must compile to on each arch.
`surogate info` and tests/test_aot_sass.py read this list, so a kernel that falls to a slower
MMA class on some arch is seen there.

The kernel modules are imported by `specs()` on first use, never at import of this module.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

from surogate.kernels.aot import Build, BuildRequest, mma_class
from surogate.kernels.plan import Support, plan
from surogate.recipes import ARCHS, Compute, names, normalize_arch

# GEMMs in the plan that are not Triton kernels, and what runs instead.
NOT_TRITON: Mapping[str, str] = MappingProxyType({
    "grad_lora": "cuBLAS (three skinny torch.matmul GEMMs, surogate/kernels/grad_lora.py)",
})

# A representative LLM layer (Qwen3-8B-like: 4096 tokens, hidden 4096, LoRA r = 16): integer
# arguments take these values, so Triton specializes them as its launcher would.
SHAPE = MappingProxyType({"M": 4096, "N": 4096, "K": 4096, "R": 16})
# The same for the MoE grouped kernels: Qwen3-30B-A3B's gate_up experts (128 experts, (2 x 768, 2048)
# each) with 4096 tokens routed top-8, so T = 32768 rows sorted by expert; LoRA r = 16.
GROUPED_SHAPE = MappingProxyType({"T": 32768, "E": 128, "N": 1536, "K": 2048, "R": 16})

# MMA classes that must not appear on an arch: the older, slower instruction families
# (an mma.sync on Hopper where wgmma was expected, a wgmma or mma.sync on datacenter Blackwell).
SLOW_MMA: Mapping[str, frozenset[str]] = MappingProxyType({
    "sm_89": frozenset(),
    "sm_90": frozenset({"HMMA", "QMMA", "IMMA"}),
    "sm_100": frozenset({"HMMA", "QMMA", "IMMA", "HGMMA", "QGMMA", "IGMMA", "OMMA"}),
    "sm_120": frozenset(),
})

# Archs whose SASS MMA mnemonics carry the operand types (tcgen05's UTC*MMA keep them in idesc).
_TYPED_MNEMONICS = frozenset({"sm_89", "sm_90", "sm_120"})
# Hardware block scaling with E4M3 scales per 16 (NVFP4), as the mnemonic shows it.
_NVFP4_SCALED = MappingProxyType({"sm_100": "UTCOMMA.4X", "sm_120": "UE4M3.4X"})


@dataclass(frozen=True, eq=False)  # identity equality: fields hold functions and mappings
class KernelSpec:
    """One kernel specialization to build for each arch it runs on."""

    name: str
    fn: Any  # the @triton.jit function
    signature: Mapping[str, str]  # pointer / float args -> Triton type ("*bf16", "*fp8e4nv", "fp32")
    constexprs: Mapping[str, Any]  # arch-independent constexprs
    recipes: tuple[str, ...]  # recipes whose training step runs this kernel
    precision: Compute | None  # MMA operand precision; None: not an MMA kernel (quantizers)
    archs: tuple[str, ...] = tuple(ARCHS)
    ints: Mapping[str, int] = field(default_factory=dict)  # integer args -> representative value
    config: Callable[[str], Any] | None = None  # arch -> triton.Config or config dict (tiles, warps)
    per_arch: Callable[[str], Mapping[str, Any]] | None = None  # further arch-dependent constexprs
    operands: str | None = None  # operand types in the SASS mnemonic, e.g. "E5M2.E4M3"
    what: str = ""
    # A MoE grouped kernel (kernels/grouped.py): not a GEMM of plan(); `recipes` are those whose
    # experts it runs on a MoE model, on every arch the kernel is built for.
    grouped: bool = False
    # A kernel of the LoRA branch beside plan()'s GEMMs (A's gradient from the FP8 copy, kernels/grad_lora_fp8.py;
    # the LoRA term added after a cuBLAS GEMM, kernels/lora_add.py): `recipes` are those that run it, on every arch.
    lora_branch: bool = False
    # A memory-bound pass whose MMA is a small side product (lora_add's rank-r term over a streamed output tile): any
    # tensor-core class does (its small tiles take mma.sync, not wgmma, on sm_90 and sm_100), FMA does not.
    streaming: bool = False

    def recipes_on(self, arch: str) -> tuple[str, ...]:
        """The recipes that run this kernel on `arch` (a dense GEMM: from the plan, refused plans excluded)."""
        if self.precision is None or self.grouped or self.lora_branch:
            return self.recipes
        return tuple(recipe_usage(self.name).get(normalize_arch(arch), ()))

    def expected_mma(self, arch: str) -> str | None:
        """The MMA class this kernel must use on `arch` (from the arch table); None: no MMA."""
        return None if self.precision is None else ARCHS[normalize_arch(arch)].mma(self.precision)

    def request(self, arch: str) -> BuildRequest:
        """The AOT build request for `arch`: config tiles, per-arch constexprs, specialized ints."""
        arch = normalize_arch(arch)
        if arch not in self.archs:
            raise ValueError(f"kernel {self.name!r} does not run on {arch}; it is built for {', '.join(self.archs)}")
        constexprs = dict(self.constexprs)
        num_warps, num_stages, options = 4, 3, {}
        if self.config is not None:
            tiles, num_warps, num_stages, options = _config_parts(self.config(arch), num_warps, num_stages)
            constexprs.update(tiles)
        if self.per_arch is not None:
            constexprs.update(self.per_arch(arch))
        signature = dict(self.signature)
        divisible = [n for n, t in signature.items() if t.startswith("*")]
        for n, v in self.ints.items():
            if v == 1:  # Triton's launcher turns an integer 1 into a constexpr
                constexprs[n] = 1
                continue
            signature[n] = "i32" if -(2**31) <= v < 2**31 else "i64"
            if v % 16 == 0:
                divisible.append(n)
        return BuildRequest(self.name, self.fn, signature, constexprs, arch, num_warps=num_warps,
                            num_stages=num_stages, options=options, divisible=tuple(divisible))

    def check(self, build: Build) -> list[str]:
        """What is wrong with `build` for this kernel (empty when it is as expected)."""
        if not build.ok:
            return [f"does not compile: {build.error}"]
        problems = []
        expected = self.expected_mma(build.arch)
        found = set(build.mma_classes)
        if expected is None and found:
            problems.append(f"expected no MMA, found {sorted(found)}")
        if expected is not None and self.streaming:
            if not found:
                problems.append(f"expected a tensor-core MMA, found {sorted(found) or 'no MMA'}")
        elif expected is not None:
            if expected not in found:
                problems.append(f"expected {expected}, found {sorted(found) or 'no MMA'}")
            slow = found & SLOW_MMA[build.arch]
            if slow:
                problems.append(f"slow MMA class {sorted(slow)} on {build.arch}")
            main = [op for op in build.mma if mma_class(op) == expected]
            if main and self.operands and build.arch in _TYPED_MNEMONICS and \
                    not any(self.operands in op for op in main):
                problems.append(f"expected {expected} on {self.operands} operands, found {sorted(main)}")
            if main and self.precision is Compute.NVFP4 and \
                    not any(_NVFP4_SCALED[build.arch] in op for op in main):
                problems.append(f"expected NVFP4 hardware block scaling ({_NVFP4_SCALED[build.arch]}), "
                                f"found {sorted(main)}")
        return problems


def _config_parts(cfg: Any, num_warps: int, num_stages: int) -> tuple[dict, int, int, dict]:
    """(constexprs, num_warps, num_stages, options) of a triton.Config or a config dict."""
    if hasattr(cfg, "kwargs"):  # triton.Config
        options = {k: v for k in ("num_ctas", "maxnreg") if (v := getattr(cfg, k, None)) not in (None, 1)}
        return dict(cfg.kwargs), cfg.num_warps or num_warps, cfg.num_stages or num_stages, options
    d = dict(cfg)
    return d, d.pop("num_warps", num_warps), d.pop("num_stages", num_stages), {}


def recipe_usage(kernel: str) -> dict[str, list[str]]:
    """arch -> recipes whose plan on that arch runs `kernel` (refused plans excluded)."""
    usage: dict[str, list[str]] = {}
    for arch in ARCHS:
        for recipe in names(include_aliases=False):
            p = plan(recipe, arch)
            if p.support is Support.REFUSED:
                continue
            if any(g.kernel == kernel for g in p.gemms) and recipe not in usage.setdefault(arch, []):
                usage[arch].append(recipe)
    return {a: r for a, r in usage.items() if r}


def _gemm_spec(name: str, fn: Any, signature: dict, constexprs: dict, precision: Compute, family: str,
               operands: str | None, ints: dict, what: str, per_arch=None) -> KernelSpec:
    """A GEMM kernel's spec: archs and recipes from the plan, tiles from the first config of `family`."""
    from surogate.kernels.configs import get_configs

    usage = recipe_usage(name)
    recipes = tuple(r for r in names(include_aliases=False) if any(r in rs for rs in usage.values()))
    return KernelSpec(name, fn, MappingProxyType(signature), MappingProxyType(constexprs), recipes, precision,
                      archs=tuple(a for a in ARCHS if a in usage), ints=MappingProxyType(ints),
                      config=lambda arch, family=family: _first_config(get_configs(family, arch), name, arch),
                      per_arch=per_arch,
                      operands=operands, what=what)


def _first_config(configs: list, name: str, arch: str) -> Any:
    """The first (largest, the one big LLM shapes pick) of a kernel's autotune configs."""
    if not configs:
        raise ValueError(f"kernel {name!r} has no config for {arch} (get_*_configs returned none that fit)")
    return configs[0]


def _gemm_specs() -> list[KernelSpec]:
    """The forward and dgrad kernels: one spec per Triton kernel of the variant table (kernels/variants.py),
    with the modes, config family and operand types the table gives it."""
    from surogate.kernels import configs
    from surogate.kernels import lora_linear as ll
    from surogate.kernels import variants as V
    from surogate.kernels.configs import block_r

    m, n, k, r = SHAPE["M"], SHAPE["N"], SHAPE["K"], SHAPE["R"]
    unused = "*bf16"  # the launcher passes the output as a dummy pointer for unused operands
    weights = {  # W_MODE -> (w_ptr, ws_ptr, aux0, aux1, aux2) types
        V.W_BF16: ("*bf16", unused, unused, unused, unused),
        V.W_FP8_ROW: ("*fp8e4nv", "*fp32", unused, unused, unused),
        V.W_FP8_BLOCK: ("*fp8e4nv", "*fp32", unused, unused, unused),
        V.W_DEQ_FP8_BLOCK: ("*fp8e4nv", "*fp32", unused, unused, unused),
        V.W_DEQ_NVFP4: ("*u8", "*fp8e4nv", "*fp32", unused, unused),
        V.W_DEQ_NF4: ("*u8", "*fp32", "*u8", "*fp32", "*fp32"),
    }
    a_types = {V.Quantizer.NONE: "*bf16", V.Quantizer.FP8_ROW_E4M3: "*fp8e4nv", V.Quantizer.FP8_ROW_E5M2: "*fp8e5",
               V.Quantizer.FP8_BLOCK_E4M3: "*fp8e4nv"}

    def spec(v: V.Variant) -> KernelSpec:
        w, ws, aux0, aux1, aux2 = weights[v.w_mode]
        a_scale = "*fp32" if v.a_mode != V.A_BF16 else unused
        signature = dict(a_ptr=a_types[v.quantizer], as_ptr=a_scale, w_ptr=w, ws_ptr=ws, aux0_ptr=aux0,
                         aux1_ptr=aux1, aux2_ptr=aux2, h_ptr="*bf16", u_ptr="*bf16", bias_ptr="*bf16",
                         out_ptr="*bf16", lora_scale="fp32")
        # Strides of contiguous operands: forward U = lora_b (N, r); dgrad U = lora_a^T, a (K, r) view.
        w_strides = (0, 0) if v.w_mode == V.W_DEQ_NF4 else (k, 1)
        if v.gemm is V.Gemm.GRAD_INPUT and v.w_mode == V.W_FP8_BLOCK:
            ws_strides = (1, k // 128)  # the K-major copy's scales: a transposed view
        else:
            ws_strides = {V.W_FP8_ROW: (1, 0), V.W_FP8_BLOCK: (k // 128, 1), V.W_DEQ_FP8_BLOCK: (k // 128, 1),
                          V.W_DEQ_NVFP4: (k // 16, 1), V.W_DEQ_NF4: (1, 0), V.W_BF16: (n, 1)}[v.w_mode]
        # Activation scales: per row (M, 1); 1x128 blocks (M, K/128) stored M-contiguous.
        as_strides = {V.A_BF16: (n, 1), V.A_FP8_ROW: (1, 1), V.A_FP8_BLOCK: (1, m)}[v.a_mode]
        u_strides = (1, k) if v.trans_w else (r, 1)
        ints = dict(M=m, N=n, K=k, R=r, Kw=k if v.w_mode == V.W_DEQ_NF4 else 0,
                    stride_am=k, stride_ak=1, stride_asm=as_strides[0], stride_ask=as_strides[1],
                    stride_w0=w_strides[0], stride_w1=w_strides[1], stride_ws0=ws_strides[0],
                    stride_ws1=ws_strides[1], stride_hm=r, stride_hr=1, stride_un=u_strides[0],
                    stride_ur=u_strides[1], stride_om=n, stride_on=1)
        constexprs = dict(A_MODE=v.a_mode, W_MODE=v.w_mode, TRANS_W=v.trans_w, HAS_LORA=True, HAS_BIAS=False,
                          UPCAST=False, FP8_PROMOTE=False, BLOCK_R=block_r(r))
        promote = v.a_mode == V.A_FP8_ROW and configs.FP8_PROMOTE
        return _gemm_spec(v.kernel, ll._lora_gemm_kernel, signature, constexprs, v.compute, v.family, v.operands,
                          ints, v.what, per_arch=lambda arch: {"FP8_PROMOTE": promote})

    def nvfp4_spec(v: V.Variant) -> KernelSpec:
        signature = dict(a_ptr="*u8", as_ptr="*fp8e4nv", a_ts_ptr="*fp32", w_ptr="*u8", ws_ptr="*fp8e4nv",
                         w_ts_ptr="*fp32", h_ptr="*bf16", u_ptr="*bf16", bias_ptr="*bf16", out_ptr="*bf16",
                         lora_scale="fp32")
        ints = dict(M=m, N=n, K=k, R=r, stride_am=k // 2, stride_asm=k // 16, stride_wn=k // 2,
                    stride_wsn=k // 16, stride_hm=r, stride_hr=1, stride_un=r, stride_ur=1, stride_om=n,
                    stride_on=1)
        constexprs = dict(HAS_LORA=True, HAS_BIAS=False, UPCAST=False, BLOCK_R=block_r(r))
        return _gemm_spec(v.kernel, ll._lora_gemm_nvfp4_kernel, signature, constexprs, v.compute, v.family, None,
                          ints, v.what)

    first = {}  # one spec per kernel name (nvfp4 and nvfp4_cached share theirs) that a registered recipe runs
    for v in V.VARIANTS:
        if recipe_usage(v.kernel):
            first.setdefault(v.kernel, v)
    return [spec(v) if v.a_mode is not None else nvfp4_spec(v) for v in first.values()]


def persistent_specs() -> tuple[KernelSpec, ...]:
    """The persistent TMA kernel (kernels/persistent.py), one spec per variant it runs (`Variant.persistent`),
    named `Variant.persistent_kernel`, built for sm_90 (its only arch, configs._persistent_archs) with its
    family's first config and TMA on.

    Not in `specs()`: a plan names a GEMM's variant kernel and says in its rule where the persistent kernel
    takes over (`variants.PERSISTENT_SM90`: a row count), so these are a second build of the same variants.
    tests/test_kernels_persistent.py builds them (every config) and checks their SASS.
    """
    from surogate.kernels import persistent as P
    from surogate.kernels import variants as V
    from surogate.kernels.configs import block_r, get_configs

    m, n, k, r = SHAPE["M"], SHAPE["N"], SHAPE["K"], SHAPE["R"]
    a_types = {V.Quantizer.NONE: "*bf16", V.Quantizer.FP8_ROW_E4M3: "*fp8e4nv", V.Quantizer.FP8_ROW_E5M2: "*fp8e5",
               V.Quantizer.FP8_BLOCK_E4M3: "*fp8e4nv"}
    out = []
    for v in V.VARIANTS:
        if not v.persistent:
            continue
        fp8 = v.a_mode != V.A_BF16
        family = P.FAMILIES[(v.a_mode, v.w_mode)]
        signature = dict(a_ptr=a_types[v.quantizer], as_ptr="*fp32" if fp8 else "*bf16",
                         w_ptr="*fp8e4nv" if fp8 else "*bf16", ws_ptr="*fp32" if fp8 else "*bf16", h_ptr="*bf16",
                         ut_ptr="*bf16", bias_ptr="*bf16", out_ptr="*bf16")
        # Weight scales: per channel (N,); 128x128 blocks (N/128, K/128), the dgrad's K-major copy's a
        # transposed view. Activation scales: (M, 1), or 1x128 blocks stored M-contiguous. U^T (r, N)
        # contiguous: the pre-scaled copy of lora_b^T, or of lora_a (dgrad).
        dgrad = v.gemm is V.Gemm.GRAD_INPUT
        ws_strides = {V.W_BF16: (0, 0), V.W_FP8_ROW: (1, 0),
                      V.W_FP8_BLOCK: (1, k // 128) if dgrad else (k // 128, 1)}[v.w_mode]
        as_strides = {V.A_BF16: (0, 0), V.A_FP8_ROW: (1, 0), V.A_FP8_BLOCK: (1, m)}[v.a_mode]
        ints = dict(M=m, N=n, K=k, R=r, stride_am=k, stride_asm=as_strides[0], stride_ask=as_strides[1],
                    stride_w0=n if v.trans_w else k, stride_ws0=ws_strides[0], stride_ws1=ws_strides[1],
                    stride_hm=r, stride_ut=n, stride_om=n)
        constexprs = dict(A_MODE=v.a_mode, W_MODE=v.w_mode, TRANS_W=v.trans_w, HAS_LORA=True, HAS_BIAS=False,
                          TMA=True, UPCAST=False, BLOCK_R=block_r(r), NUM_SMS=132)
        usage = recipe_usage(v.kernel).get("sm_90", [])
        out.append(KernelSpec(
            v.persistent_kernel, P._persistent_lora_gemm_kernel, MappingProxyType(signature),
            MappingProxyType(constexprs), tuple(usage), v.compute, archs=("sm_90",),
            ints=MappingProxyType(ints),
            config=lambda arch, family=family, name=v.persistent_kernel: _first_config(get_configs(family, arch), name,
                                                                                      arch),
            operands=v.operands, what=f"persistent TMA: {v.what}"))
    return tuple(out)


def _grouped_specs() -> list[KernelSpec]:
    """The MoE grouped kernels (kernels/grouped.py): bf16 MMAs on every arch, and block-scaled FP8 MMAs
    for fp8_block experts under an FP8 recipe.

    `_grouped_lora_gemm_kernel` once per kernel of the variant table's row that the grouped launcher
    runs (`variants.grouped_variant(gemm, compute, fmt)`: bf16 compute for every format but fp8_row, fp8
    compute for fp8_block; forward and dgrad, LoRA epilogue on), named `grouped_<dense kernel>`, its
    recipes those whose experts' format and grouped compute (`variants.grouped_compute` of the recipe's
    forward / grad_input) it runs; the same kernel without LoRA as the LoRA factor GEMMs run it (the
    bf16 factor as the weight, N = r); and `_grouped_wgrad_kernel` (the factors' gradients). Pointer
    types and strides are the launchers' for the stacked weight lists of `quantize_grouped_weight_ref`.
    The kernels that read x also come gathered (`GATHER`, x read through the int32 `rows` index, named
    `..._gather`): the forward GEMMs, `grouped_lora_hidden` and the wgrad of grad_lora_a. Without a
    gather the launchers pass `offsets` as the unused `rows_ptr`, so its type is `*i32` either way.
    """
    import triton

    from surogate.kernels import grouped as G
    from surogate.kernels import variants as V
    from surogate.kernels.configs import block_r, get_configs
    from surogate.ops.experts import experts_weight_format
    from surogate.recipes import WeightFormat, get

    t, e, n_w, k_w, r = (GROUPED_SHAPE[x] for x in ("T", "E", "N", "K", "R"))
    every = tuple(names(include_aliases=False))
    unused = "*bf16"  # the launcher passes the output as a dummy pointer for unused operands
    # W_MODE -> types of (w, ws, aux0, aux1, aux2) and strides (dim 0 is the expert; a missing tensor's are 0)
    # of w (e, 0, 1), ws (e, 0, 1) and aux0..2 (e) for a stack of E (n_w, k_w) weights.
    layouts = {
        V.W_BF16: (("*bf16", unused, unused, unused, unused), (n_w * k_w, k_w, 1), (0, 0, 0), (0, 0, 0)),
        V.W_DEQ_FP8_BLOCK: (("*fp8e4nv", "*fp32", unused, unused, unused), (n_w * k_w, k_w, 1),
                            (n_w * k_w // 128 ** 2, k_w // 128, 1), (0, 0, 0)),
        # FP8 MMA: the forward reads the stack as stored; the dgrad its K-major copy (grouped._k_major_fp8_block:
        # (K, E*N) bytes, expert e at column e*N) and the scales as an (E, K/128, N/128) view, or (`_stored`,
        # grouped.FP8_DGRAD_READS_STORED_STACK) the stack as stored with TRANS_W.
        V.W_FP8_BLOCK: (("*fp8e4nv", "*fp32", unused, unused, unused), (n_w * k_w, k_w, 1),
                        (n_w * k_w // 128 ** 2, k_w // 128, 1), (0, 0, 0)),
        V.W_DEQ_NVFP4: (("*u8", "*fp8e4nv", "*fp32", unused, unused), (n_w * k_w // 2, k_w // 2, 1),
                        (n_w * k_w // 16, k_w // 16, 1), (1, 0, 0)),
        # packed flat per expert; ws = the absmax code table (E, 256); aux = absmax_q, absmax_scale, absmax_offset
        # (the last two one value per 256 absmax codes)
        V.W_DEQ_NF4: (("*u8", "*fp32", "*u8", "*fp32", "*fp32"), (n_w * k_w // 2, 0, 0), (256, 1, 0),
                      (n_w * k_w // 64, n_w * k_w // 64 // 256, n_w * k_w // 64 // 256)),
    }

    def runs_on(recipes: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(a for a in ARCHS if any(plan(x, a).support is not Support.REFUSED for x in recipes))

    def gemm(name, w_mode, trans_w, has_lora, family, recipes, what, backward=None, w_strides=None,
             gather=False, a_mode=V.A_BF16, precision=Compute.BF16, operands="BF16") -> KernelSpec:
        types, w_st, ws_st, aux_st = layouts[w_mode]
        w_st = w_strides or w_st
        backward = trans_w if backward is None else backward
        m, n, k = (t, k_w, n_w) if backward else (t, n_w, k_w)  # backward: a = g (T, N), reduction over N
        fp8 = a_mode == V.A_FP8_BLOCK
        if fp8 and backward and not trans_w:  # the K-major copy of the stack and its transposed scales
            w_st, ws_st = (n_w, e * n_w, 1), (ws_st[0], 1, k_w // 128)
        if not has_lora:  # a LoRA factor GEMM: a bf16 factor as the weight, out (T, r)
            n = r
        # U of the epilogue: forward lora_b (E, N, r); dgrad lora_a^T, a (E, K, r) view of (E, r, K).
        u_st = ((r * k_w, 1, k_w) if backward else (n_w * r, r, 1)) if has_lora else (0, 0, 0)
        # FP8 A: E4M3 with 1x128 block scales stored row-contiguous, (rows, K/128) with strides (1, rows).
        signature = {"a_ptr": "*fp8e4nv" if fp8 else "*bf16", "as_ptr": "*fp32" if fp8 else unused,
                     "rows_ptr": "*i32", "offsets_ptr": "*i32", "w_ptr": types[0], "ws_ptr": types[1],
                     "aux0_ptr": types[2], "aux1_ptr": types[3], "aux2_ptr": types[4], "h_ptr": "*bf16",
                     "u_ptr": "*bf16", "out_ptr": "*bf16"}
        ints = {"M": m, "N": n, "K": k, "R": r if has_lora else 0, "E": e,
                "Kw": k_w if w_mode == V.W_DEQ_NF4 else 0, "stride_am": k, "stride_ak": 1,
                "stride_asm": 1 if fp8 else 0, "stride_ask": m if fp8 else 0,
                "stride_we": w_st[0], "stride_w0": w_st[1], "stride_w1": w_st[2],
                "stride_wse": ws_st[0], "stride_ws0": ws_st[1], "stride_ws1": ws_st[2],
                "stride_aux0e": aux_st[0], "stride_aux1e": aux_st[1], "stride_aux2e": aux_st[2],
                # without LoRA the launcher passes the output as H: its row stride, no column stride
                "stride_hm": r if has_lora else n, "stride_hr": 1 if has_lora else 0,
                "stride_ue": u_st[0], "stride_un": u_st[1], "stride_ur": u_st[2], "stride_om": n, "stride_on": 1}
        constexprs = {"A_MODE": a_mode, "W_MODE": w_mode, "TRANS_W": trans_w, "HAS_LORA": has_lora, "GATHER": gather,
                      "UPCAST": False, "BLOCK_R": block_r(r if has_lora else 0), "BLOCK_E": triton.next_power_of_2(e)}
        return KernelSpec(name, G._grouped_lora_gemm_kernel, MappingProxyType(signature),
                          MappingProxyType(constexprs), recipes, precision, archs=runs_on(recipes),
                          ints=MappingProxyType(ints),
                          config=lambda arch: _first_config(get_configs(family, arch), name, arch),
                          operands=operands, what=what, grouped=True)

    def experts_compute(recipe: str, g: V.Gemm) -> Compute:
        """The compute the grouped op runs `recipe`'s experts with, for the forward or the dgrad."""
        rec = get(recipe)
        return V.grouped_compute(rec.forward if g is V.Gemm.OUTPUT else rec.grad_input, experts_weight_format(rec))

    specs: dict[str, KernelSpec] = {}
    for g in (V.Gemm.OUTPUT, V.Gemm.GRAD_INPUT):
        formats: dict[str, list[WeightFormat]] = {}  # kernel -> the formats it runs (nvfp4 and nvfp4_cached share)
        variants: dict[str, V.Variant] = {}
        for compute in (Compute.BF16, Compute.FP8):
            for fmt in WeightFormat:
                try:
                    v = V.grouped_variant(g, compute, fmt)  # what kernels/grouped.py runs for this pair
                except ValueError:
                    continue  # refused by the grouped op (fp8_row; fp8 compute on another format)
                variants.setdefault(v.kernel, v)
                formats.setdefault(v.kernel, []).append(fmt)
        for kernel, v in variants.items():
            recipes = tuple(x for x in every if experts_weight_format(x) in formats[kernel]
                            and experts_compute(x, g) is v.compute)
            if recipes:
                name = f"grouped_{kernel}"
                kw = {"a_mode": v.a_mode, "precision": v.compute, "operands": v.operands}
                specs[name] = gemm(name, v.w_mode, v.trans_w, True, v.family, recipes,
                                   f"MoE experts, {v.what}", backward=g is V.Gemm.GRAD_INPUT, **kw)
                if g is V.Gemm.GRAD_INPUT and v.a_mode == V.A_FP8_BLOCK:  # the stored stack read transposed
                    specs[f"{name}_stored"] = gemm(f"{name}_stored", v.w_mode, True, True, v.family, recipes,
                                                   f"MoE experts, {v.what}, the stored stack read transposed "
                                                   "(FP8_DGRAD_READS_STORED_STACK)", backward=True, **kw)
                if g is V.Gemm.OUTPUT:  # x read through the rows index (the dgrad reads g, per grouped row)
                    specs[f"{name}_gather"] = gemm(f"{name}_gather", v.w_mode, v.trans_w, True, v.family, recipes,
                                                   f"MoE experts, {v.what}, x gathered by rows", gather=True, **kw)
    # The LoRA factor GEMMs (no epilogue): A (E, r, K) as stored; B^T, an (E, r, N) view of (E, N, r).
    for gather in (False, True):
        name = "grouped_lora_hidden" + ("_gather" if gather else "")
        specs[name] = gemm(
            name, V.W_BF16, False, False, "bf16", every,
            "MoE experts: hidden = x @ A_e^T (no LoRA epilogue, N = r)" + (", x gathered by rows" if gather else ""),
            w_strides=(r * k_w, k_w, 1), gather=gather)
    specs["grouped_lora_grad_hidden"] = gemm(
        "grouped_lora_grad_hidden", V.W_BF16, False, False, "bf16", every,
        "MoE experts: gh = g @ B_e over B^T, a strided view (no LoRA epilogue, N = r)", backward=True,
        w_strides=(n_w * r, 1, r))
    def wgrad(name, i, j, gather, what) -> KernelSpec:
        """P (T, I), Q (T, J) contiguous, out (E, I, J) FP32."""
        return KernelSpec(
            name, G._grouped_wgrad_kernel,
            MappingProxyType({"p_ptr": "*bf16", "q_ptr": "*bf16", "rows_ptr": "*i32", "offsets_ptr": "*i32",
                              "out_ptr": "*fp32", "scale": "fp32"}),
            MappingProxyType({"GATHER": gather, "UPCAST": False}), every, Compute.BF16, archs=runs_on(every),
            ints=MappingProxyType({"I": i, "J": j, "stride_pt": i, "stride_pi": 1, "stride_qt": j, "stride_qj": 1,
                                   "stride_oe": i * j, "stride_oi": j, "stride_oj": 1}),
            config=lambda arch: dict(G._WGRAD_BLOCKS), operands="BF16", grouped=True, what=what)

    # grad_lora_b[e] = s g_e^T hidden_e: P = g (T, N), Q = hidden (T, r), out (E, N, r).
    specs["grouped_grad_lora"] = wgrad(
        "grouped_grad_lora", n_w, r, False,
        "MoE experts: LoRA factor gradients, one program per (expert, output tile) over its tokens")
    # grad_lora_a[e] = s gh_e^T x_e with x read through rows: P = gh (T, r), Q = the tokens (., K), out (E, r, K).
    specs["grouped_grad_lora_gather"] = wgrad(
        "grouped_grad_lora_gather", r, k_w, True,
        "MoE experts: grad_lora_a = s gh_e^T x_e, x gathered by rows, one program per (expert, output tile)")
    return list(specs.values())


def _quantizer_specs() -> list[KernelSpec]:
    """Quantize / dequantize kernels and the other elementwise ones: no MMA; built for every arch."""
    from surogate.kernels import dequantize as dq
    from surogate.kernels import lora_factors as lf
    from surogate.kernels import quantize as q
    from surogate.kernels import swiglu as sw
    from surogate.kernels import transpose as tr

    k, m, r = SHAPE["K"], SHAPE["M"], SHAPE["R"]

    def spec(name, fn, signature, constexprs, ints, config, recipes, what):
        return KernelSpec(name, fn, MappingProxyType(signature), MappingProxyType(constexprs), recipes, None,
                          ints=MappingProxyType(ints), config=config, what=what)

    e4m3 = q.fp8_constexprs("e4m3")
    specs = [
        spec("amax", q._amax_kernel, dict(x_ptr="*bf16", partial_ptr="*fp32"), {}, dict(n=m * k),
             q.get_amax_configs, ("fp4", "qfp4"), "max |x| of a tensor (NVFP4 tensor scales)"),
        spec("amax_finish", q._amax_finish_kernel, dict(partial_ptr="*fp32", amax_ptr="*fp32", scale_ptr="*fp32"),
             dict(FMT_MAX=448.0, BLOCK=1024), dict(n_partial=m * k // 8192), lambda arch: dict(num_warps=4),
             ("fp4", "qfp4"), "max of the amax partials and its scale, on the GPU (no host sync)"),
        spec("quantize_fp8_rowwise", q._quantize_fp8_rowwise_kernel,
             dict(x_ptr="*bf16", q_ptr="*u8", scale_ptr="*fp32", amax_ptr="*fp32"), dict(e4m3, POW2=False),
             dict(M=m, K=k, stride_xm=k, stride_qm=k), lambda arch: q.get_quantize_fp8_rowwise_configs(arch, k),
             ("fp8",), "activations to E4M3, one scale per row"),
        spec("quantize_fp8_tensorwise", q._quantize_fp8_tensorwise_kernel,
             dict(x_ptr="*bf16", q_ptr="*u8", scale_ptr="*fp32"), e4m3, dict(n=m * k),
             q.get_quantize_fp8_tensorwise_configs, (), "E4M3 with one tensor scale (formats API; no recipe runs it)"),
        spec("quantize_fp8_block", q._quantize_fp8_block_kernel,
             dict(x_ptr="*bf16", q_ptr="*u8", scale_ptr="*fp32"), dict(e4m3, POW2=False, FAST=True),
             dict(M=m, K=k, stride_xm=k, stride_qm=k, stride_sm=1, stride_sk=m),
             lambda arch: q.get_quantize_fp8_block_configs(arch, (1, 128)), ("qfp8",),
             "activations and gradients to E4M3, 1x128 block scales (stored M-contiguous)"),
        spec("quantize_nvfp4", q._quantize_nvfp4_kernel,
             dict(x_ptr="*bf16", packed_ptr="*u8", bscale_ptr="*u8", tscale_ptr="*fp32"), dict(STOCHASTIC=True),
             dict(seed=12345, M=m, K=k, stride_xm=k, stride_pm=k // 2, stride_bm=k // 16),
             lambda arch: q.get_quantize_nvfp4_configs(arch, k), ("fp4", "qfp4"),
             "to NVFP4 with stochastic rounding (gradients)"),
        spec("dequantize_nf4", dq._dequantize_nf4_kernel,
             dict(packed_ptr="*u8", absmax_ptr="*fp32", absmax_q_ptr="*u8", absmax_code_ptr="*fp32",
                  absmax_scale_ptr="*fp32", absmax_offset_ptr="*fp32", nf4_ptr="*fp32", out_ptr="*i32"),
             dict(BLOCKSIZE=64, DQ_BLOCK=256, DOUBLE_QUANT=True, ROUND_BF16=True, INTERPRET=False),
             dict(n=m * k, n_bytes=m * k // 2), dq.get_dequantize_nf4_configs, ("qnf4",),
             "NF4 (double-quantized) to bf16"),
        spec("dequantize_nvfp4", dq._dequantize_nvfp4_kernel,
             dict(packed_ptr="*u8", bscale_ptr="*u8", tscale_ptr="*fp32", out_ptr="*bf16"), dict(ROUND_BF16=True),
             dict(M=m, K=k, stride_pm=k // 2, stride_bm=k // 16, stride_om=k),
             lambda arch: dq.get_dequantize_nvfp4_configs(arch, k), ("fp4", "qfp4"), "NVFP4 to bf16"),
        spec("dequantize_fp8_block", dq._dequantize_fp8_block_kernel,
             dict(q_ptr="*fp8e4nv", scale_ptr="*fp32", out_ptr="*bf16"), dict(BM=128, BK=128),
             dict(M=m, K=k, stride_qm=k, stride_sm=k // 128, stride_om=k), dq.get_dequantize_fp8_block_configs,
             ("qfp8", "qfp8-bf16"), "block FP8 to bf16"),
        spec("transpose_bytes", tr._transpose_bytes_kernel, dict(x_ptr="*u8", y_ptr="*u8"), {},
             dict(R=m, C=k, stride_xr=k, stride_yr=m), tr.get_transpose_bytes_configs, ("qfp8",),
             "K-major copy of a block-FP8 weight for the dgrad"),
        spec("lora_factors", lf._lora_factors_kernel,
             {"a_ptr": "*fp32", "b_ptr": "*fp32", "a_out_ptr": "*bf16", "b_out_ptr": "*bf16", "ut_ptr": "*bf16",
              "up_t_scale": "fp32"}, {"WRITE_UT": True},
             {"R": r, "K": k, "N": SHAPE["N"], "stride_a0": k, "stride_a1": 1, "stride_b0": r, "stride_b1": 1},
             lambda arch: lf.get_lora_factors_configs(r), tuple(names(include_aliases=False)),
             "FP32 LoRA factors to bf16 and the persistent kernel's U^T, one launch per forward"),
    ]
    for gelu, name, mlp in ((False, "swiglu", "SwiGLU"), (True, "geglu", "GeGLU (tanh GELU, Gemma)")):
        specs += [
            spec(f"{name}_backward", sw._swiglu_backward_kernel,
                 dict(dh_ptr="*bf16", gu_ptr="*bf16", d_ptr="*bf16", q_ptr="*u8", scale_ptr="*fp32"),
                 dict(e4m3, QUANTIZE=True, GELU=gelu, INTERPRET=False),
                 dict(M=m, INTER=3 * k, stride_dh=3 * k, stride_gu=6 * k, stride_d=6 * k, stride_qm=6 * k,
                      stride_sm=1, stride_sk=m), sw.get_swiglu_backward_configs, ("qfp8",),
                 f"{mlp}'s backward over the fused gate/up output and its gradient to E4M3 in 1x128 blocks, one pass"),
            spec(f"{name}_forward", sw._swiglu_forward_kernel,
                 dict(gu_ptr="*bf16", h_ptr="*bf16", q_ptr="*u8", scale_ptr="*fp32"),
                 dict(e4m3, QUANTIZE=True, GELU=gelu, INTERPRET=False),
                 dict(M=m, INTER=3 * k, stride_gu=6 * k, stride_h=3 * k, stride_qm=3 * k, stride_sm=1, stride_sk=m),
                 sw.get_swiglu_backward_configs, ("qfp8",),
                 f"{mlp} over the fused gate/up output and h to E4M3 in 1x128 blocks, one pass (swiglu.FORWARD_OP)"),
        ]
    return specs


def _lora_branch_specs() -> list[KernelSpec]:
    """LoRA A's gradient from the FP8 copy of the input (save_fp8_inputs): bf16 MMA, the 128 columns of a tile as
    its M side (wgmma on sm_90). Qwen3-8B's down_proj input (K = 12288) at M = 4096, r = 16, 1 x 128 scales.
    The LoRA term added into a cuBLAS GEMM's output (qfp8's block-scaled GEMMs on sm_90; the other cuBLAS routes):
    Qwen3-8B's gate/up output (N = 6K), r = 16, one bf16 MMA step."""
    from surogate.kernels import grad_lora_fp8 as g
    from surogate.kernels import lora_add as la

    m, k, r = SHAPE["M"], 3 * SHAPE["K"], SHAPE["R"]
    return [KernelSpec("grad_lora_a_fp8", g._grad_lora_a_fp8_kernel,
                       MappingProxyType(dict(gh_ptr="*bf16", x_ptr="*fp8e4nv", s_ptr="*fp32", out_ptr="*fp32")),
                       MappingProxyType(dict(BLOCK_SCALES=True, BLOCK_M=g.DEFAULT.block_m, BLOCK_K=g.BLOCK_K,
                                             BLOCK_R=r, UPCAST=False)),
                       ("fp8", "qfp8"), Compute.BF16, lora_branch=True,
                       ints=MappingProxyType(dict(M=m, K=k, R=r, rows_per_split=m // g.splits_for(m, k),
                                                  stride_gm=r, stride_gr=1, stride_xm=k, stride_xk=1, stride_sm=1,
                                                  stride_sg=m, stride_os=r * k, stride_or=k, stride_ok=1)),
                       config=lambda arch: dict(num_warps=g.DEFAULT.num_warps, num_stages=g.DEFAULT.num_stages),
                       what="LoRA A's gradient read from the input's FP8 copy, dequantized in the loads"),
            KernelSpec("lora_add", la._lora_add_kernel,
                       MappingProxyType(dict(out_ptr="*bf16", h_ptr="*bf16", u_ptr="*bf16", bias_ptr="*bf16",
                                             scale="fp32")),
                       MappingProxyType(dict(HAS_LORA=True, HAS_BIAS=False, INTERPRET=False,
                                             BLOCK_M=la.DEFAULT.block_m, BLOCK_N=la.DEFAULT.block_n,
                                             BLOCK_R=la.block_r(r))),
                       ("bf16", "fp8", "qfp8"), Compute.BF16, lora_branch=True, streaming=True,
                       ints=MappingProxyType(dict(M=m, N=6 * SHAPE["K"], R=r, stride_om=6 * SHAPE["K"], stride_hm=r,
                                                  stride_hr=1, stride_un=r, stride_ur=1)),
                       config=lambda arch: dict(num_warps=la.DEFAULT.num_warps, num_stages=1),
                       what="the LoRA term added into a cuBLAS GEMM's output in place, one pass")]


def _loss_specs() -> list[KernelSpec]:
    """The LM-head cross-entropy (ops/loss.py): no MMA; every recipe's training step runs it. Qwen3's
    vocabulary, bf16 logits; Gemma's with the softcap."""
    from surogate.kernels import cross_entropy as ce

    def spec(name, vocab, softcap, what):
        return KernelSpec(name, ce._cross_entropy_kernel,
                          MappingProxyType(dict(logits_ptr="*bf16", labels_ptr="*i64", grad_scale_ptr="*fp32",
                                                loss_ptr="*fp32", lse_ptr="*fp32", softcap="fp32",
                                                inv_softcap="fp32")),
                          MappingProxyType(dict(IGNORE_INDEX=ce.IGNORE_INDEX, HAS_SOFTCAP=softcap, WRITE_GRAD=True,
                                                ROUND_BF16=True)),
                          tuple(names(include_aliases=False)), None,
                          ints=MappingProxyType(dict(V=vocab, stride_row=vocab)),
                          config=lambda arch: ce.get_cross_entropy_configs(arch, vocab), what=what)

    return [spec("cross_entropy", 151936, False, "LM-head loss per row, its gradient written over the logits"),
            spec("cross_entropy_softcap", 262144, True, "the same with Gemma's logit softcap")]


# The modules whose `_*_kernel` functions must all be in the catalog (tests check it).
KERNEL_MODULES = ("surogate.kernels.lora_linear", "surogate.kernels.quantize", "surogate.kernels.dequantize",
                  "surogate.kernels.transpose", "surogate.kernels.grouped", "surogate.kernels.cross_entropy",
                  "surogate.kernels.lora_factors", "surogate.kernels.swiglu", "surogate.kernels.grad_lora_fp8",
                  "surogate.kernels.lora_add")


def _check_unique(specs: list[KernelSpec]) -> list[KernelSpec]:
    seen: set[str] = set()
    for s in specs:
        if s.name in seen:
            raise ValueError(f"kernel {s.name!r} is in the catalog twice; kernel names must be unique")
        seen.add(s.name)
    return specs


@functools.lru_cache(maxsize=1)
def specs() -> tuple[KernelSpec, ...]:
    """Every kernel in the catalog (imports the kernel modules on first call)."""
    return tuple(_check_unique(_gemm_specs() + _grouped_specs() + _quantizer_specs() + _lora_branch_specs()
                               + _loss_specs()))


def get(name: str) -> KernelSpec:
    """The spec called `name`; unknown names list the known ones."""
    for s in specs():
        if s.name == name:
            return s
    raise KeyError(f"no kernel {name!r} in the catalog; known: {', '.join(s.name for s in specs())}")
