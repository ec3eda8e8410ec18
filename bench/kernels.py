"""Fused LoRA-linear kernels vs cuBLAS: TFLOP/s per Qwen3 linear shape at M=4096 tokens.

For every recipe native on this GPU, forward (`lora_linear_cuda`) and backward
(`lora_linear_backward_cuda`: dgrad + LoRA grads) beside
  - bf16 `torch.matmul` + PEFT-style LoRA (three matmuls; backward: dgrad + the LoRA GEMMs),
  - `torch._scaled_mm` rowwise FP8 (the GEMM alone, operands pre-quantized),
and the fused FP8 GEMM alone on the same pre-quantized operands (`gemm_only`).
`validate()` runs before `bench()`; results go to bench/results/kernels.{json,md}.

    python bench/kernels.py [--models 0.6B,8B] [--recipes bf16,fp8,...] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from surogate.kernels import configs, launch  # noqa: E402
from surogate.kernels import quantize as q  # noqa: E402
from surogate.kernels.lora_linear import lora_linear_fp8  # noqa: E402
from surogate.kernels.variants import variant  # noqa: E402
from surogate.recipes import get, current_arch  # noqa: E402
from surogate.kernels.plan import native_recipes

MODELS = {  # hidden, intermediate, q heads, kv heads (head dim 128)
    "0.6B": (1024, 3072, 16, 8),
    "8B": (4096, 12288, 32, 8),
}
M_TOKENS = 4096
RANK = 16
SCALE = 2.0  # alpha 32 / r 16


def linear_shapes(model: str) -> dict[str, tuple[int, int]]:
    """(N, K) of each LoRA-targeted linear of a Qwen3 layer (k and v share a shape)."""
    h, i, qh, kvh = MODELS[model]
    return {"q": (qh * 128, h), "kv": (kvh * 128, h), "o": (h, qh * 128), "gate_up": (i, h), "down": (h, i)}


def sqnr(y: torch.Tensor, ref: torch.Tensor) -> float:
    err = (y.float() - ref.float()).pow(2).sum().clamp_min(1e-30)
    return float(10 * torch.log10(ref.float().pow(2).sum() / err))


def make_case(n: int, k: int, recipe: str, seed: int = 0) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    x = torch.randn(M_TOKENS, k, device=dev, generator=g).bfloat16()
    w = (torch.randn(n, k, device=dev, generator=g) / k ** 0.5).bfloat16()
    a = torch.randn(RANK, k, device=dev, generator=g) / k ** 0.5
    b = torch.randn(n, RANK, device=dev, generator=g) * 0.1
    go = torch.randn(M_TOKENS, n, device=dev, generator=g).bfloat16()
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
    return triton.testing.do_bench_cudagraph(fn, rep=60, return_mode="median")


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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="0.6B,8B")
    p.add_argument("--recipes", default="")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--skip-validate", action="store_true")
    args = p.parse_args()
    arch = current_arch()
    recipes = args.recipes.split(",") if args.recipes else [r for r in native_recipes(arch)]
    models = args.models.split(",")
    import triton

    commit = os.environ.get("GIT_COMMIT") or subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
    meta = dict(gpu=torch.cuda.get_device_name(), arch=arch, torch=torch.__version__, triton=triton.__version__,
                commit=commit, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    valid = {}
    if not args.skip_validate:
        cases = {f"{r} N=1024 K=2048": make_case(1024, 2048, r, seed=1) for r in recipes}
        valid = validate(cases)
        valid["fp8 accumulation (promote)"] = promote_accuracy()
        print("validate:", json.dumps(valid), flush=True)
    rows = bench(models, recipes)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kernels.json"), "w") as f:
        json.dump(dict(meta=meta, validate=valid, rows=rows), f, indent=1)
    with open(os.path.join(args.out, "kernels.md"), "w") as f:
        f.write(markdown(meta, rows, valid))
    print(markdown(meta, rows, valid))


if __name__ == "__main__":
    main()
