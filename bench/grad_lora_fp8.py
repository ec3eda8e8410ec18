"""LoRA A's gradient `s * gh^T @ x` three ways, on the GPU: from the bf16 input (cuBLAS, what runs by default), from
the input's FP8 copy rebuilt to bf16 first (what `save_fp8_inputs` ran before kernels/grad_lora_fp8.py: Inductor's
dequantize, then cuBLAS), and from the FP8 copy directly (`grad_lora_a_fp8`, dequantizing in its loads).

    python bench/grad_lora_fp8.py [--out bench/results]

Rows M (tokens of a micro-batch) x K of Qwen3-8B's LoRA inputs (4096: q/k/v, o, gate/up; 12288: down), r = 16,
both FP8 layouts (fp8: a scale a row; qfp8: a scale per 1 x 128 block). Time by triton.testing.do_bench; GB/s from
the bytes each must read at least (x in its dtype, gh). Checked: the kernel's gradient against the rebuild-then-
cuBLAS one (the same bf16 values; FP32 sums in another order). Writes grad_lora_fp8_<gpu>.json/.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: microbench
from microbench import MICROSECONDS, command_line, formatted, table, write_results  # noqa: E402

SHAPES = [(4096, 4096), (4096, 12288), (16384, 4096), (16384, 12288)]  # (M, K)
RANK = 16
LORA_SCALE = 2.0


def _systems(fmt: str) -> dict:
    from surogate.kernels.grad_lora import _weight_grad
    from surogate.kernels.grad_lora_fp8 import grad_lora_a_fp8
    from surogate.kernels.reference import dequantize_input_q

    rebuild = torch.compile(lambda data, scale: dequantize_input_q([data, scale], torch.bfloat16), dynamic=False)
    return {
        "bf16 input, cuBLAS": lambda gh, x, data, scale: _weight_grad(gh.t(), x, LORA_SCALE, torch.float32),
        "FP8 copy, rebuild + cuBLAS": lambda gh, x, data, scale: _weight_grad(gh.t(), rebuild(data, scale),
                                                                             LORA_SCALE, torch.float32),
        "FP8 copy, grad_lora_a_fp8": lambda gh, x, data, scale: grad_lora_a_fp8(gh, data, scale, LORA_SCALE,
                                                                                torch.float32),
    }


def _sweep() -> list[dict]:
    """The kernel at other launch configs (`grad_lora_fp8.Config`), each checked against the formula first."""
    import itertools

    from triton.testing import do_bench

    from surogate.kernels.grad_lora_fp8 import Config, grad_lora_a_fp8
    from surogate.kernels.reference import dequantize_input_q, input_quantizer

    rows = []
    for fmt, (m, k) in itertools.product(("fp8_row", "fp8_block"), [(4096, 4096), (4096, 12288), (16384, 12288)]):
        gen = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
        gh = torch.randn(m, RANK, device="cuda", generator=gen).bfloat16()
        data, scale = input_quantizer("fp8", fmt)(x)
        want = (gh.float().t() @ dequantize_input_q([data, scale], torch.bfloat16).float()) * LORA_SCALE
        for block_m, warps, stages, programs in itertools.product((64, 128, 256), (4, 8), (2, 3), (264, 1056)):
            config = Config(block_m, warps, stages, programs)
            try:
                got = grad_lora_a_fp8(gh, data, scale, LORA_SCALE, torch.float32, config)
            except Exception as e:  # noqa: BLE001 (a config the GPU cannot run: out of shared memory)
                print(f"{fmt} {m}x{k} {config}: {type(e).__name__}", flush=True)
                continue
            rel = float((got - want).norm() / want.norm())
            ms = do_bench(lambda c=config, a=(gh, data, scale): grad_lora_a_fp8(*a, LORA_SCALE, torch.float32, c),
                          warmup=5, rep=20)
            rows.append({"format": fmt, "M": m, "K": k, **vars(config), "ms": ms, "GB/s": m * k / ms / 1e6,
                         "rel": rel})
        best = min((r for r in rows if (r["format"], r["M"], r["K"]) == (fmt, m, k)), key=lambda r: r["ms"])
        print(f"sweep {fmt} {m}x{k}: best {best}", flush=True)
        del x, gh, data, scale, want
    return rows


def markdown(env: dict, rows: list[dict], sweep: list[dict]) -> list[str]:
    """The result file: each layout's systems per shape; with --sweep, the kernel's launch configs, fastest first."""
    gbs = ("GB/s", formatted("GB/s", ".0f"))
    lines = [f"# LoRA A's gradient from the bf16 input or its FP8 copy ({env.get('gpu')})", "",
             f"torch {env.get('torch')}, triton {env.get('triton')}, commit {env.get('commit')}; do_bench; r = {RANK}; "
             "GB/s of the bytes each must read (x, gh); rel: the kernel against rebuild + cuBLAS (same bf16 values).",
             ""]
    lines += table([("layout", "layout"), ("M", "M"), ("K", "K"), ("system", "system"), MICROSECONDS, gbs,
                    ("rel", formatted("rel_to_rebuild", ".1e"))], rows)
    if sweep:
        lines += ["", "The kernel at other launch configs (`grad_lora_fp8.Config`), fastest first per shape", ""]
        lines += table([("format", "format"), ("M", "M"), ("K", "K"), ("block_m", "block_m"),
                        ("num_warps", "num_warps"), ("num_stages", "num_stages"), ("programs", "programs"),
                        MICROSECONDS, gbs, ("rel", formatted("rel", ".1e"))],
                       sorted(sweep, key=lambda r: (r["format"], r["M"], r["K"], r["ms"])))
    return lines


def main() -> None:
    from triton.testing import do_bench

    from surogate.kernels.reference import input_quantizer

    args, env = command_line(__doc__, "--sweep", action="store_true",
                             help="also time the kernel at other launch configs")
    rows = []
    for fmt, layout in (("fp8_row", "row scales (fp8)"), ("fp8_block", "1 x 128 scales (qfp8)")):
        systems = _systems(fmt)
        for m, k in SHAPES:
            gen = torch.Generator(device="cuda").manual_seed(0)
            x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
            gh = torch.randn(m, RANK, device="cuda", generator=gen).bfloat16()
            data, scale = input_quantizer("fp8", fmt)(x)
            outs = {name: fn(gh, x, data, scale) for name, fn in systems.items()}
            ref = outs["FP8 copy, rebuild + cuBLAS"]
            rel = float((outs["FP8 copy, grad_lora_a_fp8"] - ref).norm() / ref.norm())
            for name, fn in systems.items():
                inputs = (gh, x, data, scale)
                ms = do_bench(lambda fn=fn, inputs=inputs: fn(*inputs), warmup=10, rep=50)
                read = m * k * (2 if name.startswith("bf16") else 1) + m * RANK * 2
                rows.append({"layout": layout, "M": m, "K": k, "r": RANK, "system": name, "ms": ms,
                             "GB/s": read / ms / 1e6, "rel_to_rebuild": rel})
                print(f"{layout:22s} M={m:<6d} K={k:<6d} {name:28s} {ms * 1e3:8.1f} us {read / ms / 1e6:7.0f} GB/s  "
                      f"kernel vs rebuild {rel:.1e}", flush=True)
            del x, gh, data, scale, outs, inputs
            torch.cuda.empty_cache()
    sweep = _sweep() if args.sweep else []
    lines = markdown(env, rows, sweep)
    write_results(args.out, "grad_lora_fp8", env, {"rows": rows, "sweep": sweep}, lines)


if __name__ == "__main__":
    main()
