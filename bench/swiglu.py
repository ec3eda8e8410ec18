"""SwiGLU's backward over a fused gate/up output, and qfp8's 1 x 128 quantize of the gradient: Inductor's kernels
(what a compiled qfp8 step ran before surogate/passes/swiglu.py: the SwiGLU backward into the cat's slices, then
the quantizer's twin reading it back) against `surogate::swiglu_backward` (kernels/swiglu.py, one kernel); and the
forward with the quantize of h for down_proj against `surogate::swiglu_forward` (swiglu.FORWARD_OP).

    python bench/swiglu.py [--out bench/results]

Rows M (tokens of a micro-batch) x intermediate I of Qwen3 / Llama MLPs; time by triton.testing.do_bench; GB/s
from the bytes each must move at least (dh, g, u read; dg, du written; with the quantize their E4M3 codes and
scales). Also checked: the op's gradient within an ulp of Inductor's, its codes equal to Inductor's but where
Inductor's approximate division moves an exact tie (tests/gpu/test_producer_gpu.py). Writes swiglu_<gpu>.json/.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: microbench
from microbench import command_line, write_results  # noqa: E402

# name: (intermediate size, gate activation)
MLPS = {"Qwen3-0.6B": (3072, "silu"), "Qwen3-8B": (12288, "silu"), "Llama-3-8B": (14336, "silu"),
        "Gemma-2-9B": (14336, "gelu_tanh")}
ROWS = [4096, 16384]


def _inductor(quantize: bool, activation: str):
    """The backward as the compiled qfp8 graph computed it: Inductor's fused SwiGLU backward written into the
    slices of `surogate::concat` (passes/concat.py), then `quantize_fp8_block_ref` of the cat."""
    from surogate.kernels.reference_formats import quantize_fp8_block_ref
    from surogate.kernels.reference_swiglu import gated_grads
    from surogate.passes import concat

    concat.lowered()

    def fn(dh, gate_up):
        g, u = gate_up.float().chunk(2, dim=-1)
        parts = [p.to(dh.dtype) for p in gated_grads(dh.float(), g, u, activation)]
        d = torch.ops.surogate.concat(parts, dh.dim() - 1)
        return (d, *quantize_fp8_block_ref(d)) if quantize else (d,)

    return torch.compile(fn, dynamic=False)


def _inductor_forward(activation: str):
    """The forward as the compiled qfp8 graph computes it: the model's `act(g) * u` and the producer pass's
    quantize of h for down_proj (passes/producer.py), Inductor's kernels."""
    import torch.nn.functional as F

    from surogate.kernels.reference_formats import quantize_fp8_block_ref

    def fn(gate_up):
        g, u = gate_up.chunk(2, dim=-1)
        h = (F.gelu(g, approximate="tanh") if activation == "gelu_tanh" else F.silu(g)) * u
        return (h, *quantize_fp8_block_ref(h))

    return torch.compile(fn, dynamic=False)


def _systems(direction: str, quantize: bool, activation: str) -> dict:
    import surogate.ops.swiglu  # noqa: F401  (registers surogate::swiglu_backward / _forward)

    ops = torch.ops.surogate
    if direction == "forward":
        return {"Inductor (before)": _inductor_forward(activation),
                "surogate::swiglu_forward": lambda gate_up: ops.swiglu_forward(gate_up, activation, quantize)}
    return {"Inductor (before)": _inductor(quantize, activation),
            "surogate::swiglu_backward": lambda dh, gate_up: ops.swiglu_backward(dh, gate_up, activation, quantize)}


# (direction, quantize): the backward with qfp8's gradient quantize and without it; the forward with h's quantize.
CASES = [("backward", True), ("backward", False), ("forward", True)]


def _bytes(direction: str, m: int, i: int, quantize: bool) -> int:
    """What a pass must move at least: backward dh, g, u read, dg, du written; forward g, u read, h written; plus
    the E4M3 codes and FP32 scales of what it quantizes."""
    moved, quantized = (m * i * 2 * 5, m * 2 * i) if direction == "backward" else (m * i * 2 * 3, m * i)
    return moved + (quantized + quantized // 128 * 4 if quantize else 0)


def _sweep() -> list[dict]:
    """The kernel's time at Qwen3-8B's M = 4096 under other (TILE_M, num_warps) than its config function's."""
    from triton.testing import do_bench

    from surogate.kernels import swiglu as kernel

    gen = torch.Generator(device="cuda").manual_seed(0)
    dh = torch.randn(4096, 12288, device="cuda", generator=gen).bfloat16()
    gate_up = (torch.randn(4096, 2 * 12288, device="cuda", generator=gen) * 3).bfloat16()
    original, rows = kernel.get_swiglu_backward_configs, []
    try:
        for tile_m in (8, 16, 32, 64):
            for warps in (2, 4, 8):
                kernel.get_swiglu_backward_configs = lambda arch=None, t=tile_m, w=warps: dict(
                    TILE_M=t, BK=kernel.BLOCK, num_warps=w)
                ms = do_bench(lambda: kernel.swiglu_backward(dh, gate_up, True), warmup=10, rep=50)
                rows.append({"TILE_M": tile_m, "num_warps": warps, "ms": ms})
                print(f"sweep TILE_M={tile_m:<3d} num_warps={warps}  {ms * 1e3:7.1f} us", flush=True)
    finally:
        kernel.get_swiglu_backward_configs = original
    return rows


def main() -> None:
    from triton.testing import do_bench

    args, env = command_line(__doc__, "--sweep", action="store_true",
                             help="also time the op's kernel at other tile configs (8B, M=4096)")
    rows = []
    for name, (inter, activation) in MLPS.items():
        for m in ROWS:
            gen = torch.Generator(device="cuda").manual_seed(0)
            dh = torch.randn(m, inter, device="cuda", generator=gen).bfloat16()
            gate_up = (torch.randn(m, 2 * inter, device="cuda", generator=gen) * 3).bfloat16()
            for direction, quantize in CASES:
                torch._dynamo.reset()  # one compile a shape (no recompile limit, no dynamic shapes)
                systems = _systems(direction, quantize, activation)
                inputs = (dh, gate_up) if direction == "backward" else (gate_up,)
                outs = {s: fn(*inputs) for s, fn in systems.items()}
                theirs, ours = outs.values()
                ulps = (ours[0].view(torch.int16).int() - theirs[0].view(torch.int16).int()).abs()
                check = {"max_ulps": int(ulps.max()), "share_apart": float((ulps > 0).float().mean())}
                if quantize:
                    apart = ours[1].view(torch.uint8) != theirs[1].view(torch.uint8)
                    check["codes_apart"] = float(apart.float().mean())
                for system, fn in systems.items():
                    ms = do_bench(lambda fn=fn, inputs=inputs: fn(*inputs), warmup=10, rep=50)
                    gbs = _bytes(direction, m, inter, quantize) / ms / 1e6
                    rows.append({"mlp": name, "M": m, "I": inter, "activation": activation, "direction": direction,
                                 "quantize": quantize,
                                 "system": system, "ms": ms, "GB/s": gbs, **check})
                    print(f"{name:11s} M={m:<6d} I={inter:<6d} {direction:8s} {'quantize' if quantize else 'bf16    '} "
                          f"{system:26s} {ms * 1e3:8.1f} us {gbs:7.0f} GB/s  ulps<= {check['max_ulps']} "
                          f"({check['share_apart']:.1e})" + (f" codes apart {check['codes_apart']:.1e}"
                                                              if quantize else ""), flush=True)
            del dh, gate_up, outs
            torch.cuda.empty_cache()
    sweep = _sweep() if args.sweep else []
    lines = [f"# SwiGLU backward (+ qfp8's 1 x 128 gradient quantize) and forward (+ h's): Inductor vs surogate's ops "
             f"({env.get('gpu')})", "",
             f"torch {env.get('torch')}, triton {env.get('triton')}, commit {env.get('commit')}; do_bench; GB/s of "
             "the bytes each must move; ulps: the op's bf16 gradient against Inductor's; codes apart: E4M3 codes "
             "that differ (exact ties, Inductor's approximate division).", "",
             "| MLP | M | I | direction | quantize | system | us | GB/s | max ulps (share) | codes apart |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mlp']} | {r['M']} | {r['I']} | {r.get('direction', 'backward')} | "
                     f"{'yes' if r['quantize'] else 'no'} | {r['system']} | "
                     f"{r['ms'] * 1e3:.1f} | {r['GB/s']:.0f} | {r['max_ulps']} ({r['share_apart']:.1e}) | "
                     f"{r.get('codes_apart', float('nan')):.1e} |")
    if sweep:
        lines += ["", "The op's kernel at other tile configs (Qwen3-8B, M = 4096, with the quantize)", "",
                  "| TILE_M | num_warps | us |", "|---|---|---|"]
        lines += [f"| {r['TILE_M']} | {r['num_warps']} | {r['ms'] * 1e3:.1f} |" for r in sweep]
    write_results(args.out, "swiglu", env, {"rows": rows, "sweep": sweep}, lines)


if __name__ == "__main__":
    main()
