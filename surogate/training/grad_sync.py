"""Gradients averaged over the ranks outside DDP: by hand after the last replayed micro-step of a CUDA-graph
step (`all_reduce_grads`), or in buckets while the backward runs for LoRA kept whole under FSDP
(`overlap_reduction`); `no_sync` pauses every kind for the micro-steps of gradient accumulation.

Why not DDP's reducer: a captured graph cannot replay its autograd hooks, and FSDP leaves the ignored
(replicated) LoRA parameters to the caller.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


def _buckets(params: list[nn.Parameter], bucket_bytes: int) -> list[list[nn.Parameter]]:
    """Consecutive runs of `params` of one dtype and device, each up to `bucket_bytes` (at least one)."""
    out: list[list[nn.Parameter]] = []
    size = 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        last = out[-1] if out else None
        if last is None or size + nbytes > bucket_bytes or (last[0].dtype, last[0].device) != (p.dtype, p.device):
            out.append([])
            size = 0
        out[-1].append(p)
        size += nbytes
    return out


def _reduce_bucket(bucket: list[nn.Parameter], group, async_op: bool):
    for p in bucket:
        if p.grad is None:  # every rank must send the same buffer: a missing gradient is a zero one
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in bucket])
    return flat, dist.all_reduce(flat, group=group, async_op=async_op)


def _unflatten_into(bucket: list[nn.Parameter], flat: Tensor, world: int) -> None:
    flat.div_(world)  # gloo has no AVG: sum, then divide (exact for a power-of-two world)
    for p, piece in zip(bucket, flat.split([p.numel() for p in bucket])):
        p.grad.copy_(piece.view_as(p.grad))


def all_reduce_grads(params: Iterable[nn.Parameter], *, bucket_mb: float = 25.0, group=None) -> int:
    """Average `.grad` of `params` over the ranks, in place (the tensors stay the same objects, as
    `GraphedStep` requires), in buckets of about `bucket_mb` MiB; returns the number of all-reduces.

    For the CUDA-graph step: replay every micro-step of an optimizer step, then call this once, outside
    the graph. Every rank must pass the same parameters in the same order (a missing `.grad` counts as
    zeros). A no-op in one process.
    """
    params = [p for p in params if p.requires_grad]
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return 0
    world = dist.get_world_size(group)
    buckets = _buckets(params, int(bucket_mb * 2**20))
    for bucket in buckets:
        flat, _ = _reduce_bucket(bucket, group, async_op=False)
        _unflatten_into(bucket, flat, world)
    return len(buckets)


class OverlappedReducer:
    """All-reduce gradients in buckets while the backward runs (for LoRA replicated under FSDP).

    A post-accumulate-grad hook counts the gradients of each bucket; a bucket whose gradients are all
    in is launched asynchronously, in bucket order on every rank (the ranks' collectives must match),
    and a callback at the end of the backward launches what is left, waits and writes the averages
    back. Buckets run in reverse parameter order, roughly the order the backward produces them.
    """

    def __init__(self, params: list[nn.Parameter], bucket_mb: float, group=None) -> None:
        self.group, self.world = group, dist.get_world_size(group)
        self.buckets = _buckets(list(reversed(params)), int(bucket_mb * 2**20))
        self.bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self.enabled = True  # False inside no_sync(): gradients accumulate locally
        self.all_reduces = 0  # launched so far (what a test or a profile counts)
        self._reset()
        for p in params:
            p.register_post_accumulate_grad_hook(self._ready)

    def _reset(self) -> None:
        self.left = [len(b) for b in self.buckets]
        self.launched = 0
        self.inflight: list[tuple[int, Tensor, Any]] = []
        self.queued = False

    def _ready(self, p: Tensor) -> None:
        if not self.enabled:
            return
        if not self.queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
            self.queued = True
        self.left[self.bucket_of[id(p)]] -= 1
        while self.launched < len(self.buckets) and self.left[self.launched] <= 0:
            self._launch(self.launched)

    def _launch(self, i: int) -> None:
        flat, work = _reduce_bucket(self.buckets[i], self.group, async_op=True)
        self.inflight.append((i, flat, work))
        self.all_reduces += 1
        self.launched = i + 1

    def _finish(self) -> None:
        while self.launched < len(self.buckets):  # parameters this backward did not reach
            self._launch(self.launched)
        for i, flat, work in self.inflight:
            work.wait()
            _unflatten_into(self.buckets[i], flat, self.world)
        self._reset()


def overlap_reduction(model: nn.Module, params: list[nn.Parameter], bucket_mb: float) -> OverlappedReducer:
    """Average the gradients of `params` over the ranks in buckets while each backward of `model` runs
    (what `wrap` does for LoRA replicated under FSDP); `no_sync(model)` pauses it. Returns the reducer."""
    reducer = OverlappedReducer(params, bucket_mb)
    model._surogate_reducer = reducer
    return reducer


@contextlib.contextmanager
def no_sync(model: nn.Module) -> Iterator[None]:
    """Accumulate gradients locally (no reduction) for the micro-steps inside; the backward after the
    block reduces the sum. Works for `wrap`'s DDP and FSDP models and in one process."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
        return
    reducer = getattr(model, "_surogate_reducer", None)
    sharded = isinstance(model, FSDPModule)
    if sharded:
        model.set_requires_gradient_sync(False)
    if reducer is not None:
        reducer.enabled = False
    try:
        yield
    finally:
        if sharded:
            model.set_requires_gradient_sync(True)
        if reducer is not None:
            reducer.enabled = True
