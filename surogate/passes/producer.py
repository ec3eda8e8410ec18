"""Pass 4: producer fusion: the kernel that produces an FP8 GEMM's input also quantizes it.

The FP8 forward kernels (lora_linear_fp8: E4M3 per row; lora_linear_fp8_block: E4M3 per 1x128) take
their input already quantized (`input_q`, docs/internals.md). For each such op this pass inserts the
traceable twin of the quantizer the op would run (`reference_linear.input_quantizer`) on the op's
input and passes its outputs as `input_q`. The twin is plain reductions and pointwise ops, so on CUDA
Inductor fuses it into the kernel that computes the input (the RMSNorm, the SwiGLU multiply): the
activation is quantized while it is in registers instead of being read back by a separate quantize
kernel. On CPU (aot_eager) it simply runs, with the same bits; compiled for CUDA it differs from the
Triton quantizer only where x / scale is an exact FP8 tie (Inductor's division is approximate; about
0.1% of the codes move by one step, tests/gpu/test_producer_gpu.py). Ops reading one input with the same
quantizer share one quantize node (after horizontal fusion: one for qkv, one for gate_up; with fp8_row,
which is not fused horizontally, q/k/v now quantize once instead of three times).

Which inputs: those an RMSNorm or SwiGLU produces (DESIGN.md), and every other input computed in the
graph ("other": the contiguous copy of the attention output feeding o_proj, a GELU feeding fc2): the
quantizer computes the same values wherever it runs, and Inductor fuses it into that pointwise/copy
kernel. Left to the op, and reported: graph inputs and outputs of extern GEMMs (no Inductor kernel in
this graph to quantize them in), NVFP4 forwards (the tensor scale needs the whole activation's amax
first, and on sm_89/sm_90 the op emulates FP4). bf16 forwards have nothing to quantize and are skipped.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx

from surogate.ops import input_quantizer
from surogate.passes import nodes as N
from surogate.recipes import Compute, Recipe

# Nodes whose value an extern kernel (not Inductor) writes: nothing to fuse a quantizer into.
_EXTERN_TARGETS = (*N.LINEAR_TARGETS, torch.matmul, operator.matmul, torch.mm, torch.bmm,
                   F.scaled_dot_product_attention)
_NO_PRODUCER_KERNEL = ("graph input", "GEMM output")


def why_not(recipe: Recipe, arch: str, meta: dict) -> str | None:
    """Reason the input of an op cannot be quantized by its producer, or None.

    `meta`: "kind" (`input_kind` of the op's input), "forward" and "weight_format" of the op.
    """
    forward, fmt = meta["forward"], meta["weight_format"]
    if forward == Compute.BF16:
        return "the consumer GEMM runs in bf16: nothing to quantize"
    if forward == Compute.NVFP4:
        return ("the NVFP4 forward takes no pre-quantized input (its tensor scale needs the amax of the whole "
                "activation first; on sm_89/sm_90 the op emulates FP4)")
    if input_quantizer(forward, fmt) is None:
        return f"no {forward} forward kernel takes a pre-quantized input for weight format {fmt}"
    if meta["kind"] in _NO_PRODUCER_KERNEL:
        return f"the input is a {meta['kind']}: no kernel in this graph to quantize it in (the op quantizes it)"
    return None


def supports(recipe: Recipe, arch: str, meta: dict) -> bool:
    return why_not(recipe, arch, meta) is None


def producer_kind(node: fx.Node) -> str | None:
    """'rmsnorm' for `weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)`, 'swiglu' for `silu(g) * u` (or the
    `swiglu` call passes/swiglu.py puts in its place)."""
    node = N.strip_casts(node)
    if N.is_swiglu(node):
        return "swiglu"
    if not N.is_mul(node):
        return None
    for side in node.args:
        side = N.strip_casts(side)
        if N.is_call(side, (F.silu,)) or N.is_method(side, ("silu",)):
            return "swiglu"
        if N.is_mul(side) and any(N.is_call(s, (torch.rsqrt,)) or N.is_method(s, ("rsqrt",)) for s in side.args):
            return "rmsnorm"
    return None


def input_kind(node: fx.Node) -> str:
    """'rmsnorm' / 'swiglu' (`producer_kind`), 'graph input', 'GEMM output' (an extern kernel's), else 'other'."""
    kind = producer_kind(node)
    if kind is not None:
        return kind
    if not isinstance(node, fx.Node) or node.op in ("placeholder", "get_attr"):
        return "graph input"
    if N.is_call(node, _EXTERN_TARGETS) or N.is_surogate_op(node) or \
            (N.is_getitem(node) and N.is_surogate_op(node.args[0])):
        return "GEMM output"
    return "other"


def _fused_what(kind: str, quantizer: Callable) -> str:
    if kind == "other":
        return "other -> quantized GEMM: quantize in the producer's kernel"
    return f"{kind} -> quantized GEMM: fused ({quantizer.__name__} in the {kind} kernel)"


def _insert_quantize(gm: fx.GraphModule, x: fx.Node, quantizer: Callable, ops: list[fx.Node]) -> fx.Node:
    """One `quantizer(x)` before the first of `ops`; every op of `ops` gets its (data, scale) as input_q."""
    g = gm.graph
    order = {n: i for i, n in enumerate(g.nodes)}
    with g.inserting_before(min(ops, key=order.__getitem__)):
        q = g.call_function(quantizer, (x,))
        data = g.call_function(operator.getitem, (q, 0))
        scale = g.call_function(operator.getitem, (q, 1))
    for op in ops:
        N.set_op_arg(op, "input_q", [data, scale])
    return q


def fuse_producers(gm: fx.GraphModule, ctx) -> int:
    """Give every FP8-forward op an `input_q` computed next to its producer. Returns the quantize nodes added.

    Ops that already have an `input_q` are left alone, so a second run adds nothing.
    """
    groups: dict[tuple, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if not N.is_surogate_op(node) or N.op_arg(node, "input_q") is not None:
            continue
        forward, fmt = N.op_arg(node, "forward"), N.op_arg(node, "weight_format")
        if forward == Compute.BF16:
            continue  # nothing to quantize, nothing to report
        x = N.op_arg(node, "input")
        kind = input_kind(x)
        reason = why_not(ctx.recipe, ctx.arch, {"kind": kind, "forward": forward, "weight_format": fmt})
        if reason is None and not ctx.options.get("producer", True):
            reason = "producer fusion off"
        quantizer = input_quantizer(forward, fmt) if reason is None else None
        groups.setdefault((x, kind, reason, quantizer), []).append(node)
    fused = 0
    for (x, kind, reason, quantizer), ops in groups.items():
        consumers = tuple(_consumer_name(op) for op in ops)
        if reason is not None:
            ctx.report.group(f"{kind} -> quantized GEMM: not fused, {reason}", consumers)
            continue
        _insert_quantize(gm, x, quantizer, ops)
        ctx.report.group(_fused_what(kind, quantizer), consumers)
        fused += 1
    return fused


def _consumer_name(op: fx.Node) -> str:
    """The target linear(s) an op node computes: as the rewrite and horizontal passes named them, else
    from its weight."""
    if "surogate_members" in op.meta:
        return "+".join(op.meta["surogate_members"])
    weights = N.op_arg(op, "weight")
    weight = weights[0] if isinstance(weights, (list, tuple)) and weights else None
    return N.module_name(weight) if isinstance(weight, fx.Node) else op.name
