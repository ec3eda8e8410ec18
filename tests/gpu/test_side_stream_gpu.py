"""The LoRA weight-gradient GEMMs on a side stream beside the dgrad (launch._beside), on a GPU.

The side stream changes where the two GEMMs run, not what they compute: the backward's four results equal
those of the serial backward bit for bit, eagerly and replayed from a CUDA graph (fork and join captured as
two branches), at the persistent route's 4096 rows and the Triton route's 256; the GEMMs ran on the side
stream; and the results are read on the caller's stream only after the side stream's work (a dependent
kernel queued right after the backward on the caller's stream sees the gradients).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, when run as a script
from numerics import lora_gemm_case  # noqa: E402

pytestmark = pytest.mark.gpu


def _backward(x, wl, a, b, go, fmt, compute):
    from surogate.kernels import launch

    y, h = launch.lora_linear_cuda(x, wl, fmt, a, b, None, None, 2.0, compute, compute)
    return launch.lora_linear_backward_cuda(go, x, wl, fmt, a, b, None, h, 2.0, compute)[:3]


@pytest.mark.parametrize("rows", [4096, 256])
@pytest.mark.parametrize("recipe", ["bf16", "fp8"])
def test_side_stream_gradients_equal_the_serial_ones_eager_and_graphed(rows, recipe, monkeypatch):
    from surogate.kernels import grad_lora, launch

    fmt, compute = {"bf16": ("bf16", "bf16"), "fp8": ("fp8_row", "fp8")}[recipe]
    x, _, a, b, _, go, wl = lora_gemm_case(rows, 1536, 2048, 16, fmt, 4, "cuda")
    monkeypatch.setattr(launch, "WEIGHT_GRADS_BESIDE_DGRAD", False)
    want = _backward(x, wl, a, b, go, fmt, compute)
    monkeypatch.setattr(launch, "WEIGHT_GRADS_BESIDE_DGRAD", True)
    streams = []
    real = grad_lora.weight_grads

    def recording(*args):
        streams.append(torch.cuda.current_stream())
        return real(*args)

    monkeypatch.setattr(launch, "weight_grads", recording)
    got = _backward(x, wl, a, b, go, fmt, compute)
    assert streams and streams[0] != torch.cuda.current_stream()
    for g, w in zip(got, want):
        assert torch.equal(g, w)

    # Captured: warm up on a side stream (as torch.cuda.graph asks), capture, replay on new values.
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        _backward(x, wl, a, b, go, fmt, compute)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _backward(x, wl, a, b, go, fmt, compute)
        total = out[1].sum() + out[2].sum()  # read on the capture stream right after the join
    go.mul_(-0.5)
    graph.replay()
    monkeypatch.setattr(launch, "WEIGHT_GRADS_BESIDE_DGRAD", False)
    want = _backward(x, wl, a, b, go, fmt, compute)
    torch.cuda.synchronize()
    for g, w in zip(out, want):
        assert torch.equal(g, w)
    assert torch.equal(total, want[1].sum() + want[2].sum())
