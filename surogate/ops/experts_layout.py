"""What an experts module of transformers 5 computes around its two GEMMs, read once into an `ExpertsLayout`.

`SurogateExperts` runs every layout as the same two grouped ops on `(E, N, K)` stacks (`ops/grouped.py`);
what differs between models is around them, and this table says it, so that the forward reads typed fields
and never a class name:

| model | stacks stored | gate_up's columns | biases | gate | routing weight |
|---|---|---|---|---|---|
| Qwen3-MoE, Mixtral, Qwen2-MoE, ... | `(E, N, K)` | `[gate; up]` | none | `act_fn(gate) * up` | scales the output |
| Aria | `(E, K, N)` (`is_transposed`) | `[gate; up]` | none | `act_fn(gate) * up` | scales the output |
| GPT-OSS | `(E, K, N)` | gate, up alternate | `(E, 2I)`, `(E, H)` | clamped, `(up + 1) * gate * sigmoid(alpha * gate)` | scales the output (bias included) |
| Llama 4 | `(E, K, N)` | `[gate; up]` | none | `act_fn(gate) * up` | scales the input |

Read from transformers' own markers where a class has them (`use_experts_implementation`'s `is_transposed`,
`is_concatenated`, `has_bias`, ..., and which `_apply_gate` function the class runs), from the class itself for
Llama 4's experts, which have none. `experts_layout` returns the reason instead of a layout for anything else.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn


class Gate(enum.Enum):
    """How gate_up's output becomes the down projection's input."""

    SWIGLU = "swiglu"  # act_fn(gate) * up: transformers' `_default_apply_gate`, Llama 4's `up * act_fn(gate)`
    # GPT-OSS: gate.clamp(max=limit), up.clamp(-limit, limit), (up + 1) * (gate * sigmoid(gate * alpha))
    CLAMPED_SWIGLU = "clamped_swiglu"


class Routing(enum.Enum):
    """Where a (token, expert) pair's routing weight enters."""

    OUTPUT = "output"  # transformers' contract `experts(hidden, top_k_index, top_k_weights)`: it scales the output
    # Llama 4: the MoE block scales each token by its score before the experts (routed_blocks.py runs it top-k)
    INPUT = "input"


@dataclasses.dataclass(frozen=True)
class ExpertsLayout:
    """One experts module's layout. `transposed`: stacks stored `(E, K, N)` (`x @ W[e]`), not `(E, N, K)`;
    `interleaved`: gate and up alternate along gate_up's N (GPT-OSS), not its halves; `bias`: `gate_up_proj_bias
    (E, 2I)` and `down_proj_bias (E, H)`; `alpha`, `limit`: the clamped gate's constants."""

    transposed: bool = False
    interleaved: bool = False
    bias: bool = False
    gate: Gate = Gate.SWIGLU
    alpha: float = 1.0
    limit: float = math.inf
    routing: Routing = Routing.OUTPUT

    def apply_gate(self, gate_up: Tensor, act_fn: Callable[[Tensor], Tensor] | None) -> Tensor:
        """`(S, 2I) -> (S, I)`, in the order of operations of the model's own gate (the same bf16 roundings)."""
        if self.interleaved:
            gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        else:
            gate, up = gate_up.chunk(2, dim=-1)
        if self.gate is Gate.CLAMPED_SWIGLU:
            gate = gate.clamp(min=None, max=self.limit)
            up = up.clamp(min=-self.limit, max=self.limit)
            return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))
        return act_fn(gate) * up


# transformers' `use_experts_implementation` markers that surogate cannot run, with the value it needs.
_REFUSED_MARKERS = (("has_gate", True), ("has_post_expert_norm", False), ("_is_expert_parallel", False))


def experts_layout(module: nn.Module) -> ExpertsLayout | str:
    """The layout of `module` (an experts module with 3-D `gate_up_proj` / `down_proj`), or why surogate has none."""
    from transformers.integrations.moe import _default_apply_gate
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    from transformers.models.llama4.modeling_llama4 import Llama4TextExperts

    cls = type(module)
    if isinstance(module, Llama4TextExperts):  # no markers: Llama 4's block calls it densely, `experts(routed_in)`
        if cls.forward is not Llama4TextExperts.forward:
            return f"a custom forward ({cls.__name__}.forward)"
        return ExpertsLayout(transposed=True, routing=Routing.INPUT)
    for flag, wanted in _REFUSED_MARKERS:
        if getattr(module, flag, wanted) != wanted:
            return f"{flag}={not wanted} (surogate runs gated experts without post-expert norm or expert parallelism)"
    interleaved = not getattr(module, "is_concatenated", True)
    gate_fn = getattr(cls, "_apply_gate", None)
    if gate_fn is None or gate_fn is _default_apply_gate:
        if not hasattr(module, "act_fn"):
            return "no act_fn"
        layout = ExpertsLayout(gate=Gate.SWIGLU)
    elif gate_fn is GptOssExperts._apply_gate:
        layout = ExpertsLayout(interleaved=True, gate=Gate.CLAMPED_SWIGLU, alpha=float(module.alpha),
                               limit=float(module.limit))
    else:
        return f"a custom gate ({cls.__name__}._apply_gate)"
    if interleaved != layout.interleaved:  # the gate function splits gate_up; the marker must say the same
        return (f"is_concatenated={not interleaved}, but its gate reads gate and up "
                f"{'interleaved' if layout.interleaved else 'as halves'}")
    return dataclasses.replace(layout, transposed=bool(getattr(module, "is_transposed", False)),
                               bias=bool(getattr(module, "has_bias", False)))
