"""Pass 4: producer fusion, RMSNorm or SwiGLU feeding a quantized GEMM.

The goal (DESIGN.md section 4): the normalisation or activation that produces a quantized GEMM's
input writes the FP8 activation and its scale directly, so the GEMM does not re-read and
re-quantize it. That needs (a) a kernel `rmsnorm_quant` / `swiglu_quant` emitting (fp8, scale) and
(b) a `surogate::lora_linear` variant that takes a pre-quantized input. Neither exists in the op
layer today, so this pass finds the candidates, reports them, and changes nothing: the checker
refuses while `torch.ops.surogate` has no `rmsnorm_quant` / `swiglu_quant` op. Inductor still
fuses the norm/activation arithmetic itself on CUDA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from surogate.passes import nodes as N
from surogate.recipes import Recipe

# The op each producer kind would need; when the op layer grows it, the checker starts accepting.
NEEDED_OPS = {"rmsnorm": "rmsnorm_quant", "swiglu": "swiglu_quant"}
_QUANTIZED_COMPUTES = ("fp8", "nvfp4")


def _has_op(name: str) -> bool:
    import surogate.ops  # noqa: F401

    return hasattr(torch.ops.surogate, name)


def why_not(recipe: Recipe, arch: str, meta: dict) -> str | None:
    if meta["forward"] not in _QUANTIZED_COMPUTES:
        return "the consumer GEMM runs in bf16: nothing to quantize"
    op = NEEDED_OPS[meta["kind"]]
    if not _has_op(op):
        return f"needs op surogate::{op} (fused {meta['kind']} + quantize) and a pre-quantized-input lora_linear; not in surogate.ops"
    return None


def supports(recipe: Recipe, arch: str, meta: dict) -> bool:
    return why_not(recipe, arch, meta) is None


def producer_kind(node: fx.Node) -> str | None:
    """'rmsnorm' for `weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)`, 'swiglu' for `silu(g) * u`."""
    node = N.strip_casts(node)
    if not N.is_mul(node):
        return None
    for side in node.args:
        side = N.strip_casts(side)
        if N.is_call(side, (F.silu,)) or N.is_method(side, ("silu",)):
            return "swiglu"
        if N.is_mul(side) and any(N.is_call(s, (torch.rsqrt,)) or N.is_method(s, ("rsqrt",)) for s in side.args):
            return "rmsnorm"
    return None


def fuse_producers(gm: fx.GraphModule, ctx) -> int:
    """Report producer-fusion candidates; fuse where the checker accepts (no op yet: returns 0)."""
    seen: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if not N.is_surogate_op(node) or node.args[0] in seen:
            continue
        kind = producer_kind(node.args[0])
        if kind is None:
            continue
        seen.add(node.args[0])
        meta = {"kind": kind, "forward": N.arg(node, 8, "forward")}
        if meta["forward"] not in _QUANTIZED_COMPUTES:
            continue  # a bf16 GEMM: nothing to quantize, nothing to report
        reason = why_not(ctx.recipe, ctx.arch, meta)
        consumers = tuple(_consumer_name(u) for u in node.args[0].users if N.is_surogate_op(u))
        ctx.report.group(f"{kind} -> quantized GEMM: " + ("not fused, " + reason if reason else "fused"),
                         consumers)
    return 0


def _consumer_name(op: fx.Node) -> str:
    """The target linear(s) an op node computes, named from its (possibly concatenated) weight."""
    weight = op.args[1][0] if isinstance(op.args[1], (list, tuple)) and op.args[1] else None
    if N.is_call(weight, (torch.cat,)):
        return "+".join(N.module_name(w) for w in weight.args[0])
    return N.module_name(weight) if isinstance(weight, fx.Node) else op.name
