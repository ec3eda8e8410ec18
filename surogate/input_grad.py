"""The first decoder block's input made to require grad, so that block 0 runs the same compiled graph as the others.

With frozen embeddings the embedding output has no grad, and Dynamo guards on `requires_grad`: block 0 would
compile a second graph (one more compile, one more graph's memory). transformers' `enable_input_require_grads`
marks that output with `requires_grad_(True)`, which makes it a leaf, and a model that then updates it in place
fails on its first step ("a leaf Variable that requires grad is being used in an in-place operation"): CTRL scales
it (`inputs_embeds *= sqrt(d)`), GIT adds positions to it, BLT adds its hash embeddings to it in a helper function.
The hook here hands on a copy that autograd made (a node, not a leaf), which any in-place update may take; its
backward sends nothing further, as the frozen embeddings want nothing. The copy is one pass over the embedding
output, which is small next to a block.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


class _RequireGrad(torch.autograd.Function):
    """A copy of `embedded` that requires grad, through `anchor` (a leaf that requires grad, which gets none)."""

    @staticmethod
    def forward(ctx: Any, embedded: Tensor, anchor: Tensor) -> Tensor:
        return embedded.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, None]:
        return None, None


_ANCHOR = torch.zeros((), requires_grad=True)  # 0-dim on the CPU: a scalar that a graph on any device takes


def _hand_on_a_copy_that_requires_grad(module: nn.Module, args: Any, output: Any) -> "Tensor | None":
    if isinstance(output, Tensor) and not output.requires_grad and torch.is_grad_enabled():
        return _RequireGrad.apply(output, _ANCHOR)
    return None  # trained embeddings (their output has grad already), inference, or an output of another kind


def make_inputs_require_grad(hf: nn.Module) -> "RemovableHandle | None":
    """Hook `hf`'s input embeddings so that their output requires grad in training; the handle removes it (None:
    `hf` has no input embeddings)."""
    embeddings = hf.get_input_embeddings() if hasattr(hf, "get_input_embeddings") else None
    if not isinstance(embeddings, nn.Module):
        return None
    return embeddings.register_forward_hook(_hand_on_a_copy_that_requires_grad)
