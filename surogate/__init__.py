"""surogate: fast LoRA and QLoRA fine-tuning of Hugging Face LLMs in low precision.

    model = surogate.compile(model, recipe="qfp8")

Submodules are imported lazily so that `import surogate` stays cheap; its one side effect is an import hook
that keeps bitsandbytes' first import off the network (`compat.bitsandbytes_imports_offline`).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from surogate import recipes  # noqa: E402  (pure data, cheap)
from surogate.compat import bitsandbytes_imports_offline  # noqa: E402  (standard library only)

bitsandbytes_imports_offline()  # no Hub fetch when PEFT imports bitsandbytes later (compat says why)

_LAZY = {
    "formats": ("surogate.ops.formats", None),
    "ops": ("surogate.ops", None),
    "compile": ("surogate.compiler", "compile"),
    "plan": ("surogate.kernels.plan", "plan"),
    "save_adapter": ("surogate.training.adapters", "save_adapter"),
    "load_adapter": ("surogate.training.adapters", "load_adapter"),
    "merge": ("surogate.training.adapters", "merge"),
    "GraphedStep": ("surogate.training.graphed_step", "GraphedStep"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'surogate' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


__all__ = ["recipes", "__version__", *_LAZY]
