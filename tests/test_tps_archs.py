"""bench/tps.py's other architectures on a CPU: each config has its published model's size, LoRA finds its
targets, records carry its name, and surogate.compile rewrites every target of a tiny copy of it."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from bench_module import load_bench
from test_compile_models import V, assert_every_target_rewritten
from transformers import AutoModelForCausalLM

import surogate
from surogate.compiler import linear_module_names, unmatched_targets

tps = load_bench("tps")
bp = load_bench("step_profile")

# (model_type, parameters of the published checkpoint: embeddings once where tied).
PUBLISHED = {"Llama-3-8B": ("llama", 8.03e9), "Llama-3.1-8B": ("llama", 8.03e9), "Llama-3.2-1B": ("llama", 1.24e9),
             "Mistral-7B": ("mistral", 7.25e9), "Gemma-2-2B": ("gemma2", 2.61e9), "Phi-3-mini": ("phi3", 3.82e9),
             "Gemma-3-1B": ("gemma3_text", 1.0e9)}


def test_every_architecture_is_checked_here():
    assert set(PUBLISHED) == set(tps.ARCHS)


@pytest.mark.parametrize("key", list(PUBLISHED))
def test_config_is_the_published_model_and_lora_finds_its_targets(key):
    """Built on the meta device: the real sizes, no weights."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tps.model_config(key))
    model_type, params = PUBLISHED[key]
    assert model.config.model_type == model_type and tps.model_name(key) == key
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=0.005)
    targets = tps.lora_config(key).target_modules
    assert set(targets) == set(tps.lora_targets(key))
    assert not unmatched_targets(list(targets), linear_module_names(model))  # each names at least one nn.Linear
    assert tps.unsupported(key, "liger") is None and model_type in tps.LIGER


def test_phi3_trains_its_fused_linears_and_qwen3_keys_keep_their_names():
    assert set(tps.lora_config("Phi-3-mini").target_modules) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert set(tps.lora_config("Gemma-2-2B").target_modules) == set(tps.TARGETS) == \
        set(tps.lora_config().target_modules)
    assert [tps.model_name(k) for k in ("0.6B", "8B", "30B-A3B")] == ["Qwen3-0.6B", "Qwen3-8B", "Qwen3-30B-A3B"]
    assert tps.unsupported("30B-A3B", "liger") and tps.unsupported("0.6B", "liger") is None
    with pytest.raises(ValueError, match="unknown model 'Gemma-2-9B'; known: .*Phi-3-mini"):
        tps.model_spec("Gemma-2-9B")


def test_records_skips_and_traces_carry_the_model_name(tmp_path, monkeypatch):
    """tps.py's driver names records and skips by model (its workers fail here: no GPU); step_profile.py too."""
    def fake_run(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="RuntimeError: boom")

    monkeypatch.setattr(tps.subprocess, "run", fake_run)
    monkeypatch.setattr(tps, "environment", lambda: {"gpu": "GPU", "torch": "2.x", "triton": "3.x", "commit": "abc"})
    monkeypatch.setattr(tps, "available", lambda system: None)
    argv = ["--models", "Gemma-2-2B,0.6B,30B-A3B", "--systems", "hf_eager,bnb_nf4", "--out", str(tmp_path)]
    assert tps.main(argv) == 0
    saved = json.loads((tmp_path / "tps.json").read_text())
    assert [r["model"] for r in saved["records"]] == ["Gemma-2-2B"] * 2 + ["Qwen3-0.6B"] * 2 + ["Qwen3-30B-A3B"]
    assert list(saved["skipped"]) == ["Qwen3-30B-A3B bnb_nf4"]
    assert "| Phi-3-mini |" not in (tmp_path / "tps.md").read_text()
    assert bp._trace_path(tmp_path, "Phi-3-mini", "surogate:bf16").name == "trace_Phi-3-mini_surogate-bf16.json.gz"
    assert bp._trace_path(tmp_path, "8B", "hf_compile").name == "trace_Qwen3-8B_hf-compile.json.gz"


def tiny_arch_config(key: str):
    """The published config at 2 layers, hidden 64, 4 heads of 16 (kv heads in the same share), vocab V (special
    token ids inside it): its attention kind, RoPE, soft-capping and sliding window kept."""
    config = tps.model_config(key)
    kv_heads = max(1, 4 * config.num_key_value_heads // config.num_attention_heads)
    return tps.arch_config(key, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=kv_heads, head_dim=16, vocab_size=V, pad_token_id=0, bos_token_id=1,
                           eos_token_id=2)


@pytest.mark.parametrize("key", list(PUBLISHED))
def test_tiny_copy_compiles_and_every_target_is_rewritten(key):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_arch_config(key)).to(torch.bfloat16)
    compiled = surogate.compile(model, recipe="bf16", lora=tps.lora_config(key), arch="cpu", dynamic=False)
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert_every_target_rewritten(compiled.surogate_report, tps.lora_targets(key))


def test_a_local_model_directory_is_measured_by_its_config(tmp_path):
    """--models takes a user's own model: a directory with its config.json (or the file), read with no download;
    the record is named after the directory and LoRA trains the default targets it has (experts too)."""
    from transformers import Qwen3MoeConfig

    from test_compile_models import tiny_config

    dense = tmp_path / "my-llama"
    tiny_config("llama").save_pretrained(dense)
    name, config = tps.model_spec(str(dense))
    assert (name, config.model_type) == ("my-llama", "llama") and tps.model_spec(str(dense / "config.json"))[0] == name
    assert tps.lora_targets(str(dense)) == tps.TARGETS and not tps.is_moe(str(dense))
    phi = tmp_path / "my-phi3"
    tiny_config("phi3").save_pretrained(phi)
    assert tps.lora_targets(str(phi)) == ["o_proj", "down_proj", "qkv_proj", "gate_up_proj"]
    moe = tmp_path / "my-moe"
    Qwen3MoeConfig(**{**tiny_config("qwen3_moe").to_dict(), "num_experts": 4}).save_pretrained(moe)
    lora = tps.lora_config(str(moe))
    assert tps.is_moe(str(moe)) and lora.target_parameters == ["experts.down_proj", "experts.gate_up_proj"]
    assert set(lora.target_modules) == set(tps.TARGETS[:4])  # the experts are 3-D parameters, not nn.Linear
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    compiled = surogate.compile(model, recipe="bf16", lora=tps.lora_config(str(dense)), arch="cpu", dynamic=False)
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(compiled(input_ids=ids, labels=ids).loss)
    assert_every_target_rewritten(compiled.surogate_report, tps.lora_targets(str(dense)))
    with pytest.raises(ValueError, match=r"unknown model '.*nowhere'; known: .*, or a directory with a config.json"):
        tps.model_spec(str(tmp_path / "nowhere"))
    sft = load_bench("sft")  # real data: a dense local model is taken, an MoE one refused
    assert sft.model_name(str(dense)) == "my-llama"
    with pytest.raises(SystemExit, match=r"vocabulary of my-llama \(128\) is smaller than the bundled tokenizer's"):
        sft.check_vocabularies([str(dense), "0.6B"])
    with pytest.raises(ValueError, match="or a local directory with the config.json of a dense model"):
        sft.model_name(str(moe))
