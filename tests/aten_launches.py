"""The ATen kernels eager code launches, found on the CPU: a TorchDispatchMode that records every ATen op
that would launch a GPU kernel (views, allocations and the Triton interpreter's own emulation left out).

On a GPU the custom ops' implementations (kernels/launch.py and the launchers) run eagerly around their
Triton and cuBLAS kernels: every cast, copy or small multiply there is a kernel of its own. Driving the same
implementations on CPU tensors, with the Triton kernels under TRITON_INTERPRET=1, runs the same ATen calls,
so this mode lists what the GPU launches, with the surogate line that called it (bench/copies.py scales
that to a training step; tests/test_launch_copies.py pins the counts).
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that launch no kernel: views, allocations, metadata.
NO_KERNEL = frozenset({
    "view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "as_strided", "alias", "detach",
    "slice", "select", "unsqueeze", "squeeze", "split", "split_with_sizes", "unbind", "narrow", "view_as",
    "empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided", "set_", "resize_",
    "lift_fresh", "_local_scalar_dense", "is_same_size", "sym_size", "sym_stride", "sym_numel", "dim", "size",
    "stride", "numel", "is_contiguous", "item",
})
GEMMS = frozenset({"mm", "addmm", "addmm_", "bmm", "matmul", "linear", "_scaled_mm", "_scaled_grouped_mm"})
# Composite ops that return their input unchanged when nothing is to be done (seen below autograd).
MAYBE_ALIAS = frozenset({"to", "contiguous", "type_as", "reshape", "flatten"})
COPIES = frozenset({"_to_copy", "to", "copy_", "clone", "contiguous", "cat", "stack", "index_copy", "block_diag"})


@dataclass(frozen=True)
class Launch:
    """One ATen op that launches a kernel: its name, its tensor inputs (shape, dtype, contiguous), the dtype
    and shape of its (first) output and the innermost surogate source line that called it
    ("kernels/launch.py:118")."""

    name: str
    inputs: tuple[tuple[tuple[int, ...], torch.dtype, bool], ...]
    dtype: torch.dtype | None
    site: str
    shape: tuple[int, ...] = ()

    @property
    def is_copy(self) -> bool:
        return self.name in COPIES

    @property
    def is_gemm(self) -> bool:
        return self.name in GEMMS

    def __str__(self) -> str:
        args = ", ".join(f"{tuple(s)} {str(d)[6:]}{'' if c else ' strided'}" for s, d, c in self.inputs)
        return f"{self.name}({args}) -> {str(self.dtype)[6:]} at {self.site}"


def _site() -> str | None:
    """The innermost surogate frame on the stack, or None inside the Triton interpreter."""
    stack = traceback.extract_stack()
    if any("/triton/" in f.filename for f in stack):
        return None
    for frame in reversed(stack):
        if "/surogate/" in frame.filename and "/tests/" not in frame.filename:
            return f"{frame.filename.rsplit('/surogate/', 1)[1]}:{frame.lineno}"
    return "?"


class AtenLaunches(TorchDispatchMode):
    """`with AtenLaunches() as log: ...`; then `log.launches` lists the ops, `log.elementwise()` those that are
    neither GEMMs nor inside Triton. The ops a custom op's implementation runs are recorded too: the mode
    calls a `surogate::` op's Python implementation for the tensors' device under itself."""

    def __init__(self) -> None:
        super().__init__()
        self.launches: list[Launch] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "surogate":
            fn = _implementation(func, args)
            if fn is not None:
                with self:
                    return fn(*args, **kwargs)
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if name in NO_KERNEL:
            return out
        if (name in MAYBE_ALIAS and isinstance(out, torch.Tensor) and tensors
                and out.data_ptr() == tensors[0].data_ptr()):
            return out
        site = _site()
        if site is not None:
            first = out[0] if isinstance(out, (tuple, list)) and out else out
            first = first if isinstance(first, torch.Tensor) else None
            self.launches.append(Launch(name, tuple((tuple(t.shape), t.dtype, t.is_contiguous()) for t in tensors),
                                        None if first is None else first.dtype, site,
                                        () if first is None else tuple(first.shape)))
        return out

    def elementwise(self) -> list[Launch]:
        """The recorded launches that are not GEMMs: casts, copies, multiplies, fills."""
        return [x for x in self.launches if not x.is_gemm]


def _implementation(func, args):
    """The Python function registered for a surogate op on the device of its tensors (None: run the op)."""
    from torch._library.custom_ops import _maybe_get_opdef

    opdef = _maybe_get_opdef(f"{func.namespace}::{func._opname}")
    if opdef is None:
        return None
    device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
    return opdef._backend_fns.get(device) or opdef._init_fn
