"""Pass 2: rewrite each matched LoRA linear into one `surogate::lora_linear` call.

Replacement: `getitem(surogate::lora_linear(x, [W..], fmt, A, B, dropout(x) | None, b, scale, fwd, dgrad), 0)`.
The op's registered autograd runs the fused backward; A and B stay FP32 masters (cast to bf16
inside the op), the frozen weight gets no gradient. The old nodes are erased once unused.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

from surogate.kernels.plan import Support, plan
from surogate.passes import nodes as N
from surogate.passes.match import LoraMatch
from surogate.recipes import Recipe

# The activation dtypes the op layer takes (docs/internals.md: input bf16).
INPUT_DTYPES = (torch.bfloat16,)


def why_not(recipe: Recipe, arch: str, meta: dict) -> str | None:
    """The reason a LoRA linear cannot be rewritten, or None when it can."""
    if plan(recipe, arch).support is Support.REFUSED:
        return f"recipe {recipe.name} is refused on {arch}"
    dtype = meta.get("input_dtype")
    if dtype is not None and dtype not in INPUT_DTYPES:
        return f"input dtype {dtype} (the fused op takes bfloat16 activations; load the model in bfloat16)"
    if meta.get("lora_rank") is not None and meta.get("lora_b_rank") != meta.get("lora_rank"):
        return "LoRA A and B ranks differ"
    return None


def supports(recipe: Recipe, arch: str, meta: dict) -> bool:
    return why_not(recipe, arch, meta) is None


def _meta(m: LoraMatch) -> dict:
    x, a, b = N.meta_value(m.input), N.meta_value(m.lora_a), N.meta_value(m.lora_b)
    return {
        "input_dtype": None if x is None else x.dtype,
        "lora_rank": None if a is None else a.shape[0],
        "lora_b_rank": None if b is None else b.shape[-1],
        "weight_format": m.weight_format,
    }


def _describe(m: LoraMatch) -> str:
    return f"surogate::lora_linear[{m.weight_format}, fwd={m.forward}, dgrad={m.grad_input}]"


def rewrite_one(gm: fx.GraphModule, m: LoraMatch) -> fx.Node:
    """Insert the fused op before the matched add, reroute its users, erase the dead pattern."""
    g = gm.graph
    with g.inserting_before(m.output):
        lora_input = None
        if m.dropout is not None:
            p, training = N.arg(m.dropout, 1, "p", 0.5), N.arg(m.dropout, 2, "training", True)
            lora_input = g.call_function(F.dropout, (m.input, p, training, False))
        op = N.call_op(g, input=m.input, weight=list(m.weight), weight_format=m.weight_format, lora_a=m.lora_a,
                       lora_b=m.lora_b, lora_input=lora_input, bias=m.bias, lora_scale=m.scale, forward=m.forward,
                       grad_input=m.grad_input)
        op.meta["surogate_members"] = (m.name,)  # the target it computes, for later passes' reports
        out = g.call_function(operator.getitem, (op, 0))
    base_val = N.meta_value(m.dead[-1] if N.is_linear(m.dead[-1]) else m.dead[-2])
    if base_val is not None:
        out.meta["example_value"] = base_val
    m.output.replace_all_uses_with(out)
    for node in m.dead:
        if not node.users:
            g.erase_node(node)
    return out


def rewrite_lora_linears(gm: fx.GraphModule, ctx) -> int:
    """Rewrite every match the checker supports; report the rest. Returns the rewrite count."""
    done = 0
    ctx.rewritten = []
    for m in ctx.matches:
        reason = why_not(ctx.recipe, ctx.arch, _meta(m))
        if reason is not None:
            ctx.report.fell_back(m.name, reason)
            continue
        ctx.rewritten.append((m, rewrite_one(gm, m)))
        ctx.report.rewrote(m.name, _describe(m))
        done += 1
    return done
