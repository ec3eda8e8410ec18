"""The LoRA term added into a cuBLAS GEMM's output, `out += s * H @ U^T`: cuBLAS's addmm_ against
kernels/lora_add.py, on the GPU.

    python bench/lora_add.py [--out bench/results] [--sweep]

Outputs of Qwen3-8B's linears where qfp8 runs cuBLAS (N = 4096: o, down and the dgrads of q/k/v, o, gate/up;
6144: q/k/v; 12288: down's dgrad; 24576: gate/up) at M = 4096 and 16384 rows, r = 16. Time by
triton.testing.do_bench; GB/s of the bytes each must move (the output read and written, H and U read). Checked:
the share of each one's outputs equal to the exact sum (FP64) rounded once to bf16. --sweep also times the kernel at
other launch configs (`lora_add.Config`), each checked so. Writes lora_add_<gpu>.json/.md.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: microbench
from microbench import MICROSECONDS, command_line, formatted, table, write_results  # noqa: E402

ROWS = (4096, 16384)
OUTPUTS = (4096, 6144, 12288, 24576)
RANK = 16
LORA_SCALE = 2.0


def _inputs(m: int, n: int):
    gen = torch.Generator(device="cuda").manual_seed(0)
    out = torch.randn(m, n, device="cuda", generator=gen).bfloat16()
    hidden = torch.randn(m, RANK, device="cuda", generator=gen).bfloat16()
    up = torch.randn(n, RANK, device="cuda", generator=gen).bfloat16()
    return out, hidden, up


def _rounded_once(got: torch.Tensor, exact: torch.Tensor) -> float:
    """The share of `got` equal to the exact sum rounded once to bf16."""
    return float((got == exact).float().mean())


def _moved(m: int, n: int) -> int:
    return (2 * m * n + (m + n) * RANK) * 2


def markdown(env: dict, rows: list[dict], sweep: list[dict]) -> list[str]:
    """The result file: the two systems per shape; with --sweep, the kernel's launch configs, fastest first."""
    from surogate.kernels.lora_add import DEFAULT

    gbs, once = ("GB/s", formatted("GB/s", ".0f")), ("rounded once", formatted("rounded_once", ".4f"))
    lines = [f"# The LoRA term added into a GEMM output: cuBLAS addmm_ vs kernels/lora_add.py ({env.get('gpu')})", "",
             f"torch {env.get('torch')}, triton {env.get('triton')}, commit {env.get('commit')}; do_bench; r = {RANK}; "
             f"default config {DEFAULT}; GB/s of the bytes each must move (the output read and written, H, U); "
             "rounded once: the share of outputs equal to the exact sum rounded once to bf16.", ""]
    lines += table([("M", "M"), ("N", "N"), ("system", "system"), MICROSECONDS, gbs, once], rows)
    if sweep:
        lines += ["", "The kernel at other launch configs, fastest first per shape", ""]
        lines += table([("M", "M"), ("N", "N"), ("block_m", "block_m"), ("block_n", "block_n"),
                        ("num_warps", "num_warps"), MICROSECONDS, gbs, once],
                       sorted(sweep, key=lambda r: (r["M"], r["N"], r["ms"])))
    return lines


def main() -> None:
    from triton.testing import do_bench

    from surogate.kernels.lora_add import DEFAULT, Config, lora_add_

    args, env = command_line(__doc__, "--sweep", action="store_true",
                             help="also time the kernel at other launch configs")
    systems = {"cuBLAS addmm_": lambda out, h, u, c: out.addmm_(h, u.t(), alpha=LORA_SCALE),
               "lora_add_": lambda out, h, u, c: lora_add_(out, h, u, None, LORA_SCALE, c)}
    rows, sweep = [], []
    for m, n in itertools.product(ROWS, OUTPUTS):
        out, hidden, up = _inputs(m, n)
        exact = (out.double() + LORA_SCALE * (hidden.double() @ up.double().t())).bfloat16()
        work = out.clone()  # what the timed calls add into, over and over; `out` stays the checks' input
        for name, fn in systems.items():
            correct = _rounded_once(fn(out.clone(), hidden, up, DEFAULT), exact)
            ms = do_bench(lambda fn=fn, a=(work, hidden, up): fn(*a, DEFAULT), warmup=10, rep=50)
            rows.append({"M": m, "N": n, "r": RANK, "system": name, "ms": ms, "GB/s": _moved(m, n) / ms / 1e6,
                         "rounded_once": correct})
            print(f"M={m:<6d} N={n:<6d} {name:14s} {ms * 1e3:8.1f} us {_moved(m, n) / ms / 1e6:7.0f} GB/s  "
                  f"exact sum rounded once: {correct:.4f}", flush=True)
        if args.sweep:
            for bm, bn, warps in itertools.product((16, 32, 64, 128), (128, 256, 512), (4, 8)):
                config = Config(bm, bn, warps)
                correct = _rounded_once(lora_add_(out.clone(), hidden, up, None, LORA_SCALE, config), exact)
                ms = do_bench(lambda c=config, a=(work, hidden, up): lora_add_(*a, None, LORA_SCALE, c),
                              warmup=5, rep=20)
                sweep.append({"M": m, "N": n, **vars(config), "ms": ms, "GB/s": _moved(m, n) / ms / 1e6,
                              "rounded_once": correct})
            best = min((r for r in sweep if (r["M"], r["N"]) == (m, n)), key=lambda r: r["ms"])
            print(f"sweep M={m} N={n}: best {best}", flush=True)
        del out, work, hidden, up, exact
        torch.cuda.empty_cache()
    lines = markdown(env, rows, sweep)
    write_results(args.out, "lora_add", env, {"rows": rows, "sweep": sweep}, lines)


if __name__ == "__main__":
    main()
