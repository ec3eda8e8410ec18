"""The gated delta rule's pass over chunks as Triton kernels (surogate/kernels/delta_scan.py) under
TRITON_INTERPRET=1 against their torch twins (kernels/reference_delta.py), forward and backward, and the rule's
gradients with the kernels in place against the rule with the twins; and both kernels built ahead of time for
every arch as the launchers configure them: they compile, fit the arch's shared memory, do not spill, and run their
products on tensor cores (TF32)."""

from __future__ import annotations

import pytest
import torch

from surogate.kernels import delta_scan
from surogate.kernels.aot import BuildRequest, build_many
from surogate.kernels.configs import shared_memory_bytes
from surogate.kernels.delta_scan import delta_scan_backward, delta_scan_forward
from surogate.kernels.reference_delta import delta_scan_backward_ref, delta_scan_forward_ref
from surogate.recipes import ARCHS


def _operands(bh, n, c, dk, dv, seed=0):
    gen = torch.Generator().manual_seed(seed)
    u, p = (torch.randn(bh, n, c, dv, generator=gen) for _ in range(2))
    w, kd = (torch.randn(bh, n, c, dk, generator=gen) * 0.1 for _ in range(2))
    gamma = torch.rand(bh, n, generator=gen)
    r = torch.randn(bh, n, dk, dv, generator=gen)
    return u, p, w, kd, gamma, r


@pytest.mark.parametrize("bh, n, c, dk, dv", [(3, 4, 16, 32, 48), (2, 3, 64, 48, 40), (1, 1, 32, 16, 80)])
def test_scan_kernels_equal_their_twins(bh, n, c, dk, dv):
    """Key and value widths off the blocks (masked lanes), several value slices, one chunk."""
    u, p, w, kd, gamma, r = _operands(bh, n, c, dk, dv)
    for got, want in zip(delta_scan_forward(u, w, kd, gamma), delta_scan_forward_ref(u, w, kd, gamma)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for got, want in zip(delta_scan_backward(p, r, w, kd, gamma), delta_scan_backward_ref(p, r, w, kd, gamma)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_rule_with_the_kernels_equals_the_rule_with_the_twins(monkeypatch):
    from surogate.ops import delta_rule

    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(2, 100, 2, 32, generator=gen), torch.randn(2, 100, 2, 32, generator=gen),
              torch.randn(2, 100, 2, 32, generator=gen), -torch.rand(2, 100, 2, generator=gen),
              torch.rand(2, 100, 2, generator=gen)]
    results = []
    for scans in ((delta_scan_forward_ref, delta_scan_backward_ref), (delta_scan_forward, delta_scan_backward)):
        monkeypatch.setattr(delta_rule, "_scans", lambda device, scans=scans: scans)
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = delta_rule.chunk_gated_delta_rule(*leaves, use_qk_l2norm=True)
        results.append([out, *torch.autograd.grad(out, leaves, torch.ones_like(out))])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_scan_refuses_what_the_kernel_cannot_take():
    u, p, w, kd, gamma, r = _operands(1, 2, 16, 16, 16)
    with pytest.raises(ValueError, match="contiguous FP32"):
        delta_scan_forward(u.bfloat16(), w, kd, gamma)
    with pytest.raises(ValueError, match="power of two >= 16, not 24"):
        delta_scan_forward(torch.zeros(1, 2, 24, 16), torch.zeros(1, 2, 24, 16), torch.zeros(1, 2, 24, 16), gamma)


# The tensor-core MMA of FP32 operands (TF32) in each arch's SASS; a build without it ran the products on FP32 FMAs.
TF32_MMA = {"sm_89": "HMMA.1688.F32.TF32", "sm_90": "HGMMA.64x32x8.F32.TF32", "sm_100": "UTCHMMA",
            "sm_120": "HMMA.1688.F32.TF32"}


def test_scan_kernels_build_for_every_arch_within_its_shared_memory():
    """Qwen3.5's head dim (128) as the launchers configure it. Pipelined 3 deep (Triton's default) the forward asked
    for 240 KB on sm_90, over the H200's 227 KB (run 114), and 160 KB on sm_89 / sm_120 (99 KB)."""
    assert set(TF32_MMA) == set(ARCHS)
    pointers = {"forward": ("u", "w", "kd", "gamma", "v", "states"),
                "backward": ("p", "r", "w", "kd", "gamma", "dv", "grad_next")}
    config = delta_scan.scan_config(128, 128)
    tiles = {k: v for k, v in config.items() if k.isupper()}
    requests = []
    for arch in ARCHS:
        for name, fn in (("forward", delta_scan._scan_forward_kernel), ("backward", delta_scan._scan_backward_kernel)):
            signature = {**{f"{p}_ptr": "*fp32" for p in pointers[name]}, "N": "i32"}
            requests.append(BuildRequest(f"delta_scan_{name}", fn, signature,
                                         dict(C=64, DK=128, DV=128, PRECISION="tf32", **tiles), arch,
                                         num_warps=config["num_warps"], num_stages=config["num_stages"],
                                         divisible=tuple(n for n in signature if n.endswith("_ptr"))))
    for request, build in zip(requests, build_many(requests)):
        assert build.ok, (request.arch, request.name, build.error)
        assert build.shared_bytes <= shared_memory_bytes(request.arch), build.summary()
        assert not build.spills, build.summary()
        assert TF32_MMA[request.arch] in build.mma, build.summary()
