"""Pass 3: horizontal fusion of rewritten LoRA linears that share their input (q/k/v, gate/up).

What is fused: the group becomes ONE `surogate::lora_linear` call over the weights concatenated
along N (so the shared input is read, and for FP8 recipes quantized, once, and one GEMM runs),
LoRA A stacked along r and LoRA B as a block-diagonal (N_total, r_total) matrix (gradients flow
back to each member through `cat`/`block_diag`). The output is split back per member.
Only formats whose lists concatenate exactly along N are fused (bf16; fp8_block with N % 128 == 0; nf4
with N*K % 16384 == 0, so that no 256-code group of the double-quantized absmaxes straddles two members:
each group carries its member's scale and mean, and the members share one absmax code table), and never
branches with dropout (members would share one mask).
Weights: `surogate.compile` stores each group's frozen weights packed once (`surogate.weight_packing`): the
members' weight parts are row slices of one buffer, and the fused GEMM reads that buffer, no copy.
Groups that are not packed (other names, a model changed after compile) get the weights concatenated
in the graph, a copy per step. The backward needs it too, and Inductor's partitioner keeps it from the
forward (it may not recompute what feeds a custom op): on Qwen3-8B that is ~8.4 GiB (bf16) / ~4.2 GiB
(fp8_block) per micro-batch held between forward and backward. Recipes that free the bf16 copy
(memory first) tag that concatenation MUST_RECOMPUTE instead: copied again in the backward, never held.
nf4 groups are fused only when packed (the code tables are checked equal there).
Refused (reported): fp8_row (the K-major dgrad copy has per-input-channel scales of each
member), nvfp4 (one tensor scale per member).
"""

from __future__ import annotations

import operator

import torch
from torch import fx
from torch.utils.checkpoint import CheckpointPolicy

from surogate.passes import nodes as N
from surogate.passes.match import LoraMatch
from surogate.recipes import Recipe, WeightFormat
from surogate.recipes.formats import NF4_BLOCK, NF4_DOUBLE_QUANT_BLOCK

FUSABLE_FORMATS = (WeightFormat.BF16, WeightFormat.FP8_BLOCK, WeightFormat.NF4)
_BLOCK = 128
_NF4_GROUP = NF4_BLOCK * NF4_DOUBLE_QUANT_BLOCK  # weight elements under one absmax scale and offset
# Weight-list parts every member holds the same copy of (NF4's absmax code table): the fused list takes one.
SHARED_PARTS = {WeightFormat.NF4: (4,)}


def shared_parts(weight_format) -> tuple[int, ...]:
    return SHARED_PARTS.get(WeightFormat(weight_format), ())


def why_not(recipe: Recipe, arch: str, meta: dict) -> str | None:
    """Reason a group sharing one input cannot be fused, or None. `meta` describes the group."""
    if meta["weight_format"] not in FUSABLE_FORMATS:
        return f"weight format {meta['weight_format']} has per-member scales that do not concatenate along N"
    if meta["dropout"]:
        return "LoRA dropout > 0 (fused members would share one dropout mask)"
    if len(set(meta["scales"])) != 1 or len(set(meta["computes"])) != 1:
        return "members differ in LoRA scaling or GEMM precision"
    if meta["has_bias"] not in ((True,) * meta["size"], (False,) * meta["size"]):
        return "some members have a bias and some do not"
    if meta["weight_format"] == WeightFormat.FP8_BLOCK and any(n is None or n % _BLOCK for n in meta["out_features"]):
        return "fp8_block members need N % 128 == 0 to concatenate their block scales"
    if any(n is None for n in meta["out_features"]):
        return "output sizes unknown (no shape metadata)"
    k = meta.get("in_features")
    if meta["weight_format"] == WeightFormat.NF4 and (k is None or any(n * k % _NF4_GROUP for n in meta["out_features"])):
        return f"nf4 members need N*K % {_NF4_GROUP} == 0 so that no absmax scale group straddles two of them"
    return None


def supports(recipe: Recipe, arch: str, meta: dict) -> bool:
    return why_not(recipe, arch, meta) is None


def _group_meta(members: list[tuple[LoraMatch, fx.Node]]) -> dict:
    outs = [N.meta_value(out) for _, out in members]
    return {
        "size": len(members),
        "weight_format": members[0][0].weight_format,
        "dropout": any(m.dropout is not None for m, _ in members),
        "scales": [m.scale for m, _ in members],
        "computes": [(m.weight_format, m.forward, m.grad_input) for m, _ in members],
        "has_bias": tuple(m.bias is not None for m, _ in members),
        "out_features": [None if v is None else v.shape[-1] for v in outs],
        "in_features": None if (x := N.meta_value(members[0][0].input)) is None else x.shape[-1],
    }


def _row_slice(node: fx.Node) -> tuple[fx.Node, int, int] | None:
    """(buffer, start, stop) when `node` is `buffer[start:stop]` (a packed member's part), else None."""
    if not N.is_getitem(node) or not isinstance(node.args[1], slice) or node.args[1].step not in (None, 1):
        return None
    base, rows = node.args
    value = N.meta_value(base)
    if value is None or value.dim() == 0:
        return None
    start, stop, _ = rows.indices(value.shape[0])
    return base, start, stop


def _packed(members: list[tuple[LoraMatch, fx.Node]]) -> tuple[list[tuple[LoraMatch, fx.Node]], list[fx.Node]] | None:
    """(members in row order, the packed buffers) when every weight part of the members is a row slice of
    one buffer and the slices, in some order of the members, tile that buffer from its first row to its
    last (a shared part: every member reads the whole buffer); else None (the weights are concatenated in
    the graph)."""
    slices = []
    for m, _ in members:
        parts = [_row_slice(w) for w in m.weight]
        if any(p is None for p in parts):
            return None
        slices.append(parts)
    order = sorted(range(len(members)), key=lambda j: slices[j][0][1])
    shared = shared_parts(members[0][0].weight_format)
    buffers = []
    for i in range(len(slices[0])):
        base, row = slices[order[0]][i][0], 0
        if i in shared:
            whole = (0, N.meta_value(base).shape[0])
            if any(s[i][0] is not base or s[i][1:] != whole for s in slices):
                return None
            buffers.append(base)
            continue
        for j in order:
            b, start, stop = slices[j][i]
            if b is not base or start != row:
                return None
            row = stop
        if row != N.meta_value(base).shape[0]:
            return None
        buffers.append(base)
    return [members[j] for j in order], buffers


def _fuse(gm: fx.GraphModule, members: list[tuple[LoraMatch, fx.Node]], sizes: list[int],
          recompute_weight: bool = False, packed: list[fx.Node] | None = None) -> None:
    g = gm.graph
    first_op = min((out.args[0] for _, out in members), key=lambda n: _order(gm)[n])
    m0 = members[0][0]
    _hoist(gm, [n for m, _ in members for n in (*m.weight, m.lora_a, m.lora_b, m.bias)], first_op)
    with g.inserting_before(first_op):
        n_parts = len(m0.weight)
        if packed is not None:
            weight = list(packed)
        else:
            weight = [g.call_function(torch.cat, ([m.weight[i] for m, _ in members], 0)) for i in range(n_parts)]
            if recompute_weight:  # AOTAutograd copies this tag to the aten nodes; the partitioner obeys it
                for w in weight:
                    w.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
        lora_a = g.call_function(torch.cat, ([m.lora_a for m, _ in members], 0))
        lora_b = g.call_function(torch.block_diag, tuple(m.lora_b for m, _ in members))
        bias = None
        if m0.bias is not None:
            bias = g.call_function(torch.cat, ([m.bias for m, _ in members], 0))
        op = N.call_op(g, input=m0.input, weight=weight, weight_format=m0.weight_format, lora_a=lora_a,
                       lora_b=lora_b, lora_input=None, bias=bias, lora_scale=m0.scale, forward=m0.forward,
                       grad_input=m0.grad_input)
        op.meta["surogate_members"] = tuple(m.name for m, _ in members)  # the report's name for the fused GEMM
        out = g.call_function(operator.getitem, (op, 0))
        parts = g.call_function(torch.split, (out, sizes, -1))
        for i, (_, old) in enumerate(members):
            piece = g.call_function(operator.getitem, (parts, i))
            fresh = piece if _read_in_place(old) else g.call_method("contiguous", (piece,))
            if (val := N.meta_value(old)) is not None:
                fresh.meta["example_value"] = val
            old.replace_all_uses_with(fresh)
    for m, old in members:
        op_old = old.args[0]
        g.erase_node(old)
        if not op_old.users:
            g.erase_node(op_old)
        for w in m.weight:  # a packed member's row slices, now unused
            if isinstance(w, fx.Node) and not w.users and N.is_getitem(w):
                g.erase_node(w)


# Consumers that read a column slice of the fused output in place, elementwise, whatever its row stride: the
# activations and arithmetic of gated MLPs (HF's SiLU / GELU modules trace to these functions). Casts are followed.
_ELEMENTWISE_FUNCTIONS = frozenset({
    operator.mul, operator.add, operator.sub, operator.truediv, torch.mul, torch.add, torch.sub, torch.sigmoid,
    torch.tanh, torch.nn.functional.silu, torch.nn.functional.gelu, torch.nn.functional.relu,
    torch.nn.functional.sigmoid, torch.nn.functional.tanh})
_ELEMENTWISE_METHODS = frozenset({"mul", "add", "sub", "sigmoid", "tanh"})
_CASTS = frozenset({"to", "type_as", "type", "float", "bfloat16", "half"})


def _read_in_place(node: fx.Node) -> bool:
    """Whether every consumer of a member's output reads it elementwise (after casts), so that its column slice
    of the fused output can be used as it is. Otherwise the slice gets a contiguous copy: a `.view` may not
    take a slice, nor may a kernel that assumes contiguous rows (an autograd.Function of another library);
    Inductor folds that copy into the consumers it can (q/k/v: the head split and the q/k norms). Why not copy
    every slice: a copy the backward needs is materialized (gate and up, saved for SwiGLU's backward: the
    forward kernel wrote both copies beside the activation, two more passes over (M, intermediate) a layer)."""
    for user in node.users:
        if user.op == "call_function" and user.target in _ELEMENTWISE_FUNCTIONS:
            continue
        if user.op == "call_method" and user.target in _ELEMENTWISE_METHODS:
            continue
        if user.op == "call_method" and user.target in _CASTS and _read_in_place(user):
            continue
        return False
    return True


def _order(gm: fx.GraphModule) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(gm.graph.nodes)}


def _by_packed_buffer(members: list[tuple[LoraMatch, fx.Node]]) -> list[list[tuple[LoraMatch, fx.Node]]]:
    """Split a shared-input group by the packed buffer its members' weights are row slices of (members that are
    not slices: one part). Parallel blocks (Cohere, Phi-1/2, GPT-J) feed q/k/v and the MLP's gate/up or fc1 one
    normalized input, while their weights are packed per sibling group (q/k/v apart from gate/up): each packed
    group is one GEMM over its own buffer, no copy, rather than all of them over a concatenation."""
    parts: dict[object, list[tuple[LoraMatch, fx.Node]]] = {}
    for m, out in members:
        sliced = _row_slice(m.weight[0]) if m.weight else None
        parts.setdefault(None if sliced is None else sliced[0], []).append((m, out))
    return list(parts.values())


def _hoist(gm: fx.GraphModule, nodes: list, anchor: fx.Node) -> None:
    """Move the nodes in `nodes` (and what they read) that come after `anchor` to just before it, so that the
    fused op inserted there sees them defined: a member's weight slice (`buffer[a:b]`) is traced beside that
    member's own GEMM, which may come after the group's first GEMM (Phi's fc1 after q/k/v)."""
    order = _order(gm)
    seen: set[fx.Node] = set()

    def visit(node: fx.Node) -> None:
        if node in seen or order[node] < order[anchor]:
            return
        seen.add(node)
        if node.op not in ("call_function", "call_method", "get_attr") or node is anchor:
            raise RuntimeError(f"horizontal fusion: operand {node} of the fused GEMM is computed after {anchor}")
        for arg in node.all_input_nodes:
            visit(arg)
        anchor.prepend(node)

    for node in nodes:
        if isinstance(node, fx.Node):
            visit(node)


def fuse_shared_input(gm: fx.GraphModule, ctx) -> int:
    """Fuse each group of >= 2 rewritten linears reading the same input. Returns the groups fused."""
    groups: dict[fx.Node, list[tuple[LoraMatch, fx.Node]]] = {}
    for m, out in getattr(ctx, "rewritten", []):
        groups.setdefault(m.input, []).append((m, out))
    fused = 0
    for members in (part for group in groups.values() for part in _by_packed_buffer(group)):
        if len(members) < 2:
            continue
        names = tuple(m.name for m, _ in members)
        meta = _group_meta(members)
        reason = why_not(ctx.recipe, ctx.arch, meta)
        if reason is not None or not ctx.options.get("horizontal", True):
            ctx.report.group(f"shared input, not fused ({reason or 'horizontal fusion off'})", names)
            continue
        packing = _packed(members)
        if packing is None and shared_parts(meta["weight_format"]):
            ctx.report.group(f"shared input, not fused ({meta['weight_format']} weights not packed at compile)", names)
            continue
        if packing is not None:
            members = packing[0]
            _fuse(gm, members, _group_meta(members)["out_features"], packed=packing[1])
            ctx.report.group(f"one GEMM over the packed weights [{meta['weight_format']}]", names)
        else:
            recompute = not ctx.recipe.keeps_bf16_weight
            _fuse(gm, members, meta["out_features"], recompute_weight=recompute)
            ctx.report.group(f"one GEMM over concatenated weights [{meta['weight_format']}]"
                             + (", recomputed in the backward" if recompute else ""), names)
        for m, _ in members:
            ctx.report.rewrote(m.name, f"surogate::lora_linear[{m.weight_format}, fwd={m.forward}, "
                                       f"dgrad={m.grad_input}] fused with {', '.join(n for n in names if n != m.name)}")
        fused += 1
    return fused
