"""The gated delta rule (Qwen3.5 / Qwen3-Next linear attention) forward and forward + backward: transformers'
PyTorch rule (what HF+PEFT runs without flash-linear-attention) against surogate's (surogate/ops/delta_rule.py:
the same algorithm, its pass over chunks one Triton kernel each way) and surogate's op as a compiled model runs
it (`surogate::gated_delta_rule`: the backward runs the rule again under autograd).

    python bench/delta_rule.py [--out bench/results] [--profile]

`--profile` adds where the op's forward + backward spends its GPU time at the first shape and row (torch.profiler:
the kernels by total CUDA time), the breakdown to read before the next kernel.

Inputs as a Qwen3.5 DeltaNet layer hands them over (q, k, v, beta bf16; g FP32; q/k l2-normalized in the rule).
Errors are relative (Frobenius) against transformers' rule in FP32 without TF32. Writes delta_rule_<gpu>.json /
.md with the GPU, versions and commit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: microbench
from microbench import command_line, write_results  # noqa: E402

MODULE = "transformers.models.qwen3_5.modeling_qwen3_5"
# name: (heads, key head dim, value head dim)
SHAPES = {"Qwen3.5-0.8B-class (bench/configs)": (16, 128, 128), "32 value heads": (32, 128, 128)}
ROWS = [(2, 2048), (1, 4096), (8, 512)]


def _inputs(b: int, s: int, h: int, dk: int, dv: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k = (torch.randn(b, s, h, dk, device="cuda", generator=gen).bfloat16() for _ in range(2))
    v = torch.randn(b, s, h, dv, device="cuda", generator=gen).bfloat16()
    g = -torch.rand(b, s, h, device="cuda", generator=gen) * 0.3
    beta = torch.rand(b, s, h, device="cuda", generator=gen).bfloat16()
    grad = torch.randn(b, s, h, dv, device="cuda", generator=gen).bfloat16()
    return [t.requires_grad_() for t in (q, k, v, g, beta)], grad


def _systems() -> dict:
    import importlib

    from surogate.ops import linear_attention  # noqa: F401  (registers surogate::gated_delta_rule)
    from surogate.ops.delta_rule import chunk_gated_delta_rule

    modeling = importlib.import_module(MODULE)
    hf = getattr(modeling.torch_chunk_gated_delta_rule, "__wrapped__", modeling.torch_chunk_gated_delta_rule)
    return {
        "transformers (PyTorch loop)": lambda *x: hf(*x[:3], g=x[3], beta=x[4], use_qk_l2norm_in_kernel=True)[0],
        "surogate rule": lambda *x: chunk_gated_delta_rule(*x, use_qk_l2norm=True),
        "surogate op (as compiled)": lambda *x: torch.ops.surogate.gated_delta_rule(*x, None, True),
    }


def measure(run, inputs, grad, ref) -> dict:
    from triton.testing import do_bench

    def both():
        for t in inputs:
            t.grad = None
        torch.autograd.backward(run(*inputs), grad)

    with torch.no_grad():
        out = run(*inputs)
    both()
    err = {"out": out.float(), **{f"d{n}": t.grad.float() for n, t in zip("qkvgb", inputs)}}
    err = {n: ((a - ref[n]).norm() / ref[n].norm()).item() for n, a in err.items()}

    def forward():
        with torch.no_grad():
            run(*inputs)

    return {"fwd_ms": do_bench(forward, warmup=5, rep=40), "fwd_bwd_ms": do_bench(both, warmup=5, rep=40),
            "rel_err": err}


def profile(run, inputs, grad, top: int = 15) -> list[dict]:
    """The kernels of one forward + backward of `run` by total CUDA time (after a warm-up call)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    def both():
        for t in inputs:
            t.grad = None
        torch.autograd.backward(run(*inputs), grad)

    both()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        both()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in events) or 1.0
    return [{"kernel": e.key[:90], "calls": e.count, "cuda_ms": e.device_time_total / 1e3,
             "share": e.device_time_total / total} for e in events[:top]]


def main() -> None:
    args, env = command_line(__doc__, "--profile", action="store_true",
                             help="the op's kernels by CUDA time at the first shape and row")
    systems, rows = _systems(), []
    for name, (h, dk, dv) in SHAPES.items():
        for b, s in ROWS:
            inputs, grad = _inputs(b, s, h, dk, dv)
            out = systems["transformers (PyTorch loop)"](*inputs)
            torch.autograd.backward(out, grad)
            ref = {"out": out.detach().float(), **{f"d{n}": t.grad.float() for n, t in zip("qkvgb", inputs)}}
            for system, run in systems.items():
                r = measure(run, inputs, grad, ref)
                rows.append({"shape": name, "heads": [h, dk, dv], "batch": b, "seq": s, "system": system, **r})
                print(f"{name:36s} {b}x{s:<5d} {system:28s} fwd {r['fwd_ms']:7.2f} ms  "
                      f"fwd+bwd {r['fwd_bwd_ms']:7.2f} ms"
                      f"  err out {r['rel_err']['out']:.1e} dq {r['rel_err']['dq']:.1e} dg {r['rel_err']['dg']:.1e}",
                      flush=True)
            del inputs, grad, ref
            torch.cuda.empty_cache()
    kernels = []
    if args.profile:
        (h, dk, dv), (b, s) = next(iter(SHAPES.values())), ROWS[0]
        kernels = profile(systems["surogate op (as compiled)"], *_inputs(b, s, h, dk, dv))
        for k in kernels:
            print(f"{k['share']:6.1%} {k['cuda_ms']:8.3f} ms {k['calls']:5d} x  {k['kernel']}")
    lines = [f"# Gated delta rule, forward / forward + backward ({env.get('gpu')})", "",
             f"torch {env.get('torch')}, triton {env.get('triton')}, commit {env.get('commit')}; do_bench; "
             "relative error against transformers' rule in FP32 (no TF32).", "",
             "| heads, Dk, Dv | rows | system | fwd ms | fwd+bwd ms | rel err out / dq / dg |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        e = r["rel_err"]
        lines.append(f"| {r['shape']} {tuple(r['heads'])} | {r['batch']}x{r['seq']} | {r['system']} | "
                     f"{r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | {e['out']:.1e} / {e['dq']:.1e} / {e['dg']:.1e} |")
    if kernels:
        (h, dk, dv), (b, s) = next(iter(SHAPES.values())), ROWS[0]
        lines += ["", f"The op's forward + backward at {h} heads of {dk}, {b} x {s}: kernels by CUDA time", "",
                  "| share | CUDA ms | calls | kernel |", "|---|---|---|---|"]
        lines += [f"| {k['share']:.1%} | {k['cuda_ms']:.3f} | {k['calls']} | `{k['kernel']}` |" for k in kernels]
    write_results(args.out, "delta_rule", env, {"rows": rows, "profile": kernels}, lines)


if __name__ == "__main__":
    main()
