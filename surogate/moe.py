"""How `surogate.compile` finds the experts of a mixture-of-experts model, targets them and swaps them.

- `expert_modules(model)`: the experts modules transformers 5 runs through `use_experts_implementation`
  (3-D `gate_up_proj` / `down_proj`), as `(name, module)`.
- `expert_target_parameters(model)`: the PEFT `target_parameters` that put one LoRA pair per expert on
  both stacks (`["experts.down_proj", "experts.gate_up_proj"]` for Qwen3-MoE, Mixtral, Qwen2-MoE): the
  default whenever the user's LoRA options do not say otherwise.
- `swap_experts(peft_model, recipe, undo)`: every experts module becomes a `SurogateExperts` (the
  recipe's experts format; q-recipes free the bf16 stacks), and the outermost PEFT `ParamWrapper` on it
  runs it with PEFT's factors (`ops/experts.py`); a block that runs every expert on every token (Llama 4)
  gets the class that runs only its top-k pairs (`ops/routed_blocks.py`). Experts surogate cannot run stay
  as PEFT runs them, and the report says why.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

from torch import nn

from surogate.ops.experts import (
    EXPERT_PARAMETERS,
    SurogateExperts,
    experts_lora_class,
    experts_weight_format,
    unsupported_experts,
)
from surogate.ops.experts_layout import Routing, experts_layout
from surogate.ops.routed_blocks import routed_block_class
from surogate.recipes import Recipe


def _is_experts(module: nn.Module) -> bool:
    return all(getattr(getattr(module, name, None), "dim", lambda: 0)() == 3 for name in EXPERT_PARAMETERS)


def expert_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The experts modules (3-D gate_up_proj and down_proj parameters) of `model`, PEFT wrappers seen through."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, SurogateExperts) or (_is_experts(module) and not hasattr(module, "base_layer")):
            found.append((name, module))
    return found


def expert_target_parameters(model: nn.Module) -> list[str]:
    """PEFT `target_parameters` for one LoRA pair per expert on both stacks of every experts module."""
    names = sorted({name.rsplit(".", 1)[-1] for name, _ in expert_modules(model)})
    return [f"{name}.{param}" for name in names for param in sorted(EXPERT_PARAMETERS)]


def check_target_parameters(model: nn.Module, targets: "list[str] | None") -> None:
    """Refuse, before anything changes, `target_parameters` entries that name no parameter of `model`
    (PEFT's rule: the entry is `<module path>.<parameter>` or a dotted suffix of it)."""
    if not targets:
        return
    keys = [f"{m}.{p}" for m, module in model.named_modules() for p, _ in module.named_parameters(recurse=False)]
    missing = [t for t in targets if not any(k == t or k.endswith(f".{t}") for k in keys)]
    if missing:
        found = expert_target_parameters(model)
        raise ValueError(f"LoRA target_parameters {missing} match no parameter of {type(model).__name__}; "
                         f"its expert parameters: {found or 'none (not a mixture-of-experts model)'}")


@functools.cache
def _lora_class(wrapper_class: type) -> type:
    return experts_lora_class(wrapper_class)


def _chain(outer: nn.Module) -> list[nn.Module]:
    """The nested PEFT wrappers from `outer` in (outermost first)."""
    from peft.tuners.lora.layer import ParamWrapper

    chain = []
    while isinstance(outer, ParamWrapper):
        chain.append(outer)
        outer = outer.base_layer
    return chain


def swap_experts(peft_model: nn.Module, recipe: Recipe, undo: Any = None, device: Any = None) -> list[str]:
    """Swap every experts module for a `SurogateExperts`; returns the report's lines.

    `undo` (compiler's `_Undo`) records each replaced module and swapped class, so a failure later
    hands the model back as it came. `device`: build there (compile is moving a CPU model to the GPU).
    """
    from peft.tuners.lora.layer import ParamWrapper

    parents = {name: module for name, module in peft_model.named_modules()}
    swapped, left = 0, []
    for name, module in list(peft_model.named_modules()):
        if not name or isinstance(module, SurogateExperts):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = parents[parent_name]
        if isinstance(parent, ParamWrapper) and attr == "base_layer":
            continue  # reached through its outermost wrapper below
        chain = _chain(module)
        experts = chain[-1].base_layer if chain else module
        if not _is_experts(experts) or hasattr(experts, "base_layer"):
            continue
        why = unsupported_experts(experts, experts_weight_format(recipe))
        block_class = None
        if not why and experts_layout(experts).routing is Routing.INPUT:
            block_class = routed_block_class(parent)  # the block's dense routing, run top-k
            why = block_class if isinstance(block_class, str) else None
        if why:
            left.append(f"{name} ({type(experts).__name__}: {why})")
            continue
        adapters = {a for w in chain for a in w.lora_A}
        if len(adapters) > 1:
            raise ValueError(f"{name} carries {len(adapters)} LoRA adapters {sorted(adapters)}; surogate trains one "
                             "adapter at a time on the experts")
        owner, owner_attr = (chain[-1], "base_layer") if chain else (parent, attr)
        setattr(owner, owner_attr, SurogateExperts(experts, recipe, device))
        if undo is not None:
            undo.replaced.append((owner, owner_attr, experts))
        if chain:
            outer = chain[0]
            if undo is not None:
                undo.classes.append((outer, type(outer)))
            outer.__class__ = _lora_class(type(outer))
        if block_class is not None:
            if undo is not None:
                undo.classes.append((parent, type(parent)))
            parent.__class__ = block_class
        swapped += 1
    lines = []
    if swapped:
        held = [m for m in peft_model.modules() if isinstance(m, SurogateExperts)]
        formats = ", ".join(sorted({f"weights {m.weight_format}, {m.compute} MMAs" for m in held}))
        lines.append(f"experts: {swapped} MoE blocks run as grouped ops (SurogateExperts: {formats}, LoRA per "
                     "expert in the epilogue)")
    if left:
        lines.append(f"experts left as PEFT runs them ({len(left)}): {left[0]}")
        # Most of an MoE model's weights are its experts: left unrewritten they stay bf16 whatever the recipe, in
        # PEFT's per-expert loop (which also rounds each expert's LoRA update into the bf16 stack). Worth a warning,
        # not only a report line.
        held = "" if recipe.keeps_bf16_weight else f", not stored as {recipe.name} asks"
        warnings.warn(f"{len(left)} MoE experts modules stay as PEFT runs them (bf16{held}): {left[0]}",
                      stacklevel=3)
    return lines

