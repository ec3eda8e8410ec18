"""Every workaround for a torch / Triton version difference lives here, with its root cause.

Supported: torch 2.11-2.13, Triton 3.6 and newer.
"""

from __future__ import annotations

import functools
import os


def triton_interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1).

    Root cause of the special cases keyed on this: the interpreter's bf16 `tl.dot` returns
    garbage and its fp32->fp8 casts round ties up (Triton 3.9), so kernels upcast / round explicitly.
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_available() -> bool:
    """Triton imports (it is a Linux-only dependency)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True

