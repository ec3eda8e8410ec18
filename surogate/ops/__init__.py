"""Floor 2, the op layer: what the compiler rewrites models into and what users may call directly.

- `lora_linear.py`: the `surogate::lora_linear` custom op (and its backward) with autograd, fake
  tensors and shape checks; `prepare_weight` builds a weight list in any format.
- `modules.py`: `SurogateLinear`, the frozen (possibly quantized) base layer put under PEFT's LoRA.
- `grouped.py`: `surogate::grouped_lora_linear`, the experts of a MoE block as one op per GEMM, and
  `prepare_expert_weights` (an (E, N, K) stack in any format).
- `experts.py`: `SurogateExperts`, the frozen experts of a MoE block run as two grouped ops, with PEFT's
  per-expert LoRA factors; `experts_layout.py`: what each model's experts compute around the two GEMMs
  (transposed stacks, interleaved gate/up, biases, the gate, where the routing weight enters);
  `routed_blocks.py`: Llama 4's dense MoE block rerouted to its top-k pairs.
- `loss.py`: the chunked LM head + cross-entropy that never holds FP32 logits.
- `attention.py`: the "surogate" attention implementation (packed rows never attend across examples).
- `linear_attention.py`: gated DeltaNet layers (Qwen3.5, Qwen3-Next): the delta rule as one op
  (`surogate::gated_delta_rule`), packed examples kept apart.
- `formats.py`: `quantize(tensor, fmt)` into the numeric formats, for inspection and tests.
- `swiglu.py`: `swiglu(gate_up)`, silu(g) * u with its backward as one op (`surogate::swiglu_backward`), which
  passes/swiglu.py puts in qfp8's fused MLP (imported there).

Importing this package registers the ops; the other modules are imported where they are used.
"""

from surogate.ops.grouped import grouped_lora_linear, prepare_expert_weights
from surogate.ops.lora_linear import (
    check_finite,
    grad_output_quantizer,
    grad_producer,
    input_quantizer,
    lora_linear,
    out_features,
    prepare_weight,
    save_input_q,
    set_check_finite,
    validate,
)

__all__ = ["check_finite", "grad_output_quantizer", "grad_producer", "grouped_lora_linear", "input_quantizer",
           "lora_linear", "out_features", "prepare_expert_weights", "prepare_weight", "save_input_q",
           "set_check_finite", "validate"]
