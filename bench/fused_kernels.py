"""Fused LoRA-linear kernels vs cuBLAS: TFLOP/s per Qwen3 linear shape at M=4096 tokens.

For every recipe native on this GPU, forward (`lora_linear_cuda`) and backward
(`lora_linear_backward_cuda`: dgrad + LoRA grads) beside
  - bf16 `torch.matmul` + PEFT-style LoRA (three matmuls; backward: dgrad + the LoRA GEMMs),
  - `torch._scaled_mm` rowwise FP8 (the GEMM alone, operands pre-quantized),
and the fused FP8 GEMM alone on the same pre-quantized operands (`gemm_only`).
`validate()` runs before `bench()`; results go to bench/results/kernels.{json,md}.

`--persistent` instead measures the persistent TMA kernel (kernels/persistent.py) against cuBLAS alone and
the current route, forward and dgrad, per recipe (bf16, fp8, qfp8) and M (`--m`); `validate_persistent()`
runs first; results go to bench/results/kernels_persistent.{json,md}.

    python bench/fused_kernels.py [--models 0.6B,8B] [--recipes bf16,fp8,...] [--m 4096] [--out bench/results]
    python bench/fused_kernels.py --persistent --models 8B --m 4096,16384 [--recipes bf16,fp8,qfp8]
                                  [--warp-specialize]   (every specialized config offered: a Triton's trial;
                                                         results to kernels_persistent_ws.{json,md})
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from surogate.kernels import configs, cublas, launch, variants  # noqa: E402
from surogate.kernels import quantize as q  # noqa: E402
from surogate.kernels.lora_linear import lora_linear_fp8  # noqa: E402
from surogate.kernels.variants import variant  # noqa: E402
from surogate.recipes import Compute, WeightFormat, get, current_arch  # noqa: E402
from surogate.kernels.plan import native_recipes  # noqa: E402
from surogate.training.info import git_commit  # noqa: E402

MODELS = {  # hidden, intermediate, q heads, kv heads (head dim 128)
    "0.6B": (1024, 3072, 16, 8),
    "8B": (4096, 12288, 32, 8),
}
M_TOKENS = 4096
RANK = 16
DEVICE = "cuda"
REP_MS = 60  # do_bench_cudagraph's rep: it replays the captured graph 10 times, so ~10 x REP_MS per timing
SCALE = 2.0  # alpha 32 / r 16


def linear_shapes(model: str) -> dict[str, tuple[int, int]]:
    """(N, K) of each LoRA-targeted linear of a Qwen3 layer (k and v share a shape)."""
    h, i, qh, kvh = MODELS[model]
    return {"q": (qh * 128, h), "kv": (kvh * 128, h), "o": (h, qh * 128), "gate_up": (i, h), "down": (h, i)}


def sqnr(y: torch.Tensor, ref: torch.Tensor) -> float:
    err = (y.float() - ref.float()).pow(2).sum().clamp_min(1e-30)
    return float(10 * torch.log10(ref.float().pow(2).sum() / err))


def make_case(n: int, k: int, recipe: str, seed: int = 0, m: int | None = None) -> dict:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    dev = DEVICE
    m = m or M_TOKENS
    x = torch.randn(m, k, device=dev, generator=g).bfloat16()
    w = (torch.randn(n, k, device=dev, generator=g) / k ** 0.5).bfloat16()
    a = torch.randn(RANK, k, device=dev, generator=g) / k ** 0.5
    b = torch.randn(n, RANK, device=dev, generator=g) * 0.1
    go = torch.randn(m, n, device=dev, generator=g).bfloat16()
    r = get(recipe)
    wl = q.quantize_weight(w, r.weight_format.value)
    return dict(x=x, w=w, a=a, b=b, go=go, wl=wl, fmt=r.weight_format.value, fwd=r.forward.value,
                dg=r.grad_input.value)


def _forward(c):
    return launch.lora_linear_cuda(c["x"], c["wl"], c["fmt"], c["a"], c["b"], None, None, SCALE, c["fwd"], c["dg"])


def _backward(c, hidden):
    return launch.lora_linear_backward_cuda(c["go"], c["x"], c["wl"], c["fmt"], c["a"], c["b"], None, hidden,
                                            SCALE, c["dg"])


def _peft_forward(c):
    x, w, a, b = c["x"], c["w"], c["a"].bfloat16(), c["b"].bfloat16()
    return x @ w.t() + ((x @ a.t()) @ b.t()) * SCALE


def _peft_backward(c, hidden):
    g, x, w, a, b = c["go"], c["x"], c["w"], c["a"].bfloat16(), c["b"].bfloat16()
    gh = g @ b
    dx = g @ w + (gh * SCALE) @ a
    return dx, (gh.t() @ x) * SCALE, (g.t() @ hidden) * SCALE


def validate(cases: dict) -> dict:
    """Each fused kernel against the same math in fp32 on the dequantized weight; SQNR in dB."""
    out = {}
    for key, c in cases.items():
        from surogate.kernels import reference as ref  # the plain-torch twins

        y, h = _forward(c)
        y_ref, h_ref = ref.lora_linear_ref(c["x"], c["wl"], c["fmt"], c["a"], c["b"], None, None, SCALE,
                                           c["fwd"], c["dg"])
        gi, ga, gb, _ = _backward(c, h)
        gi_r, ga_r, gb_r, _ = ref.lora_linear_backward_ref(c["go"], c["x"], c["wl"], c["fmt"], c["a"], c["b"], None,
                                                           h_ref, SCALE, c["dg"])
        out[key] = dict(output=sqnr(y, y_ref), grad_input=sqnr(gi, gi_r), grad_lora_a=sqnr(ga, ga_r),
                        grad_lora_b=sqnr(gb, gb_r))
        if not all(v > 20 for v in out[key].values()):
            print(f"VALIDATION FAILED {key}: {out[key]}", flush=True)
    return out


def promote_accuracy() -> dict:
    """SQNR (dB) vs the FP32 reference of the FP8 GEMM with and without per-K-step FP32 promotion."""
    from surogate.kernels import reference as ref

    out = {}
    for k in (4096, 12288):
        c = make_case(1024, k, "fp8", seed=2)
        y_ref, _ = ref.lora_linear_ref(c["x"], c["wl"], "fp8_row", None, None, None, None, 1.0, "fp8", "fp8")
        for flag in (False, True):
            configs.FP8_PROMOTE = flag
            y, _ = launch.lora_linear_cuda(c["x"], c["wl"], "fp8_row", None, None, None, None, 1.0, "fp8", "fp8")
            out[f"K={k} promote={flag}"] = sqnr(y, y_ref)
        configs.FP8_PROMOTE = False
        y_bf16 = c["x"].float() @ c["w"].float().t()  # the FP8 quantization noise itself, for scale
        out[f"K={k} fp8 vs bf16 math"] = sqnr(y_ref, y_bf16)
    return out


def _time(fn) -> float:
    """Median GPU time (ms) of `fn` replayed from a CUDA graph: launch overhead out, as in a
    compiled training step. `fn` runs once first so autotuning happens outside the capture."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=REP_MS, return_mode="median")


def _time_eager(fn) -> float:
    """Median time (ms) with launches from Python each call (host overhead included)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def bench(models: list[str], recipes: list[str]) -> list[dict]:
    rows = []
    fp8_row = variant("output", "fp8", "fp8_row")
    for model in models:
        for lin, (n, k) in linear_shapes(model).items():
            flops = 2.0 * M_TOKENS * n * k
            base = make_case(n, k, "bf16")
            _, hb = _forward(base)
            t_peft_f = _time(lambda: _peft_forward(base))
            t_peft_b = _time(lambda: _peft_backward(base, hb))
            # torch._scaled_mm rowwise: the GEMM alone on pre-quantized operands.
            xq, xs, _ = q.quantize_fp8_rowwise(base["x"], "e4m3")
            w8 = q.quantize_weight(base["w"], "fp8_row")
            t_smm = _time(lambda: torch._scaled_mm(xq, w8[0].t(), scale_a=xs, scale_b=w8[1].view(1, -1),
                                                   out_dtype=torch.bfloat16))
            t_gemm_fp8 = _time(lambda: lora_linear_fp8(fp8_row, (xq, xs), w8, k, None, None, None, 0.0))
            promote = {}
            for flag in (False, True):  # FP8_PROMOTE's two sides, measured (configs.FP8_PROMOTE)
                configs.FP8_PROMOTE = flag
                promote[str(flag)] = _time(lambda: lora_linear_fp8(fp8_row, (xq, xs), w8, k, None, None, None, 0.0))
            configs.FP8_PROMOTE = False
            t_peft_f_eager = _time_eager(lambda: _peft_forward(base))
            t_fused_f_eager = _time_eager(lambda: _forward(base))
            row = dict(model=model, linear=lin, M=M_TOKENS, N=n, K=k, peft_fwd_ms=t_peft_f, peft_bwd_ms=t_peft_b,
                       scaled_mm_ms=t_smm, fused_fp8_gemm_only_ms=t_gemm_fp8, fp8_promote_ms=promote,
                       eager_peft_fwd_ms=t_peft_f_eager, eager_bf16_fwd_ms=t_fused_f_eager, recipes={})
            for recipe in recipes:
                c = base if recipe == "bf16" else make_case(n, k, recipe)
                _, h = _forward(c)
                tf = _time(lambda: _forward(c))
                tb = _time(lambda: _backward(c, h))
                row["recipes"][recipe] = dict(fwd_ms=tf, bwd_ms=tb, fwd_tflops=flops / tf / 1e9,
                                              bwd_tflops=(flops + 2 * flops * RANK / n) / tb / 1e9,
                                              fwd_vs_peft=t_peft_f / tf, bwd_vs_peft=t_peft_b / tb)
                del c
            rows.append(row)
            print(_row_text(row), flush=True)
    return rows


def _row_text(row: dict) -> str:
    parts = [f"{row['model']:>4} {row['linear']:<7} N={row['N']:<5} K={row['K']:<5}",
             f"peft f/b {row['peft_fwd_ms']:.3f}/{row['peft_bwd_ms']:.3f} ms",
             f"scaled_mm {row['scaled_mm_ms']:.3f} fp8gemm {row['fused_fp8_gemm_only_ms']:.3f} "
             f"promote off/on {row['fp8_promote_ms']['False']:.3f}/{row['fp8_promote_ms']['True']:.3f} "
             f"eager peft/bf16 {row['eager_peft_fwd_ms']:.3f}/{row['eager_bf16_fwd_ms']:.3f}"]
    for r, v in row["recipes"].items():
        parts.append(f"{r}: {v['fwd_ms']:.3f}/{v['bwd_ms']:.3f} ({v['fwd_vs_peft']:.2f}x/{v['bwd_vs_peft']:.2f}x)")
    return " | ".join(parts)


# ------------------------------------------------------------------ the persistent TMA kernel (--persistent)

PERSISTENT_RECIPES = ("bf16", "fp8", "qfp8")
# (M, N, K) of the validation cases: M = 1008 a multiple of no tile (64, 128, 256); N and K of the second no
# multiple of 128. All multiples of 16, as the benchmarked shapes: the dgrad's reduction is N and TMA reads
# FP8 rows in 16-byte steps (`variants.persistent_takes`), and Triton then specializes every integer
# argument as the benchmark's (no second compile of each config). M % 16 != 0: tests/gpu/test_persistent_gpu.py.
PERSISTENT_VALIDATE = ((1008, 1024, 2048), (1008, 1008, 1040))


def offer_warp_specialized_configs() -> None:
    """Put every warp-specialized config in the persistent families, the probes kept out of them included, so
    that the tuner and the validation meet them: the trial of a Triton whose specialized builds were never
    checked on a GPU (`compat.warp_specialize_checked`), e.g. a newer one than the machine's own."""
    configs.PERSISTENT_WARP_SPECIALIZE = True
    for family in ("persistent_bf16", "persistent_fp8", "persistent_fp8_block"):
        own = configs.FAMILIES[family]
        configs.FAMILIES[family] = lambda arch, own=own, family=family: [*own(arch),
                                                                         *configs.persistent_probe_configs(family)]


@contextlib.contextmanager
def engine(name: str):
    """Route the op's GEMMs as `name` says: "current" (the routes without the persistent kernel: cuBLAS + LoRA
    addmm for bf16 with K >= 4096 and for qfp8, the Triton kernel for fp8), "triton" (`_lora_gemm_kernel`
    everywhere), "persistent" (the persistent kernel for every variant it runs, `variants.PERSISTENT_SM90 =
    True`; the default routes it for bf16 and fp8 only)."""
    before = variants.PERSISTENT_SM90, configs.FORCE_TRITON_GEMMS
    variants.PERSISTENT_SM90 = name == "persistent"
    configs.FORCE_TRITON_GEMMS = name == "triton"
    try:
        yield
    finally:
        variants.PERSISTENT_SM90, configs.FORCE_TRITON_GEMMS = before


def _op_fwd(c, name, input_q=None):
    """The whole forward op: LoRA hidden GEMM, activation quantize, the GEMM with its LoRA epilogue. With
    `input_q` the activation arrives quantized, as from a fused producer (RMSNorm / SwiGLU, passes/producer.py)."""
    with engine(name):
        return launch.lora_linear_cuda(c["x"], c["wl"], c["fmt"], c["a"], c["b"], None, None, SCALE, c["fwd"],
                                       c["dg"], input_q=input_q)[0]


def _input_q(c, recipe):
    """The input as the FP8 forward's producer would hand it over ([data, scale]); None for bf16."""
    if recipe == "fp8":
        return list(q.quantize_fp8_rowwise(c["x"], "e4m3")[:2])
    if recipe == "qfp8":
        return list(q.quantize_fp8_block(c["x"], (1, 128), "e4m3"))
    return None


def _grad_q(c, recipe):
    """The output gradient as the FP8 dgrad's producer would hand it over (grad_producer: the SwiGLU / attention
    backward quantizing what it writes): [data, scale] in the route's format; None for bf16."""
    if recipe == "fp8":
        return list(q.quantize_fp8_rowwise(c["go"], "e5m2")[:2])
    if recipe == "qfp8":
        return list(q.quantize_fp8_block(c["go"], (1, 128), "e4m3"))
    return None


def _op_dgrad(c, gh, name, gq=None):
    """The whole dgrad: grad_output quantize (and the K-major weight copy for qfp8), the GEMM, the LoRA
    term s * gh @ lora_a. gh = grad_output @ lora_b is the LoRA grads' (kernels/grad_lora.py), not timed.
    With `gq` the gradient arrives quantized, as from a fused producer (`_grad_q`)."""
    fmt, compute = WeightFormat(c["fmt"]), Compute(c["dg"])
    with engine(name):
        return launch.grad_input_cuda(c["go"], c["wl"], fmt, compute, c["x"].shape[1], gh, c["a"].bfloat16(), SCALE,
                                      gq=gq)


def _cublas_alone(c, recipe):
    """(forward, dgrad) of cuBLAS on pre-quantized operands: the GEMM alone, no quantize, no LoRA: the
    target the whole persistent op must meet. bf16: torch.mm; fp8: torch._scaled_mm rowwise (dgrad: E5M2
    grad x the cached K-major E4M3 transpose); qfp8: cuBLASLt block-scaled FP8 (dgrad on the K-major copy)."""
    from surogate.kernels.transpose import transpose_fp8

    x, go, wl = c["x"], c["go"], c["wl"]
    if recipe == "bf16":
        w = wl[0]
        return (lambda: x @ w.t()), (lambda: go @ w)
    if recipe == "fp8":
        xq, xs, _ = q.quantize_fp8_rowwise(x, "e4m3")
        gq, gs, _ = q.quantize_fp8_rowwise(go, "e5m2")
        fwd = lambda: torch._scaled_mm(xq, wl[0].t(), scale_a=xs, scale_b=wl[1].view(1, -1),  # noqa: E731
                                       out_dtype=torch.bfloat16)
        dgrad = lambda: torch._scaled_mm(gq, wl[2].t(), scale_a=gs, scale_b=wl[3].view(1, -1),  # noqa: E731
                                         out_dtype=torch.bfloat16)
        return fwd, dgrad
    xq, xs = q.quantize_fp8_block(x, (1, 128), "e4m3")
    gq, gs = q.quantize_fp8_block(go, (1, 128), "e4m3")
    w_t, ws_t = transpose_fp8(wl[0]), wl[1].t()
    return (lambda: cublas.block_fp8_gemm(xq, xs, wl[0], wl[1], None, None, None, 1.0),
            lambda: cublas.block_fp8_gemm(gq, gs, w_t, ws_t, None, None, None, 1.0))


def _time_or_nan(fn) -> float:
    """`_time(fn)`, NaN (with the reason printed) where this torch / cuBLAS cannot run it (block scaling)."""
    try:
        return _time(fn)
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as e:
        print(f"cuBLAS alone not timed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        return float("nan")


def _routes(fn) -> str:
    with variants.trace() as ran:
        fn()
    return ", ".join(sorted({str(r) for r in ran}))


def _persistent_picks(m: int, nks: list[tuple[int, int]]) -> list[str]:
    """The configs the tuner picked for the persistent kernel at M = m and these (N, K): which tile, warp
    specialization, stages ran a validation case (a wrong number is then pinned to a config)."""
    from surogate.kernels import persistent, tuning

    picks = []
    for key, c in tuning.tuner().picks().items():
        if key[0] == persistent._persistent_lora_gemm_kernel.__name__ and (key[4], key[5]) in nks \
                and key[6] == tuning.m_bucket(m):
            kw = c.kwargs
            picks.append(f"{key[1]} N={key[4]} K={key[5]}: {kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} "
                         f"ws={int(kw['WARP_SPECIALIZE'])} flatten={int(kw['FLATTEN'])} warps={c.num_warps} "
                         f"stages={c.num_stages}")
    return sorted(picks)


def validate_persistent(recipes) -> dict:
    """The persistent forward and dgrad against the plain-torch reference (SQNR dB) on the
    PERSISTENT_VALIDATE shapes; each must also have run the persistent kernel (variants.trace)."""
    from surogate.kernels import reference as ref

    out = {}
    for recipe in recipes:
        for m, n, k in PERSISTENT_VALIDATE:
            c = make_case(n, k, recipe, seed=3, m=m)
            with engine("persistent"), variants.trace() as ran:
                y, h = _forward(c)
                gh = c["go"] @ c["b"].bfloat16()
                gi = _op_dgrad(c, gh, "persistent")
            y_r, h_r = ref.lora_linear_ref(c["x"], c["wl"], c["fmt"], c["a"], c["b"], None, None, SCALE, c["fwd"],
                                           c["dg"])
            gi_r = ref.lora_linear_backward_ref(c["go"], c["x"], c["wl"], c["fmt"], c["a"], c["b"], None, h_r, SCALE,
                                                c["dg"])[0]
            key = f"{recipe} M={m} N={n} K={k}"
            out[key] = dict(output=sqnr(y, y_r), grad_input=sqnr(gi, gi_r), routes=sorted({str(r) for r in ran}),
                            nonfinite=[int((~torch.isfinite(y)).sum()), int((~torch.isfinite(gi)).sum())],
                            configs=_persistent_picks(m, [(n, k), (k, n)]))
            ok = all(isinstance(v, float) and v > 40 for v in out[key].values() if isinstance(v, float))
            if not ok or not all(r.startswith("persistent_") for r in out[key]["routes"]):
                print(f"VALIDATION FAILED {key}: {out[key]}", flush=True)
            print(f"validate persistent {key}: {out[key]}", flush=True)
    return out


def bench_persistent(models: list[str], recipes: list[str], ms: list[int]) -> list[dict]:
    """Per shape, M and recipe: cuBLAS alone (fwd, dgrad) and the whole op through the current route,
    `_lora_gemm_kernel` ("triton") and the persistent kernel; the persistent outputs' SQNR against the
    current route's at the benchmarked shape."""
    rows = []
    for model in models:
        for lin, (n, k) in linear_shapes(model).items():
            for m in ms:
                for recipe in recipes:
                    c = make_case(n, k, recipe, m=m)
                    gh = c["go"] @ c["b"].bfloat16()
                    f_cublas, d_cublas = _cublas_alone(c, recipe)
                    row = dict(model=model, linear=lin, M=m, N=n, K=k, recipe=recipe, flops=2.0 * m * n * k,
                               cublas_fwd_ms=_time_or_nan(f_cublas), cublas_dgrad_ms=_time_or_nan(d_cublas))
                    names = ("current", "persistent") if recipe == "fp8" else ("current", "triton", "persistent")
                    for name in names:  # fp8's current route is the Triton kernel
                        row[f"{name}_fwd_ms"] = _time(lambda: _op_fwd(c, name))
                        row[f"{name}_dgrad_ms"] = _time(lambda: _op_dgrad(c, gh, name))
                        row[f"{name}_routes"] = _routes(lambda: (_op_fwd(c, name), _op_dgrad(c, gh, name)))
                    if recipe == "fp8":
                        for d in ("fwd", "dgrad"):
                            row[f"triton_{d}_ms"] = row[f"current_{d}_ms"]
                    xq = _input_q(c, recipe)
                    if xq is not None:  # the forward and dgrad as the compiled model runs them behind fused producers
                        gq = _grad_q(c, recipe)
                        for name in ("current", "persistent"):
                            row[f"{name}_fwd_q_ms"] = _time(lambda: _op_fwd(c, name, xq))
                            row[f"{name}_dgrad_q_ms"] = _time(lambda: _op_dgrad(c, gh, name, gq))
                    p_fwd, c_fwd = _op_fwd(c, "persistent"), _op_fwd(c, "current")
                    p_dgrad, c_dgrad = _op_dgrad(c, gh, "persistent"), _op_dgrad(c, gh, "current")
                    row["sqnr_vs_current"] = dict(fwd=sqnr(p_fwd, c_fwd), dgrad=sqnr(p_dgrad, c_dgrad))
                    # A NaN SQNR: which side is non-finite, and which persistent configs ran (run 54's NaN rows).
                    row["nonfinite"] = {name: [int((~torch.isfinite(t)).sum()) for t in ts] for name, ts in
                                        (("persistent", (p_fwd, p_dgrad)), ("current", (c_fwd, c_dgrad)))}
                    row["persistent_configs"] = _persistent_picks(m, [(n, k), (k, n)])
                    for d, base in (("fwd", "fwd"), ("dgrad", "dgrad"), ("fwd_q", "fwd"), ("dgrad_q", "dgrad")):
                        if f"persistent_{d}_ms" in row:
                            row[f"persistent_{d}_vs_cublas"] = row[f"cublas_{base}_ms"] / row[f"persistent_{d}_ms"]
                    rows.append(row)
                    print(_persistent_row_text(row), flush=True)
                    del c
    return rows


def _persistent_row_text(r: dict) -> str:
    return (f"{r['model']:>4} {r['linear']:<7} M={r['M']:<5} N={r['N']:<5} K={r['K']:<5} {r['recipe']:<4} | "
            + " | ".join(f"{d}: cublas {r[f'cublas_{d}_ms']:.3f} current {r[f'current_{d}_ms']:.3f} "
                         f"triton {r[f'triton_{d}_ms']:.3f} persistent {r[f'persistent_{d}_ms']:.3f} "
                         f"({r[f'persistent_{d}_vs_cublas']:.2f}x cublas, "
                         f"{r[f'triton_{d}_ms'] / r[f'persistent_{d}_ms']:.2f}x triton)"
                         for d in ("fwd", "dgrad"))
            + "".join(f" | {d}, {what} from a producer: current {r[f'current_{d}_q_ms']:.3f} persistent "
                      f"{r[f'persistent_{d}_q_ms']:.3f} ({r[f'persistent_{d}_q_vs_cublas']:.2f}x cublas)"
                      for d, what in (("fwd", "input"), ("dgrad", "gradient")) if f"persistent_{d}_q_ms" in r)
            + f" | SQNR vs current {r['sqnr_vs_current']['fwd']:.1f}/{r['sqnr_vs_current']['dgrad']:.1f} dB"
            + (f" | non-finite {r['nonfinite']}" if any(sum(v) for v in r.get("nonfinite", {}).values()) else "")
            + (f" | configs: {'; '.join(r['persistent_configs'])}" if r.get("persistent_configs") else ""))


def persistent_markdown(meta: dict, rows: list[dict], valid: dict) -> str:
    lines = [f"# The persistent TMA kernel on {meta['gpu']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}, r={RANK}. Medians (ms) of "
             "`triton.testing.do_bench_cudagraph`. cuBLAS: the GEMM alone on pre-quantized operands (torch.mm, "
             "_scaled_mm rowwise, block-scaled scaled_mm). current / triton / persistent: the whole op (fwd: "
             "LoRA hidden GEMM + quantize + GEMM + LoRA; dgrad: quantize (+ K-major copy for qfp8) + GEMM + "
             "LoRA). fwd q: the forward with its input quantized by a fused producer (`input_q`: what the "
             "compiled model runs behind RMSNorm / SwiGLU), current / persistent; dgrad q: the dgrad with its "
             "gradient quantized by a fused producer (grad_producer: SwiGLU / attention backward). xC = cuBLAS ms / "
             "persistent ms (the target: >= 1.0).", "",
             "| model | linear | M | recipe | fwd cuBLAS | fwd current | fwd triton | fwd persistent (xC) | "
             "dgrad cuBLAS | dgrad current | dgrad triton | dgrad persistent (xC) | fwd q current | "
             "fwd q persistent (xC) | dgrad q current | dgrad q persistent (xC) | SQNR vs current |",
             "|" + "---|" * 17]
    for r in rows:
        cells = [r["model"], r["linear"], str(r["M"]), r["recipe"]]
        for d in ("fwd", "dgrad"):
            cells += [f"{r[f'cublas_{d}_ms']:.3f}", f"{r[f'current_{d}_ms']:.3f}", f"{r[f'triton_{d}_ms']:.3f}",
                      f"{r[f'persistent_{d}_ms']:.3f} ({r[f'persistent_{d}_vs_cublas']:.2f}x)"]
        for d in ("fwd", "dgrad"):
            if f"persistent_{d}_q_ms" in r:
                cells += [f"{r[f'current_{d}_q_ms']:.3f}",
                          f"{r[f'persistent_{d}_q_ms']:.3f} ({r[f'persistent_{d}_q_vs_cublas']:.2f}x)"]
            else:
                cells += ["-", "-"]
        cells.append(f"{r['sqnr_vs_current']['fwd']:.1f} / {r['sqnr_vs_current']['dgrad']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Routes (what ran): " + "; ".join(sorted({f"{r['recipe']} {k.split('_')[0]}: {r[k]}" for r in rows
                                                         for k in r if k.endswith("_routes")})), "",
              "Validation (persistent vs reference, SQNR dB):", ""]
    for k, v in valid.items():
        lines.append(f"- {k}: output {v['output']:.1f}, grad_input {v['grad_input']:.1f} ({', '.join(v['routes'])})"
                     + (f"; non-finite {v['nonfinite']}" if any(v.get("nonfinite", ())) else "")
                     + (f"; configs: {'; '.join(v['configs'])}" if v.get("configs") else ""))
    return "\n".join(lines) + "\n"


def markdown(meta: dict, rows: list[dict], valid: dict) -> str:
    recipes = list(rows[0]["recipes"]) if rows else []
    lines = [f"# Fused LoRA-linear kernels on {meta['gpu']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}, M={M_TOKENS}, r={RANK}. "
             "Times are medians (ms) of `triton.testing.do_bench_cudagraph` (CUDA-graph replay: no host "
             "launch overhead, for every column alike); xN = speed-up over bf16 matmul + PEFT LoRA "
             "(3 matmuls); backward = dgrad + LoRA grads.", "",
             "| model | linear | N | K | peft fwd | scaled_mm | fp8 gemm | fp8 gemm / scaled_mm | "
             + " | ".join(f"{r} fwd (x) | {r} bwd (x)" for r in recipes) + " |",
             "|" + "---|" * (8 + 2 * len(recipes))]
    for row in rows:
        cells = [row["model"], row["linear"], str(row["N"]), str(row["K"]), f"{row['peft_fwd_ms']:.3f}",
                 f"{row['scaled_mm_ms']:.3f}", f"{row['fused_fp8_gemm_only_ms']:.3f}",
                 f"{row['scaled_mm_ms'] / row['fused_fp8_gemm_only_ms']:.2f}"]
        for r in recipes:
            v = row["recipes"][r]
            cells += [f"{v['fwd_ms']:.3f} ({v['fwd_vs_peft']:.2f}x)", f"{v['bwd_ms']:.3f} ({v['bwd_vs_peft']:.2f}x)"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Validation (SQNR dB vs reference):", ""]
    for k, v in valid.items():
        lines.append(f"- {k}: " + ", ".join(f"{n} {x:.1f}" for n, x in v.items()))
    return "\n".join(lines) + "\n"


def write_results(out: str, name: str, meta: dict, valid: dict, rows: list, md: str) -> None:
    """<out>/<name>.json (meta, validation, rows) and <name>.md, and the table on stdout."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(dict(meta=meta, validate=valid, rows=rows), f, indent=1)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(md)
    print(md)


def main() -> None:
    global M_TOKENS, REP_MS, RANK
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="0.6B,8B")
    p.add_argument("--recipes", default="")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--skip-validate", action="store_true")
    p.add_argument("--m", default=str(M_TOKENS), help="token counts (rows M), comma-separated, e.g. 4096,16384")
    p.add_argument("--persistent", action="store_true", help="measure the persistent TMA kernel (sm_90)")
    p.add_argument("--rep", type=int, default=None, help="do_bench_cudagraph rep in ms (default 60; 20 with "
                   "--persistent: it times ~260 ops)")
    p.add_argument("--rank", type=int, default=RANK, help="LoRA rank of every case (default 16)")
    p.add_argument("--warp-specialize", action="store_true", help="with --persistent: offer the warp-specialized "
                   "configs (the families' own and `configs.persistent_probe_configs`), whatever this Triton")
    args = p.parse_args()
    if args.warp_specialize:
        offer_warp_specialized_configs()
    RANK = args.rank
    REP_MS = args.rep or (20 if args.persistent else REP_MS)
    arch = current_arch()
    ms = [int(v) for v in args.m.split(",")]
    if args.persistent:
        recipes = args.recipes.split(",") if args.recipes else list(PERSISTENT_RECIPES)
    else:
        recipes = args.recipes.split(",") if args.recipes else [r for r in native_recipes(arch)]
    models = args.models.split(",")
    import triton

    commit = git_commit()
    meta = dict(gpu=torch.cuda.get_device_name(), arch=arch, torch=torch.__version__, triton=triton.__version__,
                commit=commit, rank=RANK, warp_specialize=args.warp_specialize,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    if args.persistent:
        valid = {} if args.skip_validate else validate_persistent(recipes)
        rows = bench_persistent(models, recipes, ms)
        name = "kernels_persistent_ws" if args.warp_specialize else "kernels_persistent"
        write_results(args.out, name, meta, valid, rows, persistent_markdown(meta, rows, valid))
        return
    M_TOKENS = ms[0]
    valid = {}
    if not args.skip_validate:
        cases = {f"{r} N=1024 K=2048": make_case(1024, 2048, r, seed=1) for r in recipes}
        valid = validate(cases)
        valid["fp8 accumulation (promote)"] = promote_accuracy()
        print("validate:", json.dumps(valid), flush=True)
    rows = bench(models, recipes)
    write_results(args.out, "kernels", meta, valid, rows, markdown(meta, rows, valid))


if __name__ == "__main__":
    main()
