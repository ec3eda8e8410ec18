"""`merge_and_unload()` / `unload()` on the model `surogate.compile` returned: PEFT's own, on plain base layers.

Why: PEFT merges by adding B @ A to `base_layer.weight`, which a `SurogateLinear` holds transposed (GPT-2's
`Conv1D`), packed with its siblings, or not at all (q-recipes free the bf16 copy). So before PEFT's merge every
`SurogateLinear` base layer becomes the plain layer it replaced, holding the weight as the GEMMs saw it
(dequantized for a q-recipe); after it the HF model gets back its own forwards, attention implementation and
config objects (`use_cache` as the user had it, which `save_pretrained` writes).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from surogate.ops.experts import SurogateExperts
from surogate.ops.modules import SurogateLinear


def attach_unload(peft_model: nn.Module, unwrap: Any) -> None:
    """Give `peft_model` its `merge_and_unload` and `unload`: PEFT's, on plain base layers, then `unwrap.restore()`
    (the compiler's record of the HF model's own forwards, attention markers and configs)."""
    for name in ("merge_and_unload", "unload"):
        peft_method = getattr(peft_model.base_model, name)

        def method(*args: Any, _peft=peft_method, **kwargs: Any) -> nn.Module:
            plain_base_layers(peft_model)
            hf = _peft(*args, **kwargs)
            unwrap.restore()
            return hf

        method.__doc__ = peft_method.__doc__
        setattr(peft_model, name, method)


def attach_merge_guard(peft_model: nn.Module, recipe: str) -> None:
    """Refuse `merge_adapter()` where a LoRA layer's base is a `SurogateLinear` whose GEMMs read a quantized copy:
    PEFT would add B @ A to the kept bf16 `weight` (fp8, fp4: the GEMMs never see it, so the adapter silently
    dropped out of the outputs) or fail on the freed one (q-recipes: an AttributeError from inside PEFT). On bf16
    PEFT's in-place merge reaches the packed buffers the GEMMs read; `safe_merge=True` assigns a new tensor, which
    the packed q/k/v and gate/up never saw (measured: a loss between the base's and the merged one's)."""
    from peft.tuners.lora import LoraLayer

    peft_method = peft_model.base_model.merge_adapter

    def merge_adapter(*args: Any, **kwargs: Any) -> None:
        formats = {m.base_layer.weight_format for m in peft_model.modules()
                   if isinstance(m, LoraLayer) and isinstance(getattr(m, "base_layer", None), SurogateLinear)}
        if formats - {"bf16"}:
            raise ValueError(f"merge_adapter() cannot merge into the base weights recipe {recipe!r} holds quantized; "
                             "use merge_and_unload() (a plain model), or model.save_pretrained(dir) and "
                             "surogate.merge(base_dir, dir, out_dir)")
        if formats and kwargs.get("safe_merge", args[1] if len(args) > 1 else False):
            raise ValueError("merge_adapter(safe_merge=True) puts a new weight tensor in place of the one the fused "
                             "GEMMs read (q/k/v and gate/up packed in one buffer), so part of the merge would be "
                             "lost; merge in place (safe_merge=False) or use merge_and_unload()")
        return peft_method(*args, **kwargs)

    merge_adapter.__doc__ = peft_method.__doc__
    peft_model.merge_adapter = merge_adapter


def plain_base_layers(model: nn.Module) -> int:
    """Put back, in place of every `SurogateLinear` base layer of `model`'s LoRA layers, a plain `nn.Linear`
    (`Conv1D` where the LoRA layer is `fan_in_fan_out`, GPT-2) holding its weight as the GEMMs see it: exact
    for the bf16 recipes, dequantized for q-recipes. Returns the number swapped."""
    from peft.tuners.lora import LoraLayer
    from transformers.pytorch_utils import Conv1D

    if any(isinstance(m, SurogateExperts) for m in model.modules()):
        raise ValueError("merge_and_unload() / unload() does not handle experts compiled by surogate; save the "
                         "adapter (model.save_pretrained(dir)) and merge with surogate.merge(base_dir, dir, out_dir)")
    swapped = 0
    for module in model.modules():
        base = getattr(module, "base_layer", None) if isinstance(module, LoraLayer) else None
        if not isinstance(base, SurogateLinear):
            continue
        weight = base.dequantize().clone()  # clone: a packed layer's weight is a view of its group's buffer
        fan_in_fan_out = getattr(module, "fan_in_fan_out", False)
        with torch.device("meta"):
            plain = (Conv1D(base.out_features, base.in_features) if fan_in_fan_out
                     else nn.Linear(base.in_features, base.out_features, bias=base.bias is not None))
        plain.weight = nn.Parameter(weight.t().contiguous() if fan_in_fan_out else weight, requires_grad=False)
        plain.bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        module.base_layer = plain
        swapped += 1
    return swapped
