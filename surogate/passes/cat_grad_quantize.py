"""Post-grad pass: a qfp8 dgrad whose gradient is a cat quantizes it with the op's own Triton kernel.

Why: grad_producer (ops/lora_linear.py) puts the dgrad's 1 x 128 gradient quantize into the backward graph so
that Inductor fuses it into the kernel producing the gradient. A cat has no such kernel: the fused q/k/v GEMM's
gradient is built in memory (concat.py) and Inductor's quantize reads it back as a kernel of its own, 75 us for
Qwen3-8B's (4096 x 6144) gradient on the H200, about 1 TB/s (bench/results/profile_8b_h200.md). The op's Triton
quantizer (kernels/quantize.py, `quantize_fp8_block`) reads the same buffer once at over 3 TB/s
(bench/results/swiglu_h200.md), with the bits the op's twin gives eagerly. So where the gradient is a cat, the
pass drops `grad_output_q` and the op quantizes itself; the old quantize, now unread, is erased.

Which ops: `surogate::lora_linear_backward` with `grad_output_q` given, whose dgrad quantizes 1 x 128 blocks
(`quantize_fp8_block_ref`: qfp8; fp8_row's row scale would fuse nowhere either, but its Triton quantizer is not
the faster one, so it is left), and whose gradient is an `aten.cat` or `surogate::concat`. Off with
`ENABLED = False` (bench/tps.py "+catgraphquantize"). Runs inside Inductor before concat.py (post_grad.py).
"""

from __future__ import annotations

import torch
from torch import fx

from surogate.passes.nodes import block_quantized_backwards, erase_unread, set_grad_output_q

# False: the cat's quantize stays in the graph (the A/B: bench/tps.py "+catgraphquantize").
ENABLED = True


def _is_cat(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in (
        torch.ops.aten.cat.default, torch.ops.surogate.concat.default)


def quantize_cats_in_the_op(graph: fx.Graph) -> int:
    """The rewrite (module docstring) on an aten graph; returns how many backward ops now quantize themselves."""
    if not ENABLED:
        return 0
    count = 0
    for node, old in block_quantized_backwards(graph):
        if not _is_cat(node.args[0]):
            continue
        set_grad_output_q(node, None)
        erase_unread(graph, old)
        count += 1
    return count
