"""Test-suite setup: the Triton interpreter on CPU-only machines, GPU tests only where a GPU is.

TRITON_INTERPRET must be set before Triton is first imported, which is why it lives here.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", max_examples=12, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=50, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


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
