"""Causal attention forward + backward, by SDPA backend, at the shapes our users train.

Why: plain causal batches (no example boundaries) run through Hugging Face's SDPA call with no
mask, and PyTorch picks its backend by a fixed priority (flash first). On Hopper, cuDNN's fused
attention may be faster; this measures each backend (and FlexAttention, which packed rows use) on
the same tensors, with grouped-query heads as the models have them, and checks each against an
FP32 reference. A backend that cannot take a shape is reported as such, not timed.

    python bench/attention_backends.py [--out bench/results]

Writes attention_backends_<gpu>.json / .md with the GPU, versions and commit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: microbench
from microbench import command_line, write_results  # noqa: E402

# name: (query heads, key/value heads, head dim)
SHAPES = {
    "Qwen3-8B / Llama-3-8B / Mistral-7B": (32, 8, 128),
    "Qwen3-0.6B": (16, 8, 128),
    "Phi-3-mini": (32, 32, 96),
    "Llama-3.2-1B": (32, 8, 64),
}
# (batch, sequence) of the benchmark (tps.py) and of longer / shorter rows
ROWS = [(2, 2048), (1, 4096), (8, 512)]
BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def _inputs(b: int, s: int, h: int, hkv: int, d: int, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(0)
    # (B, S, H, D) transposed to (B, H, S, D): the strides HF's attention layers hand SDPA
    q = torch.randn(b, s, h, d, device="cuda", dtype=dtype, generator=g).transpose(1, 2)
    k = torch.randn(b, s, hkv, d, device="cuda", dtype=dtype, generator=g).transpose(1, 2)
    v = torch.randn(b, s, hkv, d, device="cuda", dtype=dtype, generator=g).transpose(1, 2)
    dout = torch.randn(b, h, s, d, device="cuda", dtype=dtype, generator=g)
    return [t.detach().requires_grad_(True) for t in (q, k, v)], dout


def _run(kind: str, q, k, v, expand: bool):
    gqa = q.shape[1] != k.shape[1]
    if expand and gqa:  # what HF does when it cannot pass enable_gqa: repeat the kv heads
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        gqa = False
    if kind == "flex":
        return _flex_causal(q, k, v, gqa)
    if kind == "math_fp32":
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=gqa)
    with sdpa_kernel(BACKENDS[kind]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)


_FLEX = {}


def _flex_causal(q, k, v, gqa: bool):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    b, h, s, _ = q.shape
    key = (q.shape, k.shape, q.device)
    if key not in _FLEX:
        # compiled per shape (dynamic=False, main() raises the recompile limit): past the limit Dynamo would
        # run the eager, unfused FlexAttention
        _FLEX[key] = (create_block_mask(lambda b_, h_, qi, ki: ki <= qi, None, None, s, s, device=q.device),
                      torch.compile(flex_attention, dynamic=False))
    mask, fn = _FLEX[key]
    return fn(q, k, v, block_mask=mask, enable_gqa=gqa)


def _fwd_bwd(kind, q, k, v, dout, expand):
    out = _run(kind, q, k, v, expand)
    torch.autograd.backward(out, dout)
    return out


def measure(kind: str, b: int, s: int, h: int, hkv: int, d: int, expand: bool, ref) -> dict:
    from triton.testing import do_bench

    (q, k, v), dout = _inputs(b, s, h, hkv, d)
    try:
        out = _fwd_bwd(kind, q, k, v, dout, expand)
    except RuntimeError as e:
        return {"error": str(e).splitlines()[0][:160]}
    torch.cuda.synchronize()
    ro, rq, rk, rv = ref
    err = {n: ((a.float() - r).norm() / r.norm()).item()
           for n, a, r in (("out", out, ro), ("dq", q.grad, rq), ("dk", k.grad, rk), ("dv", v.grad, rv))}

    def fwd():
        with torch.no_grad():
            _run(kind, q, k, v, expand)

    def both():
        for t in (q, k, v):
            t.grad = None
        _fwd_bwd(kind, q, k, v, dout, expand)

    fwd_ms = do_bench(fwd, warmup=25, rep=100)
    total_ms = do_bench(both, warmup=25, rep=100)
    flops = 4 * b * h * s * s * d / 2  # causal: half the score matrix; fwd 2 GEMMs, bwd 5 (2.5x)
    return {"fwd_ms": fwd_ms, "fwd_bwd_ms": total_ms, "fwd_tflops": flops / fwd_ms / 1e9,
            "fwd_bwd_tflops": 3.5 * flops / total_ms / 1e9, "rel_err": err}


def reference(b, s, h, hkv, d):
    (q, k, v), dout = _inputs(b, s, h, hkv, d)
    out = _run("math_fp32", q, k, v, expand=False)
    torch.autograd.backward(out, dout.float())
    return out.detach(), q.grad.float(), k.grad.float(), v.grad.float()


def main() -> None:
    torch._dynamo.config.recompile_limit = 256  # one FlexAttention graph per shape measured
    args, env = command_line(__doc__, "--shapes", default=",".join(SHAPES), help="names from SHAPES, comma-separated")
    rows = []
    kinds = [("flash", False), ("cudnn", False), ("cudnn", True), ("efficient", False), ("flex", False)]
    for name in args.shapes.split(","):
        h, hkv, d = SHAPES[name]
        for b, s in ROWS:
            ref = reference(b, s, h, hkv, d)
            for kind, expand in kinds:
                if expand and h == hkv:
                    continue
                r = measure(kind, b, s, h, hkv, d, expand, ref)
                label = kind + (" (kv repeated)" if expand else "")
                rows.append({"shape": name, "heads": [h, hkv, d], "batch": b, "seq": s, "backend": label, **r})
                cell = (f"{r['fwd_ms']:.3f} / {r['fwd_bwd_ms']:.3f} ms, err out {r['rel_err']['out']:.1e} "
                        f"dq {r['rel_err']['dq']:.1e}" if "error" not in r else "not taken: " + r["error"])
                print(f"{name:36s} {b}x{s:<5d} {label:22s} {cell}", flush=True)
            del ref
            torch.cuda.empty_cache()
    lines = [f"# Causal attention forward / forward+backward by backend ({env.get('gpu')})", "",
             f"torch {env.get('torch')}, commit {env.get('commit')}; bf16, do_bench; rel. error vs FP32 math.", "",
             "| heads (q, kv, d) | rows | backend | fwd ms | fwd+bwd ms | fwd+bwd TFLOP/s | rel err out / dq |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} {tuple(r['heads'])} | {r['batch']}x{r['seq']} | {r['backend']} | "
                         f"not taken: {r['error']} | | | |")
            continue
        lines.append(f"| {r['shape']} {tuple(r['heads'])} | {r['batch']}x{r['seq']} | {r['backend']} | "
                     f"{r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | {r['fwd_bwd_tflops']:.0f} | "
                     f"{r['rel_err']['out']:.1e} / {r['rel_err']['dq']:.1e} |")
    write_results(args.out, "attention_backends", env, {"rows": rows}, lines)


if __name__ == "__main__":
    main()
