"""Where the time of one training step goes: GEMMs, attention, norm/rope/activation, LM head + loss,
optimizer and launch gaps, per (model, system). It is the evidence for choosing the next fusion.

    python bench/step_profile.py --models 0.6B,8B --systems hf_compile,surogate:bf16,surogate:fp8
    python bench/step_profile.py --models 0.6B --systems surogate:bf16 --warmup 3 --trace   # + Chrome traces

Each (model, system) runs in its own subprocess (as in bench/tps.py, whose model builder, shapes and
environment record this reuses): build, `--warmup` full optimizer steps (compile, autotune), then ONE
optimizer step (accum micro-batches of forward, loss / accum, backward; AdamW step; zero_grad) under
`torch.profiler` with CPU and CUDA activities. Every GPU activity (kernel, memcpy, memset) of that step
is put in one category:

1. by the CPU ops above its launch, where they say more than the kernel's name: kernels under
   `Optimizer.step` are "optimizer"; kernels under the loss (`surogate::lm_head_ce*`, cross_entropy,
   nll_loss, log_softmax) or under an ATen op or Inductor kernel with a vocabulary-sized input (the
   LM-head GEMM, the fp32 upcast of the logits) are "lm head + loss". Without this the LM-head GEMM
   (about a quarter of the GEMM FLOPs of Qwen3-0.6B) would count as a plain cuBLAS GEMM;
2. otherwise by its name, with the ordered table `RULE_TABLE` (first match wins).

"launch gaps / idle" is the wall time of the profiled step minus the union of the GPU's busy
intervals (kernels on several streams that overlap count once). The profiler itself slows the CPU
side, so the idle share of the profiled step is an upper bound; the step's wall time without the
profiler (the last warm-up step) is reported next to it.

Writes bench/results/profile.json and profile.md (and, with --trace, one Chrome trace per run).
The classification and the interval arithmetic are pure functions of plain lists, tested on CPU by
tests/test_profile_smoke.py.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench/: microbench

from microbench import load_script  # noqa: E402

RESULTS = HERE / "results"

GEMM_SUROGATE = "gemm (surogate fused)"
GEMM_GROUPED = "gemm (surogate grouped, MoE experts)"
ROUTING = "sort / gather / scatter (MoE routing; index ops)"
GEMM_OTHER = "gemm (cuBLAS/other)"
QUANT = "quantize/dequantize"
ATTENTION = "attention"
LOSS = "lm head + loss"
OPTIMIZER = "optimizer"
ELEMENTWISE = "norm/rope/activation (fused elementwise)"
MEMORY = "memory copies"
OTHER = "other"
IDLE = "launch gaps / idle"
CATEGORIES = [GEMM_SUROGATE, GEMM_GROUPED, GEMM_OTHER, QUANT, ATTENTION, ROUTING, LOSS, OPTIMIZER, ELEMENTWISE, MEMORY,
              OTHER, IDLE]
GEMMS = {GEMM_SUROGATE, GEMM_GROUPED, GEMM_OTHER}

# Kernel name -> category, case-insensitive, first match wins. Attention comes before the cuBLAS
# GEMMs because cuDNN's SDPA kernels carry "wgmma" in their names; the elementwise category has two
# rules around memory copies so that Inductor's "triton_poi_fused__to_copy_add..." stays elementwise
# while ATen's "vectorized_elementwise_kernel<FillFunctor>" and "direct_copy_kernel" count as copies.
RULE_TABLE: list[tuple[str, str]] = [
    (GEMM_GROUPED, r"_grouped_lora_gemm|_grouped_wgrad"),
    (GEMM_SUROGATE, r"lora_gemm|_grad_input|_dgrad"),
    (ATTENTION, r"flash|fmha|attn|sdpa|attention"),
    (GEMM_OTHER, r"gemm|sm90_xmma|sm80_xmma|cutlass|nvjet|cublas|_scaled_mm|wgmma|triton_tem_fused_\w*mm"),
    (QUANT, r"quantize|dequant|amax"),
    (LOSS, r"cross_entropy|lm_head|nll|log_?softmax|_ce_"),
    (OPTIMIZER, r"adam|foreach|multi_tensor|fused_adam"),
    # Sorting the (token, expert) pairs, group bounds, gathers and scatters of the rows; also Inductor's
    # fused kernels named after them.
    (ROUTING, r"sort|searchsorted|topk|index|gather|scatter|histc|bincount"),
    (ELEMENTWISE, r"triton_|rms|norm|rope|rotary|silu|gelu|swiglu"),
    (MEMORY, r"memcpy|memset|copy|cat|fill"),
    (ELEMENTWISE, r"mul|add|elementwise|vectorized|reduce"),
]
RULES = [(category, re.compile(pattern, re.IGNORECASE)) for category, pattern in RULE_TABLE]

# The CPU ops above a kernel (its launcher, then the launcher's parents) that decide its category.
OPTIMIZER_CONTEXT = re.compile(r"Optimizer\.(step|zero_grad)|_fused_adam", re.IGNORECASE)
LOSS_CONTEXT = re.compile(r"lm_head|cross_entropy|nll_?loss|log_?softmax", re.IGNORECASE)
EMBEDDING_CONTEXT = re.compile(r"embedding", re.IGNORECASE)
# CUDA runtime/driver calls as the profiler names them (cudaLaunchKernel, cuLaunchKernelEx, cudaMemcpyAsync),
# and among them those that put kernels on the GPU (what CUDA graphs and fusion take away).
RUNTIME_CALL = re.compile(r"^cu(da)?[A-Z]")
LAUNCH_CALL = re.compile(r"^cu(da)?(LaunchKernel|LaunchCooperativeKernel|GraphLaunch)")
TOP_KERNELS = 15
SHORT_KERNEL_US = 10.0  # kernels averaging less than this: launch-latency-bound, candidates for fusing away

Kernel = tuple  # (name, start_us or None, dur_us) or (name, start_us or None, dur_us, category or None)
Chain = Sequence[tuple[str, bool]]  # (op name, has an input with a vocabulary-sized dim), launcher first


# ----------------------------------------------------------------------------- pure functions


def classify(name: str) -> str:
    """The category of a GPU activity from its name alone (`RULE_TABLE`, first match wins)."""
    for category, pattern in RULES:
        if pattern.search(name):
            return category
    return OTHER


def context_category(chain: Chain) -> str | None:
    """The category the launching CPU ops impose on a kernel, or None to fall back to its name."""
    names = [name for name, _ in chain]
    if any(OPTIMIZER_CONTEXT.search(n) for n in names):
        return OPTIMIZER
    if any(LOSS_CONTEXT.search(n) for n in names):
        return LOSS
    if any(EMBEDDING_CONTEXT.search(n) for n in names):
        return None  # the embedding table is vocabulary-sized too, but it is not the LM head
    if any(vocab and name.startswith(("aten::", "triton_")) for name, vocab in chain):
        return LOSS  # an ATen op or Inductor kernel fed the (..., vocab) logits or the LM-head weight
    return None


def has_dim(shapes: Any, size: int) -> bool:
    """Whether a (nested) list of input shapes, as the profiler records them, has a dim equal to `size`."""
    if isinstance(shapes, int):
        return shapes == size
    if isinstance(shapes, (list, tuple)):
        return any(has_dim(s, size) for s in shapes)
    return False


def busy_us(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of [start, start + dur) intervals: GPU time with at least one activity running."""
    total, lo, hi = 0.0, None, None
    for start, end in sorted((s, s + d) for s, d in intervals if d > 0):
        if hi is None or start > hi:
            if hi is not None:
                total += hi - lo
            lo, hi = start, end
        else:
            hi = max(hi, end)
    return total + (hi - lo if hi is not None else 0.0)


def summarize(kernels: Sequence[Kernel], wall_us: float) -> dict:
    """Per-category time and share of the step, idle time and the top kernels of one profiled step.

    `kernels` are (name, start_us, dur_us[, category]); a missing or None category is `classify(name)`.
    Without start times (None) the busy time is the plain sum of durations, which double-counts
    kernels that overlap on several streams; `idle_method` says which was used.
    """
    per_category: dict[str, float] = defaultdict(float)
    per_kernel: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])
    for k in kernels:
        name, dur = k[0], float(k[2])
        category = (k[3] if len(k) > 3 else None) or classify(name)
        per_category[category] += dur
        per_kernel[(name, category)][0] += 1
        per_kernel[(name, category)][1] += dur
    timed = bool(kernels) and all(k[1] is not None for k in kernels)
    busy = busy_us((k[1], k[2]) for k in kernels) if timed else sum(float(k[2]) for k in kernels)
    per_category[IDLE] = max(0.0, wall_us - busy)
    wall = max(wall_us, 1e-9)
    ranked = sorted(per_kernel.items(), key=lambda item: -item[1][1])
    top = ranked[:TOP_KERNELS]
    short = [(count, us) for _, (count, us) in ranked if us < SHORT_KERNEL_US * count]
    return {
        "launches": len(kernels),
        "gpu_busy_s": busy / 1e6,
        "idle_s": per_category[IDLE] / 1e6,
        "idle_method": "wall - union of GPU busy intervals" if timed
        else "wall - sum of kernel times (no timestamps: overlapping kernels counted twice)",
        "categories": {c: {"ms": per_category[c] / 1e3, "share": per_category[c] / wall} for c in CATEGORIES},
        "top_kernels": [{"name": name, "category": cat, "count": int(count), "ms": us / 1e3, "share": us / wall}
                        for (name, cat), (count, us) in top],
        # Every kernel, for the long tail the top list hides (the 8B step has ~17k launches).
        "kernels": [{"name": name, "category": cat, "count": int(count), "ms": us / 1e3}
                    for (name, cat), (count, us) in ranked],
        "short_launches": int(sum(c for c, _ in short)),
        "short_s": sum(us for _, us in short) / 1e6,
    }


def largest_non_gemm(record: dict) -> tuple[str, float, float] | None:
    """(category, ms, share) with the most time outside the two GEMM categories and idle."""
    rows = [(c, v["ms"], v["share"]) for c, v in record["categories"].items() if c not in GEMMS | {IDLE}]
    rows = [r for r in rows if r[1] > 0]
    return max(rows, key=lambda r: r[1]) if rows else None


def _cell(record: dict | None, category: str) -> str:
    if record is None or "error" in record:
        return "-"
    v = record["categories"].get(category, {"ms": 0.0, "share": 0.0})
    return f"{v['ms']:.1f} ms ({100 * v['share']:.1f}%)"


def _md_name(name: str, width: int = 100) -> str:
    name = name if len(name) <= width else name[:width - 1] + "…"
    return "`" + name.replace("|", "\\|").replace("`", "'") + "`"


def category_table(records: list[dict], model: str) -> list[str]:
    """Markdown table of one model: a row per category, a column per system (ms and % of the step)."""
    rows = [r for r in records if r["model"] == model]
    systems = list(dict.fromkeys(r["system"] for r in rows))
    by = {r["system"]: r for r in rows}
    lines = ["| category | " + " | ".join(systems) + " |", "|---|" + "---|" * len(systems)]
    lines += [f"| {c} | " + " | ".join(_cell(by[s], c) for s in systems) + " |" for c in CATEGORIES]
    lines.append("| **step (profiled)** | " + " | ".join(
        "-" if "error" in by[s] else f"{1e3 * by[s]['step_s']:.1f} ms" for s in systems) + " |")
    return lines


def _step_line(r: dict) -> str:
    line = (f"- {r['system']}: {r['launches']} GPU kernels/step ({r['launch_calls']} CPU launch calls), "
            f"GPU busy {1e3 * r['gpu_busy_s']:.1f} ms, idle {1e3 * r['idle_s']:.1f} ms = "
            f"{100 * r['idle_s'] / r['step_s']:.1f}% of the profiled step; "
            f"{r.get('placed_by_context', 0)} kernels placed by their launching op")
    if "short_launches" in r:
        line += (f"; {r['short_launches']} launches of kernels averaging < {SHORT_KERNEL_US:.0f} us take "
                 f"{1e3 * r['short_s']:.1f} ms")
    if r.get("unprofiled_step_s"):
        idle = max(0.0, r["unprofiled_step_s"] - r["gpu_busy_s"])
        line += (f"; without the profiler the step takes {1e3 * r['unprofiled_step_s']:.1f} ms "
                 f"(idle ≈ {100 * idle / r['unprofiled_step_s']:.1f}%, "
                 f"{r['tokens_per_s_unprofiled'] / 1e3:.1f}k tok/s)")
    return line


def markdown(records: list[dict], env: dict) -> str:
    """profile.md: per model a category table and launch/idle lines, then top kernels, then next-fusion hints."""
    ok = [r for r in records if "error" not in r]
    shape = next((r for r in records if "batch" in r), {})
    lines = [f"# Where one training step's time goes ({env.get('gpu', '?')}, torch {env.get('torch', '?')}, "
             f"triton {env.get('triton', '?')}, commit {env.get('commit', '?')})", "",
             f"One optimizer step (batch {shape.get('batch', '?')} x seq {shape.get('seq', '?')}, "
             f"grad accumulation {shape.get('accum', '?')}, AdamW fused) under torch.profiler after "
             f"{shape.get('warmup', '?')} warm-up steps; LoRA r=16 as bench/tps.py's lora_config (the 7 projections; "
             "Phi-3: its 4 linears; MoE: attention and every expert). "
             "Time per category is the sum of its GPU activities' durations, as a share of the profiled "
             "step's wall time; categories on concurrent streams may overlap. Idle = wall - union of GPU "
             "busy intervals; the profiler slows the CPU side, so it is an upper bound. surogate systems replay "
             "each micro-step as one CUDA graph (GraphedStep), so the profiler sees no CPU op above their "
             "kernels and places them by name only: the LM-head GEMM counts as a cuBLAS GEMM and the chunked "
             "loss's exp / elementwise kernels as fused elementwise (\"lm head + loss\" reads 0 there).", ""]
    for model in dict.fromkeys(r["model"] for r in records):
        lines += [f"## {model}", ""] + category_table(records, model) + [""]
        lines += [_step_line(r) for r in ok if r["model"] == model] + [""]
    for r in ok:
        lines += [f"### Top {TOP_KERNELS} kernels: {r['model']} {r['system']}", "",
                  "| kernel | category | count | ms | % of step |", "|---|---|---|---|---|"]
        lines += [f"| {_md_name(k['name'])} | {k['category']} | {k['count']} | {k['ms']:.2f} | "
                  f"{100 * k['share']:.1f}% |" for k in r["top_kernels"]] + [""]
    lines += ["## Largest non-GEMM share (candidates for the next fusion)", ""] if ok else []
    for r in ok:
        top = largest_non_gemm(r)
        lines.append(f"- {r['model']} {r['system']}: largest non-GEMM share: " +
                     (f"{top[0]}, {top[1]:.1f} ms ({100 * top[2]:.1f}% of the step)" if top else "none"))
    errors = [r for r in records if "error" in r]
    if errors:
        lines += ["", "Not measured:", ""] + [f"- {r['model']} {r['system']}: {_last_line(r['error'])}"
                                               for r in errors]
    return "\n".join(lines) + "\n"


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "failed"


def write_results(records: list[dict], env: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps({"environment": env, "records": records}, indent=2))
    (out / "profile.md").write_text(markdown(records, env))


# ----------------------------------------------------------------------------- profiler events


def _device_us(evt: Any) -> float:
    """Self device time of a profiler event or average, in us, across torch versions (cuda_* before 2.4)."""
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(evt, attr, None)
        if value is not None:
            return float(value)
    return 0.0


def _is_device(evt: Any) -> bool:
    from torch.autograd import DeviceType

    return getattr(evt, "device_type", None) == DeviceType.CUDA


def _is_annotation(evt: Any) -> bool:
    """GPU-timeline copies of record_function ranges (they span kernels and the gaps between them)."""
    return bool(getattr(evt, "is_user_annotation", False)) or "annotation" in str(getattr(evt, "activity_type", "")) \
        or evt.name.startswith("ProfilerStep")


def _chain(op: Any, vocab: int, depth: int = 64) -> tuple[tuple[str, bool], ...]:
    links = []
    while op is not None and len(links) < depth:
        links.append((op.name, has_dim(getattr(op, "input_shapes", None), vocab)))
        op = getattr(op, "cpu_parent", None)
    return tuple(links)


def _launcher(e: Any, ops: dict[int, Any], calls: dict[int, Any]) -> Any:
    """The CPU op that launched GPU activity `e`, or None.

    Where FunctionEvent has `linked_correlation_id` (recent torch), a GPU activity's equals the `id`
    of its launching op. Otherwise (older torch) the activity's `id` is the CUPTI correlation it
    shares with its runtime call (cudaLaunchKernel, cuLaunchKernelEx, ...), which the profiler
    nests under the launching op, so the op is that call's `cpu_parent`.
    """
    corr = getattr(e, "linked_correlation_id", 0)
    if corr and corr in ops:
        return ops[corr]
    call = calls.get(e.id)
    return getattr(call, "cpu_parent", None)


def device_kernels(events: Sequence[Any], vocab: int) -> tuple[list[Kernel], int, int]:
    """(kernels as (name, start_us, dur_us, category or None), CPU launch calls, kernels placed by context).

    `events` is `prof.events()`: GPU activities (device type CUDA) minus the GPU copies of
    record_function ranges; each is placed by the chain of CPU ops above its launcher, if that
    decides (`context_category`), else left to `classify`.
    """
    host = [e for e in events if not _is_device(e)]
    calls = {e.id: e for e in host if RUNTIME_CALL.match(e.name)}
    ops = {e.id: e for e in host if not RUNTIME_CALL.match(e.name) and getattr(e, "linked_correlation_id", 0) == 0}
    placed: dict[int, str | None] = {}  # id() of a launching op -> its context category
    kernels, by_context = [], 0
    for e in events:
        if not _is_device(e) or _is_annotation(e):
            continue
        op = _launcher(e, ops, calls)
        if id(op) not in placed:
            placed[id(op)] = context_category(_chain(op, vocab)) if op is not None else None
        category = placed[id(op)]
        by_context += category is not None
        kernels.append((e.name, e.time_range.start, e.time_range.elapsed_us(), category))
    return kernels, sum(1 for e in host if LAUNCH_CALL.match(e.name)), by_context


def averaged_kernels(prof: Any) -> list[Kernel]:
    """Fallback without per-event device records: (name, None, total us) from key_averages()."""
    return [(a.key, None, _device_us(a)) for a in prof.key_averages() if _is_device(a) and _device_us(a) > 0]


# ----------------------------------------------------------------------------- worker (GPU)


def _tps() -> ModuleType:
    """bench/tps.py (the model widths, systems and the worker's pieces)."""
    return load_script("tps")


def _step(micro_step: Any, opt: Any, batches: list) -> Any:
    """One optimizer step, as bench/tps.py's worker runs it; returns the mean micro-batch loss."""
    import torch

    losses = [micro_step(ids).clone() for ids in batches]
    opt.step()
    opt.zero_grad(set_to_none=True)
    return torch.stack(losses).mean()


def _trace_path(out: Path, size: str, system: str) -> Path:
    return out / f"trace_{_tps().model_name(size)}_{re.sub(r'[^A-Za-z0-9.+-]', '-', system)}.json.gz"


def worker(size: str, system: str, warmup: int, batch: int, seq: int, accum: int, trace: Path | None) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    tps = _tps()
    torch.cuda.reset_peak_memory_stats()
    model = tps.build(size, system)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0,
                            fused=True)
    vocab = tps.model_config(size).vocab_size
    g = torch.Generator(device="cuda").manual_seed(0)
    batches = [torch.randint(0, vocab, (batch, seq), device="cuda", generator=g) for _ in range(accum)]
    micro_step = tps.micro_step_fn(model, system, accum)
    unprofiled = None  # the last warm-up step's wall time; the first step compiles, so it counts from the second
    for i in range(warmup):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        _step(micro_step, opt, batches)
        torch.cuda.synchronize()
        unprofiled = time.perf_counter() - t0 if i > 0 else None

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        t0 = time.perf_counter()
        loss = _step(micro_step, opt, batches)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    kernels, calls, by_context = device_kernels(prof.events(), vocab)
    if not kernels:
        kernels = averaged_kernels(prof)
    if trace is not None:
        prof.export_chrome_trace(str(_trace_path(trace, size, system)))
    tokens = batch * seq * accum
    return {
        "model": tps.model_name(size), "system": system, "batch": batch, "seq": seq, "accum": accum,
        "warmup": warmup,
        "step_s": wall, "tokens_per_s": tokens / wall, "unprofiled_step_s": unprofiled,
        "tokens_per_s_unprofiled": tokens / unprofiled if unprofiled else None,
        "loss": float(loss), "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        **summarize(kernels, wall * 1e6), "launch_calls": calls, "placed_by_context": by_context,
    }


# ----------------------------------------------------------------------------- driver


def _available(system: str) -> str | None:
    try:
        return _tps().available(system)
    except Exception:  # e.g. a recipe suffix plan() does not know yet: let the worker decide
        return None


def _environment() -> dict:
    return _tps().environment()


def run_one(size: str, system: str, args: argparse.Namespace) -> dict:
    """One (model, system) in a subprocess; a crash, OOM or timeout becomes a record with an error."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", size, system, f"--warmup={args.warmup}",
           f"--batch={args.batch}", f"--seq={args.seq}", f"--accum={args.accum}", f"--out={args.out}"]
    cmd += ["--trace"] if args.trace else []
    failed = {"model": _tps().model_name(size), "system": system}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {**failed, "error": f"timed out after {args.timeout}s"}
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    if done.returncode != 0 or not last.startswith("{"):
        return {**failed, "error": (done.stderr.strip() or done.stdout.strip() or f"exit {done.returncode}")[-2000:]}
    return json.loads(last)


def _summary_line(r: dict) -> str:
    if "error" in r:
        return f"{r['model']:14} {r['system']:22} FAILED: {_last_line(r['error'])}"
    shares = sorted(((v["share"], c) for c, v in r["categories"].items()), reverse=True)[:4]
    return (f"{r['model']:14} {r['system']:22} step {1e3 * r['step_s']:8.1f} ms  {r['launches']:6d} kernels  "
            + ", ".join(f"{c} {100 * s:.0f}%" for s, c in shares))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="0.6B,8B", help="comma list of bench/tps.py models: Qwen3 sizes (QWEN3, "
                   "QWEN3_MOE, e.g. 30B-A3B) and other models by name (ARCHS, e.g. Gemma-2-2B)")
    p.add_argument("--systems", default="hf_compile,surogate:bf16,surogate:fp8",
                   help="comma list of bench/tps.py systems: hf_eager, hf_compile, liger, bnb_nf4, surogate:<recipe>")
    p.add_argument("--warmup", type=int, default=2, help="full optimizer steps before the profiled one")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--accum", type=int, default=4)
    p.add_argument("--timeout", type=int, default=400, help="seconds per (model, system) subprocess")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--trace", action="store_true", help="also save a Chrome trace (.json.gz) per run into --out")
    p.add_argument("--worker", nargs=2, metavar=("MODEL", "SYSTEM"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        args.out.mkdir(parents=True, exist_ok=True)
        record = worker(*args.worker, warmup=args.warmup, batch=args.batch, seq=args.seq, accum=args.accum,
                        trace=args.out if args.trace else None)
        print(json.dumps(record))
        return 0

    env = _environment()
    shape = {"batch": args.batch, "seq": args.seq, "accum": args.accum, "warmup": args.warmup}
    records = []
    for size in args.models.split(","):
        for system in args.systems.split(","):
            why = _available(system) or _tps().unsupported(size, system)
            record = {"model": _tps().model_name(size), "system": system, "error": f"skipped: {why}"} if why \
                else run_one(size, system, args)
            records.append({**shape, **record, **env})
            print(_summary_line(record), flush=True)
            write_results(records, env, args.out)
    for model in dict.fromkeys(r["model"] for r in records):
        print(f"\n{model}\n" + "\n".join(category_table(records, model)))
    print(f"\nwrote {args.out / 'profile.md'} and profile.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
