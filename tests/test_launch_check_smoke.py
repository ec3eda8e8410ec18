"""bench/launch_check.py on the CPU: its wrapper checks a launch against the reference (the Triton kernels under
the interpreter), flags a launch whose output is wrong or non-finite from finite inputs, leaves one with
non-finite inputs as downstream, restores the launcher, and its command line runs the default config."""

from __future__ import annotations

import json

import torch
from bench_module import load_bench
from numerics import lora_gemm_case

from surogate.kernels import launch


def _case():
    x, _, a, b, _, go, wl = lora_gemm_case(32, 64, 128, 16, "fp8_row", 1, "cpu")
    return x, wl, a.bfloat16(), b.bfloat16(), go


def test_a_right_launch_passes_and_a_wrong_one_is_named():
    check_mod = load_bench("launch_check")
    x, wl, a, b, go = _case()
    original = launch.lora_linear_with_casts_cuda  # what the op's forward calls, and lora_linear_cuda too
    with check_mod.LaunchCheck() as check:
        assert launch.lora_linear_with_casts_cuda is not original
        out, hidden = launch.lora_linear_cuda(x, wl, "fp8_row", a, b, None, None, 2.0, "fp8", "fp8")
        launch.lora_linear_backward_cuda(go, x, wl, "fp8_row", a, b, None, hidden, 2.0, "fp8")
        assert check.scan(1) == [] and check.launches == 2
        right = out

        def wrong(*args, **kwargs):
            y, *rest = original(*args, **kwargs)
            return y.index_fill(0, torch.tensor([3]), 0.0) * 1.0, *rest  # a row never written

        check.inner["lora_linear_with_casts_cuda"] = wrong
        launch.lora_linear_cuda(x, wl, "fp8_row", a, b, None, None, 2.0, "fp8", "fp8")
        check.inner["lora_linear_with_casts_cuda"] = lambda *a_, **k: (torch.full_like(right, float("nan")), hidden,
                                                                       None, None)
        launch.lora_linear_cuda(x, wl, "fp8_row", a, b, None, None, 2.0, "fp8", "fp8")
        launch.lora_linear_cuda(x.index_fill(0, torch.tensor([0]), float("nan")), wl, "fp8_row", a, b, None, None,
                                2.0, "fp8", "fp8")  # non-finite input: downstream, not this launch's fault
        bad = check.scan(2)
    assert launch.lora_linear_with_casts_cuda is original
    assert [(b_["launch"], b_["direction"], b_["nonfinite_outputs"] > 0) for b_ in bad] == [
        (3, "forward", False), (4, "forward", True)]
    assert bad[0]["error"] > check_mod.TOLERANCE and bad[0]["shapes"] == "x (32, 128) -> (32, 64)"
    assert bad[0]["weight_format"] == "fp8_row" and bad[0]["captured"] is False
    assert check.downstream == 1


def test_the_command_runs_the_default_config_and_refuses_a_bad_key(tmp_path, capsys):
    check_mod = load_bench("launch_check")
    out = tmp_path / "report"
    assert check_mod.main(["--set", "max_steps=1", "--set", f"output_dir={tmp_path / 'run'}", "--out", str(out)]) == 0
    record = json.loads((out / "launch_check.json").read_text())
    assert record["outcome"] == "finished" and record["bad"] == []  # on the CPU the reference op runs: nothing to check
    assert "0 launches checked" in (out / "launch_check.md").read_text()
    assert check_mod.main(["--set", "no_such_key=1", "--out", str(out)]) == 2
    assert "no_such_key" in capsys.readouterr().err
