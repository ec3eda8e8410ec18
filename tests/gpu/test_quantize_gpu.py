"""Quantize / dequantize kernels on the GPU at real sizes: bit-equal (atol 0) to the references.

The references run on CPU copies: on CUDA, torch divides by a Python scalar as a multiply by
its fp32 reciprocal (`amax / 448`), so the reference's own scales differ by an ulp between
devices; the CPU result is the format's definition. Run as a script, this file also measures
bandwidth (see `main`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, when run as a script
from bit_compare import bits as _bits  # noqa: E402

from surogate.kernels import dequantize as D
from surogate.kernels import quantize as Q
from surogate.kernels import reference_formats as RF
from surogate.kernels import reference_nf4 as RN

pytestmark = pytest.mark.gpu
SHAPES = [(4096, 4096), (4096, 12288), (123, 77), (5, 9000)]


def _cpu(ref):
    """Run a reference on CPU copies of its tensor arguments, results back on the GPU."""
    def run(*args, **kwargs):
        mv = lambda a: a.cpu() if isinstance(a, torch.Tensor) else a  # noqa: E731
        out = ref(*[mv(a) for a in args], **{k: mv(v) for k, v in kwargs.items()})
        if isinstance(out, torch.Tensor):
            return out.cuda()
        for f in dataclasses.fields(out):
            v = getattr(out, f.name)
            if isinstance(v, torch.Tensor):
                object.__setattr__(out, f.name, v.cuda())
        return out
    return run


def _x(shape, seed: int, dtype=torch.bfloat16, nonfinite: bool = False) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(shape, generator=g, device="cuda") * 3.0
    x[0] = 0.0
    x.view(-1)[7] = 1e-30
    x.view(-1)[-1] = -2e4
    if nonfinite:
        x.view(-1)[x.numel() // 3] = float("nan")
        x.view(-1)[x.numel() // 2] = float("inf")
    return x.to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("element", ["e4m3", "e5m2"])
def test_fp8_rowwise_gpu(shape, element):
    for nonfinite in (False, True):
        x = _x(shape, 1, nonfinite=nonfinite)
        data, scale, amax = Q.quantize_fp8_rowwise(x, element)
        ref = _cpu(RF.quantize_fp8_ref)(x, element, scaling="row")
        assert torch.equal(_bits(scale), _bits(ref.scale)) and torch.equal(_bits(data), _bits(ref.data))
        assert torch.equal(_bits(amax), _bits(x.float().abs().amax(-1)))


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_fp8_tensorwise_and_block_gpu(shape):
    x = _x(shape, 2, torch.float32)
    for scale in (None, torch.tensor(0.02, device="cuda")):
        data, s, _ = Q.quantize_fp8_tensorwise(x, "e4m3", scale=scale)
        ref = _cpu(RF.quantize_fp8_ref)(x, "e4m3", scaling="tensor", scale=scale)
        assert torch.equal(_bits(s), _bits(ref.scale)) and torch.equal(_bits(data), _bits(ref.data))
    for block in ((1, 128), (128, 128)):
        for pow2 in (False, True):
            data, s = Q.quantize_fp8_block(x, block, power_of_two=pow2)
            ref = _cpu(RF.quantize_fp8_ref)(x, "e4m3", scaling="block", block=block, power_of_two=pow2)
            assert torch.equal(_bits(s), _bits(ref.scale)) and torch.equal(_bits(data), _bits(ref.data))
            back = D.dequantize_fp8_block(data, s, block)
            assert torch.equal(_bits(back), _bits(_cpu(RF.dequantize_fp8_ref)(ref, torch.bfloat16)))


def test_fp8_block_1x128_fast_path_on_odd_values_gpu():
    """The 1 x 128 E4M3 path (one amax reduction on the bits, one division a row with Markstein's correction, the
    hardware cast) against the reference bit for bit where it could slip: values over 1e-20..1e20 with -0, a zero
    row, NaN and Inf rows (numerics.odd_values), and rows so small that their scale is subnormal (lifted by 2^64)."""
    from numerics import odd_values

    x = odd_values((64, 1024), seed=5).cuda()
    x[5] = (torch.randn(1024, device="cuda") * 1e-38).to(torch.bfloat16)  # scale ~2e-41: subnormal
    x[6, ::2] = -0.0
    x[7] = (torch.randn(1024, device="cuda") * 1e-33).to(torch.bfloat16)  # scale below 2^-100, normal
    data, s = Q.quantize_fp8_block(x, (1, 128))
    ref = _cpu(RF.quantize_fp8_ref)(x, "e4m3", scaling="block", block=(1, 128))
    assert torch.equal(_bits(s), _bits(ref.scale)) and torch.equal(_bits(data), _bits(ref.data))


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_nvfp4_gpu(shape):
    x = _x(shape, 3)
    packed, bscale, ts = Q.quantize_nvfp4(x)
    ref = _cpu(RF.quantize_nvfp4_ref)(x)
    assert torch.equal(_bits(ts), _bits(ref.tensor_scale)) and torch.equal(_bits(bscale), _bits(ref.block_scale))
    assert torch.equal(packed, ref.packed)
    for dtype in (torch.bfloat16, torch.float32):
        back = D.dequantize_nvfp4(packed, bscale, ts, shape=x.shape, dtype=dtype)
        assert torch.equal(_bits(back), _bits(_cpu(RF.dequantize_nvfp4_ref)(ref, dtype)))
    given = torch.tensor(1e-3, device="cuda")
    p2, b2, _ = Q.quantize_nvfp4(x, tensor_scale=given)
    r2 = _cpu(RF.quantize_nvfp4_ref)(x, tensor_scale=given)
    assert torch.equal(p2, r2.packed) and torch.equal(_bits(b2), _bits(r2.block_scale))


def test_nvfp4_stochastic_gpu_unbiased():
    x = _x((1024, 4096), 4, torch.float32)
    ts = Q.nvfp4_tensor_scale(x)
    acc = torch.zeros_like(x)
    for seed in range(16):
        p, b, _ = Q.quantize_nvfp4(x, tensor_scale=ts, stochastic=True, seed=seed)
        acc += D.dequantize_nvfp4(p, b, ts, dtype=torch.float32)
    rne = D.dequantize_nvfp4(*Q.quantize_nvfp4(x, tensor_scale=ts), dtype=torch.float32)
    # the mean of 16 stochastic roundings is closer to x than round-to-nearest, on average
    assert (acc / 16 - x).abs().mean() < (rne - x).abs().mean()


@pytest.mark.parametrize("shape", [(4096, 4096), (4096, 12288), (77, 123)])
def test_nf4_dequant_gpu(shape):
    w = _x(shape, 5, nonfinite=False)
    q = RN.quantize_nf4_ref(w)
    for dtype in (torch.bfloat16, torch.float32):
        got = D.dequantize_nf4(q.packed, q.absmax_q, q.absmax_scale, q.absmax_offset, q.absmax_code, w.shape,
                               dtype=dtype)
        assert torch.equal(_bits(got), _bits(_cpu(RN.dequantize_nf4_ref)(q, dtype)))


@pytest.mark.parametrize("fmt", ["bf16", "fp8_row", "fp8_block", "nvfp4", "nvfp4_cached", "nf4"])
def test_quantize_weight_gpu_equals_reference(fmt):
    w = _x((1536, 4096 + 64), 6)
    got = Q.quantize_weight(w, fmt)
    if fmt == "bf16":
        want = [w]
    elif fmt == "fp8_row":
        a = _cpu(RF.quantize_fp8_ref)(w, "e4m3", scaling="row")
        b = _cpu(RF.quantize_fp8_ref)(w.t().contiguous(), "e4m3", scaling="row")
        want = [a.data, a.scale.view(-1), b.data, b.scale.view(-1)]
    elif fmt == "fp8_block":
        r = _cpu(RF.quantize_fp8_ref)(w, "e4m3", scaling="block", block=(128, 128))
        want = [r.data, r.scale]
    elif fmt == "nf4":
        r = RN.quantize_nf4_ref(w)
        want = r.tensors()  # the weight list: the offset repeated per 256-code group
    else:
        r = _cpu(RF.quantize_nvfp4_ref)(w)
        want = [r.packed, r.block_scale, r.tensor_scale]
    assert len(got) == len(want)
    for g, e in zip(got, want):
        assert g.shape == e.shape and g.dtype == e.dtype and torch.equal(_bits(g), _bits(e))


# ----------------------------------------------------------------------------------------------
# Bandwidth (python tests/gpu/test_quantize_gpu.py [out.json]): GB/s of each kernel beside a copy.
# ----------------------------------------------------------------------------------------------

def _gbps(fn, nbytes: int) -> tuple[float, float]:
    import triton

    ms = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
    return ms * 1e3, nbytes / (ms * 1e-3) / 1e9


def main(out_path: str | None = None) -> list[dict]:
    rows = []
    for m, k in ((4096, 4096), (4096, 12288)):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        n = m * k
        dst = torch.empty_like(x)
        ts = Q.nvfp4_tensor_scale(x)
        cases = {
            "copy (bf16, read+write)": (lambda: dst.copy_(x), 4 * n),
            "quantize_fp8_rowwise e4m3": (lambda: Q.quantize_fp8_rowwise(x, "e4m3"), 3 * n + 8 * m),
            "quantize_fp8_block 1x128": (lambda: Q.quantize_fp8_block(x, (1, 128)), 3 * n + 4 * n // 128),
            "quantize_fp8_block 128x128": (lambda: Q.quantize_fp8_block(x, (128, 128)), 3 * n),
            "quantize_nvfp4": (lambda: Q.quantize_nvfp4(x), 2 * n + 2 * n + n // 2 + n // 16),  # amax pass + quant
            "torch ref quantize_fp8 row (GPU)": (lambda: RF.quantize_fp8_ref(x, "e4m3", scaling="row"), 3 * n),
            "amax only": (lambda: Q.amax(x), 2 * n),
            "quantize_nvfp4 given tensor scale": (lambda: Q.quantize_nvfp4(x, tensor_scale=ts), 2 * n + n // 2 + n // 16),
        }
        q = RN.quantize_nf4_ref(x)
        nf4_list = q.tensors()  # made once: its per-group offset is a copy of q's scalar
        p, b, ts = Q.quantize_nvfp4(x)
        d8, s8 = Q.quantize_fp8_block(x, (128, 128))
        cases["dequantize_nf4 -> bf16"] = (
            lambda: D.dequantize_nf4(*nf4_list, x.shape),  # as the GEMM path calls it: a weight list
            n // 2 + n // 64 + 2 * n)
        cases["torch ref dequantize_nf4 (GPU)"] = (lambda: RN.dequantize_nf4_ref(q, torch.bfloat16), n // 2 + 2 * n)
        cases["dequantize_nvfp4 -> bf16"] = (lambda: D.dequantize_nvfp4(p, b, ts), n // 2 + n // 16 + 2 * n)
        cases["dequantize_fp8_block -> bf16"] = (lambda: D.dequantize_fp8_block(d8, s8), 3 * n)
        for name, (fn, nbytes) in cases.items():
            us, gbps = _gbps(fn, nbytes)
            rows.append(dict(shape=f"{m}x{k}", kernel=name, us=round(us, 1), bytes=nbytes, gbps=round(gbps, 1)))
    rows += _sweep()
    for r in rows:
        print(f"{r['shape']:>11} {r['kernel']:<32} {r['us']:>9.1f} us {r['gbps']:>8.1f} GB/s")
    if out_path:
        with open(out_path, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)
    return rows


def _sweep() -> list[dict]:
    """Time the launchers under other tile configs (the get_*_configs functions swapped out)."""
    variants = {
        (Q, "get_quantize_fp8_rowwise_configs", "rowwise"): [
            dict(BLOCK_M=1, BLOCK_K=4096, ONE_TILE=True, num_warps=4),
            dict(BLOCK_M=2, BLOCK_K=4096, ONE_TILE=True, num_warps=8),
            dict(BLOCK_M=4, BLOCK_K=4096, ONE_TILE=True, num_warps=8),
            dict(BLOCK_M=4, BLOCK_K=4096, ONE_TILE=True, num_warps=16),
            dict(BLOCK_M=1, BLOCK_K=16384, ONE_TILE=True, num_warps=16),
            dict(BLOCK_M=1, BLOCK_K=16384, ONE_TILE=True, num_warps=32),
            dict(BLOCK_M=1, BLOCK_K=2048, ONE_TILE=False, num_warps=4),
            dict(BLOCK_M=2, BLOCK_K=4096, ONE_TILE=False, num_warps=8)],
        (D, "get_dequantize_nf4_configs", "nf4"): [
            dict(BLOCKS=b // 64, num_warps=w) for b in (1024, 2048, 4096, 8192) for w in (4, 8)],
        (Q, "get_quantize_nvfp4_configs", "nvfp4"): [
            dict(BLOCK_M=bm, BLOCK_K=bk, num_warps=w) for bm in (4, 8, 16) for bk in (128, 256) for w in (4, 8)],
        (Q, "get_quantize_fp8_block_configs", "block128"): [
            dict(TILE_M=128, BK=128, ROW_BLOCKS=False, num_warps=w) for w in (4, 8, 16)],
    }
    rows = []
    for m, k in ((4096, 4096), (4096, 12288)):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        n = m * k
        nf4_list = RN.quantize_nf4_ref(x).tensors()
        ts = Q.nvfp4_tensor_scale(x)
        calls = {
            "rowwise": (lambda: Q.quantize_fp8_rowwise(x, "e4m3"), 3 * n),
            "nf4": (lambda: D.dequantize_nf4(*nf4_list, x.shape), n // 2 + 2 * n),
            "nvfp4": (lambda: Q.quantize_nvfp4(x, tensor_scale=ts), 2 * n + n // 2),
            "block128": (lambda: Q.quantize_fp8_block(x, (128, 128)), 3 * n),
        }
        for (mod, getter, key), cfgs in variants.items():
            original = getattr(mod, getter)
            for cfg in cfgs:
                if key == "rowwise" and cfg["ONE_TILE"] and cfg["BLOCK_K"] < k:
                    continue
                setattr(mod, getter, lambda *a, _c=cfg: dict(_c))
                try:
                    fn, nbytes = calls[key]
                    us, gbps = _gbps(fn, nbytes)
                    rows.append(dict(shape=f"{m}x{k}", kernel=f"sweep {key} {cfg}", us=round(us, 1), bytes=nbytes,
                                     gbps=round(gbps, 1)))
                except Exception as e:  # a config that does not compile is a result
                    rows.append(dict(shape=f"{m}x{k}", kernel=f"sweep {key} {cfg} FAILED {type(e).__name__}",
                                     us=0.0, bytes=0, gbps=0.0))
                finally:
                    setattr(mod, getter, original)
    return rows


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.environ.get("OUT", "."), "quantize_bw.json"))
