"""The `surogate` CLI end to end on a very tiny config: train from a local model directory, info."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from surogate.cli import main


@pytest.fixture()
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SUROGATE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "surogate-cache"))


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A random tiny Qwen3 saved with save_pretrained (no tokenizer: the default one is used)."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    from surogate.tokenizer import DEFAULT_VOCAB_SIZE

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=DEFAULT_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                      initializer_range=0.1)
    d = tmp_path_factory.mktemp("tiny-model")
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(d)
    return d


def _config(tmp_path, model_dir, **extra) -> str:
    raw = {
        "model": str(model_dir), "recipe": "bf16", "sequence_len": 192, "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2, "learning_rate": 5e-3, "warmup_steps": 1, "lora_rank": 4,
        "lora_alpha": 8, "lora_target_modules": ["q_proj", "v_proj", "down_proj"],
        "dataset": {"max_train_samples": 16, "max_eval_samples": 4},
        "output_dir": str(tmp_path / "out"), "max_steps": 3, "logging_steps": 1, "eval_steps": 2, **extra,
    }
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(raw))
    return str(p)


def test_train_from_local_model_dir_end_to_end(tmp_path, tiny_model_dir, cache, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert main(["train", _config(tmp_path, tiny_model_dir)]) == 0
    out, err = capsys.readouterr()
    assert "tokens/s" in err and "step 3/3" in err and "has no tokenizer" in err
    assert "adapter:" in out and "loss chart:" in out and "tokens/s" in out

    run = tmp_path / "out"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 3 and len(metrics["train"]) == 3
    steps = metrics["train"]
    assert metrics["train_tokens"] == sum(s["tokens"] for s in steps)  # the examples' tokens, padding not counted
    assert all(0 < s["tokens"] <= 2 * 2 * 192 for s in steps)  # accumulation x batch x sequence at most
    assert metrics["tokens_per_s"] > 0 and math.isfinite(metrics["final_train_loss"])
    assert [e["step"] for e in metrics["eval"]] == [2, 3]
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert metrics["compile"]["rewritten"] > 0  # the loop ran through surogate.compile's rewritten graph

    # The adapter loads with plain PEFT onto the base named in its config.
    adapter_cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    base = AutoModelForCausalLM.from_pretrained(adapter_cfg["base_model_name_or_path"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, run / "adapter")
    lora_b = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert lora_b.abs().sum() > 0  # trained: B left its zero initialisation


def test_embedded_default_keeps_its_random_base(tmp_path, cache, capsys):
    """`model: default` saves its random base beside the adapter, so that the adapter is usable."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    args = ["train", "--output-dir", str(tmp_path / "d"), "--set", "max_steps=1", "--set", "sequence_len=192",
            "--set", "dataset.max_train_samples=8", "--set", "dataset.max_eval_samples=2",
            "--set", "lora_target_modules=[q_proj]"]
    assert main(args) == 0
    assert "tokens/s" in capsys.readouterr().out
    adapter_cfg = json.loads((tmp_path / "d" / "adapter" / "adapter_config.json").read_text())
    base_dir = tmp_path / "d" / "base_model"
    assert adapter_cfg["base_model_name_or_path"] == str(base_dir.resolve())
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    assert base.config.vocab_size == 2048 and base.config.num_hidden_layers == 2
    PeftModel.from_pretrained(base, tmp_path / "d" / "adapter")


def test_train_without_packing(tmp_path, tiny_model_dir, cache):
    assert main(["train", _config(tmp_path, tiny_model_dir, sample_packing=False, max_steps=1, eval_steps=None,
                                  sequence_len=256), "--set", "dataset.eval_split=null"]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["eval"] == [] and 0 < metrics["train_tokens"] < 2 * 2 * 256  # padding is not counted


@pytest.mark.parametrize("args, expect", [
    (["train", "/nonexistent/cfg.yaml"], "does not exist"),
    (["train", "--set", "lerning_rate=1"], "did you mean 'learning_rate'"),
    (["train", "--set", "model=/nonexistent/model"], "model:"),
    (["info", "--arch", "sm_75"], "sm_75"),
])
def test_user_errors_exit_2_with_one_line(args, expect, capsys, tmp_path):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("surogate: error:") and expect in err and "Traceback" not in err
    assert not (tmp_path / "surogate-out").exists()


def test_print_config_shows_the_checked_default(capsys):
    assert main(["train", "--print-config", "--set", "max_steps=3"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["max_steps"] == 3 and cfg["model"] == "default" and cfg["recipe"] == "bf16"


@pytest.mark.parametrize("arch", ["sm_90", "sm_120", None])
def test_info_prints_every_recipe(arch, capsys):
    """The recipes table (kernel SASS checks are the info module's tests; --no-sass keeps this instant)."""
    from surogate import recipes

    assert main(["info", "--no-sass"] + (["--arch", arch] if arch else [])) == 0
    out = capsys.readouterr().out
    for name in recipes.names(include_aliases=False):
        assert name in out
    if arch:
        assert arch in out
