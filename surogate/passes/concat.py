"""Post-grad pass: a `cat` that a surogate op reads is built by its producers writing into its slices.

Why: the backward of a horizontally fused gate/up GEMM concatenates the SwiGLU gradients (d gate, d up)
for the one fused dgrad. Inductor lowers a `cat` of pointwise inputs as ONE pointwise kernel over the
whole output, each element taking a masked branch per input: the loads are masked and not vectorized,
and the inputs' shared reads (gate, up, the gradient) happen once per input. On the H200 that kernel took
34.8 ms of a Qwen3-8B bf16 step, against 16.8 ms for the same two gradients unconcatenated (qnf4, whose
gate and up are separate GEMMs). As Inductor's ConcatKernel, each input is computed straight into its
slice of the output buffer, and the scheduler fuses the producers into one kernel that reads its inputs
once and stores both halves.

Which cats: along the last dimension (features of rows: the fused GEMMs' gradients), at least one reader
is a surogate op (an extern kernel reads the cat from memory, so it is written out whatever the lowering),
the inputs are computed in this graph (not graph inputs: those would only be copied), share one dtype,
and there are two or more. A cat read only by pointwise code (RoPE's `rotate_half`) keeps the masked
form, which fuses the cat away. The same cat comes from a model's own fused linear chunked into parts
(Phi-3's gate_up_proj) and from any group horizontal fusion joins (Falcon's parallel attention).

This runs inside Inductor on the aten graphs AOTAutograd hands it, forward and backward, after the
torch-level passes of this package (`run_pipeline`): post_grad.py chains it after swiglu.py's step 2.
"""

from __future__ import annotations

import functools

import torch
from torch import fx

from surogate.compat import register_concat_lowering

_CAT = torch.ops.aten.cat.default
# False: Inductor lowers every cat its own way (the A/B: bench/tps.py "+catmasked").
ENABLED = True


@torch.library.custom_op("surogate::concat", mutates_args=())
def concat(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    """`torch.cat`, which Inductor lowers as a ConcatKernel (`compat.register_concat_lowering`)."""
    return torch.cat(tensors, dim)


@concat.register_fake
def _(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    return torch.cat(tensors, dim)


@functools.cache
def lowered() -> bool:
    """Whether Inductor lowers `surogate::concat` as a ConcatKernel (registered on first use: importing
    Inductor's lowerings costs seconds that a CPU run, which never uses Inductor, should not pay)."""
    return register_concat_lowering(torch.ops.surogate.concat.default)


def _is_surogate_op(node: fx.Node) -> bool:
    target = node.target
    return node.op == "call_function" and getattr(target, "namespace", None) == "surogate"


def _dtype(node) -> torch.dtype | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value.dtype if isinstance(value, torch.Tensor) else None


def realize_cats_into_slices(graph: fx.Graph) -> int:
    """Replace each qualifying `aten.cat` (module docstring) with `surogate::concat`; returns how many."""
    if not ENABLED or not lowered():
        return 0
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not _CAT:
            continue
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor) or not isinstance(tensors, (list, tuple)) or len(tensors) < 2:
            continue
        if value.dim() < 2 or dim % value.dim() != value.dim() - 1:
            continue  # along the features of rows; a cat of weights (dim 0) reads graph inputs anyway
        if not any(_is_surogate_op(user) for user in node.users):
            continue
        if any(not isinstance(t, fx.Node) or t.op != "call_function" or _dtype(t) != value.dtype for t in tensors):
            continue
        with graph.inserting_before(node):
            fresh = graph.call_function(torch.ops.surogate.concat.default, (list(tensors), dim % value.dim()))
        fresh.meta.update(node.meta)
        node.replace_all_uses_with(fresh)
        graph.erase_node(node)
        count += 1
    return count
