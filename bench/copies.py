"""The ATen kernels a recipe's LoRA linears launch around their GEMMs in one training step, found on the CPU.

    python bench/copies.py --model 8B --recipe fp8      # writes bench/results/copies_<recipe>_<model>.{json,md}

Around its Triton and cuBLAS kernels the op's CUDA implementation (ops/lora_linear.py, kernels/launch.py and the
launchers) runs eager ATen calls: the LoRA factors' scaling, layout copies (their casts, with the persistent
kernel's U^T, are one Triton launch, kernels/lora_factors.py, which this does not list). On a GPU each is a
kernel of its own, on tensors of a few hundred KB, so each costs about a launch (the H200 profile of the 8B
fp8 step: 6,064 small `bfloat16_copy` kernels at ~1.3 us each, bench/NOTES.md "Copies in the fp8 step").
This runs each projection's forward and backward through that implementation on small CPU tensors (Triton
interpreted), with the route the kernel table gives the model's shape on sm_90 (`variants.route` at
M = batch x seq, the persistent kernel switched on exactly for the variants it takes there), records the ATen
ops (tests/aten_launches.py), maps each tensor's dims back to the model's (M, N, K, r) and sums over the
layers and micro-steps of bench/tps.py's step.

Not covered: a GEMM that cuBLAS runs on the GPU runs the Triton kernel here (its `addmm_` of the LoRA term
and the scales' layout copies are not counted; the table says which); horizontal fusion (bf16, qfp8: q/k/v
and gate/up as one op, whose concatenated factors Inductor builds) is not applied; the rest of the step
(Inductor's kernels, the LM head and loss, the eager code outside the compiled blocks) is in bench/NOTES.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported: the kernels run on the CPU
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/: microbench

import torch  # noqa: E402

from aten_launches import AtenLaunches  # noqa: E402  (tests/aten_launches.py)
from microbench import load_script  # noqa: E402  (bench/microbench.py)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TINY = {"M": 136, "N": 96, "K": 128, "r": 8}  # distinct, so that each tensor dim says which it is; M >= 128
# takes the bf16 scratch route of the dequantizing formats, as the model's M does
BYTES_PER_S = 3.5e12  # an H200's effective copy bandwidth (DESIGN.md: 4.3 TB/s peak)


def _tps():
    """bench/tps.py (the model widths and LoRA targets)."""
    return load_script("tps")


def projections(model: str) -> dict[str, tuple[int, int]]:
    """(N, K) of each LoRA target of a Qwen3 size (head_dim 128, as bench/tps.py builds them)."""
    hidden, inter, _, heads, kv, _ = _tps().QWEN3[model]
    shapes = {"q_proj": (heads * 128, hidden), "k_proj": (kv * 128, hidden), "v_proj": (kv * 128, hidden),
              "o_proj": (hidden, heads * 128), "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
              "down_proj": (hidden, inter)}
    return {name: shapes[name] for name in _tps().TARGETS}


def _routes(recipe, m: int, n: int, k: int, rank: int) -> tuple:
    """The (forward, dgrad) routes of one LoRA linear of `recipe` at (m, n, k) on sm_90 with cuBLAS available."""
    from surogate.kernels.variants import Gemm, route, variant

    forward = variant(Gemm.OUTPUT, recipe.forward, recipe.weight_format)
    dgrad = variant(Gemm.GRAD_INPUT, recipe.grad_input, recipe.weight_format)
    return route(forward, "sm_90", m, n, k, rank=rank), route(dgrad, "sm_90", m, k, n, rank=rank)


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype | None) -> int:
    return 0 if dtype is None else int(torch.Size(shape).numel()) * dtype.itemsize


def launches(recipe_name: str, n: int, k: int, m: int, rank: int, scale: float) -> tuple[list[dict], list[str]]:
    """The elementwise ATen launches of one LoRA linear's forward + backward at the model's (m, n, k, rank), run
    at TINY's sizes on the routes the model's shape takes; and those routes, as text."""
    import importlib

    from numerics import lora_gemm_case  # tests/numerics.py
    from surogate.kernels import variants
    from surogate.recipes import get

    op = importlib.import_module("surogate.ops.lora_linear")
    recipe = get(recipe_name)
    routes = _routes(recipe, m, n, k, rank)
    fmt, fwd, dg = recipe.weight_format.value, recipe.forward.value, recipe.grad_input.value
    x, _, a, b, _, go, wl = lora_gemm_case(TINY["M"], TINY["N"], TINY["K"], TINY["r"], fmt, 0, "cpu")

    def step():
        y, h, a_cast, b_cast = op.lora_linear_cuda(x, wl, fmt, a, b, None, None, scale, fwd, dg)
        op.lora_linear_backward_cuda(go, x, wl, fmt, a, b, None, h, scale, dg, None,
                                     a_cast if a_cast.numel() else None, b_cast if b_cast.numel() else None)

    saved = variants.PERSISTENT_SM90
    variants.PERSISTENT_SM90 = {r.variant.kernel: 1 for r in routes if r.engine is variants.Engine.PERSISTENT}
    try:
        step()  # one-time work (the LoRA gradients' scale tensor) out of the count
        with AtenLaunches() as log:
            step()
    finally:
        variants.PERSISTENT_SM90 = saved
    dims = {TINY["M"]: m, TINY["N"]: n, TINY["K"]: k, TINY["r"]: rank}
    rows = []
    for launch in log.elementwise():
        inputs = [(tuple(dims.get(d, d) for d in shape), dtype) for shape, dtype, _ in launch.inputs]
        out = tuple(dims.get(d, d) for d in launch.shape)
        rows.append({"op": launch.name, "site": launch.site,
                     "inputs": [f"{shape} {str(dtype)[6:]}" for shape, dtype in inputs],
                     "output": f"{out} {str(launch.dtype)[6:]}",
                     "bytes": sum(_nbytes(*i) for i in inputs) + _nbytes(out, launch.dtype)})
    text = [str(r) + (" (cuBLAS on the GPU; the Triton kernel ran here)" if r.engine is variants.Engine.CUBLAS else "")
            for r in routes]
    return rows, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="8B", choices=list(_tps().QWEN3))
    parser.add_argument("--recipe", default="fp8")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--rows", type=int, default=2 * 2048, help="tokens per micro-batch (M)")
    parser.add_argument("--micro-steps", type=int, default=4)
    args = parser.parse_args()
    from surogate.training.info import run_record

    layers = _tps().QWEN3[args.model][2]
    per_step = layers * args.micro_steps
    table: dict[tuple, dict] = defaultdict(lambda: {"per_layer": 0, "bytes_per_step": 0, "projections": []})
    routes = {}
    for name, (n, k) in projections(args.model).items():
        rows, routes[name] = launches(args.recipe, n, k, args.rows, args.rank, args.alpha / args.rank)
        for row in rows:
            entry = table[(row["site"], row["op"], row["output"].split(" ")[-1], " ".join(
                i.split(" ")[-1] for i in row["inputs"]))]
            entry["per_layer"] += 1
            entry["bytes_per_step"] += row["bytes"] * per_step
            entry["projections"].append(f"{name}: {', '.join(row['inputs'])} -> {row['output']}")
    records = [{"site": s, "op": op, "inputs": i, "output": o, "per_layer_micro_step": e["per_layer"],
                "per_step": e["per_layer"] * per_step, "mb_per_step": e["bytes_per_step"] / 1e6,
                "ms_at_3p5_tbs": e["bytes_per_step"] / BYTES_PER_S * 1e3, "shapes": e["projections"]}
               for (s, op, o, i), e in sorted(table.items())]
    total = sum(r["per_step"] for r in records)
    result = {"environment": run_record(), "model": args.model, "recipe": args.recipe, "rank": args.rank,
              "lora_scale": args.alpha / args.rank, "rows": args.rows, "layers": layers,
              "micro_steps": args.micro_steps, "routes": routes, "launches": records, "launches_per_step": total}
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"copies_{args.recipe}_{args.model}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# ATen launches around the LoRA GEMMs: Qwen3-{args.model} {args.recipe} (CPU, commit "
             f"{result['environment']['commit']})", "",
             f"Per LoRA linear forward + backward through the op's CUDA implementation, r={args.rank}, "
             f"M={args.rows}; x {layers} layers x {args.micro_steps} micro-steps per step. Bytes: read + written at "
             f"the model's shapes; ms: those bytes at {BYTES_PER_S / 1e12:.1f} TB/s (a launch of a small tensor "
             "costs ~1.3-2 us whatever its bytes).", "", "Routes (sm_90, forward / dgrad): "
             + "; ".join(f"{k}: {' / '.join(v)}" for k, v in routes.items()), "",
             "| site | op | inputs -> output dtype | per layer per micro-step | per step | MB per step "
             "| ms at 3.5 TB/s |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['site']} | {r['op']} | {r['inputs']} -> {r['output']} | {r['per_layer_micro_step']} | "
                     f"{r['per_step']} | {r['mb_per_step']:.1f} | {r['ms_at_3p5_tbs']:.3f} |")
    lines += ["", f"**{total} launches per step** ({total // per_step} per layer and micro-step)."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
