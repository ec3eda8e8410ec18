"""SwiGLU's backward as one kernel that also quantizes the gradient qfp8's fused gate/up dgrad reads.

Why: with qfp8 the fused gate/up GEMM's dgrad reads its gradient [dg | du] as E4M3 in 1 x 128 blocks. Inductor
built that as two kernels a layer, the SwiGLU backward writing [dg | du] and a quantize reading it back, and
would not fuse them on CUDA (bench/NOTES.md runs 120-121). `surogate::swiglu_backward` (kernels/swiglu.py)
computes the gradient and its FP8 blocks in one pass over dh, g and u.

The steps:
1. `use_swiglu_op` (torch-level pipeline, after horizontal fusion): `silu(g) * u`, where g and u are the two
   halves of one fused gate/up `surogate::lora_linear`'s output whose dgrad quantizes 1 x 128 blocks
   (`quantize_fp8_block_ref`), becomes `ops.swiglu.swiglu(gate_up, "silu")`; with `GEGLU` (on) Gemma's `gelu(g, approximate="tanh") * u` becomes `swiglu(gate_up, "gelu_tanh")` (never the exact
   GELU). Its forward is the same torch ops (so the producer pass's quantize still fuses into it, and the
   recompute pass still rebuilds it); its backward is `surogate::swiglu_backward(dh, gate_up, activation,
   quantize=False)`, the whole gradient in one buffer (no cat).
2. `quantize_in_swiglu_backward` (inside Inductor, post-grad): a `surogate::lora_linear_backward` whose
   gradient is that op's output and whose `grad_output_q` is the traced quantizer of it (grad_producer)
   reads the op's own FP8 outputs instead (`quantize=True`); the old quantize, now unread, is erased.
3. With `FORWARD_OP` (on by default: +0.8% on Qwen3-8B qfp8, H200), step 1 puts `swiglu_fused` instead, whose
   forward is `surogate::swiglu_forward`, and `quantize_in_swiglu_forward` gives down_proj that op's FP8 blocks of
   h in place of the producer pass's traced quantizer (Inductor ran the SwiGLU and that quantize as two kernels).

Requirements (else nothing changes): bf16 values, I a multiple of 128 (each scale block lies in g or in u),
no dtype-changing cast between the split and the product, grad_producer on. Off with `ENABLED = False`
(bench/tps.py "+noswiglu"). On the CPU (aot_eager) step 2 does not run; the op's backward then quantizes
with the traced quantizer, the same bits.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

from surogate.kernels.reference_formats import quantize_fp8_block_ref
from surogate.kernels.reference_linear import grad_output_quantizer
from surogate.passes import nodes as N
from surogate.recipes.formats import FP8_ACTIVATION_BLOCK

# False: the SwiGLU product stays as the model wrote it (the A/B: bench/tps.py "+noswiglu").
ENABLED = True
# True: the forward is one op too (`swiglu_fused`), which writes h's 1 x 128 blocks for down_proj (step 3). On an
# H200, Qwen3-8B qfp8 20,141 tokens/s against 19,978 without it, same call (bench/tps.py "+noswiglufwd"; bench/NOTES.md
# run 133).
FORWARD_OP = True
# True: Gemma's GeGLU (`gelu(g, approximate="tanh") * u`) takes the same ops with the tanh-GELU gate. On an H200
# (bench/NOTES.md run 138): the kernels within an ulp of their twins, Gemma-2 no further from eager PEFT, and
# Gemma-2-2B qfp8 35,272 tokens/s against 34,806 without (+1.3%, same call; bench/tps.py "+nogeglu" turns it off).
GEGLU = True
_BLOCK = FP8_ACTIVATION_BLOCK[1]  # qfp8's 1 x 128 scale blocks
_SPLITS = (torch.split, torch.functional.split)


def _dtype(node) -> torch.dtype | None:
    value = N.meta_value(node)
    return value.dtype if isinstance(value, torch.Tensor) else None


def _half(node, index: int, width: int, rank: int) -> fx.Node | None:
    """The split node when `node` (casts stripped) is piece `index` of a split of a tensor into two pieces
    `width` wide along its last dimension (`rank` dimensions), else None."""
    node = N.strip_casts(node)
    if not N.is_getitem(node, index):
        return None
    split = node.args[0]
    chunked = N.is_call(split, (torch.chunk,)) or N.is_method(split, ("chunk",))
    if not (chunked or N.is_call(split, _SPLITS) or N.is_method(split, ("split",))):
        return None
    sizes = N.arg(split, 1, "chunks" if chunked else "split_size_or_sections")
    dim = N.arg(split, 2, "dim", 0)
    if dim not in (-1, rank - 1) or sizes not in ((2,) if chunked else (width, [width, width], (width, width))):
        return None
    return split


def _activation(node: fx.Node) -> str | None:
    """The kernels' name of `node`'s gate activation (kernels/swiglu.py ACTIVATIONS): "silu", "gelu_tanh" (Gemma's
    `gelu_pytorch_tanh`, with `GEGLU`), else None (the exact GELU among them: it has no kernel)."""
    if N.is_call(node, (F.silu,)) and not N.arg(node, 1, "inplace", False):
        return "silu"
    if GEGLU and N.is_call(node, (F.gelu, torch._C._nn.gelu)) and N.arg(node, 1, "approximate", "none") == "tanh":
        return "gelu_tanh"
    return None


def gate_up_source(mul: fx.Node) -> tuple[fx.Node, str] | None:
    """(the fused gate/up output [g | u], the activation) when `mul` is `act(g) * u` (or `u * act(g)`) on its two
    halves, act silu or the tanh GELU, all bf16 (casts to bf16 between them stripped), else None."""
    if not N.is_mul(mul) or len(mul.args) != 2 or mul.kwargs:
        return None
    for act, up in (mul.args, mul.args[::-1]):
        act_node = N.strip_casts(act)
        activation = _activation(act_node) if isinstance(act_node, fx.Node) else None
        if activation is None:
            continue
        value = N.meta_value(mul)
        if not isinstance(value, torch.Tensor) or not isinstance(value.shape[-1], int) or value.shape[-1] % _BLOCK:
            return None
        width, rank = value.shape[-1], value.dim()
        split = _half(act_node.args[0], 0, width, rank)
        if split is None or split is not _half(up, 1, width, rank):
            continue
        if any(_dtype(n) not in (torch.bfloat16, None) for n in (act, act_node, up, act_node.args[0])):
            return None  # a cast to another dtype between the split and the product
        source = N.strip_casts(split.args[0])  # PEFT's `.to(dtype)` of the op's output (Phi-3's gate_up_proj)
        if value.dtype != torch.bfloat16 or _dtype(source) not in (torch.bfloat16, None) or \
                _dtype(split.args[0]) not in (torch.bfloat16, None):
            return None
        return source, activation
    return None


def _quantizes_blocks(op: fx.Node) -> bool:
    """Whether the dgrad of `op` (a `surogate::lora_linear`) reads its gradient quantized in 1 x 128 blocks."""
    return grad_output_quantizer(N.op_arg(op, "grad_input"), N.op_arg(op, "weight_format")) is quantize_fp8_block_ref


def use_swiglu_op(gm: fx.GraphModule, ctx) -> int:
    """Step 1 (module docstring): returns how many products were replaced."""
    from surogate.ops.swiglu import swiglu, swiglu_fused

    if not ENABLED or not ctx.options.get("grad_producer", True):
        return 0
    count = 0
    for node in list(gm.graph.nodes):
        found = gate_up_source(node) if N.is_mul(node) else None
        if found is None:
            continue
        source, activation = found
        if not (N.is_getitem(source, 0) and N.is_surogate_op(source.args[0])) or not _quantizes_blocks(source.args[0]):
            continue
        with gm.graph.inserting_before(node):
            fused = gm.graph.call_function(swiglu_fused if FORWARD_OP else swiglu, (source, activation))
        fused.meta.update(node.meta)
        node.replace_all_uses_with(fused)
        N.erase_unread(gm.graph, [node])
        what = ("swiglu -> quantized down_proj input and dgrad: SwiGLU's forward quantizes h, its backward the "
                "gate/up gradient (surogate::swiglu_forward, surogate::swiglu_backward)" if FORWARD_OP else
                "swiglu -> quantized dgrad: SwiGLU's backward quantizes the gate/up gradient "
                "(surogate::swiglu_backward)")
        ctx.report.group(what, (N.module_name(source.args[0]),))
        count += 1
    return count


def _unquantizing(value, op) -> fx.Node | None:
    """The `op` node (a `surogate::swiglu_*` overload, its `quantize` argument last and False) whose output 0 is
    `value`, else None."""
    if not (isinstance(value, fx.Node) and value.target is operator.getitem and value.args[1] == 0):
        return None
    node = value.args[0]
    if not isinstance(node, fx.Node) or node.target is not op or node.args[-1]:
        return None
    return node


def _quantizing(graph: fx.Graph, producer: fx.Node) -> list[fx.Node]:
    """Sets `producer`'s `quantize` argument (its last) and returns [data, scale]: getitems 1 and 2 of it, with the
    fake values Inductor reads (the op's fake implementation run again on its inputs' fake values)."""
    from torch._guards import detect_fake_mode

    args = [a.meta["val"] if isinstance(a, fx.Node) else a for a in producer.args[:-1]]
    with detect_fake_mode([a for a in args if isinstance(a, torch.Tensor)]) or torch._subclasses.FakeTensorMode():
        outputs = producer.target(*args, True)
    producer.update_arg(len(producer.args) - 1, True)
    producer.meta["val"] = outputs
    with graph.inserting_after(producer):
        scale = graph.call_function(operator.getitem, (producer, 2))
        data = graph.call_function(operator.getitem, (producer, 1))
    data.meta["val"], scale.meta["val"] = outputs[1], outputs[2]
    return [data, scale]


def quantize_in_swiglu_backward(graph: fx.Graph) -> int:
    """Step 2 (module docstring), on an aten graph; returns how many backward ops now read the op's FP8."""
    if not ENABLED:
        return 0
    count = 0
    for node, old in N.block_quantized_backwards(graph):
        producer = _unquantizing(node.args[0], torch.ops.surogate.swiglu_backward.default)
        if producer is None:
            continue
        N.set_grad_output_q(node, _quantizing(graph, producer))
        N.erase_unread(graph, old)
        count += 1
    return count


def quantize_in_swiglu_forward(graph: fx.Graph) -> int:
    """Step 3 (module docstring; `FORWARD_OP` only), on an aten graph: a forward op whose input is a
    `surogate::swiglu_forward` output and whose `input_q` is the traced 1 x 128 quantizer of it reads the op's own
    FP8 outputs instead; returns how many. Every other reader of the traced quantizer's outputs (the forward's
    outputs, when the op keeps its FP8 input for the backward: passes/save_fp8.py) reads the op's too. The
    backward's rebuilt h (recompute) has no quantizer: it stays h only."""
    from surogate.kernels.reference_linear import input_quantizer

    if not ENABLED:
        return 0
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.surogate.lora_linear.default:
            continue
        old = N.op_arg(node, "input_q")
        producer = _unquantizing(N.op_arg(node, "input"), torch.ops.surogate.swiglu_forward.default)
        if not old or producer is None:
            continue
        if input_quantizer(N.op_arg(node, "forward"), N.op_arg(node, "weight_format")) is not quantize_fp8_block_ref:
            continue
        new = _quantizing(graph, producer)
        N.set_op_arg(node, "input_q", new)
        for before, after in zip(old, new):  # other readers too: the FP8 copy kept for the backward (save_fp8)
            if isinstance(before, fx.Node):
                before.replace_all_uses_with(after)
        N.erase_unread(graph, old)
        count += 1
    return count
