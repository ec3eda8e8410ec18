"""Pass 1: find the LoRA linears of a graph and read their base weight's recipe state.

PEFT 0.21's `lora.Linear.forward` traces (Dynamo, transformers 5.x) to

    result = linear(x, W, b)                     # or getitem(surogate::lora_linear(x, [W..], fmt, ...), 0)
    h = linear(dropout?(x.to(float32)), A)       # the cast when the adapter is FP32 and x is bf16
    result = result + linear(h, B) * scaling     # scaling a Python float (specialized by Dynamo)
    result = result.to(bfloat16)

Each LoRA branch (a linear whose weight is a `lora_A` parameter) is a target: it either matches
the whole pattern and becomes a `LoraMatch`, or is reported as a fallback with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from surogate.passes import nodes as N
from surogate.recipes import Compute, WeightFormat


@dataclass
class LoraMatch:
    name: str
    output: fx.Node  # the node whose value the rewrite replaces (the add)
    input: fx.Node
    weight: list[fx.Node]
    weight_format: str
    forward: str
    grad_input: str
    bias: fx.Node | None
    lora_a: fx.Node
    lora_b: fx.Node
    scale: float
    dropout: fx.Node | None  # the dropout call on the LoRA branch (p > 0), else None
    dead: list[fx.Node]  # nodes of the pattern, erased once unused (in this order)


class NoMatch(Exception):
    """A LoRA branch that does not have the expected shape; the message is the report's reason."""


def _base(node: fx.Node) -> tuple[fx.Node, list[fx.Node], str, str, str, fx.Node | None, list[fx.Node]]:
    """(input, weight list, format, forward, grad_input, bias, dead nodes) of a base GEMM output."""
    if N.is_linear(node):
        bf16 = WeightFormat.BF16.value  # op arguments in the graph are the schema's strings
        return node.args[0], [node.args[1]], bf16, Compute.BF16.value, Compute.BF16.value, N.arg(node, 2, "bias"), [node]
    if N.is_getitem(node, 0) and N.is_surogate_op(node.args[0]):
        op = node.args[0]
        if N.op_arg(op, "lora_a") is not None:
            raise NoMatch("the base GEMM already carries a LoRA branch")
        return (N.op_arg(op, "input"), list(N.op_arg(op, "weight")), N.op_arg(op, "weight_format"),
                N.op_arg(op, "forward"), N.op_arg(op, "grad_input"), N.op_arg(op, "bias"), [node, op])
    raise NoMatch(f"the base layer is not a linear (found {node.format_node() if isinstance(node, fx.Node) else node})")


def match_branch(lora_a_linear: fx.Node) -> LoraMatch:
    """Match the whole LoRA linear around the `linear(., A)` node, or raise NoMatch with the reason."""
    la = lora_a_linear
    users = list(la.users)
    if len(users) != 1 or not N.is_linear(users[0]):
        raise NoMatch("the LoRA A output feeds something other than one LoRA B linear")
    lb = users[0]
    if N.arg(la, 2, "bias") is not None or N.arg(lb, 2, "bias") is not None:
        raise NoMatch("the LoRA branch has a bias (lora_bias=True is not fused)")
    scale, mul = 1.0, None
    after_b = list(lb.users)
    if len(after_b) != 1:
        raise NoMatch("the LoRA B output has several users")
    if N.is_mul(after_b[0]):
        mul = after_b[0]
        other = mul.args[1] if mul.args[0] is lb else mul.args[0]
        if not isinstance(other, (int, float)):
            raise NoMatch("the LoRA scaling is not a constant (dynamic float); compile with dynamic=False/None")
        scale = float(other)
        after_b = list(mul.users)
    tail = mul or lb
    if len(after_b) != 1 or not N.is_add(after_b[0]):
        raise NoMatch("the LoRA branch is not added to the base output (DoRA or another variant?)")
    add = after_b[0]
    base_out = add.args[1] if add.args[0] is tail else add.args[0]
    x, weight, fmt, fwd, gi, bias, base_dead = _base(base_out)
    if len(base_out.users) != 1:
        raise NoMatch("the base GEMM output is used outside the LoRA sum")
    branch_in, dropout = la.args[0], None
    casts: list[fx.Node] = []
    # Down to the base layer's input, no further: a model's own dropout before the layer (T5's `wo`, Whisper's `fc2`,
    # ModernBERT's `Wo`) is part of that input, and stripping it too unfused those layers.
    while branch_in is not N.strip_casts(x) and (N.is_cast(branch_in) or N.is_dropout(branch_in)):
        if N.is_dropout(branch_in):
            p, training = N.arg(branch_in, 1, "p", 0.5), N.arg(branch_in, 2, "training", True)
            if isinstance(p, fx.Node) or isinstance(training, fx.Node):
                raise NoMatch("the LoRA dropout probability is not a constant")
            if training and p > 0:
                if dropout is not None:
                    raise NoMatch("two dropouts on the LoRA branch")
                dropout = branch_in
        casts.append(branch_in)
        branch_in = branch_in.args[0]
    if branch_in is not N.strip_casts(x):
        raise NoMatch("the LoRA branch does not read the base layer's input")
    dead = [add, *([mul] if mul else []), lb, la, *casts, *base_dead]
    return LoraMatch(N.module_name(la.args[1]), add, x, weight, fmt, fwd, gi, bias, la.args[1], lb.args[1],
                     scale, dropout, dead)


def is_lora_a(node: fx.Node) -> bool:
    """A linear whose weight is a PEFT `lora_A` parameter (placeholder or attribute)."""
    if not N.is_linear(node) or not isinstance(node.args[1], fx.Node):
        return False
    w = node.args[1]
    return "lora_a" in str(w.target).lower() or "lora_a" in w.name.lower()


def match_lora_linears(gm: fx.GraphModule, ctx) -> int:
    """Fill `ctx.matches`; report every LoRA branch that does not match. Returns the match count."""
    ctx.matches = []
    for node in list(gm.graph.nodes):
        if not is_lora_a(node):
            continue
        try:
            ctx.matches.append(match_branch(node))
        except NoMatch as e:
            ctx.report.fell_back(N.module_name(node.args[1]), str(e))
    return len(ctx.matches)
