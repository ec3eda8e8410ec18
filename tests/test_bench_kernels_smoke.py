"""bench/fused_kernels.py --persistent on CPU: the Triton interpreter, tiny shapes, each timing one call.

What it checks is that the GPU run needs no edit: every column is filled, the persistent column really ran
the persistent kernel (and the others did not), validation reads the reference, the tables render."""

from __future__ import annotations

import importlib.machinery
import json
import sys
from pathlib import Path

import torch
from bench_module import REPO, load_bench


def test_persistent_bench_runs_validates_and_writes(tmp_path, monkeypatch) -> None:
    kb = load_bench("fused_kernels")
    monkeypatch.setattr(kb, "DEVICE", "cpu")
    monkeypatch.setattr(kb, "linear_shapes", lambda model: {"q": (256, 128), "down": (128, 144)})
    monkeypatch.setattr(kb, "PERSISTENT_VALIDATE", ((37, 64, 128), (37, 48, 144)))
    monkeypatch.setattr(kb, "_time", lambda fn: (fn(), 1.0)[1])

    def cublas_alone(c, recipe):  # no cuBLAS FP8 on CPU: the bf16 GEMMs stand in
        return (lambda: c["x"] @ c["w"].t()), (lambda: c["go"] @ c["w"])

    monkeypatch.setattr(kb, "_cublas_alone", cublas_alone)
    monkeypatch.setattr("sys.argv", ["fused_kernels.py", "--persistent", "--models", "tiny", "--m", "5,40",
                                     "--out", str(tmp_path)])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "cpu (interpreter)")
    monkeypatch.setattr(kb, "current_arch", lambda: "sm_90")
    kb.main()
    data = json.loads((tmp_path / "kernels_persistent.json").read_text())
    assert len(data["rows"]) == 2 * 2 * 3  # shapes x M x recipes
    for row in data["rows"]:
        assert row["persistent_routes"].startswith("persistent_") and "persistent" not in row["current_routes"]
        assert row["sqnr_vs_current"]["fwd"] > 40 and row["sqnr_vs_current"]["dgrad"] > 40
        assert row["persistent_fwd_vs_cublas"] == 1.0 and row["triton_dgrad_ms"] == 1.0
        assert ("persistent_fwd_q_ms" in row) == (row["recipe"] != "bf16")  # the producer-quantized forward
        assert ("persistent_dgrad_q_vs_cublas" in row) == (row["recipe"] != "bf16")  # and dgrad
    assert len(data["validate"]) == 2 * 3
    for key, v in data["validate"].items():
        assert v["output"] > 40 and v["grad_input"] > 40, key
        assert all(r.startswith("persistent_") for r in v["routes"]), key
    md = (tmp_path / "kernels_persistent.md").read_text()
    assert md.count("\n| tiny |") == 12 and "xC" in md


def test_no_bench_script_shadows_an_installed_module():
    """A script run as `python bench/x.py` puts bench/ first on sys.path, so bench/<name>.py answers `import <name>`:
    bench/kernels.py answered transformers 5.25's `import kernels` (the hub-kernels package it now requires) and
    every benchmark that imports transformers failed. No script may take an installed top-level module's name."""
    bench = REPO / "bench"
    path = [p for p in sys.path if Path(p or ".").resolve() not in (bench, REPO)]
    taken = [s.stem for s in bench.glob("*.py")
             if any(importlib.machinery.PathFinder.find_spec(s.stem, [p]) for p in path if p)]
    assert taken == [], taken


def test_microbench_command_line_and_result_files(tmp_path, monkeypatch) -> None:
    """bench/microbench.py, which the GPU microbenchmarks (lora_add, grad_lora_fp8, swiglu, delta_rule,
    attention_backends, gemm_ceiling) share: --out and the script's own option; <stem>_<gpu>.json / .md in --out."""
    mb = load_bench("microbench")
    for script in ("lora_add", "grad_lora_fp8", "swiglu", "delta_rule", "attention_backends", "gemm_ceiling"):
        assert "command_line(__doc__" in (REPO / "bench" / f"{script}.py").read_text()
    monkeypatch.setattr(sys, "argv", ["x.py", "--out", str(tmp_path), "--sweep"])
    args, env = mb.command_line("One line.\n\nMore.", "--sweep", action="store_true")
    assert args.sweep and args.out == str(tmp_path) and "commit" in env
    md = mb.write_results(args.out, "thing", {"gpu": "NVIDIA H200", "commit": "abc"}, {"rows": [1, 2]}, ["# t", "x"])
    assert md == tmp_path / "thing_h200.md" and md.read_text() == "# t\nx\n"
    saved = json.loads((tmp_path / "thing_h200.json").read_text())
    assert saved == {"env": {"gpu": "NVIDIA H200", "commit": "abc"}, "rows": [1, 2]}


def test_microbenchmark_result_tables() -> None:
    """lora_add's and grad_lora_fp8's result files through microbench.table: the lines their inline builders wrote
    before (sweeps fastest first), from rows shaped as their GPU runs record them."""
    env = {"gpu": "NVIDIA H200", "torch": "2.11", "triton": "3.6", "commit": "abc"}
    lora_add = load_bench("lora_add")
    rows = [{"M": 4096, "N": 6144, "r": 16, "system": "lora_add_", "ms": 0.0789, "GB/s": 3419.4,
             "rounded_once": 1.0}]
    sweep = [{"M": 4096, "N": 6144, "block_m": 32, "block_n": 128, "num_warps": 4, "ms": 0.0812, "GB/s": 3300.2,
              "rounded_once": 1.0},
             {"M": 4096, "N": 6144, "block_m": 16, "block_n": 256, "num_warps": 8, "ms": 0.0790, "GB/s": 3410.0,
              "rounded_once": 1.0}]
    lines = lora_add.markdown(env, rows, sweep)
    assert lines[0] == "# The LoRA term added into a GEMM output: cuBLAS addmm_ vs kernels/lora_add.py (NVIDIA H200)"
    assert lines[4:] == [
        "| M | N | system | us | GB/s | rounded once |", "|---|---|---|---|---|---|",
        "| 4096 | 6144 | lora_add_ | 78.9 | 3419 | 1.0000 |", "",
        "The kernel at other launch configs, fastest first per shape", "",
        "| M | N | block_m | block_n | num_warps | us | GB/s | rounded once |", "|---|---|---|---|---|---|---|---|",
        "| 4096 | 6144 | 16 | 256 | 8 | 79.0 | 3410 | 1.0000 |",
        "| 4096 | 6144 | 32 | 128 | 4 | 81.2 | 3300 | 1.0000 |"]
    assert lora_add.markdown(env, rows, [])[-1] == "| 4096 | 6144 | lora_add_ | 78.9 | 3419 | 1.0000 |"

    grad = load_bench("grad_lora_fp8")
    rows = [{"layout": "fp8", "M": 4096, "K": 4096, "r": 16, "system": "FP8 copy, grad_lora_a_fp8", "ms": 0.0123,
             "GB/s": 2800.4, "rel_to_rebuild": 3.2e-4}]
    sweep = [{"format": "fp8", "M": 4096, "K": 4096, "block_m": 64, "num_warps": 4, "num_stages": 3, "programs": 132,
              "ms": 0.013, "GB/s": 2700.0, "rel": 3.3e-4}]
    assert grad.markdown(env, rows, sweep)[4:] == [
        "| layout | M | K | system | us | GB/s | rel |", "|---|---|---|---|---|---|---|",
        "| fp8 | 4096 | 4096 | FP8 copy, grad_lora_a_fp8 | 12.3 | 2800 | 3.2e-04 |", "",
        "The kernel at other launch configs (`grad_lora_fp8.Config`), fastest first per shape", "",
        "| format | M | K | block_m | num_warps | num_stages | programs | us | GB/s | rel |",
        "|---|---|---|---|---|---|---|---|---|---|", "| fp8 | 4096 | 4096 | 64 | 4 | 3 | 132 | 13.0 | 2700 | 3.3e-04 |"]
