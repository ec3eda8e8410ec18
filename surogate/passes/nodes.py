"""Small predicates over torch-level FX nodes (what Dynamo hands a custom backend), and the few helpers the
post-grad passes share on aten graphs (`erase_unread`, a backward op's `grad_output_q`).

One place that knows the spellings Dynamo uses for the same operation: `torch._C._nn.linear`
or `F.linear`, `x.to(dtype)` or `x.float()`, `operator.mul` or `torch.mul`, and so on.
"""

from __future__ import annotations

import operator
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

LINEAR_TARGETS = (torch._C._nn.linear, F.linear)
ADD_TARGETS = (operator.add, operator.iadd, torch.add)
MUL_TARGETS = (operator.mul, operator.imul, torch.mul)
DROPOUT_TARGETS = (F.dropout, torch.dropout, torch.nn.functional.dropout)
CAST_METHODS = ("to", "float", "bfloat16", "half", "type", "type_as")


def surogate_op():
    """The `surogate::lora_linear` overload (imported late: the op layer registers it)."""
    import surogate.ops  # noqa: F401  (registers torch.ops.surogate.*)

    return torch.ops.surogate.lora_linear.default


def is_swiglu(node: Any) -> bool:
    """A call of `surogate.ops.swiglu.swiglu` or `swiglu_fused` (what passes/swiglu.py puts in place of
    `silu(g) * u`)."""
    from surogate.ops.swiglu import swiglu, swiglu_fused

    return is_call(node, (swiglu, swiglu_fused))


def is_call(node: Any, targets: tuple) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def is_method(node: Any, names: tuple[str, ...]) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target in names


def is_linear(node: Any) -> bool:
    return is_call(node, LINEAR_TARGETS)


def is_surogate_op(node: Any) -> bool:
    op = surogate_op()
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in (op, op._overloadpacket)


def is_add(node: Any) -> bool:
    return is_call(node, ADD_TARGETS) or is_method(node, ("add", "add_", "__add__"))


def is_mul(node: Any) -> bool:
    return is_call(node, MUL_TARGETS) or is_method(node, ("mul", "mul_", "__mul__"))


def is_cast(node: Any) -> bool:
    """A dtype cast (`x.to(torch.float32)`, `x.float()`); device moves are not expected in a region."""
    return is_method(node, CAST_METHODS)


def is_dropout(node: Any) -> bool:
    return is_call(node, DROPOUT_TARGETS)


def is_getitem(node: Any, index: int | None = None) -> bool:
    return (is_call(node, (operator.getitem,)) and (index is None or node.args[1] == index))


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Positional-or-keyword argument `name` of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _op_arg_names() -> tuple[str, ...]:
    """The argument names of `surogate::lora_linear`, in schema order."""
    return tuple(a.name for a in surogate_op()._schema.arguments)


def op_arg(node: fx.Node, name: str) -> Any:
    """Argument `name` of a `surogate::lora_linear` call node, read by its schema name (positional,
    keyword, or the schema's default)."""
    names = _op_arg_names()
    i = names.index(name)  # a name not in the schema is a bug here: ValueError
    if len(node.args) > i:
        return node.args[i]
    if name in node.kwargs:
        return node.kwargs[name]
    default = surogate_op()._schema.arguments[i].default_value
    return default


def set_op_arg(node: fx.Node, name: str, value: Any) -> None:
    """Set argument `name` of a `surogate::lora_linear` call node, wherever it was passed."""
    i = _op_arg_names().index(name)
    if len(node.args) > i:
        node.args = (*node.args[:i], value, *node.args[i + 1:])
    else:
        node.kwargs = {**node.kwargs, name: value}


def call_op(graph: fx.Graph, **arguments: Any) -> fx.Node:
    """A `surogate::lora_linear` call node from its arguments by name (schema order; defaults omitted)."""
    names = _op_arg_names()
    unknown = set(arguments) - set(names)
    if unknown:
        raise TypeError(f"surogate::lora_linear has no argument {sorted(unknown)}; its arguments: {names}")
    args = tuple(arguments[n] for n in names if n in arguments)
    if len(args) != len(arguments) or names[:len(args)] != tuple(n for n in names if n in arguments):
        raise TypeError(f"pass the arguments of surogate::lora_linear as a prefix of {names}")
    return graph.call_function(surogate_op(), args)


def meta_value(node: Any) -> Any:
    """The fake/example tensor Dynamo (`example_value`) or make_fx (`val`) recorded for a node."""
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def strip_casts(node: Any) -> Any:
    while is_cast(node):
        node = node.args[0]
    return node


_MODULE_TOKEN = re.compile(r"modules_(.+?)_(?=modules_|parameters_|buffers_)")
_STOP = ("base_layer", "lora_A", "lora_B", "lora_a", "lora_b")


def module_name(node: fx.Node) -> str:
    """'self_attn.q_proj' from a Dynamo placeholder such as `L_self_modules_self_attn_modules_q_proj_...`."""
    text = str(node.target if node.op in ("placeholder", "get_attr") else node.name)
    text = text.replace("_dict_modules_", "_modules_")  # PEFT wrappers trace as `..._dict_modules_...`
    parts: list[str] = []
    for token in _MODULE_TOKEN.findall(text):
        if token in _STOP:
            break
        parts.append(token)
    return ".".join(parts) or text


# --- aten graphs (the post-grad passes) ---------------------------------------------------------------------------

_GRAD_OUTPUT_Q = 10  # the schema's position of grad_output_q (ops/lora_linear.py _LORA_LINEAR_BACKWARD_SCHEMA)


def grad_output_q(node: fx.Node) -> Any:
    """The `grad_output_q` argument of a `surogate::lora_linear_backward` node, wherever it was passed."""
    if len(node.args) > _GRAD_OUTPUT_Q:
        return node.args[_GRAD_OUTPUT_Q]
    return node.kwargs.get("grad_output_q")


def set_grad_output_q(node: fx.Node, value: Any) -> None:
    """Set the `grad_output_q` argument of a `surogate::lora_linear_backward` node, wherever it was passed."""
    if len(node.args) > _GRAD_OUTPUT_Q:
        node.update_arg(_GRAD_OUTPUT_Q, value)
    else:
        node.update_kwarg("grad_output_q", value)


def block_quantized_backwards(graph: fx.Graph) -> list[tuple[fx.Node, Any]]:
    """(node, its grad_output_q) for each `surogate::lora_linear_backward` of `graph` that is handed its gradient
    quantized and whose dgrad reads 1 x 128 E4M3 blocks (`quantize_fp8_block_ref`: qfp8)."""
    from surogate.kernels.reference_formats import quantize_fp8_block_ref
    from surogate.kernels.reference_linear import grad_output_quantizer

    found = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.surogate.lora_linear_backward.default:
            continue
        old = grad_output_q(node)
        if old and grad_output_quantizer(node.args[9], node.args[3]) is quantize_fp8_block_ref:
            found.append((node, old))
    return found


def erase_unread(graph: fx.Graph, roots: Any) -> None:
    """Erase `roots` (a node or a list of them) and what only they read, once nothing reads them."""
    roots = roots if isinstance(roots, (list, tuple)) else [roots]
    stack, erased = [r for r in roots if isinstance(r, fx.Node)], set()
    while stack:
        node = stack.pop()
        if node not in erased and node.op in ("call_function", "call_method") and not node.users:
            stack.extend(node.all_input_nodes)
            graph.erase_node(node)
            erased.add(node)
