"""Floor 2, the op layer: what the compiler rewrites models into and what users may call directly.

- `lora_linear.py`: the `surogate::lora_linear` custom op (and its backward) with autograd, fake
  tensors and shape checks; `prepare_weight` builds a weight list in any format.
- `modules.py`: `SurogateLinear`, the frozen (possibly quantized) base layer put under PEFT's LoRA.
- `loss.py`: the chunked LM head + cross-entropy that never holds FP32 logits.
- `attention.py`: the "surogate" attention implementation (packed rows never attend across examples).
- `formats.py`: `quantize(tensor, fmt)` into the numeric formats, for inspection and tests.

Importing this package registers the ops; the other modules are imported where they are used.
"""

from surogate.ops.lora_linear import (
    check_finite,
    input_quantizer,
    lora_linear,
    out_features,
    prepare_weight,
    set_check_finite,
    validate,
)

__all__ = ["check_finite", "input_quantizer", "lora_linear", "out_features", "prepare_weight", "set_check_finite",
           "validate"]
