"""Activation checkpointing with each decoder block's saved input in host memory
(`surogate.compile(checkpoint="offload")`, `gradient_checkpointing: offload`).

Why: `checkpoint=True` keeps only each block's input between forward and backward, but keeps it on the
GPU for every layer: layers x batch x seq x hidden x 2 bytes (Qwen3-8B at 2 x 2048: 36 x 32 MiB = 1.1 GiB a
micro-batch), the largest part of what checkpointing leaves. Here each input goes to host memory during the
forward and comes back during the backward one block ahead of need, so the copies run behind compute.

What moves: the eager `torch.utils.checkpoint` around a block (surogate/compiler.py) saves the block's
positional tensor inputs, i.e. the hidden states, as saved tensors; `BlockInputOffload.hooks(i)` wraps that
call in `saved_tensors_hooks`, whose pack copies the input to a host buffer and whose unpack (run when the
backward starts block i's recompute) hands it back. Keyword inputs (RoPE cos/sin, masks: one set shared by
every block) stay where they are; the tensors a block saves inside the checkpoint are the checkpoint's own.
So does a leaf that requires grad (autograd holds it anyway): the first block's input where the user marked
the embedding output with transformers' `enable_input_require_grads()`.

On CUDA:
- pack: the copy to pinned host memory runs on a side stream after an event recorded on the compute stream,
  so the forward never waits for it. The device tensor is held until `IN_FLIGHT` newer inputs were packed;
  then the compute stream waits for the copy's event and the tensor is dropped, so the caching allocator
  hands its memory only to work ordered after the copy. Not `record_stream`: during CUDA-graph capture the
  allocator defers such frees to the end of the capture, and the graph would hold every input again.
- unpack of block i: the compute stream waits for block i's input (copied back ahead, or still held: the
  newest `IN_FLIGHT` never left), then the copy of block i-1's input (the next block recomputed) into a new
  device tensor starts on the side stream and runs while block i recomputes and back-propagates.
- host buffers are allocated once per (block, argument, dtype, device) and size class, and live as long as
  the model: the next step reuses them (the same pointers), which CUDA graphs need. Under
  `surogate.GraphedStep` the warm-up steps allocate them and the capture records copies to and from those
  addresses; every replay reuses them and runs no Python, so nothing inside the captured region allocates
  host memory, syncs the host or decides anything anew. A buffer serves any tensor that fits (sizes round up
  to a power of two, as the pinned allocator does), so a shorter shape bucket reuses a longer one's buffers
  and a longer bucket gets buffers of its own, kept for the graphs that recorded them. A buffer is busy from pack to
  unpack (or until autograd drops the saved tensor): a second forward before a backward takes other buffers.
Elsewhere (the CPU): the same bookkeeping, with the copies inline and no streams, which is what the CPU
tests check.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

# Block inputs still held on the device after their copy to host started. The compute stream waits for the
# copy of block i's input when block i + IN_FLIGHT starts, two block forwards after the copy began, so the
# copy (about 1 ms for 32 MiB over PCIe 5; a Qwen3-8B block forward of 4096 tokens takes several) does not
# stall the forward even on small models. The newest inputs are also the first the backward needs, so they
# never come back from host. Costs one more input of device memory than keeping just the running block's.
IN_FLIGHT = 2


def size_class(numel: int) -> int:
    """`numel` rounded up to a power of two: torch's pinned-memory allocator rounds every allocation up to
    one anyway, so the buffer may as well use it and serve the shorter shapes that fit."""
    return 1 << max(numel - 1, 0).bit_length()


@dataclass(eq=False)
class HostBuffer:
    """One host buffer (pinned on CUDA) and the events of the last copy into and out of it."""

    data: Tensor  # flat, `size_class` elements
    stored: "torch.cuda.Event | None" = None  # the copy into `data` finished (CUDA only)
    loaded: "torch.cuda.Event | None" = None  # the copy out of `data` finished (CUDA only)
    owner: "weakref.ref[_Saved] | None" = None  # the saved tensor whose bytes `data` holds

    def holds(self, saved: "_Saved") -> bool:
        return self.owner is not None and self.owner() is saved

    def is_free(self) -> bool:
        saved = None if self.owner is None else self.owner()
        return saved is None or saved.unpacked

    def view(self, shape: torch.Size) -> Tensor:
        return self.data[:shape.numel()].view(shape)


class _Saved:
    """What autograd keeps for one offloaded input: its host buffer, and a device copy while one exists."""

    __slots__ = ("buffer", "shape", "device", "on_device", "fetched", "prev", "unpacked", "capturing",
                 "__weakref__")

    def __init__(self, buffer: HostBuffer, value: Tensor, prev: "weakref.ref[_Saved] | None",
                 capturing: bool) -> None:
        self.buffer, self.shape, self.device = buffer, value.shape, value.device
        self.on_device: Tensor | None = value  # the packed tensor itself, until retired
        self.fetched: Tensor | None = None  # the copy back, started ahead of the unpack
        self.prev = prev  # the input packed just before this one: recomputed next in the backward
        self.unpacked = False
        self.capturing = capturing  # packed during CUDA-graph capture


class _Copies:
    """Copies between one device and its host buffers: on CUDA on a side stream, ordered by events against
    the current (compute) stream; on any other device inline, in program order."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.fork = torch.cuda.Event() if self.cuda else None

    def new_buffer(self, dtype: torch.dtype, numel: int) -> HostBuffer:
        data = torch.empty(numel, dtype=dtype, pin_memory=self.cuda)
        if not self.cuda:
            return HostBuffer(data)
        return HostBuffer(data, torch.cuda.Event(), torch.cuda.Event())

    def _side(self) -> torch.cuda.StreamContext:
        """The side stream, after everything enqueued so far on the compute stream."""
        self.fork.record(torch.cuda.current_stream(self.device))
        self.stream.wait_event(self.fork)
        return torch.cuda.stream(self.stream)

    def to_host(self, buffer: HostBuffer, value: Tensor) -> None:
        host = buffer.view(value.shape)
        if not self.cuda:
            host.copy_(value)
            return
        with self._side():
            host.copy_(value, non_blocking=True)
        buffer.stored.record(self.stream)

    def to_device(self, buffer: HostBuffer, shape: torch.Size) -> Tensor:
        # Allocated on the compute stream, where it is used and freed; written on the side stream only after
        # the fork, so after every earlier user of that memory.
        value = torch.empty(shape, dtype=buffer.data.dtype, device=self.device)
        if not self.cuda:
            value.copy_(buffer.view(shape))
            return value
        with self._side():
            value.copy_(buffer.view(shape), non_blocking=True)
        buffer.loaded.record(self.stream)
        return value

    def wait_stored(self, buffer: HostBuffer) -> None:
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(buffer.stored)

    def wait_loaded(self, buffer: HostBuffer) -> None:
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(buffer.loaded)

    def capturing(self) -> bool:
        return self.cuda and torch.cuda.is_current_stream_capturing()


class BlockInputOffload:
    """The host buffers and the copies of the saved block inputs of one compiled model.

    `with offload.hooks(i): torch.utils.checkpoint.checkpoint(block_forward, hidden_states, ...)` offloads
    block i's saved inputs; see the module docstring for the stream and buffer rules.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple, list[HostBuffer]] = {}  # (block, argument, dtype, device) -> its pool
        self._in_flight: list[_Saved] = []  # packed, device tensor still held
        self._loading: list[weakref.ref[_Saved]] = []  # copies back that no unpack has waited for yet
        self._last: weakref.ref[_Saved] | None = None  # the most recently packed input
        self._copies: dict[torch.device, _Copies] = {}
        self._join_task = -1  # the backward that has a join queued at its end

    def hooks(self, block: int) -> torch.autograd.graph.saved_tensors_hooks:
        """The pack/unpack hooks for one checkpointed call of decoder block `block`."""
        position = itertools.count()
        return torch.autograd.graph.saved_tensors_hooks(lambda t: self._pack(block, next(position), t),
                                                        self._unpack)

    def held_on_device(self) -> list[Tensor]:
        """The device tensors this offload still holds (the newest inputs, whose copies may still run)."""
        return [s.on_device for s in self._in_flight if s.on_device is not None]

    def host_bytes(self) -> int:
        return sum(b.data.untyped_storage().nbytes() for pool in self.buffers.values() for b in pool)

    # --- hooks -------------------------------------------------------------------------------------

    def _pack(self, block: int, position: int, tensor: Tensor) -> "_Saved | Tensor":
        if tensor.numel() == 0 or tensor.layout != torch.strided or not tensor.is_contiguous():
            return tensor  # kept as it is: nothing to gain, or a layout the flat buffers do not hold
        if tensor.is_leaf and tensor.requires_grad:
            # The first block's input where the user called `enable_input_require_grads()` (surogate's own hook
            # makes no leaf): autograd's AccumulateGrad node holds it on the device anyway, so a copy frees nothing.
            return tensor
        value = tensor.detach()
        copies = self._copies_for(value.device)
        self._retire(IN_FLIGHT - 1)
        buffer = self._buffer((block, position, value.dtype, value.device), value.numel(), copies)
        saved = _Saved(buffer, value, self._last, copies.capturing())
        buffer.owner = weakref.ref(saved)
        copies.to_host(buffer, value)
        self._in_flight.append(saved)
        self._last = weakref.ref(saved)
        return saved

    def _unpack(self, saved: "_Saved | Tensor") -> Tensor:
        if isinstance(saved, Tensor):
            return saved
        if not saved.buffer.holds(saved):
            raise RuntimeError("checkpoint='offload': a block input was read back after a later forward reused "
                               "its host buffer; run the backward of a forward before the next forward that "
                               "needs it, or use checkpoint=True")
        copies = self._copies_for(saved.device)
        if saved.on_device is not None:  # one of the newest: never left the device
            copies.wait_stored(saved.buffer)  # the copy to host reads it: join before it may be freed
            value, saved.on_device = saved.on_device, None
            self._in_flight.remove(saved)
        else:
            if saved.fetched is None:  # not copied back ahead (the first block unpacked, or a second backward)
                saved.fetched = copies.to_device(saved.buffer, saved.shape)
            copies.wait_loaded(saved.buffer)
            value, saved.fetched = saved.fetched, None
        saved.unpacked = True
        self._prefetch(None if saved.prev is None else saved.prev(), copies)
        self._join_at_backward_end()
        return value

    # --- internals ---------------------------------------------------------------------------------

    def _copies_for(self, device: torch.device) -> _Copies:
        if device not in self._copies:
            self._copies[device] = _Copies(device)
        return self._copies[device]

    def _buffer(self, key: tuple, numel: int, copies: _Copies) -> HostBuffer:
        """The smallest free buffer of `key` that holds `numel` elements, else a new one of its size class."""
        pool = self.buffers.setdefault(key, [])
        fits = [b for b in pool if b.is_free() and b.data.numel() >= numel]
        if fits:
            return min(fits, key=lambda b: b.data.numel())
        buffer = copies.new_buffer(key[2], size_class(numel))
        pool.append(buffer)
        return buffer

    def _retire(self, keep: int) -> None:
        """Drop the device tensors of all but the newest `keep` packed inputs, each once its copy is done."""
        while len(self._in_flight) > keep:
            saved = self._in_flight.pop(0)
            copies = self._copies_for(saved.device)
            if saved.capturing == copies.capturing():
                copies.wait_stored(saved.buffer)
            else:  # packed in or out of a capture that is not this one's: no event of it may be waited on here
                saved.on_device.record_stream(copies.stream)
            saved.on_device = None

    def _prefetch(self, saved: "_Saved | None", copies: _Copies) -> None:
        """Start copying `saved` back (the next block the backward recomputes), unless it never left."""
        if saved is None or saved.unpacked or saved.on_device is not None or saved.fetched is not None:
            return
        if not saved.buffer.holds(saved):
            return  # its buffer was reused by a later forward: the unpack says so
        saved.fetched = copies.to_device(saved.buffer, saved.shape)
        self._loading.append(weakref.ref(saved))

    def _join_at_backward_end(self) -> None:
        """Queue, once per backward, a join of the copies back that no unpack waited for (a block whose
        recompute the backward never reached): a CUDA-graph capture must join every side-stream copy, and the
        compute stream must not free a tensor that a copy still writes."""
        task = torch._C._current_graph_task_id()
        if task == -1 or task == self._join_task:
            return
        self._join_task = task
        torch.autograd.Variable._execution_engine.queue_callback(self._join)

    def _join(self) -> None:
        loading, self._loading = self._loading, []
        for ref in loading:
            saved = ref()
            if saved is not None and saved.fetched is not None:
                self._copies_for(saved.device).wait_loaded(saved.buffer)
