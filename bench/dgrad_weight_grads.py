"""The bf16 LoRA backward with the weight gradients inside the persistent dgrad, against the two cuBLAS GEMMs.

    python bench/dgrad_weight_grads.py [--m 4096] [--rank 16] [--out bench/results]

One LoRA linear's whole backward on CUDA (`launch.lora_linear_backward_cuda`, bf16, the persistent route on
sm_90): `g @ lora_b`, the dgrad GEMM with its LoRA term, and `grad_lora_b = s g^T h`, `grad_lora_a = s gh^T x`.
"in dgrad": the persistent kernel also computes the two weight gradients (persistent.WeightGrads, its work
queue giving them to the programs the last wave of output tiles leaves idle); "cuBLAS": they are two FP32-out
cuBLAS GEMMs after it (`persistent.WEIGHT_GRADS_IN_DGRAD = False`); "dgrad only": the dgrad GEMM alone, the
floor. Qwen3-8B's horizontally fused linears (q/k/v, gate/up) at M rows. Medians of CUDA-graph replays
(`triton.testing.do_bench_cudagraph`), each after the tuner picked its configs.

Writes bench/results/dgrad_weight_grads.{json,md} (GPU, versions, commit).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from surogate.kernels import launch, persistent  # noqa: E402
from surogate.training.info import run_record  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# Qwen3-8B, hidden 4096, 32 + 2 x 8 heads of 128, intermediate 12288: (out features N, in features K).
LINEARS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288)}


def case(m: int, n: int, k: int, r: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=gen) / k ** 0.5).bfloat16()
    a = torch.randn(r, k, device="cuda", generator=gen) / k ** 0.5
    b = torch.randn(n, r, device="cuda", generator=gen) * 0.01
    g = torch.randn(m, n, device="cuda", generator=gen).bfloat16()
    return dict(x=x, w=[w], a=a, b=b, g=g, h=(x @ a.bfloat16().t()), a16=a.bfloat16(), b16=b.bfloat16())


def backward(c: dict) -> tuple:
    return launch.lora_linear_backward_cuda(c["g"], c["x"], c["w"], "bf16", c["a"], c["b"], None, c["h"], 2.0,
                                            "bf16", None, c["a16"], c["b16"])


def dgrad_only(c: dict) -> torch.Tensor:
    gh = c["g"] @ c["b16"]
    return launch.grad_input_cuda(c["g"], c["w"], launch.WeightFormat.BF16, launch.Compute.BF16,
                                  c["x"].shape[1], gh, c["a16"], 2.0)


def sweep(c: dict, r: int) -> list[dict]:
    """Each config on the persistent kernel alone: the plain dgrad (bf16 family, warp-specialized included)
    and the dgrad with the weight gradients at several gradient-tile shapes (BLOCK_P x BLOCK_S)."""
    import dataclasses  # noqa: F401

    from surogate.kernels import configs
    from surogate.kernels.variants import A_BF16, W_BF16

    g, w, k = c["g"], c["w"][0], c["x"].shape[1]
    gh = g @ c["b16"]
    out = []
    for cfg in configs.get_configs("persistent_bf16", "sm_90"):
        ms = timed(lambda: persistent.launch_persistent_gemm(g, None, A_BF16, w, None, W_BF16, True, k, gh,
                                                             c["a16"].t(), None, 2.0, config=cfg))
        out.append(dict(kind="plain", config=_name(cfg), ms=ms))
    for cfg in configs.get_configs("persistent_bf16_wgrad", "sm_90"):
        for bp, bs in ((128, 64), (128, 128), (256, 64), (128, 256)):
            tile = triton.Config({**cfg.kwargs, "BLOCK_P": bp, "BLOCK_S": bs}, num_warps=cfg.num_warps,
                                 num_stages=cfg.num_stages)
            wg = persistent.WeightGrads.of(g, c["h"], c["x"], gh, 2.0)
            try:
                ms = timed(lambda: persistent.launch_persistent_gemm(g, None, A_BF16, w, None, W_BF16, True, k, gh,
                                                                     c["a16"].t(), None, 2.0, config=tile,
                                                                     weight_grads=wg))
            except Exception as e:  # noqa: BLE001 (out of shared memory: recorded)
                ms = float("nan")
                print(f"  {_name(tile)}: {type(e).__name__}")
            out.append(dict(kind="with grads", config=_name(tile), ms=ms))
    return out


def _name(cfg) -> str:
    kw = cfg.kwargs
    text = f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} ws={int(kw['WARP_SPECIALIZE'])} " \
           f"fl={int(kw['FLATTEN'])} w{cfg.num_warps} s{cfg.num_stages}"
    return text + (f" P{kw['BLOCK_P']} S{kw['BLOCK_S']}" if "BLOCK_P" in kw else "")


def timed(fn) -> float:
    fn()  # the tuner's picks, outside the timing
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=200)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int, default=4096)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--sweep", action="store_true", help="also time each config of the persistent kernel alone")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/dgrad_weight_grads.py needs a CUDA GPU (sm_90 for the persistent route)")
    rows = []
    for name, (n, k) in LINEARS.items():
        c = case(args.m, n, k, args.rank)
        persistent.WEIGHT_GRADS_IN_DGRAD = True
        fused = timed(lambda: backward(c))
        persistent.WEIGHT_GRADS_IN_DGRAD = False
        apart = timed(lambda: backward(c))
        floor = timed(lambda: dgrad_only(c))
        persistent.WEIGHT_GRADS_IN_DGRAD = True
        rows.append(dict(linear=name, m=args.m, n=n, k=k, rank=args.rank, in_dgrad_ms=fused, cublas_ms=apart,
                         dgrad_only_ms=floor, speedup=apart / fused, sweep=sweep(c, args.rank) if args.sweep else []))
        for line in rows[-1]["sweep"]:
            print(f"  {line['kind']:10s} {line['config']:44s} {line['ms']:.3f} ms", flush=True)
        print(f"{name:8s} M={args.m} N={n:6d} K={k:6d}  in dgrad {fused:.3f} ms  cuBLAS {apart:.3f} ms  "
              f"dgrad only {floor:.3f} ms  x{apart / fused:.3f}", flush=True)
    env = run_record()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dgrad_weight_grads.json").write_text(json.dumps({"environment": env, "records": rows}, indent=1))
    lines = [f"# LoRA backward: weight gradients in the persistent dgrad vs cuBLAS, {env['gpu']}", "",
             f"torch {env['torch']}, triton {env['triton']}, commit {env['commit']}; Qwen3-8B linears, bf16, "
             f"r={args.rank}, M={args.m}. Medians (ms) of CUDA-graph replays; the whole backward of one linear.", "",
             "| linear | N | K | in dgrad | cuBLAS | dgrad only | cuBLAS / in dgrad |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['linear']} | {r['n']} | {r['k']} | {r['in_dgrad_ms']:.3f} | {r['cublas_ms']:.3f} | "
              f"{r['dgrad_only_ms']:.3f} | {r['speedup']:.3f}x |" for r in rows]
    (args.out / "dgrad_weight_grads.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
