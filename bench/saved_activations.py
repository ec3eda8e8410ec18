"""What one decoder layer keeps from its forward for its backward, per recipe, measured on the CPU.

    python bench/saved_activations.py --models 0.6B,8B --recipes bf16,qfp8,qnf4   # each with recompute off and on

`surogate.compile` runs on a one-layer Qwen3 at a real model's widths (bench/tps.py QWEN3; vocabulary
cut to 1024, which no layer reads), and the graph its backend receives is partitioned into forward and
backward by Inductor's min-cut partitioner, the one CUDA training runs. The forward's extra outputs are
what the backward keeps: the tensors it computed count (activations); graph inputs (parameters, frozen
weights, the block's input) are references and are listed apart. Their bytes scale with the tokens, so
the table gives bytes per token per layer, and per micro-batch of bench/tps.py (2 x 2048 tokens, all
layers). No GPU: the partition is a property of the graph, so the CUDA run saves the same set (Inductor
may still fuse away or reuse buffers, so this is the upper bound a peak sees per layer).
Writes bench/results/saved_activations.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from collections import Counter
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

RESULTS = Path(__file__).resolve().parent / "results"
MICRO_BATCH_TOKENS = 2 * 2048


def _node_kind(node: torch.fx.Node) -> str:
    """A short name for what produced a saved tensor (the aten op, or 'input')."""
    if node.op == "placeholder":
        return "input"
    target = getattr(node.target, "__name__", str(node.target))
    return target.replace(".default", "")


def kept_for_backward(model: torch.nn.Module, recipe: str, tokens: int, **options) -> list[dict]:
    """Compile `model` (a HF causal LM) with surogate for the CPU, run one step on `tokens` random tokens, and
    return what the forward of each compiled graph keeps for the backward under Inductor's min-cut
    partitioner: one record per kept tensor (shape with the symbolic sequence length at `tokens`, dtype,
    bytes, the aten op that made it or "input", the node's name). `options` go to `surogate.compile`."""
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    import surogate
    import surogate.compiler as compiler
    from surogate.passes import PassContext, run_pipeline

    records: list[dict] = []

    def backend_with_partitioner(rec, arch, report, options=None, inductor=None):  # the partition stands in for either
        def backend(gm, example_inputs):
            ctx = PassContext(rec, arch, report, dict(options or {}))
            run_pipeline(gm, ctx)
            # The forward graph returns the block's own outputs first, then what the backward keeps.
            user_outputs = len(_flat(next(n for n in gm.graph.nodes if n.op == "output").args[0]))

            def forward_compiler(fw, _inputs):
                outputs = _flat(next(n for n in fw.graph.nodes if n.op == "output").args[0])
                for node in outputs[user_outputs:]:
                    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
                    if isinstance(val, torch.Tensor):
                        shape = tuple(_hint(d) for d in val.shape)  # the sequence length is symbolic
                        records.append({"shape": shape, "dtype": str(val.dtype).replace("torch.", ""),
                                        "bytes": _hint(val.numel()) * val.element_size(), "kind": _node_kind(node),
                                        "node": node.name})
                return fw

            with compiler.backward_trace_flags(ctx.options):  # what the ops' autograd formulas read, as the backend
                return aot_module_simplified(gm, example_inputs, fw_compiler=forward_compiler,
                                             bw_compiler=lambda bw, _inputs: bw,
                                             partition_fn=min_cut_rematerialization_partition)
        return backend

    vocab = model.config.vocab_size
    with mock.patch.object(compiler, "make_backend", backend_with_partitioner):
        model = surogate.compile(model, recipe=recipe, arch="cpu", **options)
        ids = torch.randint(0, vocab, (1, tokens))
        model(input_ids=ids, labels=ids).loss.backward()
    return records


def activation_bytes_per_token(records: list[dict], tokens: int) -> float:
    """Bytes a token costs among the kept tensors that the forward computed (not graph inputs) and that
    have a sequence dimension."""
    return sum(r["bytes"] for r in records if r["kind"] != "input" and tokens in r["shape"]) / tokens


def saved_by_layer(size: str, recipe: str, tokens: int, **options) -> dict:
    """What one compiled Qwen3 decoder layer of `size` keeps under `recipe`, `tokens` tokens."""
    import transformers as T
    from tps import QWEN3

    hidden, inter, layers, heads, kv, _ = QWEN3[size]
    torch.manual_seed(0)
    cfg = T.Qwen3Config(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1, num_attention_heads=heads,
                        num_key_value_heads=kv, head_dim=128, vocab_size=1024)
    records = kept_for_backward(T.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16), recipe, tokens, **options)
    per_token = activation_bytes_per_token(records, tokens)
    by_kind = Counter()
    for r in records:
        if r["kind"] != "input" and tokens in r["shape"]:
            by_kind[(r["kind"], r["dtype"], r["shape"][-1])] += r["bytes"] / tokens
    return {"model": f"Qwen3-{size}", "recipe": recipe, "options": options, "tokens": tokens,
            "bytes_per_token_per_layer": per_token,
            "gib_per_micro_batch": per_token * MICRO_BATCH_TOKENS * layers / 2 ** 30,
            "saved": records, "top": [{"kind": k, "dtype": d, "width": w, "bytes_per_token": b}
                                      for (k, d, w), b in by_kind.most_common(12)]}


def _hint(size) -> int:
    """A size as an int: a symbolic one (the dynamic sequence length) by the value it was traced with."""
    return size if isinstance(size, int) else int(size.node.hint)


def _flat(args) -> list:
    out = []
    for a in args if isinstance(args, (list, tuple)) else [args]:
        out.extend(_flat(a) if isinstance(a, (list, tuple)) else [a])
    return out


def environment() -> dict:
    """Versions and commit of the run (the partition depends on torch's partitioner)."""
    import platform

    import transformers

    from surogate.training.info import git_commit

    return {"device": f"CPU ({platform.machine()})", "torch": torch.__version__,
            "transformers": transformers.__version__, "commit": git_commit()}


def markdown(rows: list[dict], env: dict) -> str:
    lines = [f"# What a decoder layer keeps for the backward (CPU, Inductor's min-cut partition; torch {env['torch']}, "
             f"transformers {env['transformers']}, commit {env['commit']})", "",
             f"Per layer per token, and per micro-batch of bench/tps.py ({MICRO_BATCH_TOKENS} tokens, all layers); "
             "computed tensors only (graph inputs such as the block input and the frozen weights are references). "
             "`recompute_producers`, `save_fp8_inputs`: surogate.compile's options (passes/recompute.py, "
             "passes/save_fp8.py).", "",
             "| model | recipe | recompute_producers | save_fp8_inputs | bytes / token / layer | GiB / micro-batch | "
             "largest kept (op, dtype, width: bytes/token) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        top = "; ".join(f"{t['kind']} {t['dtype']} {t['width']}: {t['bytes_per_token']:.0f}" for t in r["top"][:6])
        on_off = lambda key: "on" if r["options"].get(key) else "off"  # noqa: E731
        lines.append(f"| {r['model']} | {r['recipe']} | {on_off('recompute_producers')} | "
                     f"{on_off('save_fp8_inputs')} | "
                     f"{r['bytes_per_token_per_layer']:.0f} | {r['gib_per_micro_batch']:.2f} | {top} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="0.6B,8B", help="bench/tps.py QWEN3 sizes (their widths)")
    p.add_argument("--recipes", default="bf16,qfp8,qnf4")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    from surogate.recipes import Compute, get

    rows = []
    for size in args.models.split(","):
        for recipe in args.recipes.split(","):
            # save_fp8_inputs (passes/save_fp8.py) both ways for the recipes with an FP8 forward, off otherwise.
            fp8_forward = get(recipe).forward is Compute.FP8
            for recompute, save_fp8 in itertools.product((False, True), (False, True) if fp8_forward else (False,)):
                row = saved_by_layer(size, recipe, args.tokens, recompute_producers=recompute,
                                     save_fp8_inputs=save_fp8)
                rows.append(row)
                print(f"{row['model']} {recipe:8s} recompute {'on ' if recompute else 'off'} save_fp8 "
                      f"{'on ' if save_fp8 else 'off'} {row['bytes_per_token_per_layer']:8.0f} B/token/layer  "
                      f"{row['gib_per_micro_batch']:6.2f} GiB/micro-batch", flush=True)
    env = environment()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "saved_activations.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    (args.out / "saved_activations.md").write_text(markdown(rows, env))
    print(markdown(rows, env))


if __name__ == "__main__":
    main()
