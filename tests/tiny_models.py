"""Tiny random Llama, Qwen3 and Qwen3-MoE folders saved with save_pretrained (no tokenizer: `surogate train` uses its
embedded default), and the small config that trains on them in seconds: what a user's own model looks like
to the CLI, without a download."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

MAX_POSITIONS = 256
TARGETS = ["q_proj", "v_proj", "down_proj"]


def save_tiny_model(path: Path, arch: str = "qwen3", seed: int = 0, **shape_overrides: int) -> Path:
    """A 1-layer, hidden-32 causal LM in bf16 with the default tokenizer's vocabulary, saved to `path`
    (`shape_overrides`, e.g. num_hidden_layers=2: another model of the same tokenizer)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config, Qwen3MoeConfig

    from surogate.training.tokenizer import DEFAULT_VOCAB_SIZE

    torch.manual_seed(seed)
    shape = {"vocab_size": DEFAULT_VOCAB_SIZE, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
             "max_position_embeddings": MAX_POSITIONS, "initializer_range": 0.1, **shape_overrides}
    if arch == "qwen3_moe":  # 4 experts of 16, top-2
        config = Qwen3MoeConfig(**shape, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    else:
        config = Qwen3Config(**shape) if arch == "qwen3" else LlamaConfig(**shape)
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its "Writing model shards" bar would land in tests' captured stderr
    try:
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(path)
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
    return path


def tiny_raw_config(model_dir: Path, output_dir: Path, **extra) -> dict:
    """A run of a few steps on the bundled GSM8K sample (sequence_len 192: shorter rows drop most examples)."""
    raw = {
        "model": str(model_dir), "recipe": "bf16", "sequence_len": 192, "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2, "learning_rate": 5e-3, "warmup_steps": 1, "lora_rank": 4,
        "lora_alpha": 8, "lora_target_modules": list(TARGETS),
        "dataset": {"max_train_samples": 16, "max_eval_samples": 4},
        "output_dir": str(output_dir), "max_steps": 3, "logging_steps": 1, "eval_steps": 2,
    }
    for key, value in extra.items():
        if key == "dataset":
            raw["dataset"] = {**raw["dataset"], **value}
        else:
            raw[key] = value
    return raw


def write_config(path: Path, raw: dict) -> str:
    path.write_text(yaml.safe_dump(raw))
    return str(path)
