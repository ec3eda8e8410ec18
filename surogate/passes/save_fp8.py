"""After the producer and recompute passes (`surogate.compile(..., save_fp8_inputs=...)`, off by default): the
LoRA linears whose forward GEMM reads an FP8 copy of its input (`input_q`, from the producer pass) keep that copy
for the backward instead of the bf16 input: DESIGN's "saving activations in FP8" for the recipes that compute in
FP8 (fp8, qfp8).

The backward reads a LoRA linear's input only for LoRA A's gradient, `s * (g @ B)^T @ x`. Kept in FP8 (E4M3 and
an FP32 scale per row or per 1 x 128 block) it takes a little over half the bytes of bf16, and the forward already
computed it, in the kernel that produced the input (the RMSNorm, the SwiGLU, o_proj's layout copy). The backward
op takes the copy (`input_q`) and A's gradient reads it: on CUDA `kernels/grad_lora_fp8.py` dequantizes in its
loads, the reference dequantizes first (`reference.dequantize_input_q`, the same bf16 values). So A's gradient
reads the values the forward GEMM read, not the bf16 ones: the rounding the forward already has, applied to one
more product. Nothing else changes: the loss, B's gradients and every input gradient are the same numbers.

How: the op's autograd formula keeps `input_q` when `ops.save_input_q` is held while AOTAutograd traces it
(the backend holds it with this pass's decision), and this pass tags the quantize nodes `MUST_SAVE`, so the
partitioner keeps their outputs rather than rebuilding them in the backward from a rebuilt producer.

"auto" follows the recompute pass: where it keeps the producers' bf16 outputs (fp8 on a GPU with memory to spare,
or `recompute_producers=False`) their FP8 copies are kept instead, half the bytes; where it rebuilds them (qfp8,
checkpointing, short memory) the backward keeps nothing of them, and this stays off. True keeps the FP8 copies
even then (about 3.5 GiB for Qwen3-8B at 2 x 2048), for the rebuild's time; recompute then leaves those inputs.

Off by default: on an H200 it costs Qwen3-8B fp8 2.1-2.4% of its speed for 2.3 GiB (48.0 -> 45.7 GiB at the peak;
bench/NOTES.md runs 139, 141, 142), and saves qfp8 nothing (its producers are rebuilt: 3.3 GiB more for +0.9%).
Why the cost: A's gradient from the copy is slower than from bf16 although it reads half the bytes. First a
pointwise rebuild then cuBLAS (run 139), now one Triton kernel (runs 141-142: 0.5-1.3 TB/s, where cuBLAS reads the
bf16 input at 1.7-3.8 TB/s; bench/results/grad_lora_fp8_h200.md). A kernel that streams the copy at cuBLAS's rate
would make it free; until then it is the option for a run that keeps its producers and needs those GiB.
"""

from __future__ import annotations

from torch import fx
from torch.utils.checkpoint import CheckpointPolicy

from surogate.passes import nodes as N
from surogate.passes.recompute import input_producer
from surogate.recipes import Compute


def keep_in_fp8(option: "bool | str", rebuilt: bool) -> tuple[bool, str]:
    """Whether ops with an `input_q` keep it for the backward (option True / False, or "auto": when the recompute
    pass did not rebuild the producers, `rebuilt`), and the report's reason for an "auto" decision ("" otherwise)."""
    if option != "auto":
        return bool(option), ""
    if rebuilt:
        return False, ("save_fp8_inputs auto: off (the backward rebuilds the GEMM inputs and keeps nothing of them; "
                       "True keeps their FP8 copies instead, a little faster)")
    return True, ("save_fp8_inputs auto: on (the GEMM inputs would be kept for the backward in bf16; their FP8 copies "
                  "are half the bytes)")


def _quantize_node(input_q: list) -> fx.Node | None:
    """The quantize call whose (data, scale) getitems `input_q` is, or None."""
    sources = {n.args[0] if N.is_getitem(n) else None for n in input_q}
    source = sources.pop() if len(sources) == 1 else None
    return source if isinstance(source, fx.Node) else None


def save_fp8_inputs(gm: fx.GraphModule, ctx) -> int:
    """Decide (`keep_in_fp8`), write the decision into `ctx.options["save_fp8_inputs"]` (the backend holds
    `ops.save_input_q` with it; the compile cache key carries it) and tag each kept quantize `MUST_SAVE`.
    Returns the quantize nodes tagged."""
    ops = [n for n in gm.graph.nodes if N.is_surogate_op(n) and N.op_arg(n, "input_q")
           and N.op_arg(n, "forward") != Compute.BF16]
    keep, why = keep_in_fp8(ctx.options.get("save_fp8_inputs", False), ctx.options.get("recompute_producers") is True)
    ctx.options["save_fp8_inputs"] = keep
    if why and ops:
        ctx.report.note(why)
    if not keep:
        return 0
    tagged: dict[fx.Node, list[fx.Node]] = {}
    for op in ops:
        q = _quantize_node(N.op_arg(op, "input_q"))
        if q is not None:
            tagged.setdefault(q, []).append(op)
    for q, consumers in tagged.items():
        q.meta["recompute"] = CheckpointPolicy.MUST_SAVE
        kind = input_producer(q.args[0]) or "input"
        names = "+".join("+".join(op.meta.get("surogate_members", (op.name,))) for op in consumers)
        ctx.report.group(f"{kind} -> GEMM input: kept for the backward in FP8 (the forward GEMM's copy), not bf16",
                         (names,))
    return len(tagged)
