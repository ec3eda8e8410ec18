"""transpose_fp8: the K-major copy of a block-FP8 weight that the qfp8 dgrad makes each call."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # conftest sets it too; here so the file also runs alone
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from surogate.kernels.transpose import transpose_fp8  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("shape", [(1, 1), (128, 128), (130, 257), (300, 64)])
def test_transpose_fp8_equals_torch_for_ragged_tiles(shape):
    g = torch.Generator().manual_seed(sum(shape))
    w = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).to(DEV).view(torch.float8_e4m3fn)
    got = transpose_fp8(w)
    assert got.dtype == torch.float8_e4m3fn and got.shape == shape[::-1] and got.is_contiguous()
    assert torch.equal(got.view(torch.uint8), w.view(torch.uint8).t().contiguous())


def test_transpose_fp8_reads_a_strided_view():
    w = torch.arange(200 * 96, dtype=torch.int32).remainder(251).to(torch.uint8).reshape(200, 96).to(DEV)
    view = w[::2]  # rows with a stride of 2 * 96 bytes
    assert torch.equal(transpose_fp8(view), view.t().contiguous())


def test_transpose_fp8_refuses_wider_elements():
    with pytest.raises(ValueError, match="1-byte"):
        transpose_fp8(torch.zeros(4, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="2-D"):
        transpose_fp8(torch.zeros(4, dtype=torch.uint8))
