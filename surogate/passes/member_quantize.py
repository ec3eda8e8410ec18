"""Post-grad pass: an FP8 dgrad's 1x128 gradient quantize of a concatenated gradient runs per member.

Why: the backward of a horizontally fused GEMM (gate/up, q/k/v) concatenates its members' gradients for the
one fused dgrad, and qfp8's dgrad reads that gradient quantized to E4M3 with one scale per 1x128 block
(`grad_producer` puts the quantizer's traceable twin into the backward graph, ops/lora_linear.py). The cat is
built in memory (a ConcatKernel, concat.py) and the quantizer's reduction read it back in a kernel of its
own: 22 ms of a Qwen3-8B qfp8 step on the H200 for gate/up alone (bench/results/profile_8b_h200.md), the
SwiGLU gradients written and read again. Where every member is a whole number of blocks wide, each block
lies in one member: quantizing each member and laying the tiles side by side gives the same bits, and
Inductor fuses each member's quantize into the kernel that computes the member (the SwiGLU backward, the
q/k-norm backward), which then stores the FP8 tiles into their slice of one buffer.

What is rewritten: a `surogate::lora_linear_backward` whose `grad_output_q` is given, whose dgrad quantizes
1x128 blocks (its `grad_output_quantizer` is `quantize_fp8_block_ref`: qfp8), and whose `grad_output` is an
`aten.cat` along the last dimension of two or more tensors each a multiple of 128 wide. Its `grad_output_q`
becomes `quantize_members` of the cat's inputs (`quantize_fp8_block_ref`'s numbers, piece by piece); the old
quantize, now unread, is erased. Runs inside Inductor before concat.py (post_grad.py).
"""

from __future__ import annotations

import torch
from torch import fx

import surogate.ops  # noqa: F401  (registers torch.ops.surogate.*)
from surogate.kernels.reference_formats import fp8_block_tiles, quantize_fp8_block_ref
from surogate.kernels.reference_linear import grad_output_quantizer
from surogate.passes import concat

# False: the quantize reads the whole cat (the A/B: bench/tps.py "+catquantize"); part of post_grad's cache key.
ENABLED = True
_CAT = torch.ops.aten.cat.default
_BLOCK = 128
_GRAD_OUTPUT_Q = 10  # the schema's position of grad_output_q (ops/lora_linear.py _LORA_LINEAR_BACKWARD_SCHEMA)


def quantize_members(*members: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_fp8_block_ref(torch.cat(members, -1))` (E4M3, 1x128 blocks) for members whose last dims are
    multiples of 128, computed member by member: (data (..., N) fp8, scale (..., N/128) fp32 M-contiguous).

    The tiles go into one buffer through `surogate::concat` (Inductor's ConcatKernel: each member's FP8 cast
    writes its slice), and the data is a view of that buffer, as the twin's `_tiles_as` is of its tiles."""
    tiles, scales = zip(*(fp8_block_tiles(m, (1, _BLOCK), "e4m3") for m in members))
    data = torch.ops.surogate.concat(list(tiles), 2)  # (M, 1, N/128, 128)
    lead, n = members[0].shape[:-1], data.shape[2] * _BLOCK
    strides, step = [1], n
    for size in reversed(lead):
        strides.append(step)
        step = step * size
    data = data.as_strided((*lead, n), strides[::-1])
    scale = torch.cat([s.t() for s in scales], 0).t()  # (M, N/128), M-contiguous as the Triton quantizer's
    return data, scale.reshape(*lead, scale.shape[-1])


def _val(node) -> torch.Tensor | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _members(grad_output) -> list[fx.Node] | None:
    """The cat's inputs when `grad_output` is a cat along its last dimension of tensors a whole number of
    blocks wide, else None."""
    if not isinstance(grad_output, fx.Node) or grad_output.target is not _CAT:
        return None
    tensors = grad_output.args[0]
    dim = grad_output.args[1] if len(grad_output.args) > 1 else grad_output.kwargs.get("dim", 0)
    value = _val(grad_output)
    if value is None or not isinstance(tensors, (list, tuple)) or len(tensors) < 2:
        return None
    if dim % value.dim() != value.dim() - 1:
        return None
    vals = [_val(t) for t in tensors]
    if any(v is None or v.dtype != value.dtype or v.shape[:-1] != value.shape[:-1] for v in vals):
        return None
    if any(not isinstance(v.shape[-1], int) or v.shape[-1] % _BLOCK for v in vals):
        return None
    return list(tensors)


def _per_member(data) -> bool:
    """Whether `data` is already `quantize_members`' (a view of a `surogate::concat` of tiles)."""
    return isinstance(data, fx.Node) and data.target is torch.ops.aten.as_strided.default and \
        isinstance(data.args[0], fx.Node) and data.args[0].target is torch.ops.surogate.concat.default


def _grad_output_q(node: fx.Node):
    if len(node.args) > _GRAD_OUTPUT_Q:
        return node.args[_GRAD_OUTPUT_Q]
    return node.kwargs.get("grad_output_q")


def _set_grad_output_q(node: fx.Node, value: list[fx.Node]) -> None:
    if len(node.args) > _GRAD_OUTPUT_Q:
        node.update_arg(_GRAD_OUTPUT_Q, value)
    else:
        node.update_kwarg("grad_output_q", value)


def _erase_unread(graph: fx.Graph, roots) -> None:
    """Erase `roots` and what only they read, once nothing reads them (the old quantize)."""
    stack, erased = [r for r in roots if isinstance(r, fx.Node)], set()
    while stack:
        node = stack.pop()
        if node not in erased and node.op == "call_function" and not node.users:
            stack.extend(node.all_input_nodes)
            graph.erase_node(node)
            erased.add(node)


def _inline(graph: fx.Graph, before: fx.Node, fn, args: list[fx.Node]):
    """`fn(*args)` traced to aten ops (Inductor's `fwd_only`, on the args' fake values) and inserted before
    `before`; returns the nodes of its outputs."""
    from torch._guards import detect_fake_mode
    from torch._inductor.pattern_matcher import fwd_only

    vals = [a.meta["val"] for a in args]
    with detect_fake_mode(vals) or torch._subclasses.FakeTensorMode():
        traced = fwd_only(fn, vals)
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    with graph.inserting_before(before):
        return graph.graph_copy(traced.graph, dict(zip(placeholders, args)))


def quantize_per_member(graph: fx.Graph) -> int:
    """Rewrite each qualifying backward op's `grad_output_q` (module docstring); returns how many."""
    if not ENABLED or not concat.lowered():
        return 0
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.surogate.lora_linear_backward.default:
            continue
        old = _grad_output_q(node)
        members = _members(node.args[0])
        if not old or members is None or _per_member(old[0]):
            continue
        if grad_output_quantizer(node.args[9], node.args[3]) is not quantize_fp8_block_ref:
            continue  # a dgrad with another quantizer: fp8_row's scale spans the whole row
        data, scale = _inline(graph, node, quantize_members, members)
        _set_grad_output_q(node, [data, scale])
        _erase_unread(graph, old)
        count += 1
    return count
