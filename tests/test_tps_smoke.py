"""bench/tps.py on a CPU: system names, recipe labels and the result files (the runs need a GPU)."""

from __future__ import annotations

import json

import pytest
from bench_module import load_bench

tps = load_bench("tps")


def _record(system: str, tok: float, emulated: bool = False) -> dict:
    recipe = tps.recipe_of(system)[0]
    return dict(model="Qwen3-0.6B", system=system, recipe=recipe, emulated=emulated, tokens_per_s=tok,
                peak_gib=7.0, first_step_s=30.0, loss_first=12.0, loss_last=11.0, finite=True, commit="abc1234")


def test_systems_parse_into_recipe_and_options():
    assert tps.surogate_system("surogate:qfp8+ckpt+nograph") == ("qfp8", {"checkpoint": True, "cuda_graphs": False})
    assert tps.recipe_of("bnb_nf4") == ("nf4 (bitsandbytes)", False)
    assert tps.recipe_of("hf_compile") == ("bf16", False)
    assert tps.recipe_of("surogate:qnf4+ckpt")[0] == "qnf4"
    with pytest.raises(ValueError, match="unknown option"):
        tps.surogate_system("surogate:bf16+fast")


def test_results_label_emulated_recipes_and_compare_with_the_best_peer(tmp_path):
    records = [_record("hf_eager", 20e3), _record("hf_compile", 40e3), _record("surogate:bf16", 60e3),
               _record("surogate:fp4", 30e3, emulated=True)]
    env = dict(gpu="GPU", torch="2.x", triton="3.x", commit="abc1234")
    tps.write_results(records, {"liger": "liger_kernel is not installed"}, env, tmp_path)
    md = (tmp_path / "tps.md").read_text()
    assert "surogate:fp4 (emulated)" in md and "surogate:bf16 (emulated)" not in md
    assert "Qwen3-0.6B surogate:bf16: 1.50x" in md  # over hf_compile, the best peer
    assert "liger: liger_kernel is not installed" in md
    saved = json.loads((tmp_path / "tps.json").read_text())
    assert [r["recipe"] for r in saved["records"]] == ["bf16", "bf16", "bf16", "fp4"]
    assert (tmp_path / "tps.png").stat().st_size > 0
