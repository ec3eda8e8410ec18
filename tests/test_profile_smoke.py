"""bench/step_profile.py on a CPU: kernel classification, GPU busy-interval union, event extraction and reports.

The profiled GPU step itself needs a GPU; everything it feeds (plain lists of kernel names and
times, fake profiler events, fake records) is checked here, in well under a second.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from bench_module import load_bench
from torch.autograd import DeviceType

REPO = Path(__file__).resolve().parents[1]


bp = load_bench("step_profile")
VOCAB = 151936


@pytest.mark.parametrize("name, category", [
    ("_lora_gemm_kernel", bp.GEMM_SUROGATE),
    ("_lora_gemm_nvfp4_kernel", bp.GEMM_SUROGATE),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", bp.GEMM_OTHER),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTT", bp.GEMM_OTHER),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16>", bp.GEMM_OTHER),
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", bp.ELEMENTWISE),
    ("flash_fwd_kernel", bp.ATTENTION),
    ("pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel", bp.ATTENTION),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", bp.ATTENTION),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>",
     bp.OPTIMIZER),
    ("multi_tensor_apply_kernel", bp.OPTIMIZER),
    ("_quantize_fp8_rowwise_kernel", bp.QUANT),
    ("_dequantize_nf4_kernel", bp.QUANT),
    ("void at::native::vectorized_elementwise_kernel", bp.ELEMENTWISE),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, std::array<char*, 1ul> >",
     bp.MEMORY),
    ("triton_red_fused__log_softmax_nll_loss_forward_1", bp.LOSS),
    ("Memcpy DtoD (Device -> Device)", bp.MEMORY),
    ("some_unknown_kernel", bp.OTHER),
    ("_grouped_lora_gemm_kernel", bp.GEMM_GROUPED),
    ("_grouped_wgrad_kernel", bp.GEMM_GROUPED),
    ("void at::cuda::cub::DeviceRadixSortOnesweepKernel<...>", bp.ROUTING),
    ("triton_poi_fused_index_mul_1", bp.ROUTING),
    ("void at::native::indexFuncLargeIndex<c10::BFloat16, long, unsigned int, 2, 2, -2, true>", bp.ROUTING),
])
def test_classify_real_kernel_names(name, category):
    assert bp.classify(name) == category


def test_rules_cover_every_category_but_idle_and_other():
    assert {c for c, _ in bp.RULES} == set(bp.CATEGORIES) - {bp.IDLE, bp.OTHER}


def test_context_puts_the_lm_head_and_optimizer_first():
    assert bp.context_category([("aten::mm", False), ("surogate::lm_head_ce_fused", False)]) == bp.LOSS
    assert bp.context_category([("aten::mm", True), ("aten::linear", True)]) == bp.LOSS  # vocab-sized GEMM
    assert bp.context_category([("triton_per_fused_0", True), ("CompiledFunction", True)]) == bp.LOSS
    assert bp.context_category([("aten::mm", False), ("CompiledFunction", True)]) is None  # only ATen/Inductor
    assert bp.context_category([("aten::index_select", True), ("aten::embedding", True)]) is None
    assert bp.context_category([("aten::_fused_adamw_", False), ("Optimizer.step#AdamW.step", False)]) == bp.OPTIMIZER
    assert bp.context_category([("aten::mm", False), ("surogate::lora_linear", False)]) is None
    assert bp.context_category([]) is None


def test_has_dim_reads_nested_shapes():
    assert bp.has_dim([[4096, 1024], [VOCAB, 1024], []], VOCAB)
    assert not bp.has_dim([[4096, 1024], [], [16]], VOCAB)
    assert not bp.has_dim(None, VOCAB)


@pytest.mark.parametrize("intervals, busy", [
    ([], 0.0),
    ([(0, 10)], 10.0),
    ([(0, 10), (20, 5)], 15.0),  # a gap of 10
    ([(0, 10), (5, 10)], 15.0),  # overlap: [0, 15)
    ([(0, 100), (10, 5), (50, 20)], 100.0),  # nested in the first
    ([(30, 5), (0, 10), (8, 4), (35, 0)], 17.0),  # unsorted, touching, a zero-length one
    ([(0, 10), (10, 10)], 20.0),  # back to back
])
def test_busy_us_is_the_union(intervals, busy):
    assert bp.busy_us(intervals) == pytest.approx(busy)


def test_summarize_shares_idle_and_top_kernels():
    kernels = [("_lora_gemm_kernel", 0.0, 400.0), ("_lora_gemm_kernel", 400.0, 200.0),
               ("flash_fwd_kernel", 550.0, 100.0),  # overlaps the GEMM by 50 us on another stream
               ("nvjet_tst_128x256", 700.0, 100.0, bp.LOSS),  # placed by its launcher: the LM head
               ("multi_tensor_apply_kernel", 900.0, 50.0)]
    s = bp.summarize(kernels, wall_us=1000.0)
    assert s["launches"] == 5
    assert s["gpu_busy_s"] == pytest.approx(800e-6)  # [0, 650) + [700, 800) + [900, 950)
    assert s["idle_s"] == pytest.approx(200e-6)
    assert s["idle_method"].startswith("wall - union")
    cat = s["categories"]
    assert list(cat) == bp.CATEGORIES
    assert cat[bp.GEMM_SUROGATE]["ms"] == pytest.approx(0.6) and cat[bp.GEMM_SUROGATE]["share"] == pytest.approx(0.6)
    assert cat[bp.LOSS]["ms"] == pytest.approx(0.1) and cat[bp.GEMM_OTHER]["ms"] == 0.0
    assert cat[bp.IDLE]["share"] == pytest.approx(0.2)
    top = s["top_kernels"]
    assert top[0] == {"name": "_lora_gemm_kernel", "category": bp.GEMM_SUROGATE, "count": 2, "ms": pytest.approx(0.6),
                      "share": pytest.approx(0.6)}
    assert len(top) == 4 and [k["ms"] for k in top] == sorted((k["ms"] for k in top), reverse=True)
    many = bp.summarize([(f"k{i}", 10.0 * i, 1.0 + i) for i in range(20)], wall_us=1000.0)["top_kernels"]
    assert len(many) == bp.TOP_KERNELS == 15 and many[0]["name"] == "k19" and many[-1]["name"] == "k5"


def test_summarize_keeps_every_kernel_and_counts_the_short_ones():
    """The whole kernel list goes to the JSON (the tail the top 15 hide), and launches of kernels averaging
    under SHORT_KERNEL_US are counted with their time."""
    kernels = [(f"k{i}", 100.0 * i, 1.0 + i) for i in range(20)] + [("k0", 3000.0, 3.0)]
    s = bp.summarize(kernels, wall_us=5000.0)
    by_name = {k["name"]: k for k in s["kernels"]}
    assert len(s["kernels"]) == 20 and s["kernels"][-1]["name"] == "k1"  # 2 us in all; k0 has 1 + 3
    assert by_name["k0"] == {"name": "k0", "category": bp.OTHER, "count": 2, "ms": pytest.approx(0.004)}
    short = [k for k in kernels if k[0] in {f"k{i}" for i in range(9)}]  # k0 (mean 2 us) .. k8 (9 us)
    assert s["short_launches"] == len(short) == 10
    assert s["short_s"] == pytest.approx(sum(k[2] for k in short) / 1e6)


def test_summarize_without_timestamps_sums_and_says_so():
    s = bp.summarize([("flash_fwd_kernel", None, 300.0), ("flash_bwd_kernel", None, 300.0)], wall_us=1000.0)
    assert s["gpu_busy_s"] == pytest.approx(600e-6) and s["idle_s"] == pytest.approx(400e-6)
    assert "no timestamps" in s["idle_method"]
    assert bp.summarize([], wall_us=500.0)["categories"][bp.IDLE]["share"] == pytest.approx(1.0)


def _cpu(id_, name, parent=None, shapes=None, corr=0):
    return SimpleNamespace(id=id_, name=name, device_type=DeviceType.CPU, linked_correlation_id=corr,
                           cpu_parent=parent, input_shapes=shapes or [], is_user_annotation=False)


def _gpu(name, start, dur, corr, annotation=False):
    return SimpleNamespace(id=10_000 + corr, name=name, device_type=DeviceType.CUDA, linked_correlation_id=corr,
                           is_user_annotation=annotation,
                           activity_type="gpu_user_annotation" if annotation else "kernel",
                           time_range=SimpleNamespace(start=start, elapsed_us=lambda d=dur: d))


def test_device_kernels_follow_launchers_and_drop_annotations():
    loss = _cpu(1, "surogate::lm_head_ce")
    step = _cpu(2, "Optimizer.step#AdamW.step")
    events = [
        loss, _cpu(3, "aten::mm", parent=loss, shapes=[[512, 1024], [1024, VOCAB]]),
        step, _cpu(4, "aten::_fused_adamw_", parent=step),
        _cpu(5, "aten::mm", shapes=[[4096, 1024], [1024, 3072]]),
        _cpu(6, "cudaLaunchKernel", corr=3), _cpu(7, "cuLaunchKernelEx", corr=5), _cpu(8, "cudaMemsetAsync", corr=4),
        _gpu("nvjet_tst_128x256", 0.0, 100.0, corr=3),
        _gpu("multi_tensor_apply_kernel", 150.0, 20.0, corr=4),
        _gpu("sm90_xmma_gemm_bf16bf16", 200.0, 50.0, corr=5),
        _gpu("Optimizer.step#AdamW.step", 140.0, 40.0, corr=2, annotation=True),
    ]
    kernels, calls, by_context = bp.device_kernels(events, VOCAB)
    assert [k[0] for k in kernels] == ["nvjet_tst_128x256", "multi_tensor_apply_kernel", "sm90_xmma_gemm_bf16bf16"]
    assert [k[3] for k in kernels] == [bp.LOSS, bp.OPTIMIZER, None]
    assert kernels[2][1:3] == (200.0, 50.0)
    assert calls == 2 and by_context == 2
    cat = bp.summarize(kernels, wall_us=400.0)["categories"]
    assert cat[bp.LOSS]["ms"] == pytest.approx(0.1) and cat[bp.GEMM_OTHER]["ms"] == pytest.approx(0.05)


def test_device_kernels_without_linked_correlation_use_the_runtime_call():
    """Older torch: no `linked_correlation_id`; a GPU activity shares its `id` with its runtime call."""
    loss = _cpu(1, "aten::cross_entropy_loss")
    mm = _cpu(2, "aten::mm", shapes=[[4096, 1024], [1024, 3072]])
    events = [loss, mm, _cpu(70, "cudaLaunchKernel", parent=loss), _cpu(71, "cuLaunchKernel", parent=mm),
              _gpu("void at::native::cunn_SoftMaxForward<LogSoftMaxForwardEpilogue>", 0.0, 10.0, corr=0),
              _gpu("_lora_gemm_kernel", 20.0, 30.0, corr=0)]
    for e in events:
        del e.linked_correlation_id
    events[4].id, events[5].id = 70, 71
    kernels, calls, by_context = bp.device_kernels(events, VOCAB)
    assert [k[3] for k in kernels] == [bp.LOSS, None] and calls == 2 and by_context == 1


def _record(system, gemm_ms, norm_ms, loss_ms, idle_ms, step_ms=100.0):
    cats = {c: {"ms": 0.0, "share": 0.0} for c in bp.CATEGORIES}
    for c, ms in [(bp.GEMM_OTHER, gemm_ms), (bp.ELEMENTWISE, norm_ms), (bp.LOSS, loss_ms), (bp.IDLE, idle_ms)]:
        cats[c] = {"ms": ms, "share": ms / step_ms}
    return {"model": "Qwen3-0.6B", "system": system, "batch": 2, "seq": 2048, "accum": 4, "warmup": 2,
            "step_s": step_ms / 1e3, "tokens_per_s": 16384 / (step_ms / 1e3), "unprofiled_step_s": 0.09,
            "tokens_per_s_unprofiled": 16384 / 0.09, "launches": 1234, "launch_calls": 1200,
            "gpu_busy_s": (step_ms - idle_ms) / 1e3, "idle_s": idle_ms / 1e3, "categories": cats,
            "top_kernels": [{"name": "nvjet_tst_128x256|x", "category": bp.GEMM_OTHER, "count": 400,
                             "ms": gemm_ms, "share": gemm_ms / step_ms}]}


ENV = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0", "commit": "abc1234"}


def test_markdown_has_every_category_numbers_and_the_next_fusion():
    records = [_record("hf_compile", 50.0, 30.0, 10.0, 5.0), _record("surogate:bf16", 60.0, 8.0, 20.0, 7.0),
               {"model": "Qwen3-8B", "system": "surogate:fp8", "error": "Traceback...\ntorch.OutOfMemoryError: CUDA"}]
    md = bp.markdown(records, ENV)
    assert "## Qwen3-0.6B" in md and "NVIDIA H100 80GB HBM3" in md and "abc1234" in md
    assert "| category | hf_compile | surogate:bf16 |" in md
    for c in bp.CATEGORIES:
        assert f"| {c} |" in md
    assert f"| {bp.ELEMENTWISE} | 30.0 ms (30.0%) | 8.0 ms (8.0%) |" in md
    assert f"| {bp.IDLE} | 5.0 ms (5.0%) | 7.0 ms (7.0%) |" in md
    assert "| **step (profiled)** | 100.0 ms | 100.0 ms |" in md
    assert "1234 GPU kernels/step (1200 CPU launch calls)" in md
    assert "### Top 15 kernels: Qwen3-0.6B hf_compile" in md and "`nvjet_tst_128x256\\|x`" in md
    assert f"Qwen3-0.6B hf_compile: largest non-GEMM share: {bp.ELEMENTWISE}, 30.0 ms (30.0% of the step)" in md
    assert f"Qwen3-0.6B surogate:bf16: largest non-GEMM share: {bp.LOSS}, 20.0 ms (20.0% of the step)" in md
    assert "- Qwen3-8B surogate:fp8: torch.OutOfMemoryError: CUDA" in md
    assert "## Qwen3-8B" in md and "| **step (profiled)** | - |" in md


def test_main_runs_workers_as_subprocesses_and_records_failures(tmp_path, monkeypatch, capsys):
    ok = _record("surogate:bf16", 60.0, 8.0, 20.0, 7.0)
    seen = []

    def fake_run(cmd, **kw):
        seen.append(cmd)
        assert kw["timeout"] == 7 and "--worker" in cmd and "--trace" in cmd
        if cmd[cmd.index("--worker") + 2] == "surogate:bf16":
            return subprocess.CompletedProcess(cmd, 0, stdout="compiling...\n" + json.dumps(ok) + "\n", stderr="")
        if cmd[cmd.index("--worker") + 2] == "hf_compile":
            return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="Traceback\nRuntimeError: boom")
        raise subprocess.TimeoutExpired(cmd, 7)

    monkeypatch.setattr(bp.subprocess, "run", fake_run)
    monkeypatch.setattr(bp, "_environment", lambda: ENV)
    monkeypatch.setattr(bp, "_available", lambda system: None)
    assert bp.main(["--models", "0.6B", "--systems", "surogate:bf16,hf_compile,surogate:fp8", "--timeout", "7",
                    "--trace", "--out", str(tmp_path)]) == 0
    assert len(seen) == 3 and seen[0][seen[0].index("--worker") + 1] == "0.6B"
    report = json.loads((tmp_path / "profile.json").read_text())
    assert report["environment"] == ENV
    errors = {r["system"]: r.get("error") for r in report["records"]}
    assert errors["surogate:bf16"] is None and "boom" in errors["hf_compile"] and "timed out" in errors["surogate:fp8"]
    assert all(r["commit"] == "abc1234" for r in report["records"])
    md = (tmp_path / "profile.md").read_text()
    assert "- Qwen3-0.6B hf_compile: RuntimeError: boom" in md and "timed out after 7s" in md
    assert "surogate:bf16" in capsys.readouterr().out


def test_help_runs_as_a_script():
    done = subprocess.run([sys.executable, str(REPO / "bench" / "step_profile.py"), "--help"], capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0 and "--systems" in done.stdout and "--trace" in done.stdout
