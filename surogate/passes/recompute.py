"""Pass 5 (`surogate.compile(..., recompute_producers=...)`, "auto" by default): rebuild the RMSNorm and
SwiGLU outputs (and layout copies, such as the attention output's) that LoRA linears read in the backward
instead of keeping them from the forward.

Each `surogate::lora_linear` keeps its input for the backward (LoRA A's gradient reads it). When that
input is an RMSNorm output `w * (x.float() * rsqrt(...)).to(bf16)` or a SwiGLU product `silu(g) * u`,
the backward already keeps what rebuilds it: the RMSNorm's backward keeps x and the rsqrt, the SwiGLU's
keeps g and u. Inductor's partitioner still keeps the input itself, because a value that a custom op
reads in the backward must be materialized there, and it does not recompute such values. This pass tags
the producer's pointwise nodes (the multiplies, the casts, the silu; never the rsqrt's reduction, which
stays kept at 4 bytes a token) `MUST_RECOMPUTE`, which AOTAutograd copies to the aten nodes and the
partitioner obeys: the backward recomputes them, one pointwise kernel each, and the forward keeps
nothing extra. The values are the same ops on the same tensors, so the numbers are bit for bit those of
a run without the pass.

Rebuilding costs time (on an H200, Qwen3-8B bf16 runs 2.2% slower and keeps 7.1 GiB less: bench/NOTES.md
run 91), so "auto" (`rebuild_producers`) keeps them where memory is plenty: the recipes that keep bf16
weights (bf16, fp8, fp4: chosen for speed) on a GPU where the kept tensors take at most `KEEP_SHARE` of
the free memory; the recipes that store the weights quantized (chosen for memory), the CPU, and short
GPUs rebuild. Bytes kept: bench/saved_activations.py (bench/results/saved_activations.md).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx
from torch.utils.checkpoint import CheckpointPolicy

from surogate.passes import nodes as N
from surogate.passes.producer import producer_kind


_LAYOUT_METHODS = ("contiguous", "reshape", "view", "transpose", "permute")


_GATES = (F.silu, F.gelu, torch._C._nn.gelu)  # SwiGLU, and the GELU-gated MLP of Gemma (approximate="tanh")


def _gate(node: fx.Node) -> bool:
    return N.is_call(node, _GATES) or N.is_method(node, ("silu",))


def _pointwise(node: fx.Node) -> bool:
    """A node the backward may rebuild for the price of one elementwise pass: a multiply, a cast, a gate
    activation (silu, gelu), the `swiglu` call of passes/swiglu.py (its forward is silu and a multiply)."""
    return N.is_mul(node) or N.is_cast(node) or _gate(node) or N.is_swiglu(node)


def _gated(node: fx.Node) -> bool:
    """`act(g) * u` with act silu (SwiGLU) or gelu (GeGLU, Gemma)."""
    node = N.strip_casts(node)
    return N.is_mul(node) and any(_gate(N.strip_casts(a)) for a in node.args)


def _layout(node: fx.Node) -> bool:
    """A copy or view that changes only the layout (the attention output's transpose + contiguous)."""
    return N.is_method(node, _LAYOUT_METHODS) or N.is_call(node, (torch.reshape, torch.transpose, torch.permute))


def input_producer(x: fx.Node) -> str | None:
    """What computes an op's input, when the backward can rebuild it from what it keeps anyway: 'rmsnorm',
    'swiglu' (`producer.producer_kind`), 'gated MLP' (a GELU gate, Gemma's), 'layout copy' (of a tensor
    the backward keeps, such as the attention output its own backward reads), else None."""
    if not isinstance(x, fx.Node):
        return None
    kind = producer_kind(x)
    if kind is not None:
        return kind
    if _gated(x):
        return "gated MLP"
    return "layout copy" if _layout(x) else None


def producer_nodes(x: fx.Node) -> list[fx.Node]:
    """The nodes of `input_producer(x)` to rebuild: walked back from `x` through its pointwise nodes (norm,
    SwiGLU) or its layout nodes (layout copy) until the first other node (the rsqrt, the residual add, a
    GEMM or attention output, a graph input); [] when `x` has no such producer. Rebuilding a layout chain
    never keeps more than before: its source has the same size as `x`."""
    kind = input_producer(x)
    if kind is None:
        return []
    return _walk([x], _layout if kind == "layout copy" else _pointwise)


def _walk(starts: list[fx.Node], step) -> list[fx.Node]:
    """The nodes reached from `starts` through their inputs while `step(node)` holds."""
    found, todo = [], list(starts)
    while todo:
        node = todo.pop()
        if not isinstance(node, fx.Node) or node in found or not step(node):
            continue
        found.append(node)
        todo.extend(node.all_input_nodes)
    return found


_ATTENTION_TARGETS = (F.scaled_dot_product_attention, torch.ops.higher_order.flex_attention)


def _attention_input_step(node: fx.Node) -> bool:
    """What rebuilds an attention query or key from the QKV GEMM's output: the head view and transpose, the
    per-head RMSNorm's pointwise part (q_norm, k_norm: the rsqrt stays kept), RoPE (multiplies by cos/sin,
    the rotate-half slices, negation and cat, the sum). Stops at the GEMM's output, the rsqrt, the inputs."""
    if N.is_getitem(node) and N.is_surogate_op(node.args[0]):
        return False  # the GEMM's own output: kept, never recomputed
    return (_pointwise(node) or _layout(node) or N.is_add(node) or N.is_getitem(node)
            or N.is_call(node, (torch.cat, torch.neg, operator.neg)) or N.is_method(node, ("neg",)))


def attention_input_nodes(attention: fx.Node) -> list[fx.Node]:
    """The nodes between the QKV GEMM and an attention call's query, key and value, to rebuild in the
    backward: the attention's backward then recomputes q and k after RoPE from the GEMM's output, which
    the backward keeps once, instead of keeping q/k both before the norm (for the norm's backward) and
    after RoPE (for its own)."""
    return _walk(list(attention.args[:3]), _attention_input_step)


# "auto" keeps the producers when they take at most this share of the GPU memory free when the graph compiles
# (weights loaded, activations not yet). What a Qwen3 layer keeps in all is ~1.8x what rebuilding saves
# (docs/compile.md), so at this share the whole micro-batch's activations stay under ~40% of that memory.
KEEP_SHARE = 0.2
GIB = 1 << 30


def _tagged_groups(gm: fx.GraphModule, fp8_inputs: bool = False) -> list[tuple[list[fx.Node], str, str, list[fx.Node]]]:
    """(nodes to rebuild, what, consumers, tensors kept without the rebuild) for every op input and attention
    call with a producer the backward can rebuild; with `fp8_inputs` (`save_fp8_inputs=True`, passes/save_fp8.py) not
    the inputs of ops that keep their FP8 copy instead (their backward reads no bf16 input)."""
    groups, seen = [], set()

    def fp8_kept(op: fx.Node) -> bool:
        return fp8_inputs and bool(N.op_arg(op, "input_q"))

    for node in list(gm.graph.nodes):
        if N.is_call(node, _ATTENTION_TARGETS):
            nodes = attention_input_nodes(node)
            what = "attention q/k/v (head views, q/k norms, RoPE): rebuilt in the backward from the QKV GEMM's output, not kept"
            groups.append((nodes, what, node.name, [a for a in node.args[:2] if a in nodes]))
        elif N.is_surogate_op(node) and N.op_arg(node, "input") not in seen and not fp8_kept(node):
            x = N.op_arg(node, "input")
            seen.add(x)
            what = f"{input_producer(x)} -> GEMM input: rebuilt in the backward, not kept"
            groups.append((producer_nodes(x), what, "+".join(node.meta.get("surogate_members", (node.name,))), [x]))
    return [g for g in groups if g[0]]


def _bytes(node: fx.Node) -> int:
    """Bytes of `node`'s tensor, a dynamic dimension at the size this graph is compiled for."""
    value = N.meta_value(node)
    if not isinstance(value, torch.Tensor):
        return 0
    numel = 1
    for d in value.shape:
        numel *= d if isinstance(d, int) else (d.node.hint or 1)
    return numel * value.element_size()


def kept_bytes(groups: list) -> int:
    """Bytes one call of the graph keeps for the backward when `groups` (`_tagged_groups`) are not rebuilt."""
    return sum(_bytes(t) for _, _, _, tensors in groups for t in tensors)


def free_device_bytes(arch: str) -> int | None:
    """Bytes the caching allocator can still hand out on the current CUDA device (free to the driver plus
    reserved and unused); None for the CPU backend."""
    if arch == "cpu" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info()
    return free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()


def rebuild_producers(option: "bool | str", recipe, kept: int, free_bytes: int | None) -> tuple[bool, str]:
    """Whether to rebuild the producers (option True / False, or "auto" decided from the recipe, the `kept` bytes
    and the free memory), and the report's reason for an "auto" decision ("" otherwise)."""
    if option != "auto":
        return bool(option), ""
    size = f"keeping them would take {kept / GIB:.2f} GiB"
    if not recipe.keeps_bf16_weight:
        return True, f"recompute_producers auto: rebuilt ({recipe.name} stores its weights for memory; {size})"
    if free_bytes is None:
        return True, f"recompute_producers auto: rebuilt (not on a GPU; {size})"
    share = kept / max(free_bytes, 1)
    where = f"{size} of the {free_bytes / GIB:.1f} GiB free ({share:.0%})"
    if share <= KEEP_SHARE:
        return False, f"recompute_producers auto: kept, not rebuilt ({where}; True keeps less, a little slower)"
    return True, f"recompute_producers auto: rebuilt ({where}, over {KEEP_SHARE:.0%})"


def recompute_producers(gm: fx.GraphModule, ctx) -> int:
    """Tag for recompute in the backward the producers of every op's input (`producer_nodes`) and of every
    attention call's q/k/v (`attention_input_nodes`), when `rebuild_producers` says so. The decision is
    written back into `ctx.options["recompute_producers"]` (the compile cache key carries it). Returns the
    inputs and attention calls tagged."""
    option = ctx.options.get("recompute_producers", False)
    if option is False:
        return 0
    groups = _tagged_groups(gm, ctx.options.get("save_fp8_inputs") is True)
    kept = kept_bytes(groups) * ctx.options.get("graph_calls", 1)
    free = free_device_bytes(ctx.arch) if option == "auto" and groups else None
    rebuild, why = rebuild_producers(option, ctx.recipe, kept, free)
    ctx.options["recompute_producers"] = rebuild
    if why and groups:
        ctx.report.note(why)
    if not rebuild:
        return 0
    for nodes, what, consumers, _ in groups:
        for n in nodes:
            n.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
        ctx.report.group(what, (consumers,))
    return len(groups)
