"""Pass 5 (opt-in, `surogate.compile(..., recompute_producers=True)`): rebuild the RMSNorm and SwiGLU
outputs (and layout copies, such as the attention output's) that LoRA linears read in the backward
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

Measured on the CPU with the partitioner CUDA training runs (bench/saved_activations.py): see
bench/results/saved_activations.md. Its time on a GPU is not measured yet, so it is off by default.
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
    activation (silu, gelu)."""
    return N.is_mul(node) or N.is_cast(node) or _gate(node)


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


def recompute_producers(gm: fx.GraphModule, ctx) -> int:
    """Tag for recompute in the backward the producers of every op's input (`producer_nodes`) and of every
    attention call's q/k/v (`attention_input_nodes`), when the `recompute_producers` option is on.
    Returns the inputs and attention calls tagged."""
    if not ctx.options.get("recompute_producers", False):
        return 0
    tagged = 0
    seen: set[fx.Node] = set()
    for node in list(gm.graph.nodes):
        if N.is_call(node, _ATTENTION_TARGETS):
            nodes, what = attention_input_nodes(node), ("attention q/k/v (head views, q/k norms, RoPE): rebuilt in "
                                                         "the backward from the QKV GEMM's output, not kept")
            consumers = node.name
        elif N.is_surogate_op(node) and N.op_arg(node, "input") not in seen:
            x = N.op_arg(node, "input")
            seen.add(x)
            nodes, what = producer_nodes(x), f"{input_producer(x)} -> GEMM input: rebuilt in the backward, not kept"
            consumers = "+".join(node.meta.get("surogate_members", (node.name,)))
        else:
            continue
        for n in nodes:
            n.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
        if nodes:
            tagged += 1
            ctx.report.group(what, (consumers,))
    return tagged
