"""Test-suite setup: the Triton interpreter on CPU-only machines, GPU tests only where a GPU is.

TRITON_INTERPRET must be set before Triton is first imported, which is why it lives here.
"""

from __future__ import annotations

import atexit
import gc
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

from surogate.compat import import_bitsandbytes_offline  # noqa: E402

import_bitsandbytes_offline()  # tests import PEFT, which imports bitsandbytes: no Hub fetch from a test

settings.register_profile(
    "ci", max_examples=12, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=50, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def module_cache_dir(tmp_path_factory):
    """SUROGATE_CACHE_DIR in the test session's temporary folder for a module's tests (the data cache and tuned
    configs of a test never land in the user's ~/.cache)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SUROGATE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "surogate-cache"))
    yield
    mp.undo()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect (not skip) GPU tests on machines without CUDA, and say so once."""
    if HAS_CUDA:
        return
    gpu = [item for item in items if "gpu" in item.keywords]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if "gpu" not in item.keywords]


def pytest_report_header(config: pytest.Config) -> str:
    mode = "CUDA" if HAS_CUDA else "CPU only: Triton kernels under TRITON_INTERPRET=1, GPU tests deselected"
    return f"surogate tests: torch {torch.__version__}, {mode}"


def pytest_configure(config: pytest.Config) -> None:
    """Garbage-collect less often. Compiling a model makes many objects that live through it, so with
    the default thresholds (700, 10, 10) full passes over the whole heap came every few tests: 40-59
    of them, 32-35 s of a 4.5-minute run on 2 cores (test_compile_models alone: 8.4 s of collection
    in a 37 s run; 3.9 s with these)."""
    gc.set_threshold(50_000, 20, 20)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Collect once, then freeze what is left: pytest's unraisable-exception check collects five
    more times at exit, each pass ~2 s with a session's models and compiled graphs in the heap.
    What this collection frees still reports its unraisable exceptions; unfrozen at exit, so that
    the interpreter's shutdown frees the rest as it did."""
    gc.collect()
    gc.freeze()
    atexit.register(gc.unfreeze)
