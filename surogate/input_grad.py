"""The first decoder block's input made to require grad, so that block 0 runs the same compiled graph as the others.

With frozen embeddings the embedding output has no grad, and Dynamo guards on `requires_grad`: block 0 would
compile a second graph (one more compile, one more graph's memory). transformers' `enable_input_require_grads`
marks that output with `requires_grad_(True)`, which makes it a leaf, and a model that then updates it in place
fails on its first step ("a leaf Variable that requires grad is being used in an in-place operation"): CTRL scales
it (`inputs_embeds *= sqrt(d)`), GIT adds positions to it, BLT adds its hash embeddings to it in a helper function.
The hook here hands on a copy that autograd made (a node, not a leaf), which any in-place update may take; its
backward sends nothing further, as the frozen embeddings want nothing. The copy is one pass over the embedding
output, which is small next to a block.

Dynamo reads `.grad` of each tensor it takes as a graph input, and hides the warning that reading a non-leaf's
makes by swapping `warnings.showwarning` (`safe_grad`). Under a filter that turns warnings into errors (`python -W
error`, pytest's `filterwarnings = error`) the warning raises before it is shown, and the block's compile fails
("InternalTorchDynamoError: UserWarning: The .grad attribute of a Tensor that is not a leaf Tensor ..."): block 0's
input is such a non-leaf. `quiet_grad_reads` ignores that one warning around the block's call while such a filter
is set (an H200 test ran under one: bench/NOTES.md session 34).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, ContextManager, Iterator

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


_NON_LEAF_GRAD_READ = "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed"


@contextlib.contextmanager
def _ignoring_non_leaf_grad_reads() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NON_LEAF_GRAD_READ, category=UserWarning)
        yield


def quiet_grad_reads() -> ContextManager[None]:
    """Around a compiled block's call: where a warnings filter raises, ignore the warning that Dynamo's read of a
    non-leaf input's `.grad` makes (it hides it itself otherwise); nothing to do, and nothing done, without one."""
    if any(action == "error" for action, *_ in warnings.filters):
        return _ignoring_non_leaf_grad_reads()
    return contextlib.nullcontext()


def make_inputs_require_grad(hf: nn.Module) -> "RemovableHandle | None":
    """Hook `hf`'s input embeddings so that their output requires grad in training; the handle removes it (None:
    `hf` has no input embeddings)."""
    embeddings = hf.get_input_embeddings() if hasattr(hf, "get_input_embeddings") else None
    if not isinstance(embeddings, nn.Module):
        return None
    return embeddings.register_forward_hook(_hand_on_a_copy_that_requires_grad)
