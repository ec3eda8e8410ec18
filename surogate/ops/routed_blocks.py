"""MoE blocks that run every expert on every token (Llama 4), rerouted to the top-k pairs `SurogateExperts` runs.

Llama 4's `Llama4TextMoe` scales each token by its sigmoid router score for every expert (0 for the experts it
did not pick: `sigmoid(-inf)`), then runs all E experts on all T tokens, `experts(routed_in (E*T, H))`, and sums
over the experts. A pair that was not picked has an all-zero input, and its expert (no bias) maps zero to
exactly zero in the forward: `up = 0` whatever `act_fn(0)` is finite. In the backward its LoRA gradients are
zero (each is a product with its input or with its `x @ A^T`, both zero), and its router-score gradient never
reaches the router: `sigmoid'(-inf) = 0` and the scatter that built the scores drops it. So running only the
k picked pairs, each token scaled by its score (`Routing.INPUT`), is the same function with the same
gradients, at k/E of the work (Llama 4 Scout: 1/16, Maverick: 1/128). This is that block; `moe.swap_experts`
gives a block this class (recorded for undo) when it swaps the block's experts.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn


def _llama4_forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor]:
    """`Llama4TextMoe.forward` on the top-k pairs: the same router call, outputs and in-place shared add."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_scores, router_logits = self.router(hidden_states)
    # The router's own choice (`Llama4Router`: topk of the logits) and its score of each chosen expert.
    top_k_index = torch.topk(router_logits, self.top_k, dim=1).indices
    routed_out = self.experts(hidden_states, top_k_index, router_scores.gather(1, top_k_index))
    out = self.shared_expert(hidden_states)
    out.add_(routed_out)
    return out, router_logits


def routed_block_class(block: nn.Module) -> type | str:
    """The top-k class for `block` (the module holding `Routing.INPUT` experts), or why there is none."""
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    cls = type(block)
    if not isinstance(block, Llama4TextMoe) or cls.forward is not Llama4TextMoe.forward:
        return f"its MoE block {cls.__name__} is not transformers' Llama4TextMoe (whose dense routing surogate reroutes)"
    return _top_k_class(cls)


@functools.cache
def _top_k_class(cls: type) -> type:
    top_k = type(f"TopK{cls.__name__}", (cls,), {"forward": _llama4_forward, "__doc__": _llama4_forward.__doc__})
    top_k.__qualname__ = top_k.__name__
    return top_k
