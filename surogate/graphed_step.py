"""One training micro-step (forward + backward) captured as a CUDA graph and replayed.

Why: a compiled LoRA step still launches ~140 kernels per decoder layer from Python; on a 0.6B
model the GPU idles for more than half the step waiting for them (bench/results/profile.md).
Replaying a captured graph launches the whole micro-step at once. With packed batches every
micro-batch has the same shape, so one capture serves the whole run.

    step = surogate.GraphedStep(model, loss_scale=1 / accum)
    for batch in micro_batches:
        loss = step(**batch)          # forward + backward; gradients accumulate in p.grad
    optimizer.step(); optimizer.zero_grad()

The first call runs `warmup` eager micro-steps (compilation, autotuning, cuBLAS workspaces),
then captures; the gradients are as if only the real calls had run. A call whose inputs differ in
shape, dtype or key set from the captured one runs eagerly (same gradients, no graph), so an
odd-sized batch never breaks a run. The loss a call returns lives in the graph's memory: the next
call overwrites it, so `.clone()` (or add it into an accumulator) to keep it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor, nn


class Capture(Protocol):
    """What `GraphedStep` needs from a graph: record `fn` once, then run the recording."""

    def capture(self, fn: Callable[[], None]) -> None: ...

    def replay(self) -> None: ...


class CudaGraphCapture:
    """`torch.cuda.CUDAGraph` on a side stream; warm-up and capture share the stream (cuBLAS keeps a
    workspace per stream, and one allocated during capture would be freed under the graph)."""

    def __init__(self) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.stream = torch.cuda.Stream()

    def warmup(self, fn: Callable[[], None], iterations: int) -> None:
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            for _ in range(iterations):
                fn()
        torch.cuda.current_stream().wait_stream(self.stream)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # warm-up blocks back to the driver, so the graph pool does not double them

    def capture(self, fn: Callable[[], None]) -> None:
        with torch.cuda.graph(self.graph, stream=self.stream):
            fn()

    def replay(self) -> None:
        self.graph.replay()


class EagerCapture:
    """Runs `fn` at every replay instead of recording it: the bookkeeping of `GraphedStep` without a
    GPU (tests, and a debugging switch when a capture misbehaves)."""

    def __init__(self) -> None:
        self.fn: Callable[[], None] | None = None

    def warmup(self, fn: Callable[[], None], iterations: int) -> None:
        for _ in range(iterations):
            fn()

    def capture(self, fn: Callable[[], None]) -> None:
        self.fn = fn

    def replay(self) -> None:
        assert self.fn is not None, "replay before capture"
        self.fn()


def _signature(inputs: dict[str, Tensor]) -> tuple:
    return tuple(sorted((k, tuple(v.shape), v.dtype, v.device) for k, v in inputs.items()))


class GraphedStep:
    """`loss = step(**batch)`: the model's forward, `(loss * loss_scale).backward()`, as one CUDA graph.

    Gradients accumulate into each trainable parameter's `.grad` exactly as an eager backward would;
    `optimizer.zero_grad()` (to None or to zero) between optimizer steps is fine. The parameters must
    keep their storage (optimizers update in place), and the model must not sync with the host inside
    its forward/backward (no `.item()`), or the capture fails with an error that says so.
    """

    def __init__(self, model: nn.Module, loss_scale: float = 1.0, warmup: int = 2,
                 capture: Capture | None = None) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters; attach LoRA (surogate.compile) first")
        if capture is None:
            if not all(p.is_cuda for p in self.params):
                raise ValueError("CUDA graphs need the model on a CUDA device; move it with model.cuda(), or "
                                 "drive it without GraphedStep (model(**batch).loss.backward())")
            capture = CudaGraphCapture()
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (compilation must happen before capture), got {warmup}")
        self.model = model
        self.loss_scale = float(loss_scale)
        self.warmup = warmup
        self.capture_backend = capture
        self.grads: list[Tensor] | None = None
        self.static_inputs: dict[str, Tensor] | None = None
        self.static_signature: tuple | None = None
        self.static_loss: Tensor | None = None
        self.replays = 0
        self.eager_calls = 0

    # --- public -------------------------------------------------------------------------------

    @property
    def captured(self) -> bool:
        return self.static_inputs is not None

    def __call__(self, **inputs: Tensor) -> Tensor:
        """Forward + backward of one micro-batch; returns the (unscaled) loss."""
        if not all(isinstance(v, Tensor) for v in inputs.values()):
            raise TypeError("GraphedStep takes tensor keyword arguments only (input_ids=..., labels=...)")
        if "labels" not in inputs:
            raise ValueError("GraphedStep trains: pass labels= so that the model returns a loss")
        if self.static_inputs is None:
            self._capture(inputs)
        elif _signature(inputs) != self.static_signature:
            return self._eager(inputs)
        self._bind_grads()
        for name, value in inputs.items():
            self.static_inputs[name].copy_(value, non_blocking=True)
        self.capture_backend.replay()
        self.replays += 1
        return self.static_loss

    # --- internals ----------------------------------------------------------------------------

    def _forward_backward(self, inputs: dict[str, Tensor]) -> Tensor:
        loss = self.model(**inputs).loss
        if loss is None:
            raise ValueError("the model returned no loss; pass labels=")
        (loss * self.loss_scale).backward()
        return loss.detach()

    def _eager(self, inputs: dict[str, Tensor]) -> Tensor:
        self._bind_grads()
        self.eager_calls += 1
        if self.eager_calls == 1:
            warnings.warn(f"GraphedStep: inputs {_signature(inputs)} differ from the captured "
                          f"{self.static_signature}; running them eagerly (pack to one shape to keep "
                          "every micro-step in the graph)", stacklevel=3)
        return self._forward_backward(inputs)

    def _bind_grads(self) -> None:
        """Point every `.grad` at the buffer the graph accumulates into (zeroed if it was set to None)."""
        unset = []
        for p, g in zip(self.params, self.grads):
            if p.grad is None:
                unset.append(g)
                p.grad = g
            elif p.grad is not g:
                raise RuntimeError("a parameter's .grad was replaced by another tensor; the captured graph "
                                   "accumulates into the old one. Zero gradients with optimizer.zero_grad() "
                                   "(to None or in place) and do not assign .grad between micro-steps")
        if unset:
            torch._foreach_zero_(unset)

    def _capture(self, inputs: dict[str, Tensor]) -> None:
        # Gradients already accumulated (a capture in mid-step) survive the warm-up runs.
        kept = [None if p.grad is None else p.grad.clone() for p in self.params]
        self.static_inputs = {k: v.clone() for k, v in inputs.items()}
        self.static_signature = _signature(self.static_inputs)
        self.capture_backend.warmup(lambda: self._forward_backward(self.static_inputs), self.warmup)
        self.grads = []
        for p, k in zip(self.params, kept):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if k is None:
                p.grad.zero_()
            else:
                p.grad.copy_(k)
            self.grads.append(p.grad)

        def record() -> None:
            self.static_loss = self._forward_backward(self.static_inputs)

        try:
            self.capture_backend.capture(record)
        except RuntimeError as error:
            self.static_inputs = None
            raise RuntimeError(
                f"capturing the training step as a CUDA graph failed ({error}). Usually something in the "
                "forward or backward syncs with the host (.item(), a data-dependent shape, a CPU tensor); "
                "train without CUDA graphs (cuda_graphs: false, or call the model directly) or remove the "
                "sync") from error
