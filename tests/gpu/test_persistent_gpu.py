"""The persistent TMA kernel (kernels/persistent.py) on an sm_90 GPU, every config the tuner may pick.

On CPU the interpreter runs one config without warp specialization or the TMA engine; here each
config of each family (warp-specialized or not) runs the forward and the dgrad at odd and 8B-like
shapes against the reference GEMM of the same quantized operands, and the op with
`variants.PERSISTENT_SM90` on matches `reference.lora_linear_ref` / its backward.

On a failure the message names the config (BLOCK_M x BLOCK_N x BLOCK_K, warp specialization, flatten,
warps, stages; "pointer path" = TMA off) or, for the op, the configs the tuner picked, with the SQNR, the
count of non-finite outputs and where the error sits: `2nd-half share` is the fraction of the error energy
in rows BLOCK_M/2..BLOCK_M-1 of each M tile, the rows of the second consumer warpgroup of a warp-specialized
build (about 0.5 for noise; near 1.0 is run 54's bug, those rows scaled with the scales of other rows).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from surogate.kernels import configs, launch, persistent, tuning, variants
from surogate.kernels import reference as ref
from surogate.kernels.quantize import quantize_weight
from surogate.recipes import current_arch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or current_arch() != "sm_90",
                                                  reason="the persistent kernel is routed on sm_90 only")]

RECIPES = {"bf16": ("bf16", "bf16"), "fp8": ("fp8", "fp8_row"), "qfp8": ("fp8", "fp8_block")}
# (M, N, K): tile tails (M % 16 != 0); the bench's validation shape (M % 16 == 0, as Triton then specializes
# M); an 8B q/o shape; 8B kv (its dgrad reduces over 1024: run 54's failing kv rows).
SHAPES = [(1000, 1008, 1040), (1008, 1024, 2048), (4096, 4096, 4096), (4096, 1024, 4096)]
FLOOR = 35.0  # dB: both sides quantize alike; FP8 wgmma accumulates unpromoted (bench/NOTES.md run 2)


def _case(m, n, k, fmt, seed=0, rank=16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=g) / k ** 0.5).bfloat16()
    a = torch.randn(rank, k, device="cuda", generator=g) / k ** 0.5
    b = torch.randn(n, rank, device="cuda", generator=g) * 0.1
    go = torch.randn(m, n, device="cuda", generator=g).bfloat16()
    return x, w, a, b, go, quantize_weight(w, fmt)


def _config_name(config) -> str:
    if config is None:
        return "pointer path (TMA off, tuned)"
    kw = config.kwargs
    return (f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} warp_specialize={kw['WARP_SPECIALIZE']} "
            f"flatten={kw['FLATTEN']} warps={config.num_warps} stages={config.num_stages}")


def _diagnose(got: torch.Tensor, want: torch.Tensor, block_m: int | None) -> tuple[float, str]:
    """(SQNR in dB, -inf when any output is non-finite; a description: SQNR, non-finite count and the first
    one's index, the error's share in the second half of each BLOCK_M tile)."""
    assert torch.isfinite(want).all(), "the reference itself is non-finite"
    bad = ~torch.isfinite(got)
    n_bad = int(bad.sum())
    g = torch.where(bad, torch.zeros_like(got), got).double()
    err = (g - want.double()).pow(2).sum(dim=1)  # per row
    db = float(10 * torch.log10(want.double().pow(2).sum() / err.sum().clamp_min(1e-300)))
    text = f"{db:.1f} dB"
    if n_bad:
        first = [int(i) for i in bad.nonzero()[0]]
        text += f", {n_bad} non-finite (first at row {first[0]}, col {first[1]})"
    if block_m is not None and err.sum() > 0:
        second = (torch.arange(len(err), device=err.device) % block_m) >= block_m // 2
        text += f", 2nd-half share {float(err[second].sum() / err.sum()):.2f}"
    return (float("-inf") if n_bad else db), text


def _tuned_picks() -> str:
    """The configs the tuner chose for the persistent kernel in this process: family, modes, N, K, M bucket."""
    picks = []
    for key, c in tuning.tuner().picks().items():
        if key[0] == persistent._persistent_lora_gemm_kernel.__name__:
            picks.append(f"{key[1]} modes={key[3]} N={key[4]} K={key[5]} M~{key[6]}: {_config_name(c)}")
    return "; ".join(picks) or "none recorded"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_op_with_the_switch_on_matches_the_reference(recipe, shape, monkeypatch):
    compute, fmt = RECIPES[recipe]
    x, w, a, b, go, wl = _case(*shape, fmt)
    monkeypatch.setattr(variants, "PERSISTENT_SM90", True)
    with variants.trace() as ran:
        y, h = launch.lora_linear_cuda(x, wl, fmt, a, b, None, None, 2.0, compute, compute)
        gi = launch.lora_linear_backward_cuda(go, x, wl, fmt, a, b, None, h, 2.0, compute)[0]
    assert [r.engine for r in ran] == [variants.Engine.PERSISTENT] * 2
    y_r, h_r = ref.lora_linear_ref(x, wl, fmt, a, b, None, None, 2.0, compute, compute)
    gi_r = ref.lora_linear_backward_ref(go, x, wl, fmt, a, b, None, h_r, 2.0, compute)[0]
    (fwd, fwd_text), (dgrad, dgrad_text) = _diagnose(y, y_r, None), _diagnose(gi, gi_r, None)
    print(f"{recipe} {shape}: fwd {fwd_text}; dgrad {dgrad_text}; tuned: {_tuned_picks()}")
    assert fwd > FLOOR and dgrad > FLOOR, f"fwd {fwd_text}; dgrad {dgrad_text}; tuned: {_tuned_picks()}"


@pytest.mark.parametrize("rank", [32, 64, 128])
@pytest.mark.parametrize("recipe", ["bf16", "fp8"])
def test_larger_ranks_and_a_bias_tuned_and_untuned(recipe, rank, monkeypatch):
    """LoRA ranks 32-128 with a bias (`variants.PERSISTENT_MAX_RANK`, `PERSISTENT_BIAS`) on the persistent kernel,
    tuned (configs that do not fit in shared memory are skipped) and untuned (SUROGATE_AUTOTUNE=0: the first
    config that fits, `tuning.Tuner.run`; run 58 found the family's first config refused at 64 and 128)."""
    compute, fmt = RECIPES[recipe]
    m, n, k = 1008, 1024, 2048
    x, w, a, b, go, wl = _case(m, n, k, fmt, seed=2, rank=rank)
    bias = torch.randn(n, device="cuda").bfloat16()
    monkeypatch.setattr(variants, "PERSISTENT_SM90", True)
    y_r, h_r = ref.lora_linear_ref(x, wl, fmt, a, b, None, bias, 2.0, compute, compute)
    gi_r = ref.lora_linear_backward_ref(go, x, wl, fmt, a, b, None, h_r, 2.0, compute)[0]
    results = {}
    for name, autotune in (("tuned", "1"), ("untuned", "0")):
        monkeypatch.setenv("SUROGATE_AUTOTUNE", autotune)
        try:
            with variants.trace() as ran:
                y, h = launch.lora_linear_cuda(x, wl, fmt, a, b, None, bias, 2.0, compute, compute)
                gi = launch.lora_linear_backward_cuda(go, x, wl, fmt, a, b, None, h, 2.0, compute)[0]
            assert [r.engine for r in ran] == [variants.Engine.PERSISTENT] * 2
            results[name] = (_diagnose(y, y_r, None), _diagnose(gi, gi_r, None))
        except Exception as e:  # noqa: BLE001 (the failure is the finding: which launch fails, and why)
            results[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    print(f"{recipe} rank {rank} + bias: {results}")
    for name, got in results.items():
        assert not isinstance(got, str), f"{name}: {got}"
        (fwd, fwd_text), (dgrad, dgrad_text) = got
        assert fwd > FLOOR and dgrad > FLOOR, f"{name}: fwd {fwd_text}; dgrad {dgrad_text}"


@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_every_config_computes_the_same_gemm(recipe, shape, monkeypatch):
    """Each candidate config (warp-specialized ones included) and the pointer path, forward and dgrad,
    against the op's reference at tile tails. Every config runs (a non-finite one does not stop the
    loop); the message lists each bad one with its numbers. The probe configs kept out of the families
    (`configs.persistent_probe_configs`) run too and are reported as "probe" (printed, and as a warning in
    pytest's summary), without failing the test."""
    compute, fmt = RECIPES[recipe]
    m, n, k = shape
    x, w, a, b, go, wl = _case(m, n, k, fmt, seed=1)
    y_r, h_r = ref.lora_linear_ref(x, wl, fmt, a, b, None, None, 2.0, compute, compute)
    gi_r = ref.lora_linear_backward_ref(go, x, wl, fmt, a, b, None, h_r, 2.0, compute)[0]
    v_fwd = variants.variant("output", compute, fmt)
    family = persistent.FAMILIES[(v_fwd.a_mode, v_fwd.w_mode)]
    monkeypatch.setattr(variants, "PERSISTENT_SM90", True)
    failures, lines = [], []
    probes = configs.persistent_probe_configs(family)
    for config in [*configs.get_configs(family, "sm_90"), None, *probes]:
        def launcher(*args, **kw):
            return original(*args, **kw, config=config, tma=config is not None)

        original = persistent.launch_persistent_gemm
        monkeypatch.setattr(persistent, "launch_persistent_gemm", launcher)
        try:
            y, h = launch.lora_linear_cuda(x, wl, fmt, a, b, None, None, 2.0, compute, compute)
            gi = launch.lora_linear_backward_cuda(go, x, wl, fmt, a, b, None, h, 2.0, compute)[0]
        finally:
            monkeypatch.setattr(persistent, "launch_persistent_gemm", original)
        block_m = config.kwargs["BLOCK_M"] if config is not None else None
        (fwd, fwd_text), (dgrad, dgrad_text) = _diagnose(y, y_r, block_m), _diagnose(gi, gi_r, block_m)
        probe = any(config is p for p in probes)
        line = f"{'probe ' if probe else ''}{family} {_config_name(config)}: fwd {fwd_text}; dgrad {dgrad_text}"
        lines.append(line)
        if probe:  # in pytest's warnings summary, which (unlike -s output) survives xdist
            warnings.warn(f"{recipe} {shape}: {line}", UserWarning, stacklevel=1)
        if min(fwd, dgrad) <= FLOOR and not probe:
            failures.append(line)
    print(f"{recipe} {shape}:\n  " + "\n  ".join(lines))
    assert failures == [], "bad configs:\n  " + "\n  ".join(failures)


@pytest.mark.parametrize("recipe", ["bf16", "fp8", "qnf4"])
def test_a_compiled_model_on_the_default_persistent_route_follows_eager_peft(recipe, monkeypatch):
    """The default routing (`variants.PERSISTENT_SM90`, by rows) inside a compiled tiny Qwen3 at 2 x 2048 rows,
    enough for every routed variant: bf16, fp8 and qnf4 (its bf16 scratch route) run the persistent kernel,
    and the loss and the LoRA gradients stay as close to eager PEFT as with the kernel switched off (the
    kernel's numerics in a real graph: views, packed weights, the LoRA factors' dtypes; no CUDA graphs)."""
    import copy

    import surogate
    from tiny_qwen3 import VOCAB, cuda_lora_qwen3

    rows = 2 * 2048
    assert rows >= max(variants.PERSISTENT_SM90.values())
    ids = torch.randint(0, VOCAB, (2, rows // 2), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    reference = cuda_lora_qwen3()
    ref_loss = reference(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    names = sorted(n for n, p in reference.named_parameters() if p.requires_grad)
    g_ref = torch.cat([dict(reference.named_parameters())[n].grad.flatten().float() for n in names])
    errors = {}
    for setting in (variants.PERSISTENT_SM90, False):
        monkeypatch.setattr(variants, "PERSISTENT_SM90", setting)
        model = surogate.compile(copy.deepcopy(cuda_lora_qwen3()), recipe=recipe)
        with variants.trace() as ran:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        engines = {r.engine for r in ran}
        assert (variants.Engine.PERSISTENT in engines) == bool(setting), (setting, engines)
        g = torch.cat([dict(model.named_parameters())[n].grad.flatten().float() for n in names])
        errors[bool(setting)] = (abs(loss.item() - ref_loss.item()) / ref_loss.item(),
                                 ((g - g_ref).norm() / g_ref.norm()).item())
    print(f"{recipe}: (loss, LoRA-gradient) relative error vs eager PEFT, persistent on {errors[True]}, "
          f"off {errors[False]}")
    (loss_on, grad_on), (loss_off, grad_off) = errors[True], errors[False]
    assert loss_on <= max(2 * loss_off, 1e-3) and grad_on <= max(1.5 * grad_off, 0.02), errors
