"""How close can a Triton GEMM get to cuBLAS on Hopper, before any LoRA or quantize is added: the ceiling of #19's
"whole op >= 1.0x cuBLAS" target.

    python bench/gemm_ceiling.py [--out bench/results] [--rows 4096,16384]

On the Qwen3-8B linears after horizontal fusion (qkv, o, gate_up, down), forward (x (M, K) @ W (N, K)^T):
- cuBLAS: torch.mm (bf16) and torch._scaled_mm with row / channel scales (E4M3), the GEMM alone;
- persistent bare: kernels/persistent.py's kernel with no LoRA term, at every config of its family and its 128x256
  tiles at other L2 groupings (the fastest one reported): the GEMM our fused op is built on;
- persistent op: the same kernel with the LoRA up-projection in its epilogue (H = x @ A given, as the library
  computes it before), the tuned config;
- cuBLAS K-concat (bf16): the LoRA term folded into cuBLAS's reduction, [x | H] (M, K + r) @ [W | s U] (N, K + r)^T,
  with r = 16 per projection fused (qkv 48, gate_up 32): what the op would cost if its producer wrote H beside x.
Time: median of `triton.testing.do_bench_cudagraph` (no launch overhead). Each Triton output is checked against
cuBLAS's (SQNR, dB). The ratio xC = cuBLAS ms / the row's ms: >= 1.0 is as fast as the GEMM alone.
Writes gemm_ceiling_<gpu>.json/.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: microbench
from microbench import command_line, write_results  # noqa: E402

# (N, K, LoRA projections fused into the GEMM) of Qwen3-8B's linears after horizontal fusion.
SHAPES_8B = {"qkv": (6144, 4096, 3), "o": (4096, 4096, 1), "gate_up": (24576, 4096, 2), "down": (4096, 12288, 1)}
RANK, LORA_SCALE = 16, 2.0


def _sqnr(got: torch.Tensor, ref: torch.Tensor) -> float:
    err = (got.float() - ref.float()).pow(2).mean()
    return float(10 * torch.log10(ref.float().pow(2).mean() / err.clamp_min(1e-30)))


def _time(fn) -> float:
    from triton.testing import do_bench_cudagraph

    fn()
    return do_bench_cudagraph(fn, rep=50)


def _family_rows(name: str, m: int, n: int, k: int, dtype: str, cublas_ms: float, ref: torch.Tensor, launch,
                 family: str) -> list[dict]:
    """The bare persistent kernel at every config of `family`: one row each (ms, xC, SQNR vs cuBLAS)."""
    from surogate.kernels.configs import _pcfg, get_configs

    bk = 64 if family == "persistent_bf16" else 128
    # Beyond the family: its two 128x256 tiles with other L2 groupings (GROUP_M 4, 16).
    extra = [_pcfg(128, 256, bk, True, 2, group=g) for g in (4, 16)] + [
        _pcfg(128, 256, bk, False, 3, group=g) for g in (4, 16)]
    rows = []
    for config in get_configs(family, "sm_90") + extra:
        label = (f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']}x{config.kwargs['BLOCK_K']} "
                 f"ws={int(config.kwargs['WARP_SPECIALIZE'])} flat={int(config.kwargs['FLATTEN'])} "
                 f"g{config.kwargs['GROUP_M']} w{config.num_warps} s{config.num_stages}"
                 + (" (extra)" if config in extra else ""))
        try:
            out = launch(config)
            ms = _time(lambda c=config: launch(c))
        except Exception as e:  # noqa: BLE001 - a config that does not build here is a row, not the end
            rows.append({"linear": name, "M": m, "dtype": dtype, "system": "persistent bare", "config": label,
                         "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})
            continue
        rows.append({"linear": name, "M": m, "N": n, "K": k, "dtype": dtype, "system": "persistent bare",
                     "config": label, "ms": ms, "xC": cublas_ms / ms, "sqnr": _sqnr(out, ref)})
    return rows


def measure(name: str, m: int, n: int, k: int, projections: int) -> list[dict]:
    from surogate.kernels.persistent import launch_persistent_gemm
    from surogate.kernels.quantize import quantize_fp8_rowwise
    from surogate.kernels.variants import A_BF16, A_FP8_ROW, W_BF16, W_FP8_ROW

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=gen) / k ** 0.5).bfloat16()
    r = RANK * projections
    hidden = torch.randn(m, r, device="cuda", generator=gen).bfloat16()
    up = (torch.randn(n, r, device="cuda", generator=gen) * 0.01).bfloat16()
    base = dict(linear=name, M=m, N=n, K=k)
    rows = []

    # bf16
    ref = x @ w.t()
    ms_c = _time(lambda: x @ w.t())
    rows.append({**base, "dtype": "bf16", "system": "cuBLAS", "ms": ms_c, "xC": 1.0})
    xc = torch.cat([x, hidden], dim=1)
    wc = torch.cat([w, up * LORA_SCALE], dim=1)
    ref_op = xc @ wc.t()
    ms = _time(lambda: xc @ wc.t())
    rows.append({**base, "dtype": "bf16", "system": f"cuBLAS K-concat (K+{r})", "ms": ms, "xC": ms_c / ms})

    def bare_bf16(config):
        return launch_persistent_gemm(x, None, A_BF16, w, None, W_BF16, False, n, None, None, None, 0.0,
                                      config=config)

    rows += _family_rows(name, m, n, k, "bf16", ms_c, ref, bare_bf16, "persistent_bf16")

    def op_bf16():
        return launch_persistent_gemm(x, None, A_BF16, w, None, W_BF16, False, n, hidden, up, None, LORA_SCALE)

    out = op_bf16()
    ms = _time(op_bf16)
    rows.append({**base, "dtype": "bf16", "system": "persistent op (LoRA epilogue)", "ms": ms, "xC": ms_c / ms,
                 "sqnr": _sqnr(out, ref_op)})

    # fp8, row / channel scales
    xq, xs = quantize_fp8_rowwise(x, "e4m3")[:2]  # E4M3, a scale per row (M, 1): the fp8 recipe's activation
    wq, wsc = quantize_fp8_rowwise(w, "e4m3")[:2]  # and per output channel (N, 1): its weight
    sb = wsc.reshape(1, -1).contiguous()

    def cublas_fp8():
        return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=sb, out_dtype=torch.bfloat16)

    ref8 = cublas_fp8()
    ms_c8 = _time(cublas_fp8)
    rows.append({**base, "dtype": "fp8 row", "system": "cuBLAS", "ms": ms_c8, "xC": 1.0})

    def bare_fp8(config):
        return launch_persistent_gemm(xq, xs, A_FP8_ROW, wq, wsc.reshape(-1), W_FP8_ROW, False, n, None, None,
                                      None, 0.0, config=config)

    rows += _family_rows(name, m, n, k, "fp8 row", ms_c8, ref8, bare_fp8, "persistent_fp8")
    return rows


def main() -> None:
    args, env = command_line(__doc__, "--rows", default="4096,16384", help="M values, comma-separated")
    rows = []
    for m in (int(v) for v in args.rows.split(",")):
        for name, (n, k, projections) in SHAPES_8B.items():
            got = measure(name, m, n, k, projections)
            for row in got:
                extra = row.get("error") or f"{row['ms'] * 1e3:8.1f} us  xC {row['xC']:.3f}" + (
                    f"  SQNR {row['sqnr']:.1f}" if "sqnr" in row else "")
                print(f"M={m:<6d} {name:8s} {row['dtype']:8s} {row['system']:30s} "
                      f"{row.get('config', ''):36s} {extra}",
                      flush=True)
            rows += got
            torch.cuda.empty_cache()
    best = {}
    for row in rows:
        if row["system"] == "persistent bare" and "ms" in row:
            key = (row["linear"], row["M"], row["dtype"])
            if key not in best or row["ms"] < best[key]["ms"]:
                best[key] = row
    lines = [f"# The Triton GEMM's ceiling against cuBLAS ({env.get('gpu')})", "",
             f"torch {env.get('torch')}, triton {env.get('triton')}, commit {env.get('commit')}; Qwen3-8B linears "
             f"after horizontal fusion, forward; median of do_bench_cudagraph; r = {RANK} a projection. "
             "xC = cuBLAS ms / the row's ms. persistent bare: the fastest config of the family, no LoRA; op: with the "
             "LoRA epilogue (H given); K-concat: the LoRA term inside cuBLAS's reduction.", "",
             "| linear | M | dtype | cuBLAS us | persistent bare us (xC) | its config | persistent op us (xC) | "
             "cuBLAS K-concat us (xC) |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if row["system"] != "cuBLAS":
            continue
        key = (row["linear"], row["M"], row["dtype"])
        others = {r["system"].split(" (")[0]: r for r in rows
                  if (r["linear"], r["M"], r["dtype"]) == key and "ms" in r and r["system"] != "persistent bare"}
        b = best.get(key)

        def cell(r):
            return f"{r['ms'] * 1e3:.1f} ({r['xC']:.2f}x)" if r else "-"
        concat = next((r for s, r in others.items() if s.startswith("cuBLAS K-concat")), None)
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {row['ms'] * 1e3:.1f} | {cell(b)} | "
                     f"{b['config'] if b else '-'} | {cell(others.get('persistent op'))} | {cell(concat)} |")
    errors = [r for r in rows if "error" in r]
    if errors:
        lines += ["", "Configs that did not run:", ""] + [
            f"- {r['linear']} M={r['M']} {r['dtype']} {r['config']}: {r['error']}" for r in errors]
    md = write_results(args.out, "gemm_ceiling", env, {"rows": rows}, lines)
    print("\n".join(lines))
    print(f"wrote {md}")


if __name__ == "__main__":
    main()
