"""bench/tps.py on a CPU: system names, recipe labels and the result files (the runs need a GPU)."""

from __future__ import annotations

import json

import pytest
from bench_module import load_bench

tps = load_bench("tps")


def _record(system: str, tok: float, emulated: bool = False) -> dict:
    recipe = tps.recipe_of(system)[0]
    return {"model": "Qwen3-0.6B", "system": system, "recipe": recipe, "emulated": emulated, "tokens_per_s": tok,
            "peak_gib": 7.0, "first_step_s": 30.0, "loss_first": 12.0, "loss_last": 11.0, "finite": True,
            "commit": "abc1234"}


def test_systems_parse_into_recipe_and_options():
    assert tps.surogate_system("surogate:qfp8+ckpt+nograph") == ("qfp8", {"checkpoint": True, "cuda_graphs": False})
    assert tps.surogate_system("surogate:qnf4+offload+cpuload") == ("qnf4", {"checkpoint": "offload", "cpu_load": True})
    assert tps.recipe_of("bnb_nf4") == ("nf4 (bitsandbytes)", False)
    assert tps.recipe_of("hf_compile") == ("bf16", False)
    assert tps.recipe_of("surogate:qnf4+ckpt")[0] == "qnf4"
    with pytest.raises(ValueError, match="unknown option"):
        tps.surogate_system("surogate:bf16+fast")
    # A percentage after +ckpt / +offload: checkpoint only that share of the blocks.
    assert tps.surogate_system("surogate:qnf4+ckpt67") == ("qnf4", {"checkpoint": True, "checkpoint_fraction": 0.67})
    assert tps.surogate_system("surogate:qnf4+offload75+cpuload") == \
        ("qnf4", {"checkpoint": "offload", "checkpoint_fraction": 0.75, "cpu_load": True})
    for wrong in ("ckpt0", "ckpt100", "ckpt067", "offload-50", "ckptx"):
        with pytest.raises(ValueError, match="unknown option"):
            tps.surogate_system(f"surogate:qnf4+{wrong}")
    # The row-fp8 cuBLAS A/B: rule names the worker turns into variants.FP8_ROW_CUBLAS.
    from surogate.kernels.variants import CublasRule

    assert tps.surogate_system("surogate:fp8+fp8cublasdgrad") == ("fp8", {"fp8_row_cublas": ("ROW_FP8_DGRAD_SM90",)})
    rules = {CublasRule[r] for r in tps.surogate_system("surogate:fp8+fp8cublas")[1]["fp8_row_cublas"]}
    assert rules == {CublasRule.ROW_FP8_FWD_SM90, CublasRule.ROW_FP8_DGRAD_SM90}


def test_results_label_emulated_recipes_and_compare_with_the_best_peer(tmp_path):
    records = [_record("hf_eager", 20e3), _record("hf_compile", 40e3), _record("surogate:bf16", 60e3),
               _record("surogate:fp4", 30e3, emulated=True)]
    env = {"gpu": "GPU", "torch": "2.x", "triton": "3.x", "commit": "abc1234"}
    tps.write_results(records, {"liger": "liger_kernel is not installed"}, env, tmp_path)
    md = (tmp_path / "tps.md").read_text()
    assert "surogate:fp4 (emulated)" in md and "surogate:bf16 (emulated)" not in md
    assert "Qwen3-0.6B surogate:bf16: 1.50x" in md  # over hf_compile, the best peer
    assert "liger: liger_kernel is not installed" in md
    saved = json.loads((tmp_path / "tps.json").read_text())
    assert [r["recipe"] for r in saved["records"]] == ["bf16", "bf16", "bf16", "fp4"]
    assert (tmp_path / "tps.png").stat().st_size > 0


def test_qwen3_30b_a3b_has_its_published_size_and_trains_lora_on_every_expert():
    """30.5B parameters (3.3B active), counted on the meta device: the real sizes, no weights built."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    config = tps.model_config("30B-A3B")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == "Qwen3MoeForCausalLM" and model.config._experts_implementation == "grouped_mm"
    total = sum(p.numel() for p in model.parameters())
    experts = model.model.layers[0].mlp.experts
    per_expert = (experts.gate_up_proj.numel() + experts.down_proj.numel()) // config.num_experts
    active = total - config.num_hidden_layers * (config.num_experts - config.num_experts_per_tok) * per_expert
    assert total == pytest.approx(30.5e9, rel=0.02) and active == pytest.approx(3.3e9, rel=0.02)

    lora = tps.lora_config("30B-A3B")
    assert set(lora.target_parameters) == {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}
    assert set(lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"} and lora.r == 16
    assert not tps.lora_config("0.6B").target_parameters and tps.model_config("0.6B").model_type == "qwen3"
    # PEFT finds the expert parameters (one layer, to stay fast): r rows of A per expert.
    config.num_hidden_layers = 1
    with torch.device("meta"):
        peft_model = get_peft_model(AutoModelForCausalLM.from_config(config), lora)
    a = {n: p.shape for n, p in peft_model.named_parameters() if "lora_A" in n}
    assert len(a) == 6 and {s[0] for n, s in a.items() if "experts" in n} == {16 * config.num_experts}
    with pytest.raises(ValueError, match="unknown model"):
        tps.model_config("30B")


def test_moe_skips_dense_only_peers_and_an_oom_is_a_result(tmp_path):
    assert tps.unsupported("30B-A3B", "bnb_nf4") and tps.unsupported("30B-A3B", "liger")
    assert tps.unsupported("30B-A3B", "hf_compile") is None and tps.unsupported("8B", "bnb_nf4") is None
    oom = "Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB."
    assert tps.failure(1, oom) == "OOM"
    assert tps.failure(1, "RuntimeError: boom") == "RuntimeError: boom"
    assert tps.failure(-9, "").startswith("killed by signal 9")
    records = [_record("hf_eager", 20e3), {**_record("hf_compile", 0), "error": "OOM"}]
    for r in records:
        r["model"] = "Qwen3-30B-A3B"
    env = {"gpu": "GPU", "torch": "2.x", "triton": "3.x", "commit": "abc1234"}
    tps.write_results(records, {"Qwen3-30B-A3B bnb_nf4": tps.unsupported("30B-A3B", "bnb_nf4")}, env, tmp_path)
    md = (tmp_path / "tps.md").read_text()
    assert "| Qwen3-30B-A3B | 20.0k (7.0, 30) | OOM |" in md and "- Qwen3-30B-A3B hf_compile: OOM" in md
    assert "- Qwen3-30B-A3B bnb_nf4: dense only" in md
