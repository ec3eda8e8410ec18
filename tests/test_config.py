"""`surogate train` configs: every bad key, value or path fails up front, naming the key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from surogate.compiler import DEFAULT_TARGETS
from surogate.training.config import (ConfigError, TrainConfig, dataset_sources, default_config_path, from_dict,
                                      load_config)


def _write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_default_config_loads_and_matches_dataclass_defaults_where_unset():
    cfg = load_config(None)
    assert cfg.model == "default" and cfg.recipe == "bf16"
    assert cfg.dataset.path is None and cfg.dataset.eval_split == "test"
    assert cfg.max_steps is not None  # the embedded run is bounded
    assert default_config_path().is_file()
    # The targets are the model's own, so that `--set model=...` works for any architecture (an explicit
    # list of the 7 projections refused Phi-3, whose q/k/v and gate/up are fused).
    assert "lora_target_modules" not in yaml.safe_load(default_config_path().read_text())
    assert cfg.lora_target_modules == list(DEFAULT_TARGETS)


def test_empty_mapping_gives_dataclass_defaults():
    assert from_dict({}) == TrainConfig()


@pytest.mark.parametrize("key, value, expect", [
    ("lerning_rate", 1e-3, "did you mean 'learning_rate'"),
    ("zzz", 1, "unknown key 'zzz'"),
])
def test_unknown_key_named_with_hint(key, value, expect):
    with pytest.raises(ConfigError, match=expect):
        from_dict({key: value})


def test_unknown_dataset_key_named():
    with pytest.raises(ConfigError, match=r"^unknown key 'dataset\.pth'; did you mean 'dataset\.path'\?$"):
        from_dict({"dataset": {"pth": "x"}})


@pytest.mark.parametrize("raw, key", [
    ({"learning_rate": "fast"}, "learning_rate"),
    ({"learning_rate": 0}, "learning_rate"),
    ({"learning_rate": float("nan")}, "learning_rate"),
    ({"sequence_len": 1}, "sequence_len"),
    ({"sequence_len": 12.5}, "sequence_len"),
    ({"per_device_train_batch_size": 0}, "per_device_train_batch_size"),
    ({"gradient_accumulation_steps": True}, "gradient_accumulation_steps"),
    ({"sample_packing": "yes"}, "sample_packing"),
    ({"lr_scheduler_type": "exponential"}, "lr_scheduler_type"),
    ({"lora_rank": -4}, "lora_rank"),
    ({"lora_dropout": 1.5}, "lora_dropout"),
    ({"lora_target_modules": []}, "lora_target_modules"),
    ({"recipe": "fp16"}, "recipe"),
    ({"arch": "sm_75"}, "arch"),
    ({"max_steps": 0}, "max_steps"),
    ({"num_epochs": 0}, "num_epochs"),
    ({"warmup_steps": -1}, "warmup_steps"),
    ({"eval_steps": 1.5}, "eval_steps"),
    ({"save_steps": 0}, "save_steps"),
    ({"logging_steps": -0.5}, "logging_steps"),
    ({"save_steps": True}, "save_steps"),
    ({"dataset": {"format": "alpacca"}}, "dataset.format"),
    ({"dataset": {"max_train_samples": 0}}, "dataset.max_train_samples"),
    ({"dataset": 5}, "dataset"),
])
def test_bad_value_names_the_key(raw, key):
    with pytest.raises(ConfigError, match=rf"^{key}\b"):
        from_dict(raw)


def test_step_intervals_take_hugging_faces_ratios():
    """Below 1 an interval is a ratio of the run's steps (HF's Trainer), rounded up once the total is known;
    a whole float is a step count."""
    from surogate.training.config import every_steps

    cfg = from_dict({"eval_steps": 0.25, "save_steps": 2.0, "logging_steps": 0.1})
    assert (cfg.eval_steps, cfg.save_steps, cfg.logging_steps) == (0.25, 2, 0.1)
    assert type(cfg.save_steps) is int
    assert [every_steps(v, 10) for v in (0.25, 2, 0.1, 0.01)] == [3, 2, 1, 1]


def test_yaml_scientific_notation_without_dot_is_a_number(tmp_path):
    # PyYAML reads "2e-4" as a string; the config must still take it as 2e-4.
    p = tmp_path / "c.yaml"
    p.write_text("learning_rate: 2e-4\nlora_alpha: 16\n")
    cfg = load_config(p)
    assert cfg.learning_rate == pytest.approx(2e-4) and cfg.lora_alpha == 16.0


def test_missing_model_dir_named(tmp_path):
    with pytest.raises(ConfigError, match=r"^model: .*not a directory"):
        from_dict({"model": str(tmp_path / "nope")})


def test_model_dir_without_config_json(tmp_path):
    with pytest.raises(ConfigError, match=r"^model: .*config\.json"):
        from_dict({"model": str(tmp_path)})


def test_hub_id_accepted_without_network(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert from_dict({"model": "Qwen/Qwen3-0.6B"}).model == "Qwen/Qwen3-0.6B"


def test_missing_dataset_dir_and_split(tmp_path):
    with pytest.raises(ConfigError, match=r"^dataset\.path"):
        from_dict({"dataset": {"path": str(tmp_path / "missing")}})
    (tmp_path / "train.jsonl").write_text('{"text": "hi"}\n')
    with pytest.raises(ConfigError, match=r"^dataset\.eval_split: .*test\.jsonl does not exist"):
        from_dict({"dataset": {"path": str(tmp_path), "format": "text"}})
    cfg = from_dict({"dataset": {"path": str(tmp_path), "format": "text", "eval_split": None}})
    assert cfg.dataset.eval_split is None


@pytest.mark.parametrize("name", ["validation", "val"])
def test_a_folder_without_test_evaluates_on_its_validation_split(tmp_path, name):
    """eval_split left at its default "test": a folder of train/validation files evaluates on validation; one
    set explicitly is taken as written."""
    (tmp_path / "train.jsonl").write_text('{"text": "hi"}\n')
    (tmp_path / f"{name}.jsonl").write_text('{"text": "ho"}\n')
    assert from_dict({"dataset": {"path": str(tmp_path)}}).dataset.eval_split == name
    with pytest.raises(ConfigError, match=r"^dataset\.eval_split: .*test\.jsonl does not exist \(nor test\.json, "
                                          r"test\.parquet, test\.csv, test\.tsv\); "
                                          rf"the folder's splits: train, {name}; set eval_split: null"):
        from_dict({"dataset": {"path": str(tmp_path), "eval_split": "test"}})
    # a mistyped train split names the folder's files too (was datasets' load_dataset error where it is installed)
    with pytest.raises(ConfigError, match=r"^dataset\.train_split: .*training\.jsonl does not exist \(nor "
                                          rf"training\.json, .*\); the folder's splits: train, {name}$"):
        from_dict({"dataset": {"path": str(tmp_path), "train_split": "training"}})
    (tmp_path / "test.jsonl").write_text('{"text": "hu"}\n')
    assert from_dict({"dataset": {"path": str(tmp_path)}}).dataset.eval_split == "test"  # test first, as ever


def test_an_error_from_a_set_value_does_not_name_the_file(tmp_path):
    """A dataset path from --set without a test split: the file did not write eval_split nor the path, so
    the error is not prefixed with the file's name; with the path in the file, it is."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"text": "hi"}\n')
    p = _write(tmp_path, {"max_steps": 5})
    with pytest.raises(ConfigError, match=r"^dataset\.eval_split: .*test\.jsonl does not exist \(nor test\.json, "
                                          r"test\.parquet, test\.csv, test\.tsv, nor a validation or val split\)"):
        load_config(p, [f"dataset.path={tmp_path / 'data'}"])
    p = _write(tmp_path, {"dataset": {"path": str(tmp_path / "data")}})
    with pytest.raises(ConfigError, match=r"cfg\.yaml: dataset\.eval_split: .*test\.jsonl does not exist"):
        load_config(p, ["max_steps=3"])


def test_tokenizer_with_default_model_refused():
    with pytest.raises(ConfigError, match=r"^tokenizer"):
        from_dict({"tokenizer": "Qwen/Qwen3-0.6B"})


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")


def test_errors_carry_the_file_name(tmp_path):
    p = _write(tmp_path, {"lora_rank": "sixteen"})
    with pytest.raises(ConfigError, match=r"cfg\.yaml: lora_rank"):
        load_config(p)


def test_a_yaml_syntax_error_names_its_line_and_column(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("recipe: bf16\nmodel: a: b\n")  # an unquoted ': ' inside a value
    with pytest.raises(ConfigError, match=r"bad\.yaml:2:9: not valid YAML: mapping values are not allowed here "
                                          r"\(a value with ': ' or '#' in it needs quotes\)$"):
        load_config(p)


def test_targets_written_as_one_comma_separated_string_are_a_list():
    """`lora_target_modules: q_proj, v_proj` is one YAML string: it matched no layer, and the error listed both
    names among the model's layers."""
    cfg = from_dict({"lora_target_modules": "q_proj, v_proj", "lora_dropout": 0.0,
                     "lora_target_parameters": "experts.down_proj"})
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]
    assert cfg.lora_target_parameters == ["experts.down_proj"]
    with pytest.raises(ConfigError, match=r"^lora_target_modules: expected a non-empty list"):
        from_dict({"lora_target_modules": "q_proj,,v_proj"})


def test_non_mapping_yaml(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)


def test_overrides_apply_and_are_checked(tmp_path):
    p = _write(tmp_path, {"max_steps": 5})
    cfg = load_config(p, ["max_steps=7", "dataset.max_train_samples=10", "recipe=qbnb"])
    assert cfg.max_steps == 7 and cfg.dataset.max_train_samples == 10 and cfg.recipe == "qnf4"
    with pytest.raises(ConfigError, match="key=value"):
        load_config(p, ["max_steps"])
    with pytest.raises(ConfigError, match=r"max_stepz.*did you mean 'max_steps'"):
        load_config(p, ["max_stepz=3"])


def test_set_values_yaml_would_not_take_as_written_are_strings_and_dataset_keys_name_the_key(tmp_path):
    """A Jinja chat_template is not valid YAML (was a yaml ScannerError traceback) and `out/run #2` would lose
    its `#2` as a YAML comment: both are taken as written. An unknown or bad dataset key from --set is named
    as --set wrote it, not blamed on the config file the user did not edit."""
    p = _write(tmp_path, {"max_steps": 5})
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    cfg = load_config(p, [f"dataset.chat_template={template}", "output_dir=out/run #2", "max_steps=7"])
    assert cfg.dataset.chat_template == template and cfg.output_dir == "out/run #2" and cfg.max_steps == 7
    for override, message in (("dataset.formatt=x",
                               r"^unknown key 'dataset\.formatt'; did you mean 'dataset\.format'\?$"),
                              ("dataset.format=alpacaa", r"^dataset\.format: 'alpacaa' is not one of")):
        with pytest.raises(ConfigError, match=message):
            load_config(p, [override])


def test_lora_alpha_zero_is_refused(tmp_path):
    """lora_alpha 0 makes the LoRA scale 0: a run that trains nothing (the eval loss never moved); one line."""
    with pytest.raises(ConfigError, match=r"cfg\.yaml: lora_alpha: must be > 0 \(the LoRA scale"):
        load_config(_write(tmp_path, {"lora_alpha": 0}))
    assert load_config(_write(tmp_path, {"lora_alpha": 0.5})).lora_alpha == 0.5


def test_example_configs_are_valid(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # hub ids are plausible names, not looked up
    configs = sorted((Path(__file__).parents[1] / "examples" / "configs").glob("*.yaml"))
    assert configs, "examples/configs/ has no YAML"
    for path in configs:
        load_config(path)  # hub ids are not looked up: checking needs no network


# --- trainer keys: checkpoints, logging, eval, output_dir, model names ---------------------------------

@pytest.mark.parametrize("raw, key", [
    ({"save_steps": 0}, "save_steps"),
    ({"save_total_limit": 0}, "save_total_limit"),
    ({"eval_on_start": "yes"}, "eval_on_start"),
    ({"recompute_producers": "sometimes"}, "recompute_producers"),
    ({"save_fp8_inputs": "yes"}, "save_fp8_inputs"),
    ({"report_to": "wandb"}, "report_to"),
    ({"report_to": 3}, "report_to"),
    ({"resume_from_checkpoint": 5}, "resume_from_checkpoint"),
])
def test_bad_trainer_value_names_the_key(raw, key):
    with pytest.raises(ConfigError, match=rf"^{key}\b"):
        from_dict(raw)


def test_trainer_keys_accepted():
    cfg = from_dict({"save_steps": 50, "save_total_limit": 2, "report_to": "none", "eval_on_start": False})
    assert (cfg.save_steps, cfg.save_total_limit, cfg.report_to, cfg.eval_on_start) == (50, 2, [], False)
    assert from_dict({"report_to": ["tensorboard"]}).report_to == ["tensorboard"]  # installed by the test extra


def test_memory_keys_reach_surogate_compile(monkeypatch):
    """gradient_checkpointing and recompute_producers become surogate.compile's checkpoint= and
    recompute_producers= (the trainer's one integration point, setup.compile_model)."""
    import surogate.compiler
    from surogate.training import setup

    seen = {}
    monkeypatch.setattr(surogate.compiler, "compile", lambda model, **kw: seen.update(kw) or model)
    monkeypatch.setattr(setup, "lora_config", lambda cfg, model: None)
    setup.compile_model(object(), from_dict({}))
    assert seen["recompute_producers"] == "auto" and seen["checkpoint"] is False  # the defaults
    assert seen["save_fp8_inputs"] is False
    setup.compile_model(object(), from_dict({"save_fp8_inputs": True}))
    assert seen["save_fp8_inputs"] is True
    setup.compile_model(object(), from_dict({"gradient_checkpointing": True, "recompute_producers": False}))
    assert seen["recompute_producers"] is False and seen["checkpoint"] is True
    setup.compile_model(object(), from_dict({"recompute_producers": True}))
    assert seen["recompute_producers"] is True
    # Padded batches vary in length, and "auto" weighs the first batch: rebuilt, whatever the memory.
    setup.compile_model(object(), from_dict({"sample_packing": False}))
    assert seen["recompute_producers"] is True
    setup.compile_model(object(), from_dict({"gradient_checkpointing": "offload"}))
    assert seen["checkpoint"] == "offload" and seen["checkpoint_fraction"] == 1.0  # the default: every block
    setup.compile_model(object(), from_dict({"gradient_checkpointing": True, "gradient_checkpointing_fraction": 0.67}))
    assert seen["checkpoint"] is True and seen["checkpoint_fraction"] == 0.67


@pytest.mark.parametrize("value", ["yes", "true", 1, None])
def test_gradient_checkpointing_takes_true_false_or_offload(value):
    with pytest.raises(ConfigError, match=r"^gradient_checkpointing: expected true, false or offload, got"):
        from_dict({"gradient_checkpointing": value})


@pytest.mark.parametrize("value, expect", [
    (0, r"must be > 0"), (-0.5, r"must be > 0"), (1.5, r"must be <= 1.0"), ("most", r"expected a number"),
    (True, r"expected a finite number"), (None, r"expected a finite number"),
])
def test_gradient_checkpointing_fraction_takes_a_share_of_the_blocks(value, expect):
    with pytest.raises(ConfigError, match=rf"^gradient_checkpointing_fraction: {expect}"):
        from_dict({"gradient_checkpointing": True, "gradient_checkpointing_fraction": value})


def test_gradient_checkpointing_fraction_needs_checkpointing_on():
    with pytest.raises(ConfigError, match=r"^gradient_checkpointing_fraction: 0.5 needs gradient_checkpointing: true "
                                          r"or offload"):
        from_dict({"gradient_checkpointing_fraction": 0.5})
    assert from_dict({"gradient_checkpointing_fraction": 1}).gradient_checkpointing_fraction == 1.0
    assert from_dict({"gradient_checkpointing": "offload",
                      "gradient_checkpointing_fraction": "0.75"}).gradient_checkpointing_fraction == 0.75


@pytest.mark.parametrize("raw, expect", [
    ({"parallelism": "tp"}, r"^parallelism: 'tp' is not one of ddp, fsdp"),
    ({"fsdp_lora": "offloaded"}, r"^fsdp_lora: 'offloaded' is not one of replicated, sharded"),
    ({"fsdp_lora": "sharded"}, r"^fsdp_lora: sharded needs parallelism: fsdp"),
    ({"parallelism": "fsdp", "cuda_graphs": True}, r"^cuda_graphs: true cannot run with parallelism: fsdp"),
])
def test_parallelism_keys_checked(raw, expect):
    with pytest.raises(ConfigError, match=expect):
        from_dict(raw)


def test_parallelism_keys_accepted():
    assert (from_dict({}).parallelism, from_dict({}).fsdp_lora) == ("ddp", "replicated")
    cfg = from_dict({"parallelism": "fsdp", "fsdp_lora": "sharded", "cuda_graphs": "auto"})
    assert (cfg.parallelism, cfg.fsdp_lora) == ("fsdp", "sharded")


def test_eval_steps_needs_an_eval_split():
    with pytest.raises(ConfigError, match=r"^eval_steps: set, but there is no eval split"):
        from_dict({"eval_steps": 10, "dataset": {"eval_split": None}})
    assert from_dict({"eval_steps": 10}).eval_steps == 10  # the bundled sample's test split
    assert from_dict({"eval_steps": 10, "dataset": {"val_set_size": 0.1}}).eval_steps == 10  # held-out train


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match=r"^output_dir: .* is a file, not a folder"):
        from_dict({"output_dir": str(tmp_path / "f")})
    with pytest.raises(ConfigError, match=r"^output_dir: .* is inside .*, which is a file"):
        from_dict({"output_dir": str(tmp_path / "f" / "run")})
    assert from_dict({"output_dir": str(tmp_path / "new" / "run")}).output_dir.endswith("run")


def test_model_name_that_is_a_mistyped_folder(tmp_path, monkeypatch):
    (tmp_path / "models" / "tiny-llama").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with pytest.raises(ConfigError, match=r"^model: 'models/tiny-lama' is not a local folder \(did you mean "
                                          r"'models/tiny-llama'\?\); write ./models/tiny-lama for a local folder"):
        from_dict({"model": "models/tiny-lama"})
    with pytest.raises(ConfigError, match=r"models/ is a local folder without zzz"):
        from_dict({"model": "models/zzz"})
    assert from_dict({"model": "Qwen/Qwen3-0.6B"}).model == "Qwen/Qwen3-0.6B"  # not checked against the hub here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # and no cached hub model of that name
    with pytest.raises(ConfigError, match=r"^model: 'nobody-xyz/no-model' is not a local folder nor a cached hub "
                                          r"model, and HF_HUB_OFFLINE is set \(offline mode\); download it first"):
        from_dict({"model": "nobody-xyz/no-model"})


@pytest.mark.parametrize("key, value", [("train_on_inputs", True), ("chat_template", "chatml"), ("val_set_size", 0.1)])
def test_a_dataset_key_at_the_top_level_points_under_dataset(key, value):
    """Axolotl writes these at the top level (they got no hint, or "did you mean 'eval_steps'?")."""
    with pytest.raises(ConfigError, match=rf"^unknown key '{key}'; it belongs under dataset: write dataset\.{key}"):
        from_dict({key: value})


@pytest.mark.parametrize("raw, expect", [
    ({"max_seq_length": 512}, r"^unknown key 'max_seq_length'; write sequence_len$"),  # TRL: no hint before
    ({"max_length": 512}, r"^unknown key 'max_length'; write sequence_len$"),
    ({"adapter": "qlora"}, r"^unknown key 'adapter'; surogate always trains a LoRA adapter: drop it; for QLoRA set "
                           r"recipe: qnf4"),
    ({"load_in_4bit": True}, r"^unknown key 'load_in_4bit'; write recipe: qnf4"),
    ({"deepspeed": "ds.json"}, r"^unknown key 'deepspeed'; run under torchrun with parallelism"),  # was: 'seed'?
    ({"warmup_ratio": 0.1}, r"^unknown key 'warmup_ratio'; write warmup_steps: <the ratio> \(below 1 it is a ratio of "
                            r"the run's steps, as Hugging Face's\)$"),
    ({"lora_target_linear": True}, r"^unknown key 'lora_target_linear'; write lora_target_modules: all-linear$"),
    ({"dataset": {"type": "alpaca"}}, r"^unknown key 'dataset\.type'; write dataset\.format: alpaca, messages"),
    ({"dataset": [{"type": "alpaca"}]}, r"^unknown key 'dataset\[0\]\.type'; write dataset\[0\]\.format"),
    ({"chat_template_jinja": "{{ x }}"}, r"^unknown key 'chat_template_jinja'; write dataset\.chat_template: "),
    ({"dataset": {"chat_template": "tokenizer_default"}}, r"^dataset\.chat_template: tokenizer_default is Axolotl's "
                                                          r"name for the tokenizer's own template; drop the key"),
    ({"dataset": {"chat_template": "llama3"}}, r"^dataset\.chat_template: 'llama3' is Axolotl's name for a model "
                                               r"family's template; the model's tokenizer carries its own: drop the"),
    ({"dataset": {"chat_template": "jinja"}}, r"^dataset\.chat_template: jinja is Axolotl's pointer to "
                                              r"chat_template_jinja; write the Jinja string itself"),
    ({"lr_scheduler_type": "constant_with_warmup"}, r"^lr_scheduler_type: constant_with_warmup is constant here "
                                                     r"\(it warms up over warmup_steps\); write constant$"),
    ({"max_steps": -1}, r"^max_steps: -1 is Hugging Face's 'not set'; write null or drop the key \(num_epochs "
                        r"decides\)$"),
    ({"dataset": [{}, {"field_messages": "chat"}]}, r"^unknown key 'dataset\[1\]\.field_messages'; write "
                                                   r"dataset\[1\]\.columns: \{<your field>: messages\}$"),
    ({"truncation_mode": "keep_end"}, r"^unknown key 'truncation_mode'; an example longer than sequence_len keeps its "
                                      r"first sequence_len tokens \(TRL's keep_start; keep_end is not supported\): "
                                      r"drop it, or write excess_length_strategy: drop or raise$"),
    ({"excess_length_strategy": "keep_end"}, r"^excess_length_strategy: 'keep_end' is not one of truncate, drop, "
                                             r"raise$"),
    ({"load_best_model_at_end": True}, r"^unknown key 'load_best_model_at_end'; not supported: .* metrics\.jsonl gives "
                                       r"each checkpoint-<step>'s eval loss to pick the best by: drop it$"),
    ({"train_on_eos": "turn"}, r"^unknown key 'train_on_eos'; a dataset key: each assistant turn's end-of-turn text "
                               r"is trained"),  # Axolotl writes it at the top level too: it listed every key
    ({"cosine_min_lr_ratio": 0.1}, r"^unknown key 'cosine_min_lr_ratio'; not supported: lr_scheduler_type is one of "
                                   r"linear, cosine, constant: drop it$"),
    ({"lr_scheduler_kwargs": {}}, r"^unknown key 'lr_scheduler_kwargs'; not supported: write lr_scheduler_type "
                                  r"\(linear, cosine, constant\) and warmup_steps: drop it$"),
])
def test_another_trainers_key_says_what_to_write(raw, expect):
    """Axolotl's, TRL's and Unsloth's names got no hint (max_seq_length, adapter, dataset.type) or a wrong one
    (deepspeed: "did you mean 'seed'?")."""
    with pytest.raises(ConfigError, match=expect):
        from_dict(raw)


def test_several_unknown_keys_are_all_named_each_with_what_to_write():
    """An Axolotl config has a dozen keys to change: the error named one a run, then named the others without
    their answers (a run each to learn them)."""
    with pytest.raises(ConfigError) as e:
        from_dict({"adapter": "lora", "lora_r": 8, "base_model": "x", "zzz": 1, "seed": 1, "local_rank": 0})
    lines = str(e.value).splitlines()
    assert lines[0] == "5 unknown keys, each with what to write:"
    assert lines[1].startswith("  adapter: surogate always trains a LoRA adapter: drop it")
    assert lines[2:6] == ["  base_model: write model: (a local Hugging Face folder or a hub id)",
                          "  local_rank: torchrun gives each process its rank: drop it",  # was "did you mean lora_rank"
                          "  lora_r: write lora_rank", "  zzz: not a key here"]
    assert lines[6].startswith("  (valid keys: model, tokenizer, ") and len(lines) == 7
    with pytest.raises(ConfigError, match=r"^2 unknown keys, each with what to write:\n  dataset\.path_: did you mean "
                                          r"'dataset\.path'\?\n  dataset\.type: write dataset\.format"):
        from_dict({"dataset": {"type": "alpaca", "path_": "x"}})


def test_foreign_key_hints_name_real_keys():
    """A hint's `write <key>` names a key surogate has, and no foreign name shadows one of surogate's."""
    import dataclasses
    import re

    from surogate.training.config import DATASET_FOREIGN_KEYS, FOREIGN_KEYS, DatasetConfig

    top = {f.name for f in dataclasses.fields(TrainConfig)}
    ds = {f"dataset.{f.name}" for f in dataclasses.fields(DatasetConfig)}
    assert not (set(FOREIGN_KEYS) & top) and not ({f"dataset.{k}" for k in DATASET_FOREIGN_KEYS} & ds)
    for hint in [*FOREIGN_KEYS.values(), *DATASET_FOREIGN_KEYS.values()]:
        for key in re.findall(r"(?:write|set) ([\w.]+)", hint):
            assert key in top | ds, (key, hint)


def test_a_key_set_twice_in_the_yaml_is_an_error_with_its_lines(tmp_path):
    """YAML keeps the last of two equal keys silently; the config names both lines."""
    p = tmp_path / "cfg.yaml"
    p.write_text("max_steps: 5\nlearning_rate: 1.0e-3\ndataset:\n  format: text\n  format: alpaca\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml:5: key 'format' is set twice \(first on line 4\); keep one$"):
        load_config(p)
    p.write_text("base: &b {max_steps: 5}\n<<: *b\nlearning_rate: 1.0e-3\n")  # a merge key may override: not an error
    with pytest.raises(ConfigError, match="unknown key 'base'"):
        load_config(p)


@pytest.mark.parametrize("raw, expect", [
    ({"adam_beta2": 1}, r"^adam_beta2: must be < 1, got 1 \(the usual values: adam_beta1 0\.9, adam_beta2 0\.999 or "
                        r"0\.95\)$"),
    ({"adam_beta1": -0.1}, r"^adam_beta1: must be >= 0\.0, got -0\.1$"),
    ({"adam_beta1": 1.5}, r"^adam_beta1: must be <= 1\.0, got 1\.5$"),
    ({"adam_epsilon": 0}, r"^adam_epsilon: must be > 0, got 0$"),
    ({"adam_epsilon": "tiny"}, r"^adam_epsilon: expected a number, got 'tiny'$"),
])
def test_adam_keys_out_of_range_say_so(raw, expect):
    with pytest.raises(ConfigError, match=expect):
        from_dict(raw)


def test_adam_keys_are_hugging_faces_defaults_and_take_yaml_strings():
    assert [getattr(from_dict({}), k) for k in ("adam_beta1", "adam_beta2", "adam_epsilon")] == [0.9, 0.999, 1e-8]
    cfg = from_dict({"adam_beta1": 0, "adam_beta2": 0.95, "adam_epsilon": "1e-6"})  # YAML 1.1 reads 1e-6 as a string
    assert (cfg.adam_beta1, cfg.adam_beta2, cfg.adam_epsilon) == (0.0, 0.95, 1e-6)


@pytest.mark.parametrize("value", [0, -1e-3])
def test_learning_rate_must_be_positive_says_so(value):
    with pytest.raises(ConfigError, match=rf"^learning_rate: must be > 0, got {value}$"):
        from_dict({"learning_rate": value})


# --- a mix of datasets ---------------------------------------------------------------------------------

def test_dataset_list_is_a_mix_whose_errors_name_the_source(tmp_path):
    """`dataset` as a list of sources (a mix): each checked as `dataset` is, its errors naming `dataset[n]`; a
    list of one is one source; Axolotl's `datasets` key says what to write."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"text": "x"}\n')
    b.write_text('{"text": "y"}\n')
    cfg = from_dict({"dataset": [{"path": str(a)}, {"path": str(b), "format": "text", "val_set_size": 0.5}]})
    assert [d.path for d in dataset_sources(cfg)] == [str(a), str(b)] and cfg.dataset[1].val_set_size == 0.5
    one = from_dict({"dataset": [{"path": str(a)}]})
    assert one.dataset.path == str(a) and dataset_sources(one) == [one.dataset]
    for raw, expect in [
        ([{"path": str(a)}, {"path": str(b), "fromat": "text"}], r"^unknown key 'dataset\[1\]\.fromat'; did you mean "
                                                                  r"'dataset\[1\]\.format'\?"),
        ([{"path": str(a)}, {"path": str(tmp_path / "c.jsonl")}], r"^dataset\[1\]\.path: .*c\.jsonl' does not exist"),
        ([{"path": str(a)}, {"path": str(b), "eval_split": "test"}], r"^dataset\[1\]\.eval_split: dataset\[1\]\.path "
                                                                      r"is one file"),
        ([str(a), 3], r"^dataset\[1\]: expected a mapping"),
        ([], r"^dataset: an empty list"),
    ]:
        with pytest.raises(ConfigError, match=expect):
            from_dict({"dataset": raw})
    with pytest.raises(ConfigError, match=r"^unknown key 'datasets'; write dataset: a mapping for one source, or a "
                                          r"list of them for a mix"):
        from_dict({"datasets": [{"path": str(a)}]})


def test_a_mix_evaluates_on_the_sources_that_have_an_eval_split(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_text('{"text": "x"}\n{"text": "y"}\n')
    from_dict({"eval_steps": 5, "dataset": [{"path": str(a)}, {"path": str(a), "val_set_size": 1}]})
    with pytest.raises(ConfigError, match=r"^eval_steps: set, but there is no eval split"):
        from_dict({"eval_steps": 5, "dataset": [{"path": str(a)}, {"path": str(a)}]})


def test_set_into_a_listed_dataset_says_where_to_write_it(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_text('{"text": "x"}\n')
    path = _write(tmp_path, {"dataset": [{"path": str(a)}, {"path": str(a)}]})
    assert len(load_config(path).dataset) == 2
    with pytest.raises(ConfigError, match=r"^--set dataset\.max_train_samples: .*cfg\.yaml's dataset is a list of "
                                          r"sources; set max_train_samples in the file, under the source"):
        load_config(path, ["dataset.max_train_samples=3"])


def test_checking_a_config_imports_no_torch():
    """`surogate train --print-config` and a config error come before any heavy import: the config module took
    DEFAULT_TARGETS from surogate.compiler, which imports torch, dynamo and bitsandbytes (7.5 s on 2 cores)."""
    code = ("import sys; from surogate.training.config import load_config; load_config(None); "
            "print(sorted(m for m in ('torch', 'transformers', 'bitsandbytes', 'surogate.compiler') "
            "if m in sys.modules))")
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.stdout.strip() == "[]"
