"""Post-grad pass: a qfp8 dgrad whose gradient no kernel of the graph produces quantizes it with its own kernel.

Why: grad_producer (ops/lora_linear.py) puts the dgrad's 1 x 128 gradient quantize into the backward graph so
that Inductor fuses it into the kernel producing the gradient. Two gradients have no such kernel: a cat (the
fused q/k/v GEMM's gradient, built in memory by concat.py) and a graph input (down_proj's, the gradient entering
a block graph). Inductor's quantize of those is a kernel of its own reading the buffer back, at about 1 TB/s for
Qwen3-8B's (4096 x 6144) q/k/v gradient on the H200 (75 us, bench/results/profile_8b_h200.md); the op's Triton
quantizer (kernels/quantize.py, `quantize_fp8_block`) reads it once at over 3 TB/s (45 us at 4096 x 12288,
bench/NOTES.md run 126), with the bits the op's twin gives eagerly. So there the pass drops `grad_output_q` and
the op quantizes itself; the old quantize, now unread, is erased.

Which ops: `surogate::lora_linear_backward` with `grad_output_q` given, whose dgrad quantizes 1 x 128 blocks
(`quantize_fp8_block_ref`: qfp8; fp8's row-scaled quantizer has no faster Triton twin), and whose gradient is an
`aten.cat`, a `surogate::concat` or a placeholder. Off with `ENABLED = False` (bench/tps.py "+graphgradquantize").
Runs inside Inductor before concat.py (post_grad.py).
"""

from __future__ import annotations

import torch
from torch import fx

from surogate.passes.nodes import block_quantized_backwards, erase_unread, set_grad_output_q

# False: those quantizes stay in the graph (the A/B: bench/tps.py "+graphgradquantize").
ENABLED = True


def unproduced(node) -> bool:
    """Whether no kernel of this graph writes `node` as it computes it: a graph input or a cat."""
    if not isinstance(node, fx.Node):
        return False
    return node.op == "placeholder" or (node.op == "call_function" and node.target in (
        torch.ops.aten.cat.default, torch.ops.surogate.concat.default))


def quantize_in_the_op(graph: fx.Graph) -> int:
    """The rewrite (module docstring) on an aten graph; returns how many backward ops now quantize themselves."""
    if not ENABLED:
        return 0
    count = 0
    for node, old in block_quantized_backwards(graph):
        if not unproduced(node.args[0]):
            continue
        set_grad_output_q(node, None)
        erase_unread(graph, old)
        count += 1
    return count
