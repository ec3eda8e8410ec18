"""Which transformers class `surogate train`, `load_adapter` and `surogate merge` build a checkpoint as.

`AutoModelForCausalLM`, except where a checkpoint is published as a vision-language model and that would load
only its text model under other module names. Qwen3.5 (dense and MoE) checkpoints are
`Qwen3_5(Moe)ForConditionalGeneration`: `AutoModelForCausalLM` gives `Qwen3_5ForCausalLM`, whose layers are
`model.layers.N`, while the published model's are `model.language_model.layers.N`. An adapter trained on the
former does not load onto the latter: PEFT warns of missing keys and leaves every LoRA B at zero, so the served
model is the base. Built as its own class (as Axolotl's Qwen3.5 examples do), the adapter's names are the
checkpoint's, `surogate merge` writes the whole model back (vision tower included), and text rows train the same
(tests/test_model_class.py: equal to FP32 PEFT, packed rows equal to their examples alone); the vision tower gets no
LoRA (compile's default targets are the decoder's).

Only the model types checked that way: Llama 4's `Llama4ForConditionalGeneration` fails its own forward on text
rows in transformers 5.24 (`MoeCausalLMOutputWithPast` has no `image_outputs`), so Llama 4 keeps
`AutoModelForCausalLM`.
"""

from __future__ import annotations

from typing import Any

OWN_CLASS_MODEL_TYPES = frozenset({"qwen3_5", "qwen3_5_moe"})


def causal_lm_class(config: Any) -> Any:
    """The class (with `from_pretrained` / `from_config`) to build `config`'s checkpoint as (module doc)."""
    import transformers
    from transformers import AutoModelForCausalLM

    named = (getattr(config, "architectures", None) or [""])[0] or ""
    own = getattr(transformers, named, None) if named.endswith("ForConditionalGeneration") else None
    if own is not None and getattr(config, "model_type", None) in OWN_CLASS_MODEL_TYPES:
        return own
    return AutoModelForCausalLM
