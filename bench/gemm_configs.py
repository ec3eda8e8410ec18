"""Every tile config of one fused-GEMM op, timed alone on the Qwen3-8B shapes: which config wins and by how much.

The autotuner only reports its pick; this table shows the whole field, so a config list can be
cut to what wins and a new candidate judged before it goes into `surogate/kernels/configs.py`.
Each (op, shape, config) is launched with that config fixed, timed by CUDA-graph replay (no host
overhead), and checked against what the library runs by default (SQNR, dB) so a fast config that is
wrong shows. "default" is what the library runs: the autotuned Triton pick, or cuBLAS where
surogate/kernels/cublas.py sends the GEMM (qfp8 on sm_90, bf16 with K >= 4096).

    python bench/gemm_configs.py [--ops qfp8_fwd,qfp8_dgrad,qfp8_dgrad_dequant] [--out bench/results]

Ops (M = 4096 tokens, r = 16; the 8B linears after horizontal fusion: qkv, o, gate_up, down):
  qfp8_fwd            lora_linear_fp8_block: E4M3 1x128 x E4M3 128x128 (the activation pre-quantized)
  qfp8_dgrad          grad_input_fp8_block: E4M3 1x128 grad x the weight made K-major per call
  qfp8_dgrad_dequant  grad_input_dequant_fp8_block: bf16 grad x the block-FP8 weight dequantized in registers
  fp8_fwd / bf16_fwd  lora_linear_fp8 (row scales) / lora_linear_bf16, for scale
Also timed once per shape: the gradient quantize (1x128) and the FP8 weight transpose (ours and torch's).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from surogate.kernels import configs, grad_input, lora_linear, variants  # noqa: E402
from surogate.kernels import quantize as q  # noqa: E402
from surogate.kernels.transpose import transpose_fp8  # noqa: E402
from surogate.training.info import run_record  # noqa: E402

M_TOKENS, RANK, SCALE = 4096, 16, 2.0
SHAPES_8B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288)}

_C = configs._cfg
# Beyond each family's list: candidates worth a look (wide tiles, 4-warp 128 x 128, other stages and groups).
EXTRA = {
    "fp8_block": [_C(128, 64, 128, 4, 3), _C(128, 64, 128, 4, 4, group=16), _C(64, 128, 128, 4, 4),
                  _C(128, 128, 128, 8, 3)],
    "dequant": [_C(256, 128, 64, 8, 4), _C(256, 64, 64, 8, 3)],
    "fp8": [],
    "bf16": [],
}


def _family(op: str) -> str:
    return {"qfp8_fwd": "fp8_block", "qfp8_dgrad": "fp8_block", "qfp8_dgrad_dequant": "dequant",
            "fp8_fwd": "fp8", "bf16_fwd": "bf16"}[op]


def _case(n: int, k: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M_TOKENS, k, device="cuda", generator=g).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=g) / k ** 0.5).bfloat16()
    dy = torch.randn(M_TOKENS, n, device="cuda", generator=g).bfloat16()
    lora_a = (torch.randn(RANK, k, device="cuda", generator=g) / k ** 0.5).bfloat16()
    lora_b = (torch.randn(n, RANK, device="cuda", generator=g) * 0.1).bfloat16()
    wq, ws = q.quantize_weight(w, "fp8_block")
    return dict(x=x, w=w, dy=dy, lora_a=lora_a, lora_b=lora_b, wq=wq, ws=ws, w_row=q.quantize_weight(w, "fp8_row"),
                xq=q.quantize_fp8_block(x, (1, 128), "e4m3"), xr=q.quantize_fp8_rowwise(x, "e4m3")[:2],
                dyq=q.quantize_fp8_block(dy, (1, 128), "e4m3"),
                hidden=x @ lora_a.t(), gh=dy @ lora_b)


def _op_fn(op: str, c: dict):
    """The launch under test, as a closure (weight transpose included for qfp8_dgrad: it runs every call).
    Each launcher takes its kernel-table variant, the activation as its quantizer left it, the weight
    list and the true K (kernels/variants.py)."""
    k = c["w"].shape[1]
    fwd, dgrad = variants.Gemm.OUTPUT, variants.Gemm.GRAD_INPUT
    if op == "qfp8_fwd":
        v = variants.variant(fwd, "fp8", "fp8_block")
        return lambda: lora_linear.lora_linear_fp8_block(v, c["xq"], [c["wq"], c["ws"]], k, c["hidden"], c["lora_b"],
                                                         None, SCALE)
    if op == "qfp8_dgrad":
        v = variants.variant(dgrad, "fp8", "fp8_block")
        return lambda: grad_input.grad_input_fp8_block(v, c["dyq"], [transpose_fp8(c["wq"]), c["ws"].t()], k,
                                                       c["gh"], c["lora_a"], SCALE)
    if op == "qfp8_dgrad_dequant":
        v = variants.variant(dgrad, "bf16", "fp8_block")
        return lambda: grad_input.grad_input_dequant_fp8_block(v, (c["dy"],), [c["wq"], c["ws"]], k, c["gh"],
                                                               c["lora_a"], SCALE)
    if op == "fp8_fwd":
        v = variants.variant(fwd, "fp8", "fp8_row")
        return lambda: lora_linear.lora_linear_fp8(v, c["xr"], c["w_row"], k, c["hidden"], c["lora_b"], None, SCALE)
    if op == "bf16_fwd":
        v = variants.variant(fwd, "bf16", "bf16")
        return lambda: lora_linear.lora_linear_bf16(v, (c["x"],), [c["w"]], k, c["hidden"], c["lora_b"], None, SCALE)
    raise ValueError(f"unknown op {op!r}")


def _time(fn) -> float:
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median")


def _sqnr(y: torch.Tensor, ref: torch.Tensor) -> float:
    err = (y.float() - ref.float()).pow(2).sum().clamp_min(1e-30)
    return float(10 * torch.log10(ref.float().pow(2).sum() / err))


def _cfg_name(c) -> str:
    kw = c.kwargs
    return f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} w{c.num_warps} s{c.num_stages} g{kw['GROUP_M']}"


class _FixedConfig:
    """Swaps lora_linear's autotuned runner for one that launches a single config."""

    def __init__(self, cfg):
        self.cfg, self.saved = cfg, None

    def __enter__(self):
        self.saved = lora_linear._runner
        kwargs = dict(self.cfg.kwargs, num_warps=self.cfg.num_warps, num_stages=self.cfg.num_stages)
        lora_linear._runner = lambda kernel, family, device, modes: (lambda grid, **kw: kernel[grid](**kw, **kwargs))

    def __exit__(self, *exc):
        lora_linear._runner = self.saved


class _TritonGemms:
    """Runs the Triton kernels where the library would call cuBLAS (surogate/kernels/cublas.py)."""

    def __enter__(self):
        configs.FORCE_TRITON_GEMMS = True

    def __exit__(self, *exc):
        configs.FORCE_TRITON_GEMMS = False


def sweep(ops: list[str], arch: str) -> list[dict]:
    rows = []
    for shape, (n, k) in SHAPES_8B.items():
        c = _case(n, k)
        flops = 2.0 * M_TOKENS * n * k
        side = dict(quantize_1x128_ms=_time(lambda: q.quantize_fp8_block(c["dy"], (1, 128), "e4m3")),
                    torch_transpose_ms=_time(lambda: c["wq"].t().contiguous()),
                    weight_transpose_ms=_time(lambda: transpose_fp8(c["wq"])))
        print(f"{shape} N={n} K={k}: quantize dy 1x128 {side['quantize_1x128_ms']:.3f} ms, FP8 weight transpose "
              f"{side['weight_transpose_ms']:.3f} ms (torch .t().contiguous() {side['torch_transpose_ms']:.3f})",
              flush=True)
        for op in ops:
            fn = _op_fn(op, c)
            ref = fn()  # what the library runs (cuBLAS or the autotuned Triton pick)
            auto_ms = _time(fn)
            family = _family(op)
            cands = configs.get_configs(family, arch) + EXTRA[family]
            for cfg in cands:
                rec = dict(shape=shape, N=n, K=k, op=op, family=family, config=_cfg_name(cfg),
                           in_family=cfg in cands[:len(cands) - len(EXTRA[family])], default_ms=auto_ms, **side)
                try:
                    with _FixedConfig(cfg), _TritonGemms():
                        y = fn()
                        rec["sqnr_vs_default_db"] = _sqnr(y, ref)
                        rec["ms"] = _time(fn)
                    rec["tflops"] = flops / rec["ms"] / 1e9
                except Exception as e:  # out of resources etc.: recorded, not fatal
                    rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                rows.append(rec)
                print(_row_text(rec), flush=True)
            del fn, ref
        c = None  # free this shape's tensors before the next
        torch.cuda.empty_cache()
    return rows


def _row_text(r: dict) -> str:
    if "error" in r:
        return f"  {r['op']:<19} {r['shape']:<8} {r['config']:<26} ERROR {r['error']}"
    mark = "" if r["in_family"] else " (extra)"
    return (f"  {r['op']:<19} {r['shape']:<8} {r['config']:<26} {r['ms']:.3f} ms {r['tflops']:6.0f} TFLOP/s "
            f"(default {r['default_ms']:.3f}) sqnr {r['sqnr_vs_default_db']:.0f}{mark}")


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# Tile configs of the fused GEMMs on {meta['gpu']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}; M={M_TOKENS}, r={RANK}, "
             "Qwen3-8B shapes after horizontal fusion. ms = median of CUDA-graph replays with the config fixed; "
             "(extra) = not in the family's list. Best per (op, shape) in bold.", "",
             "| op | shape | config | ms | TFLOP/s | default ms | SQNR vs default (dB) |", "|---|---|---|---|---|---|---|"]
    best = {}
    for r in rows:
        if "ms" in r:
            key = (r["op"], r["shape"])
            best[key] = min(best.get(key, float("inf")), r["ms"])
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['op']} | {r['shape']} | {r['config']} | error | | | {r['error']} |")
            continue
        ms = f"**{r['ms']:.3f}**" if r["ms"] == best[(r["op"], r["shape"])] else f"{r['ms']:.3f}"
        extra = " (extra)" if not r["in_family"] else ""
        lines.append(f"| {r['op']} | {r['shape']} | {r['config']}{extra} | {ms} | {r['tflops']:.0f} | "
                     f"{r['default_ms']:.3f} | {r['sqnr_vs_default_db']:.0f} |")
    side = {r["shape"]: r for r in rows}
    lines += ["", "| shape | quantize dy 1x128 (ms) | FP8 weight transpose: transpose_fp8 (ms) "
              "| torch .t().contiguous() (ms) |", "|---|---|---|---|"]
    lines += [f"| {s} | {r['quantize_1x128_ms']:.3f} | {r['weight_transpose_ms']:.3f} | {r['torch_transpose_ms']:.3f} |"
              for s, r in side.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", default="qfp8_fwd,qfp8_dgrad,qfp8_dgrad_dequant,fp8_fwd")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gemm_configs.py times CUDA kernels: run it on a GPU")
    from surogate.recipes import current_arch

    meta = dict(run_record(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    rows = sweep(args.ops.split(","), current_arch())
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gemm_configs.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    text = markdown(meta, rows)
    with open(os.path.join(args.out, "gemm_configs.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
