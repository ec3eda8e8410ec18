"""Soak the persistent TMA kernel, config by config: does any config give wrong or non-deterministic output?

Why: training the fp8 recipe with its row-scaled GEMMs (forward and dgrad) on `_persistent_lora_gemm_kernel`
(surogate/kernels/persistent.py) hit a NaN loss at a random step (5, 6 and 36 in three runs, bench/NOTES.md
runs 63-64) at the fidelity shapes: M = 1024 rows; (N, K) = (1024, 512) q/k/v fused, (512, 512) o, (2560, 512)
gate/up fused, (512, 1280) down; the dgrads the same with N and K swapped (reading the cached K-major FP8
weight transpose); LoRA rank 16. With the route off, training was fine. The suspects then: a race in a
warp-specialized config, an output tile never written (the launcher allocates its output with torch.empty),
stale shared memory or TMA descriptors. A NaN once in thousands of launches is invisible to the validations
(bench/fused_kernels.py, tests/gpu/test_persistent_gpu.py), which launch once.

Outcome on the H200 (run 65): every fp8 config clean, 160,000 launches, with and without --scratch-ring 64. The
fault needed training under CUDA graphs (runs 66-70: NaN from finite inputs at a random replay, never eagerly;
gone without the warp-specialized configs, which the library no longer offers). So a clean soak is necessary,
not sufficient; tests/gpu/test_graphed_step_gpu.py's fp8 replay test trains through graphs instead.

What: for each family (--families: bf16, fp8, qfp8), direction (forward, dgrad), shape (--shapes, default the
four fidelity ones at --m 1024; or --models 8B) and config of the family (`configs.get_configs(family, "sm_90")`
with `configs.PERSISTENT_WARP_SPECIALIZE = True`, so the warp-specialized configs are in), the kernel runs
--iters times on fixed inputs, each output compared with the first (torch.equal):
- the inputs are the op's own: bench/fused_kernels.py's `make_case`, and the arguments `_op_fwd` / `_op_dgrad` pass
  `launch_persistent_gemm` on the persistent route (recorded, not run: `op_call`), the config then pinned;
- --poison (default on): before each launch, blocks of the output's size are filled with NaN and handed back
  to the caching allocator, so the output (torch.empty) lands on NaN: a tile the kernel never writes shows as
  NaN ("poisoned" counts the launches whose output did land on a poisoned block);
- --interleave (default on): the same shape's other direction (same config) runs between two launches, and
  each eager output is held until the next launch returns. Every launch writes its device-side TMA descriptors
  (`tl.make_tensor_descriptor`) into a global scratch buffer the caching allocator hands out again at the same
  address; in training consecutive launches are different GEMMs, so the descriptors there change from launch
  to launch, while identical back-to-back launches would rewrite identical descriptors and hide a stale one
  (in the sm_90 PTX only warp 0 of each partition fences a descriptor for the TMA proxy, yet 2-4 warps issue
  the LoRA U^T loads and the output stores through it);
- --graph (default on, besides eager; CUDA only): G launches (--graph-launches) captured in a CUDA graph,
  replayed iters / G times, every output compared with the eager first one: how training ran the kernel;
- per row: launches, mismatching launches (not equal to the first), launches with a NaN / Inf, the largest
  |difference| from the first, where the differences sat (tiles; the share in rows BLOCK_M/2.. of a tile, a
  warp-specialized build's second consumer warpgroup), the first output's SQNR against the plain-torch
  reference of the same math (`surogate.kernels.reference`, as `validate_persistent`), the config.
The most suspect rows run first (fp8 warp-specialized configs at the fidelity shapes); no row starts after
--time-limit seconds (and a running one stops there), and the output says which did not run. A table line per
row as it goes; bench/results/persistent_soak.{json,md} (--out): environment, table, verdict.

On the H200 (one call each, under the 10-minute limit):
    python bench/persistent_soak.py --out $OUT
    python bench/persistent_soak.py --families fp8 --scratch-ring 64 --out $OUT/ring   # if the first finds faults
    python bench/persistent_soak.py --models 8B --m 4096 --iters 500
(--out $OUT on the second too, for its files to come back.)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import inspect
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import triton

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))  # bench/: microbench

from microbench import load_script  # noqa: E402
from surogate.kernels import configs, persistent  # noqa: E402
from surogate.kernels import reference as ref  # noqa: E402
from surogate.kernels.configs import interpreting  # noqa: E402
from surogate.recipes import current_arch  # noqa: E402
from surogate.training.info import run_record  # noqa: E402


kb = load_script("fused_kernels")

# (N, K) of the forward GEMMs of bench/fidelity.py's "small" Qwen3 base (hidden 512, 8 + 2 x 4 heads of 64,
# intermediate 1280), q/k/v and gate/up fused as trained; its fine-tune's micro-batch is 2 x 512 = 1024 rows.
FIDELITY_SHAPES = {"qkv": (1024, 512), "o": (512, 512), "gate_up": (2560, 512), "down": (512, 1280)}
DIRECTIONS = ("forward", "dgrad")
FLOOR_DB = 35.0  # tests/gpu/test_persistent_gpu.py's floor: below it a config computes the wrong GEMM
POISON_BLOCKS = 2  # NaN-filled blocks handed back before each launch (the output takes one of them)


# ------------------------------------------------------------------ what runs: inputs, calls, configs


@dataclasses.dataclass
class Target:
    """One (family, linear) case: the op's recorded kernel calls and plain-torch outputs per direction."""

    recipe: str
    linear: str
    m: int
    n: int
    k: int
    calls: dict[str, dict]
    refs: dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Spec:
    """One row: a target's direction under one config of its kernel family."""

    target: Target
    direction: str
    family: str
    index: int  # the config's place in its family's list
    config: triton.Config


@contextlib.contextmanager
def _recording(calls: list[dict]) -> Iterator[None]:
    """`persistent.launch_persistent_gemm` replaced by a recorder of its arguments (defaults filled in) that
    runs nothing and returns an empty output, so the op's own operand preparation is captured as is."""
    real = persistent.launch_persistent_gemm
    signature = inspect.signature(real)

    def record(*args, **kwargs) -> torch.Tensor:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        calls.append(dict(bound.arguments))
        a = bound.arguments["a"]
        return torch.empty((a.shape[0], bound.arguments["n_out"]), dtype=bound.arguments["out_dtype"],
                           device=a.device)

    persistent.launch_persistent_gemm = record
    try:
        yield
    finally:
        persistent.launch_persistent_gemm = real


def _grad_hidden(c: dict) -> torch.Tensor:
    """gh = grad_output @ lora_b, the dgrad's LoRA input (as bench/fused_kernels.py's validation makes it)."""
    return c["go"] @ c["b"].bfloat16()


def op_call(c: dict, direction: str) -> dict:
    """The `launch_persistent_gemm` arguments of the op's forward or dgrad on case `c` as the persistent route
    passes them (quantized activation / gradient, FP8 weight list or its K-major transpose, LoRA factors)."""
    calls: list[dict] = []
    with _recording(calls):
        if direction == "forward":
            kb._op_fwd(c, "persistent")
        else:
            kb._op_dgrad(c, _grad_hidden(c), "persistent")
    if len(calls) != 1:
        raise RuntimeError(f"the {direction} launched the persistent kernel {len(calls)} times, not once: "
                           "its route (variants.PERSISTENT_SM90) does not take this shape")
    return {name: v for name, v in calls[0].items() if name != "config"}


def references(c: dict) -> dict[str, torch.Tensor]:
    """The op's forward output and grad_input in plain torch: FP32 math on the same quantized operands."""
    y, h = ref.lora_linear_ref(c["x"], c["wl"], c["fmt"], c["a"], c["b"], None, None, kb.SCALE, c["fwd"], c["dg"])
    gi = ref.lora_linear_backward_ref(c["go"], c["x"], c["wl"], c["fmt"], c["a"], c["b"], None, h, kb.SCALE,
                                      c["dg"])[0]
    return {"forward": y, "dgrad": gi}


def make_target(recipe: str, linear: str, m: int, n: int, k: int) -> Target:
    """bench/fused_kernels.py's case for one linear (seed 0), its recorded calls and references."""
    c = kb.make_case(n, k, recipe, seed=0, m=m)
    return Target(recipe, linear, m, n, k, {d: op_call(c, d) for d in DIRECTIONS}, references(c))


def family_configs(family: str) -> list[triton.Config]:
    """Every sm_90 config of a persistent family, the warp-specialized ones included whatever this Triton is."""
    before = configs.PERSISTENT_WARP_SPECIALIZE
    configs.PERSISTENT_WARP_SPECIALIZE = True
    try:
        return configs.get_configs(family, "sm_90")
    finally:
        configs.PERSISTENT_WARP_SPECIALIZE = before


def plan(targets: list[Target]) -> list[Spec]:
    """Every (target, direction, config), the most suspect first: fp8 before the other families, warp-specialized
    configs before the rest, then the targets' order (the fidelity shapes first), direction, config."""
    specs = []
    for t in targets:
        for d in DIRECTIONS:
            call = t.calls[d]
            family = persistent.FAMILIES[(call["a_mode"], call["w_mode"])]
            specs += [Spec(t, d, family, i, c) for i, c in enumerate(family_configs(family))]
    order = {id(t): i for i, t in enumerate(targets)}
    return sorted(specs, key=lambda s: (s.target.recipe != "fp8", not s.config.kwargs["WARP_SPECIALIZE"],
                                        order[id(s.target)], DIRECTIONS.index(s.direction), s.index))


# ------------------------------------------------------------------ launching and comparing


def launch(call: dict, config: triton.Config) -> torch.Tensor:
    """One kernel launch of a recorded call with `config` pinned."""
    return persistent.launch_persistent_gemm(**{**call, "config": config})


def poison(nbytes: int, device: torch.device) -> list[tuple[int, int]]:
    """Fill POISON_BLOCKS fresh blocks of `nbytes` with bf16 NaN and free them, so the caching allocator hands
    NaN-filled memory to the next allocation of that size; their address ranges."""
    blocks = [torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).fill_(float("nan"))
              for _ in range(POISON_BLOCKS)]
    return [(b.data_ptr(), b.data_ptr() + nbytes) for b in blocks]


def landed_on(out: torch.Tensor, spans: list[tuple[int, int]]) -> bool:
    """Whether `out` was allocated inside one of the poisoned blocks."""
    return any(lo <= out.data_ptr() < hi for lo, hi in spans)


def poisoned_launch(call: dict, config: triton.Config, nbytes: int, enabled: bool) -> tuple[torch.Tensor, bool]:
    """A launch on poisoned memory (when `enabled`): (output, whether it landed on the poison)."""
    spans = poison(nbytes, call["a"].device) if enabled else []
    out = launch(call, config)
    return out, landed_on(out, spans)


def differing(out: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """The elements where `out` is not `first`, a NaN at the same place as in `first` counting as equal (NaN
    launches are tallied apart, and a NaN in the first output must not make every later launch a mismatch)."""
    return (out != first) & ~(out.isnan() & first.isnan())


def same(out: torch.Tensor, first: torch.Tensor) -> bool:
    """The same output as the first: torch.equal, or else equal but for NaN at the same places."""
    return torch.equal(out, first) or not bool(differing(out, first).any())


def describe_difference(out: torch.Tensor, first: torch.Tensor, config: triton.Config) -> dict:
    """Where `out` differs from `first`: element count, the first one, the tiles (BLOCK_M x BLOCK_N) holding
    them, and the share in rows BLOCK_M/2.. of their tile (a warp-specialized build's second consumer)."""
    bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    where = differing(out, first).nonzero()
    tiles = torch.unique(torch.stack([where[:, 0] // bm, where[:, 1] // bn], dim=1), dim=0)
    return dict(elements=len(where), first=[int(v) for v in where[0]],
                tiles=[[int(a), int(b)] for a, b in tiles[:16]],
                second_half_share=float(((where[:, 0] % bm) >= bm // 2).float().mean()))


@dataclasses.dataclass
class Stats:
    """One row's tally over its launches."""

    launches: int = 0
    mismatches: int = 0  # launches whose output is not the first's (`same`)
    nonfinite: int = 0  # launches with any NaN / Inf in their output
    poisoned: int = 0  # launches whose output landed on NaN-filled memory
    max_abs_diff: float = 0.0  # largest finite |output - first| over all launches
    first_bad: dict | None = None  # describe_difference of the first mismatching launch, with its number

    def count(self, out: torch.Tensor, poisoned: bool) -> None:
        """Tally a launch: its poisoning and whether its output is all finite."""
        self.launches += 1
        self.poisoned += int(poisoned)
        self.nonfinite += int(not bool(torch.isfinite(out).all()))

    def compare(self, out: torch.Tensor, first: torch.Tensor, config: triton.Config) -> None:
        """Tally a mismatch of `out` against the first output: how far off, and where (the first one)."""
        if same(out, first):
            return
        self.mismatches += 1
        diff = (out.float() - first.float()).abs()
        finite = diff[torch.isfinite(diff)]
        if finite.numel():
            self.max_abs_diff = max(self.max_abs_diff, float(finite.max()))
        if self.first_bad is None:
            self.first_bad = dict(launch=self.launches, **describe_difference(out, first, config))


def out_bytes(call: dict) -> int:
    """Bytes of the output `launch_persistent_gemm` allocates for `call`: the poison blocks' size."""
    return call["a"].shape[0] * call["n_out"] * torch.finfo(call["out_dtype"]).bits // 8


class ScratchRing:
    """Triton's allocator for the global scratch of device-side TMA descriptors (`triton.set_allocator`), handing
    out `n` buffers per size in turn, all kept alive: no two of `n` consecutive launches write their descriptors
    at the same address. The library's allocator (compat.ensure_tma_allocator) takes a fresh `torch.empty` per
    launch, which the caching allocator mostly returns at the same address: the --scratch-ring A/B of the lead
    that a stale descriptor of the previous GEMM at that address is used."""

    def __init__(self, n: int, device: str) -> None:
        self.n, self.device = n, device
        self.buffers: dict[int, list[torch.Tensor]] = collections.defaultdict(list)
        self.calls: collections.Counter = collections.Counter()

    def __call__(self, size: int, alignment: int, stream) -> torch.Tensor:
        ring = self.buffers[size]
        if len(ring) < self.n:
            ring.append(torch.empty(size, device=self.device, dtype=torch.int8))
        self.calls[size] += 1
        return ring[(self.calls[size] - 1) % self.n]


@dataclasses.dataclass(frozen=True)
class Settings:
    """How each row runs (the command line's choices) and when the soak stops (time.monotonic())."""

    iters: int
    graph: bool
    group: int  # launches captured in one CUDA graph
    poison: bool
    interleave: bool
    deadline: float


def soak_eager(call: dict, config: triton.Config, decoy: dict | None, s: Settings) -> tuple[torch.Tensor, Stats]:
    """`s.iters` eager launches, each on poisoned memory and after a launch of `decoy` (None: none), the last
    output held until the next launch returns, so that no two consecutive launches write the same address:
    (the first output, the tally of all against it)."""
    nbytes, stats = out_bytes(call), Stats()
    first, hit = poisoned_launch(call, config, nbytes, s.poison)
    stats.count(first, hit)
    held = collections.deque([first], maxlen=1)
    while stats.launches < s.iters and time.monotonic() < s.deadline:
        if decoy is not None:
            launch(decoy, config)
        out, hit = poisoned_launch(call, config, nbytes, s.poison)
        stats.count(out, hit)
        stats.compare(out, first, config)
        held.append(out)
    return first, stats


def soak_graph(call: dict, config: triton.Config, decoy: dict | None, first: torch.Tensor, s: Settings) -> Stats:
    """A CUDA graph of `s.group` launches (each after its poisoning and its `decoy`, captured too) replayed
    s.iters // s.group times; every output compared with the eager `first`."""
    graph, outs, hits = torch.cuda.CUDAGraph(), [], []
    with torch.cuda.graph(graph):
        for _ in range(s.group):
            if decoy is not None:
                launch(decoy, config)
            out, hit = poisoned_launch(call, config, out_bytes(call), s.poison)
            outs.append(out)
            hits.append(hit)
    stats = Stats()
    for _ in range(s.iters // s.group):
        if time.monotonic() > s.deadline:
            break
        graph.replay()
        for out, hit in zip(outs, hits):
            stats.count(out, hit)
            stats.compare(out, first, config)
    return stats


# ------------------------------------------------------------------ rows


def config_text(config: triton.Config) -> str:
    kw = config.kwargs
    return (f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} ws={int(kw['WARP_SPECIALIZE'])} "
            f"flatten={int(kw['FLATTEN'])} warps={config.num_warps} stages={config.num_stages}")


def make_row(spec: Spec, mode: str, stats: Stats, expected: int, sqnr_db: float, seconds: float,
             error: str | None = None) -> dict:
    """A table row: what ran (family, direction, linear, the GEMM's M x N_out x K_reduction, config, mode) and
    its tally; `expected` launches, fewer when the time limit cut it short."""
    t, call = spec.target, spec.target.calls[spec.direction]
    return dict(recipe=t.recipe, family=spec.family, direction=spec.direction, linear=t.linear, M=t.m, N=t.n, K=t.k,
                gemm=[t.m, call["n_out"], call["a"].shape[1]], config=config_text(spec.config),
                config_fields=dict(spec.config.kwargs, num_warps=spec.config.num_warps,
                                   num_stages=spec.config.num_stages), mode=mode, **dataclasses.asdict(stats),
                cut_short=error is None and stats.launches < expected, sqnr_db=sqnr_db, seconds=seconds, error=error)


def _error_text(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


def run_spec(spec: Spec, s: Settings) -> list[dict]:
    """The eager row of one (target, direction, config) and, with `s.graph`, its CUDA-graph row; with
    `s.interleave` the target's other direction (same config) runs between its launches. A config that fails
    to build or launch is a finding, not the end of the soak: its row carries the error."""
    call, t0 = spec.target.calls[spec.direction], time.monotonic()
    decoy = spec.target.calls[DIRECTIONS[1 - DIRECTIONS.index(spec.direction)]] if s.interleave else None
    try:
        first, eager = soak_eager(call, spec.config, decoy, s)
    except Exception as e:  # noqa: BLE001
        return [make_row(spec, "eager", Stats(), s.iters, float("nan"), time.monotonic() - t0, _error_text(e))]
    db = kb.sqnr(first, spec.target.refs[spec.direction])
    rows = [make_row(spec, "eager", eager, s.iters, db, time.monotonic() - t0)]
    if s.graph and time.monotonic() < s.deadline:
        t1, expected = time.monotonic(), s.iters // s.group * s.group
        try:
            stats = soak_graph(call, spec.config, decoy, first, s)
            rows.append(make_row(spec, "graph", stats, expected, db, time.monotonic() - t1))
        except Exception as e:  # noqa: BLE001
            rows.append(make_row(spec, "graph", Stats(), expected, db, time.monotonic() - t1, _error_text(e)))
    return rows


def spec_text(spec: Spec) -> str:
    t = spec.target
    return f"{t.recipe} {spec.direction} {t.linear} {config_text(spec.config)}"


def row_text(r: dict) -> str:
    m, n, k = r["gemm"]
    text = (f"{r['recipe']:<4} {r['direction']:<7} {r['linear']:<8} {m}x{n}x{k:<6} {r['config']:<46} {r['mode']:<5} "
            f"launches {r['launches']:>5}  mismatches {r['mismatches']:>4}  nan/inf {r['nonfinite']:>4}  "
            f"max|diff| {r['max_abs_diff']:<8.3g} poisoned {r['poisoned']:>5}  SQNR {r['sqnr_db']:5.1f} dB  "
            f"{r['seconds']:6.1f} s")
    if r["first_bad"]:
        b = r["first_bad"]
        text += (f" | first mismatch: launch {b['launch']}, {b['elements']} elements from {b['first']}, tiles "
                 f"{b['tiles']}, {b['second_half_share']:.0%} in rows BLOCK_M/2.. of their tile")
    if r["cut_short"]:
        text += " | cut short by the time limit"
    if r["error"]:
        text += f" | ERROR {r['error']}"
    return text


# ------------------------------------------------------------------ report


def bad_rows(rows: list[dict]) -> list[dict]:
    """Rows with any mismatch, any non-finite output, or an error."""
    return [r for r in rows if r["mismatches"] or r["nonfinite"] or r["error"]]


def _bad_text(r: dict) -> str:
    return (f"{r['recipe']} {r['direction']} {r['linear']} {r['config']} ({r['mode']}: {r['mismatches']} of "
            f"{r['launches']} launches mismatching, {r['nonfinite']} with NaN / Inf"
            + (f", {r['error']}" if r["error"] else "") + ")")


def verdict(rows: list[dict], not_run: list[str]) -> str:
    """One paragraph: the configs with any mismatch or NaN (or "none in N launches"), those below FLOOR_DB
    against the reference, and what the time limit left out."""
    total = sum(r["launches"] for r in rows)
    bad = bad_rows(rows)
    if bad:
        text = (f"Verdict: {len(bad)} of {len(rows)} rows with a mismatch, a NaN / Inf or an error, in {total} "
                "launches: " + "; ".join(map(_bad_text, bad)) + ".")
    else:
        text = (f"Verdict: none in {total} launches: every config gave the same finite output on every launch "
                f"({len(rows)} rows).")
    low = [r for r in rows if not r["error"] and not r["sqnr_db"] > FLOOR_DB]
    if low:
        text += f" Below {FLOOR_DB:.0f} dB against the reference: " + "; ".join(
            f"{r['recipe']} {r['direction']} {r['linear']} {r['config']} {r['sqnr_db']:.1f} dB"
            for r in low if r["mode"] == "eager") + "."
    if not_run:
        text += f" Not run (time limit): {len(not_run)} rows, from {not_run[0]}."
    return text


def _header(meta: dict) -> str:
    """The md's paragraph on what ran: environment and settings."""
    interleave = "on (the other direction launched between launches)" if meta["interleave"] else "off"
    return (f"torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}, {meta['date']}. "
            f"{meta['iters']} launches a row on fixed inputs (bench/fused_kernels.py's `make_case`, LoRA rank "
            f"{meta['rank']}), each output compared with the first; poison {'on' if meta['poison'] else 'off'} "
            "(the output lands on NaN-filled memory: a tile never written is NaN); graph rows: "
            f"{meta['graph_launches']} launches a CUDA graph, replayed; interleave {interleave}. GEMM: M x N_out x "
            "K (the reduction). max|diff|: against the first output. SQNR: the first output against the plain-torch "
            "reference.")


def markdown(meta: dict, rows: list[dict], notes: list[str], verdict_text: str) -> str:
    lines = [f"# The persistent kernel's soak on {meta['gpu']}", "", _header(meta), ""]
    lines += [f"- {n}" for n in notes] + ([""] if notes else [])
    lines += ["| family | direction | linear | GEMM | config | mode | launches | mismatches | NaN/Inf launches | "
              "max abs diff | poisoned | SQNR dB | s |", "|" + "---|" * 13]
    for r in rows:
        m, n, k = r["gemm"]
        cells = [r["recipe"], r["direction"], r["linear"], f"{m}x{n}x{k}", r["config"], r["mode"], str(r["launches"]),
                 str(r["mismatches"]), str(r["nonfinite"]), f"{r['max_abs_diff']:.3g}", str(r["poisoned"]),
                 f"{r['sqnr_db']:.1f}", f"{r['seconds']:.1f}"]
        if r["error"]:
            cells[6] = "ERROR " + r["error"].replace("|", "/")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", verdict_text]) + "\n"


def write_results(out: Path, meta: dict, rows: list[dict], notes: list[str], not_run: list[str],
                  verdict_text: str) -> None:
    """<out>/persistent_soak.json (meta, notes, rows, not_run, verdict) and persistent_soak.md."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "persistent_soak.json").write_text(json.dumps(
        dict(meta=meta, notes=notes, rows=rows, not_run=not_run, verdict=verdict_text), indent=1))
    md = markdown(meta, rows, notes, verdict_text)
    (out / "persistent_soak.md").write_text(md)
    print(md, flush=True)


# ------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default="bf16,fp8", help="recipes whose persistent family runs, of "
                   f"{','.join(kb.PERSISTENT_RECIPES)} (fp8: row-scaled FP8; qfp8: 1x128 / 128x128 blocks)")
    p.add_argument("--shapes", default="", help="linears as name=NxK (forward N, K), comma-separated; default "
                   "the fidelity shapes " + ",".join(f"{k}={n}x{kk}" for k, (n, kk) in FIDELITY_SHAPES.items()))
    p.add_argument("--models", default="", help="bench/fused_kernels.py models whose linears run (e.g. 8B), beside "
                   "--shapes, instead of the fidelity shapes")
    p.add_argument("--m", type=int, default=1024, help="rows M of every GEMM")
    p.add_argument("--iters", type=int, default=2000, help="launches per row")
    p.add_argument("--graph", action=argparse.BooleanOptionalAction, default=True,
                   help="also replay each config from a CUDA graph (CUDA only)")
    p.add_argument("--graph-launches", type=int, default=20, help="launches captured in one graph (G)")
    p.add_argument("--poison", action=argparse.BooleanOptionalAction, default=True,
                   help="NaN-fill the memory the output is allocated from before each launch")
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=True,
                   help="launch the same shape's other direction (same config) between a row's launches")
    p.add_argument("--scratch-ring", type=int, default=0, metavar="N",
                   help="TMA descriptor scratch from N buffers in turn (ScratchRing) instead of the library's "
                        "allocator (0): with mismatches at 0 and none at N, stale descriptors are the cause")
    p.add_argument("--time-limit", type=float, default=400.0, help="seconds; no row starts after them")
    p.add_argument("--out", default=str(HERE / "results"))
    return p.parse_args(argv)


def shapes(args: argparse.Namespace) -> dict[str, tuple[int, int]]:
    """name -> forward (N, K): --shapes, then each --models' linears; the fidelity shapes when neither is given."""
    out = {}
    for item in filter(None, args.shapes.split(",")):
        name, _, dims = item.rpartition("=")
        n, k = (int(v) for v in dims.lower().split("x"))
        out[name or f"{n}x{k}"] = (n, k)
    for model in filter(None, args.models.split(",")):
        out.update({f"{model}:{lin}": nk for lin, nk in kb.linear_shapes(model).items()})
    return out or dict(FIDELITY_SHAPES)


def device() -> str:
    """"cuda" on an sm_90 GPU (the kernel's only arch), "cpu" under the Triton interpreter (tests); else refused."""
    if torch.cuda.is_available():
        if current_arch() != "sm_90":
            raise SystemExit(f"the persistent kernel is built for sm_90 only, this GPU is {current_arch()}")
        return "cuda"
    if not interpreting():
        raise SystemExit("no GPU: run under TRITON_INTERPRET=1 (the Triton interpreter, tiny shapes)")
    return "cpu"


def soak(specs: list[Spec], s: Settings) -> tuple[list[dict], list[str]]:
    """Run the specs in order, a table line per row as it ends, none started past the deadline:
    (the rows, the specs not run)."""
    rows = []
    for i, spec in enumerate(specs):
        if time.monotonic() > s.deadline:
            return rows, [spec_text(x) for x in specs[i:]]
        for r in run_spec(spec, s):
            rows.append(r)
            print(row_text(r), flush=True)
    return rows, []


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.monotonic()
    kb.DEVICE = device()
    notes = []
    graph = args.graph and kb.DEVICE == "cuda"
    if args.graph and not graph:
        notes.append("--graph skipped: no CUDA here (CUDA graphs need a GPU); eager rows only.")
    s = Settings(args.iters, graph, args.graph_launches, args.poison, args.interleave, start + args.time_limit)
    if args.scratch_ring:
        triton.set_allocator(ScratchRing(args.scratch_ring, kb.DEVICE))
    meta = dict(run_record(str(HERE.parent)), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                iters=s.iters, graph=s.graph, graph_launches=s.group, poison=s.poison, interleave=s.interleave,
                m=args.m, rank=kb.RANK, time_limit_s=args.time_limit, scratch_ring=args.scratch_ring)
    specs = plan([make_target(recipe, name, args.m, n, k) for recipe in args.families.split(",")
                  for name, (n, k) in shapes(args).items()])
    print(f"{len(specs)} (family, direction, shape, config) to soak, {s.iters} launches each"
          f"{' eager and graph' if s.graph else ' eager'}; time limit {args.time_limit:.0f} s", flush=True)
    rows, not_run = soak(specs, s)
    if not_run:
        notes.append(f"Time limit ({args.time_limit:.0f} s) spent: {len(not_run)} of {len(specs)} "
                     f"(family, direction, shape, config) not run, the first: {not_run[0]}.")
        print(notes[-1], flush=True)
    meta["seconds"] = time.monotonic() - start
    write_results(Path(args.out), meta, rows, notes, not_run, verdict(rows, not_run))


if __name__ == "__main__":
    main()
