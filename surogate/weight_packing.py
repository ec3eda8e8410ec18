"""Frozen weights of linears that share their input, concatenated once at compile (issue 19).

Not to be confused with packing examples into rows (data side, `sample_packing`).

Horizontal fusion (passes/horizontal.py) runs q/k/v, and gate/up, as one GEMM over their weights
concatenated along N. Concatenating inside the graph copies the group's frozen weights at every
micro-step, and either holds the copy from the forward to the backward (8.4 GiB on Qwen3-8B bf16)
or copies again in the backward. Here the copy is made once: each group's weight parts are
concatenated into one buffer that every member `SurogateLinear` registers (`SurogateLinear.pack`),
each member reads its own rows as views, and the pass, finding the members' slices of one buffer,
hands the buffer itself to the fused GEMM. The members' own copies are freed, so nothing is stored
twice.

Groups are siblings named in `SHARED_INPUT_GROUPS` (they read the same normalized hidden state in
every architecture that uses these names); the pass still fuses only linears that read the same graph
node, and a packed layer that is not fused reads its rows, the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from surogate.ops.modules import SurogateLinear
from surogate.passes import horizontal
from surogate.recipes import Recipe

# Sibling linears that read one input, in the order their rows are packed.
SHARED_INPUT_GROUPS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("query", "key", "value"),
    ("w1", "w3"),
)


def _groups(targets: Iterable[tuple[str, nn.Module]]) -> list[list[tuple[str, nn.Module]]]:
    """The LoRA layers of each shared-input group that has >= 2 of its members among `targets`."""
    by_name = dict(targets)
    found = []
    for parent in dict.fromkeys(name.rpartition(".")[0] for name in by_name):
        for group in SHARED_INPUT_GROUPS:
            names = [f"{parent}.{leaf}" if parent else leaf for leaf in group]
            members = [(name, by_name[name]) for name in names if name in by_name]
            if len(members) >= 2:
                found.append(members)
    return found


def _why_not(members: list[tuple[str, nn.Module]], recipe: Recipe) -> str | None:
    """Why a group's weights are not packed (the fused GEMM's own rules, horizontal.why_not), or None."""
    bases = [m.base_layer for _, m in members]
    if any(not isinstance(b, (SurogateLinear, nn.Linear)) for b in bases):
        return "a member's base layer is not a linear"
    if len({b.in_features for b in bases}) != 1:
        return "members differ in input size"
    adapter = members[0][1].active_adapters[0]
    meta = {
        "size": len(members),
        "weight_format": recipe.weight_format.value,
        "dropout": any(getattr(m.lora_dropout[adapter], "p", 0.0) > 0 for _, m in members),
        "scales": [m.scaling[adapter] for _, m in members],
        "computes": [(recipe.forward, recipe.grad_input)] * len(members),
        "has_bias": tuple(b.bias is not None for b in bases),
        "out_features": [b.out_features for b in bases],
        "in_features": bases[0].in_features,
    }
    return horizontal.why_not(recipe, "", meta)


def pack_shared_input_weights(targets: list[tuple[str, nn.Module]], recipe: Recipe, undo=None,
                              device: "torch.device | None" = None) -> list[tuple[str, ...]]:
    """Pack the frozen weights of each group of sibling LoRA targets that horizontal fusion will run as one
    GEMM. A plain `nn.Linear` base (the bf16 recipe) becomes a bf16 `SurogateLinear` first (recorded in
    `undo` like compile's other swaps). Returns the packed groups' names."""
    packed = []
    for members in _groups(targets):
        if _why_not(members, recipe) is not None:
            continue
        bases, originals = [], {}
        for _, module in members:
            base = module.base_layer
            if not isinstance(base, SurogateLinear):
                module.base_layer = SurogateLinear.from_linear(base, recipe, device)
                originals[id(module.base_layer)] = base
                if undo is not None:
                    undo.swapped.append((module, base))
            bases.append(module.base_layer)
        lists = [b.weight_list() for b in bases]  # every part has rows along N (N, N/128, N*K/64 ...)
        shared = horizontal.shared_parts(recipe.weight_format)
        if any(not torch.equal(own[i], lists[0][i]) for own in lists for i in shared):
            continue  # e.g. NF4 absmax code tables that differ: the fused list could hold only one
        with torch.no_grad():
            parts = [lists[0][i] if i in shared else torch.cat([own[i] for own in lists]) for i in range(len(lists[0]))]
        starts = [0] * len(parts)
        for base, own in zip(bases, lists):
            rows = tuple((0, p.shape[0]) if i in shared else (starts[i], starts[i] + p.shape[0])
                         for i, p in enumerate(own))
            starts = [stop for _, stop in rows]
            base.pack(parts, rows)
            if id(base) in originals and originals[id(base)].weight.device == base.w0.device:
                # The nn.Linear kept for undo reads the packed rows too, so its own copy is freed now,
                # not when compile returns (a bf16 model would otherwise hold q/k/v and gate/up twice).
                originals[id(base)].weight.data = base.weight_list()[0]
        packed.append(tuple(name for name, _ in members))
    return packed


def unpack(model: nn.Module) -> int:
    """Give every packed layer of `model` its own copy of its rows again. Returns the layers unpacked."""
    count = 0
    for module in model.modules():
        if isinstance(module, SurogateLinear) and module._rows is not None:
            module.unpack()
            count += 1
    return count
