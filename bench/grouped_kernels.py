"""The grouped (MoE expert) LoRA GEMMs at Qwen3-30B-A3B's shapes: forward and backward time per format.

One micro-batch of bench/tps.py's 30B-A3B run: 2 x 2048 tokens routed top-8 over 128 experts
(uniform random routing, so groups of about 256 rows), LoRA r=16; gate_up (N 1536, K 2048, the
tokens read through `rows`) and down (N 2048, K 768). Each case is timed as one CUDA-graph replay
(bench/fused_kernels.py's `_time`). The fp8_block experts in FP8 compute (what qfp8 runs) are timed twice:
the dgrad against a K-major copy of the stack made per call (today's default), and reading the stored
stack transposed (`FP8_DGRAD_READS_STORED_STACK`), after checking that both give the same bits.

    python bench/grouped_kernels.py [--out bench/results]     # writes grouped_kernels.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fused_kernels import _time  # noqa: E402  (CUDA-graph replay, median)

from surogate.kernels import grouped  # noqa: E402
from surogate.kernels import reference_grouped as rg  # noqa: E402
from surogate.training.info import git_commit  # noqa: E402

EXPERTS, TOP_K, TOKENS, RANK, SCALE = 128, 8, 2 * 2048, 16, 2.0
DEVICE = "cuda"  # a CPU smoke run (TRITON_INTERPRET=1, tiny shapes) sets "cpu"
GEMMS = {"gate_up": (1536, 2048, True), "down": (2048, 768, False)}  # N, K, input read through `rows`
CASES = [("bf16", "bf16", False), ("nf4", "bf16", False), ("fp8_block", "bf16", False),
         ("fp8_block", "fp8", False), ("fp8_block", "fp8", True)]  # format, compute, dgrad reads the stored stack


def make_gemm(n: int, k: int, gathered: bool, fmt: str, seed: int = 0) -> dict:
    """Routed tokens (or grouped rows), offsets, the quantized expert stack, FP32 LoRA factors, a gradient."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    experts = torch.randint(0, EXPERTS, (TOKENS, TOP_K), device=DEVICE, generator=g).reshape(-1)
    ids, order = torch.sort(experts, stable=True)
    counts = torch.bincount(ids, minlength=EXPERTS)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).int()
    rows = (order // TOP_K).int() if gathered else None
    s = TOKENS * TOP_K
    x = torch.randn(TOKENS if gathered else s, k, device=DEVICE, generator=g).bfloat16()
    w = (torch.randn(EXPERTS, n, k, device=DEVICE, generator=g) / k ** 0.5).bfloat16()
    return {"x": x, "rows": rows, "offsets": offsets, "w": rg.quantize_grouped_weight_ref(w, fmt),
            "a": torch.randn(EXPERTS, RANK, k, device=DEVICE, generator=g) / k ** 0.5,
            "b": torch.randn(EXPERTS, n, RANK, device=DEVICE, generator=g) * 0.1,
            "go": torch.randn(s, n, device=DEVICE, generator=g).bfloat16()}


def measure(c: dict, fmt: str, compute: str) -> dict:
    """Forward and backward (dgrad + LoRA grads) time in ms, and the backward's dgrad output for checks."""
    def fwd():
        return grouped.grouped_lora_linear(c["x"], c["offsets"], c["w"], fmt, c["a"], c["b"], SCALE, compute,
                                           rows=c["rows"])

    hidden = fwd()[1]

    def bwd():
        return grouped.grouped_lora_linear_backward(c["go"], c["x"], c["offsets"], c["w"], fmt, c["a"], c["b"],
                                                    hidden, SCALE, compute, rows=c["rows"])

    return {"forward_ms": _time(fwd), "backward_ms": _time(bwd), "dx": bwd()[0]}


def run() -> list[dict]:
    rows = []
    for gemm, (n, k, gathered) in GEMMS.items():
        cases = {fmt: make_gemm(n, k, gathered, fmt) for fmt in dict.fromkeys(f for f, _, _ in CASES)}
        copy_dx = None
        for fmt, compute, stored in CASES:
            grouped.FP8_DGRAD_READS_STORED_STACK = stored
            try:
                r = measure(cases[fmt], fmt, compute)
            finally:
                grouped.FP8_DGRAD_READS_STORED_STACK = False
            dx = r.pop("dx")
            same = None
            if compute == "fp8" and not stored:
                copy_dx = dx
            elif stored:
                same = bool(torch.equal(dx, copy_dx))
            row = {"gemm": gemm, "N": n, "K": k, "format": fmt, "compute": compute,
                   "fp8_dgrad": ("stored stack" if stored else "K-major copy") if compute == "fp8" else "",
                   **r, "same_bits_as_copy": same}
            rows.append(row)
            print(f"{gemm:8s} {fmt:10s} {compute:5s} {row['fp8_dgrad']:13s} fwd {r['forward_ms']:7.3f} ms  "
                  f"bwd {r['backward_ms']:7.3f} ms" + ("" if same is None else f"  same bits: {same}"), flush=True)
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# Grouped expert GEMMs at Qwen3-30B-A3B's shapes ({meta['gpu']}, torch {meta['torch']}, "
             f"triton {meta['triton']}, commit {meta['commit']})", "",
             f"{TOKENS} tokens routed top-{TOP_K} over {EXPERTS} experts (uniform), LoRA r={RANK}; "
             "median ms of a CUDA-graph replay; backward = dgrad + LoRA gradients.", "",
             "| GEMM | format | compute | FP8 dgrad weight | forward ms | backward ms | same bits |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        same = "" if r["same_bits_as_copy"] is None else ("yes" if r["same_bits_as_copy"] else "**no**")
        lines.append(f"| {r['gemm']} (N {r['N']}, K {r['K']}) | {r['format']} | {r['compute']} | {r['fp8_dgrad']} | "
                     f"{r['forward_ms']:.3f} | {r['backward_ms']:.3f} | {same} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args()

    import triton

    commit = git_commit()
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "commit": commit}
    rows = run()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "grouped_kernels.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "grouped_kernels.md"), "w") as f:
        f.write(markdown(meta, rows))
    print(markdown(meta, rows))


if __name__ == "__main__":
    main()
