"""One training micro-step (forward + backward) captured as a CUDA graph per shape bucket and replayed.

Why: a compiled LoRA step still launches ~140 kernels per decoder layer from Python; on a 0.6B model
the launches, not the GPU, set the pace (bench/results/profile.md). Replaying a captured graph
launches the whole micro-step at once.

    step = surogate.GraphedStep(model, loss_scale=1 / accum)
    for batch in micro_batches:
        loss = step(**batch)          # forward + backward; gradients accumulate in p.grad
    optimizer.step(); optimizer.zero_grad()

Shape buckets: real data has rows of many lengths. Each call's sequence length is rounded up to
the smallest of `buckets` it fits (lengths chosen from the data: `surogate.training.buckets.choose`, what
`surogate train` passes for padded batches), else to the next multiple of `pad_to` (128 by default), and
the row is padded to it (labels -100, so the loss
and the gradients are those of the unpadded row: padding is appended after every real token, which
causal attention never lets a real token see; `attention_mask` is padded with 0 and `position_ids`
restart at 0, a segment of their own). One graph is captured per (batch size, bucket length, dtypes),
up to `max_graphs`; later shapes run eagerly. All graphs share one memory pool (they never run at
the same time), so the graphs of several buckets cost about the memory of the largest one, plus
each graph's static inputs and loss. Padding costs compute: up to the next bucket, or at most `pad_to - 1`
tokens a row.

The first call of a bucket runs `warmup` eager micro-steps (compilation, autotuning, cuBLAS
workspaces), then captures; the gradients are as if only the real calls had run. If a capture
fails, the process is left whole (CUDA RNG state, the allocator's graph pool, the current stream,
the gradients), a warning says why once, and every later call runs eagerly. The loss a call returns
lives in the graph's memory: the next call overwrites it, so `.clone()` it to keep it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from surogate.compat import capturable_eager_masks, masks_as_under_capture
from surogate.training.buckets import padded_length

PAD_TO = 128  # the default shape bucket: lengths rounded up to a multiple of this
# Fill of each padded input (keys not listed pad with 0). position_ids pad with 0, 1, 2, ...
PAD_VALUES = {"labels": -100, "attention_mask": 0, "input_ids": 0}


class Capture(Protocol):
    """What `GraphedStep` needs from a graph: warm up, record `fn` once, then run the recording."""

    def warmup(self, fn: Callable[[], None], iterations: int) -> None: ...

    def capture(self, fn: Callable[[], None]) -> None: ...

    def replay(self) -> None: ...


class CaptureFailed(RuntimeError):
    """A CUDA graph capture failed; the process state was restored (see `CudaGraphCapture.capture`)."""


class CudaGraphCapture:
    """`torch.cuda.CUDAGraph` on a side stream. Warm-up and capture share the stream (cuBLAS keeps a
    workspace per stream, and one allocated during capture would be freed under the graph); graphs made
    with the same `shared` dict share that stream and one memory pool."""

    def __init__(self, shared: dict | None = None) -> None:
        shared = {} if shared is None else shared
        if "stream" not in shared:
            shared["stream"] = torch.cuda.Stream()
            shared["pool"] = torch.cuda.graph_pool_handle()
        self.stream, self.pool = shared["stream"], shared["pool"]
        self.graph = torch.cuda.CUDAGraph()

    def warmup(self, fn: Callable[[], None], iterations: int) -> None:
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream), masks_as_under_capture(), capturable_eager_masks():
            for _ in range(iterations):
                fn()
        torch.cuda.current_stream().wait_stream(self.stream)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # warm-up blocks back to the driver, so the graph pool does not double them

    def capture(self, fn: Callable[[], None]) -> None:
        """Record `fn`. On failure torch leaves the process half in capture mode: the default CUDA generator
        still counts offsets for the graph ("Offset increment outside graph capture" at the next random op),
        the allocator still routes to the graph's pool, the side stream stays current. Undo all three."""
        device = torch.cuda.current_device()
        generator = torch.cuda.default_generators[device]
        rng = generator.clone_state()  # a state object that was never registered with the capture
        stream = torch.cuda.current_stream()
        try:
            with capturable_eager_masks(), torch.cuda.graph(self.graph, pool=self.pool, stream=self.stream):
                fn()
        except Exception as error:
            torch.cuda.set_stream(stream)
            _quietly(self.graph.reset)
            generator.graphsafe_set_state(rng)
            _quietly(lambda: torch._C._cuda_endAllocateToPool(device, self.pool))
            _quietly(torch.cuda.synchronize)
            raise CaptureFailed(str(error).splitlines()[0] if str(error) else type(error).__name__) from error

    def replay(self) -> None:
        self.graph.replay()

    def release(self) -> None:
        self.graph.reset()


def _quietly(fn: Callable[[], object]) -> None:
    try:
        fn()
    except Exception:  # cleaning up after a failed capture: whatever still fails here was never set up
        pass


class EagerCapture:
    """Runs `fn` at every replay instead of recording it: the bookkeeping of `GraphedStep` without a
    GPU (tests, and a debugging switch when a capture misbehaves)."""

    def __init__(self, shared: dict | None = None) -> None:
        self.fn: Callable[[], None] | None = None

    def warmup(self, fn: Callable[[], None], iterations: int) -> None:
        for _ in range(iterations):
            fn()

    def capture(self, fn: Callable[[], None]) -> None:
        self.fn = fn

    def replay(self) -> None:
        assert self.fn is not None, "replay before capture"
        self.fn()

    def release(self) -> None:
        self.fn = None


def _signature(inputs: dict[str, Tensor]) -> tuple:
    return tuple(sorted((k, tuple(v.shape), v.dtype, v.device) for k, v in inputs.items()))


@dataclass
class _Graph:
    """One captured bucket: its recording, its static inputs (padded shape) and its loss."""

    capture: Capture
    inputs: dict[str, Tensor]
    padding: dict[str, Tensor]  # per-token inputs: the pad values over the whole bucket width
    loss: Tensor | None = None


class GraphedStep:
    """`loss = step(**batch)`: the model's forward, `(loss * loss_scale).backward()`, as CUDA graphs.

    Gradients accumulate into each trainable parameter's `.grad` exactly as an eager backward would;
    `optimizer.zero_grad()` (to None or to zero) between optimizer steps is fine. The parameters must
    keep their storage (optimizers update in place), and the model must not sync with the host inside
    its forward/backward (no `.item()`). `capture` is a class (or an instance whose class is used) that
    records one graph: `CudaGraphCapture` on CUDA, `EagerCapture` to check the bookkeeping anywhere.
    `strict=True` raises when a capture fails instead of continuing eagerly.
    """

    def __init__(self, model: nn.Module, loss_scale: float = 1.0, warmup: int = 2, capture=None,
                 pad_to: int = PAD_TO, max_graphs: int = 16, strict: bool = False,
                 buckets: "Sequence[int] | None" = None) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters; attach LoRA (surogate.compile) first")
        if capture is None:
            if not all(p.is_cuda for p in self.params):
                raise ValueError("CUDA graphs need the model on a CUDA device; move it with model.cuda(), or "
                                 "drive it without GraphedStep (model(**batch).loss.backward())")
            capture = CudaGraphCapture
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (compilation must happen before capture), got {warmup}")
        if pad_to < 1 or max_graphs < 1:
            raise ValueError(f"pad_to and max_graphs must be >= 1, got {pad_to} and {max_graphs}")
        self.model = model
        self.loss_scale = float(loss_scale)
        self.warmup = warmup
        self.capture_class = capture if isinstance(capture, type) else type(capture)
        self.pad_to, self.max_graphs, self.strict = pad_to, max_graphs, strict
        if any(not isinstance(b, int) or b < 1 for b in buckets or ()):
            raise ValueError(f"buckets must be positive lengths, got {list(buckets)}")
        self.max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        limit = self.max_positions
        self.buckets = tuple(sorted({b for b in buckets or () if limit is None or b <= limit}))  # none past positions
        self.shared: dict = {}  # the stream and memory pool every graph of this step uses
        self.graphs: dict[tuple, _Graph] = {}
        self.grads: list[Tensor] | None = None
        self.failure: str | None = None
        self.replays = 0
        self.eager_calls = 0
        self._warned: set[str] = set()

    # --- public -------------------------------------------------------------------------------

    @property
    def captured(self) -> bool:
        return bool(self.graphs)

    def __call__(self, **inputs: Tensor) -> Tensor:
        """Forward + backward of one micro-batch; returns the (unscaled) loss."""
        if not all(isinstance(v, Tensor) for v in inputs.values()):
            raise TypeError("GraphedStep takes tensor keyword arguments only (input_ids=..., labels=...)")
        if "labels" not in inputs:
            raise ValueError("GraphedStep trains: pass labels= so that the model returns a loss")
        if self.failure is not None:
            return self._eager(inputs)
        length = inputs["labels"].shape[-1]
        padded = padded_length(length, self.buckets, self.pad_to, self.max_positions)
        key = _signature({k: v[:, :0] if _is_row(v, length) else v for k, v in inputs.items()}) + (padded,)
        graph = self.graphs.get(key)
        if graph is None:
            if len(self.graphs) >= self.max_graphs:
                self._warn_once("max_graphs", f"GraphedStep: {self.max_graphs} shape buckets are captured already "
                                "(max_graphs); running this shape eagerly")
                return self._eager(inputs)
            graph = self._capture(inputs, length, padded, key)
            if graph is None:
                return self._eager(inputs)
        self._bind_grads()
        _fill(graph, inputs, length)
        graph.capture.replay()
        self.replays += 1
        return graph.loss

    def release(self) -> None:
        """Free every captured graph (their memory pool goes back to the allocator)."""
        for graph in self.graphs.values():
            graph.capture.release()
        self.graphs.clear()

    # --- internals ----------------------------------------------------------------------------

    def _forward_backward(self, inputs: dict[str, Tensor]) -> Tensor:
        loss = self.model(**inputs).loss
        if loss is None:
            raise ValueError("the model returned no loss; pass labels=")
        accumulated = self._take_grads()
        try:
            (loss * self.loss_scale).backward()
        except BaseException:  # a failed backward (a NaN check, an interrupt) leaves the gradients as they were
            self._put_back(accumulated)
            raise
        self._add_grads(accumulated)
        return loss.detach()

    def _take_grads(self) -> list[Tensor | None] | None:
        """The `.grad`s accumulated so far, taken off the parameters so that the backward assigns its gradients
        (autograd's AccumulateGrad adds into an existing `.grad` with one kernel per parameter: 14 a layer and
        micro-step on a Qwen3 with LoRA on its 7 projections, ~2,000 launches a step at 8B); `_add_grads` adds
        them all back with `torch._foreach_add_`, the same sums. None (autograd accumulates) when a parameter
        has a post-accumulate-grad hook, which must see the accumulated gradient (grad_sync's overlap)."""
        if any(getattr(p, "_post_accumulate_grad_hooks", None) for p in self.params):
            return None
        taken = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        return taken

    def _put_back(self, taken: list[Tensor | None] | None) -> None:
        if taken is not None:
            for p, old in zip(self.params, taken):
                p.grad = old

    def _add_grads(self, taken: list[Tensor | None] | None) -> None:
        if taken is None:
            return
        into, new = [], []
        for p, old in zip(self.params, taken):
            if old is None:
                continue  # the first gradient: the backward's own, as AccumulateGrad leaves it
            if p.grad is not None:
                into.append(old)
                new.append(p.grad)
            p.grad = old
        if into:
            torch._foreach_add_(into, new)

    def _eager(self, inputs: dict[str, Tensor]) -> Tensor:
        if self.grads is not None:
            self._bind_grads()
        self.eager_calls += 1
        return self._forward_backward(inputs)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=4)

    def _bind_grads(self) -> None:
        """Point every `.grad` at the buffer the graphs accumulate into (zeroed if it was set to None)."""
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

    def _restore_grads(self, kept: list[Tensor | None]) -> None:
        """Gradients as before the warm-up, in the buffers the graphs accumulate into."""
        if self.grads is None:
            self.grads = [torch.zeros_like(p) for p in self.params]
        for p, buffer, k in zip(self.params, self.grads, kept):
            if k is None:
                buffer.zero_()
            else:
                buffer.copy_(k)
            p.grad = buffer

    def _capture(self, inputs: dict[str, Tensor], length: int, padded: int, key: tuple) -> _Graph | None:
        # Gradients already accumulated (a capture in mid-step) survive the warm-up runs.
        kept = [None if p.grad is None else p.grad.clone() for p in self.params]
        padding = {k: _pad_value(k, v, padded) for k, v in inputs.items() if _is_row(v, length)}
        static = {k: v.clone() for k, v in inputs.items()}
        for name, pad in padding.items():
            static[name] = torch.cat([inputs[name], pad[:, length:]], dim=1)
        graph = _Graph(self.capture_class(self.shared), static, padding)
        try:
            graph.capture.warmup(lambda: self._forward_backward(static), self.warmup)
        finally:
            self._restore_grads(kept)

        def record() -> None:
            graph.loss = self._forward_backward(static)

        try:
            graph.capture.capture(record)
        except Exception as error:
            self._restore_grads(kept)
            self.failure = str(error)
            self.release()
            message = (f"capturing the training step as a CUDA graph failed ({error}). Usually something in the "
                       "forward or backward syncs with the host (.item(), a data-dependent shape, a CPU tensor). "
                       "Training continues without CUDA graphs (same results, slower); set cuda_graphs: false "
                       "to skip the attempt")
            if self.strict:
                raise RuntimeError(message) from error
            self._warn_once("failed", f"GraphedStep: {message}")
            return None
        self.graphs[key] = graph
        return graph


def _is_row(value: Tensor, length: int) -> bool:
    """A per-token input (B, S, ...) whose sequence dimension is padded to the bucket."""
    return value.dim() >= 2 and value.shape[1] == length


def _pad_value(name: str, value: Tensor, width: int) -> Tensor:
    """The pad of a per-token input over a whole bucket `width` (a call uses the columns past its length).
    Any pad is harmless to the real tokens before it (causal attention, labels -100); position_ids count
    on (0 .. width-1 stays inside the model's positions), the rest take `PAD_VALUES`."""
    shape = (value.shape[0], width, *value.shape[2:])
    if name == "position_ids":
        ramp = torch.arange(width, device=value.device, dtype=value.dtype)
        return ramp.view(1, width, *([1] * (value.dim() - 2))).expand(shape).clone()
    return value.new_full(shape, PAD_VALUES.get(name, 0))


def _fill(graph: _Graph, inputs: dict[str, Tensor], length: int) -> None:
    """Copy a call's inputs into a graph's static inputs; per-token ones fill the first `length` columns
    and the pad the rest (a shorter call must not leave a longer one's tokens behind)."""
    for name, value in inputs.items():
        target = graph.inputs[name]
        if name in graph.padding and target.shape[1] != length:
            target[:, length:].copy_(graph.padding[name][:, length:], non_blocking=True)
            target = target[:, :length]
        target.copy_(value, non_blocking=True)
