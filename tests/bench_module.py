"""Import a script of bench/ as a module, for the CPU smoke tests of the benchmarks."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_bench(script: str) -> ModuleType:
    """bench/<script>.py as the module `bench_<script>` (bench/ is not a package)."""
    name = f"bench_{script}"
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
