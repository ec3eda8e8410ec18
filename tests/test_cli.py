"""The `surogate` CLI end to end on a very tiny config: train from a local model directory, merge, info, and
every user-fixable mistake answered with one line and exit status 2 (before the model loads)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import save_tiny_model, tiny_raw_config, write_config

from surogate.training.cli import main


@pytest.fixture()
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SUROGATE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "surogate-cache"))


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A random tiny Qwen3 saved with save_pretrained (no tokenizer: the default one is used)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), arch="llama")


def _config(tmp_path, model_dir, **extra) -> str:
    return write_config(tmp_path / "tiny.yaml", tiny_raw_config(model_dir, tmp_path / "out", **extra))


def test_train_from_local_model_dir_end_to_end(tmp_path, tiny_model_dir, cache, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert main(["train", _config(tmp_path, tiny_model_dir)]) == 0
    out, err = capsys.readouterr()
    assert "step 3/3" in err and "has no tokenizer" in err
    assert "step 1/3 | " in err and "first step" in err.split("step 1/3")[1].splitlines()[0]  # compile apart
    assert "tokens/s" in err.split("step 2/3")[1].splitlines()[0]
    # the time left at the mean steady step: from the second step on, none on the first (compile) or the last
    assert re.search(r"\| \d+s left$", err.split("step 2/3")[1].splitlines()[0])
    assert "left" not in err.split("step 1/3")[1].splitlines()[0] + err.split("step 3/3")[1].splitlines()[0]
    assert "adapter:" in out and "loss chart:" in out and "then" in out and "tokens/s" in out

    run = tmp_path / "out"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 3 and len(metrics["train"]) == 3
    steps = metrics["train"]
    assert metrics["train_tokens"] == sum(s["tokens"] for s in steps)  # the examples' tokens, padding not counted
    assert all(0 < s["tokens"] <= 2 * 2 * 192 for s in steps)  # accumulation x batch x sequence at most
    assert metrics["tokens_per_s"] > 0 and math.isfinite(metrics["final_train_loss"])
    assert metrics["first_step_s"] > 0
    assert [e["step"] for e in metrics["eval"]] == [0, 2, 3]  # before the first step, every eval_steps, the end
    # parameter counts: LoRA r=4 on q (32->32), v (32->16), down (64->32) of one layer; the base without LoRA
    assert metrics["parameters"]["trainable"] == 4 * ((32 + 32) + (32 + 16) + (64 + 32))
    base_numel = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    assert metrics["parameters"]["frozen"] == base_numel and metrics["parameters"]["frozen_bytes"] == 2 * base_numel
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
    assert "first step" in capsys.readouterr().out  # one step: no steady-state tokens/s to give
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


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("surogate: error: "), err
    return err


@pytest.fixture()
def no_model_load(monkeypatch):
    """Fail the test if the model's weights load: these errors must come before."""
    from surogate.training import setup

    def refuse(*args, **kwargs):
        raise AssertionError("the model loaded before the error")

    monkeypatch.setattr(setup, "load_base_model", refuse)


@pytest.mark.parametrize("extra, expect", [
    ({"lora_target_modules": ["q_proj", "q_porj"]},
     ("lora_target_modules: q_porj matches no linear layer of {model}; its linear layers: down_proj, gate_proj, "
      "k_proj, lm_head, o_proj, q_proj, up_proj, v_proj (or [all-linear])")),
    ({"sequence_len": 512}, "sequence_len: 512 is more than the model's max_position_embeddings (256)"),
    ({"eval_steps": 2, "dataset": {"eval_split": None}}, "eval_steps: set, but there is no eval split"),
])
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_model_mismatches_are_one_line_before_the_model_loads(extra, expect, arch, tiny_model_dir, tiny_llama_dir,
                                                              tmp_path, cache, no_model_load, capsys):
    model = tiny_model_dir if arch == "qwen3" else tiny_llama_dir
    assert main(["train", _config(tmp_path, model, **extra)]) == 2
    assert expect.format(model=model) in _one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_mlp_names_on_an_moe_model_say_where_its_experts_get_lora(tmp_path, cache, no_model_load, capsys):
    """A dense model's target list on Qwen3-MoE: gate/up/down_proj are no linear layers there (the experts are 3-D
    parameters); the error says that lora_target_parameters trains them and to leave the names out. A typo alone
    gets no such hint."""
    model = save_tiny_model(tmp_path / "moe", arch="qwen3_moe")
    dense = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert main(["train", _config(tmp_path, model, lora_target_modules=dense, lora_dropout=0.0)]) == 2
    error = _one_line_error(capsys)
    assert "gate_proj, up_proj, down_proj match no linear layer" in error
    assert ("lora_target_parameters (by default [experts.down_proj, experts.gate_up_proj], one pair per expert): "
            "leave those names out") in error
    assert main(["train", _config(tmp_path, model, lora_target_modules=["q_porj"], lora_dropout=0.0)]) == 2
    assert "lora_target_parameters" not in _one_line_error(capsys)


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen3"])
def test_a_wrong_expert_target_is_one_line_before_the_model_loads(arch, tmp_path, cache, no_model_load, capsys):
    """`lora_target_parameters` naming no parameter (the MoE's pieces, a dense model) gave compile's traceback after
    the model loaded; one line from the config now, with the names it has. A comma-separated string is a list."""
    model = save_tiny_model(tmp_path / arch, arch=arch)
    config = _config(tmp_path, model, lora_target_parameters="experts.gate_proj, experts.down_proj", lora_dropout=0.0)
    assert main(["train", config]) == 2
    error = _one_line_error(capsys).rstrip()
    assert error.startswith("surogate: error: ") and "lora_target_parameters: LoRA target_parameters " in error
    if arch == "qwen3_moe":
        assert "['experts.gate_proj'] match no parameter" in error
        assert error.endswith("set names from that list, or [] for no expert LoRA")
    else:
        assert error.endswith("none (not a mixture-of-experts model); leave it out")
    assert not (tmp_path / "out").exists()


def test_packing_on_a_model_whose_attention_cannot_keep_examples_apart_is_one_line(tmp_path, cache, no_model_load,
                                                                                    capsys):
    """Bloom keeps transformers' own attention masks and builds them without the row's position_ids (ALiBi), so
    packed examples would attend to each other: refused from the config, with what to set."""
    from transformers import BloomConfig

    from surogate.training.tokenizer import DEFAULT_VOCAB_SIZE

    model = tmp_path / "bloom"
    BloomConfig(vocab_size=DEFAULT_VOCAB_SIZE, hidden_size=32, n_layer=1, n_head=2).save_pretrained(model)
    assert main(["train", _config(tmp_path, model, lora_target_modules=["query_key_value"])]) == 2
    assert ("sample_packing: BloomForCausalLM keeps transformers' own attention masks, built without the row's "
            "position_ids" in _one_line_error(capsys))
    assert not (tmp_path / "out").exists()


def test_tokenizer_larger_than_the_embedding_is_one_line_before_the_data(tiny_model_dir, tmp_path, cache,
                                                                         no_model_load, monkeypatch, capsys):
    """A model whose vocab_size is below its tokenizer's length would index past its embedding: refused from
    the config, before the data is tokenized (not a traceback after)."""
    import json
    import shutil

    from surogate.training import data

    small = tmp_path / "small-vocab"
    shutil.copytree(tiny_model_dir, small)
    config = json.loads((small / "config.json").read_text())
    config["vocab_size"] = 1000  # the embedded default tokenizer has 2048
    (small / "config.json").write_text(json.dumps(config))

    def refuse(*args, **kwargs):
        raise AssertionError("the data loaded before the error")

    monkeypatch.setattr(data, "load_splits", refuse)
    assert main(["train", _config(tmp_path, small)]) == 2
    err = capsys.readouterr().err  # after the line saying the folder has no tokenizer
    assert "Traceback" not in err and err.splitlines()[-1].startswith("surogate: error: tokenizer: ")
    assert f"tokenizer: the embedded default ({small} has none) has 2048 tokens, but the model's embedding has " \
           "1000" in err


def test_output_dir_naming_a_file(tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    assert main(["train", "--output-dir", str(tmp_path / "taken")]) == 2
    err = _one_line_error(capsys)
    assert err.startswith("surogate: error: output_dir: ") and "is a file, not a folder" in err
    assert main(["train", "--output-dir", str(tmp_path / "taken" / "run")]) == 2
    assert "which is a file" in _one_line_error(capsys)


def test_mistyped_local_model_folder(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """A folder name without ./ looks like a hub id; a close local folder, or no hub to ask, says so."""
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "tiny-model")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--set", "model=tiny-modell"]) == 2
    assert "model: 'tiny-modell' is not a local folder (did you mean 'tiny-model'?); write ./tiny-modell" in \
        _one_line_error(capsys)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["train", "--set", "model=my-own-model"]) == 2
    err = _one_line_error(capsys)
    assert "'my-own-model' is not a local folder nor a cached hub model, and HF_HUB_OFFLINE is set (offline mode); " \
           "download it first (hf download my-own-model)" in err and "write ./" not in err
    assert main(["train", "--set", "model=tiny-model", "--set", "sequence_len=192", "--print-config"]) == 0


def test_hub_id_the_hub_does_not_give_is_one_line(tmp_path, monkeypatch, capsys):
    """Past the config check (a plausible hub id), the hub is asked for the model's config before anything loads."""
    import transformers

    def unreachable(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\n(88 more lines)")

    def not_there(*args, **kwargs):
        raise OSError("someone/some-model is not a valid model identifier listed on 'https://huggingface.co/models'")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", not_there)
    assert main(["train", "--set", "model=someone/some-model", "--output-dir", str(tmp_path / "o")]) == 2
    err = _one_line_error(capsys)
    assert "model: 'someone/some-model' is not a local folder, and the hub gave no config for it (someone/" in err
    # no network: the name may be right, so the line says what is missing rather than how to write a folder
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", unreachable)
    assert main(["train", "--set", "model=someone/some-model", "--output-dir", str(tmp_path / "o")]) == 2
    err = _one_line_error(capsys)
    assert "model: 'someone/some-model' is not a local folder nor a cached hub model, and the hub could not be " \
           "reached (no network, or offline mode); download it first (hf download someone/some-model)" in err
    assert "write ./" not in err
    assert not (tmp_path / "o").exists()


def test_report_to_tensorboard_without_the_package(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    assert main(["train", "--set", "report_to=tensorboard"]) == 2
    assert "report_to: tensorboard needs the tensorboard package: pip install tensorboard" in _one_line_error(capsys)


def _adapter(base_dir, out_dir):
    """A LoRA adapter with non-zero B (PEFT's own save), as a finished run leaves."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(out_dir)
    return model.base_model.model.model.layers[0].self_attn.q_proj


def test_merge_command(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    q = _adapter(tiny_model_dir, tmp_path / "adapter")
    assert main(["merge", str(tiny_model_dir), str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    assert "merged:" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    a, b = q.lora_A["default"].weight.float(), q.lora_B["default"].weight.float()
    expect = (q.base_layer.weight.float() + 2.0 * b @ a).to(torch.bfloat16)  # scale = alpha / r = 2
    assert merged.dtype == torch.bfloat16
    assert torch.equal(merged.model.layers[0].self_attn.q_proj.weight, expect)


@pytest.mark.parametrize("which, expect", [
    ("base", "BASE: "), ("adapter", "ADAPTER: "), ("out", "OUT: "),
])
def test_merge_errors_are_one_line(which, expect, tiny_model_dir, tmp_path, capsys):
    _adapter(tiny_model_dir, tmp_path / "adapter")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    args = {"base": str(tiny_model_dir), "adapter": str(tmp_path / "adapter"), "out": str(tmp_path / "merged")}
    args[which] = {"base": str(tmp_path / "no-base"), "adapter": str(tmp_path / "no-adapter"),
                   "out": str(tmp_path / "full")}[which]
    assert main(["merge", args["base"], args["adapter"], args["out"]]) == 2
    assert expect in _one_line_error(capsys)
    assert not (tmp_path / "merged").exists()


def test_print_config_shows_the_checked_default(capsys):
    assert main(["train", "--print-config", "--set", "max_steps=3"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["max_steps"] == 3 and cfg["model"] == "default" and cfg["recipe"] == "bf16"


def test_python_dash_m_surogate_runs_the_console_script():
    """`python -m surogate` (what `torchrun ... -m surogate train` starts on every rank) is the same main."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-m", "surogate", "train", "--print-config", "--set", "max_steps=3"],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout)["max_steps"] == 3


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


def test_info_says_how_several_processes_would_run(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["info", "--no-sass"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("distributed"))
    assert "not launched by torchrun (one process); backends: NCCL" in line and "gloo yes" in line
    assert "torchrun --nproc-per-node N -m surogate train cfg.yaml" in line
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(["info", "--no-sass"]) == 0
    assert "distributed   launched: rank 2 of 4 (local rank 0)" in capsys.readouterr().out


def test_info_shows_where_each_kernel_hands_over_to_cublas(capsys):
    """`surogate info` prints the kernel table's shape rules: on sm_90 the block-FP8 GEMMs go to cuBLASLt,
    on sm_89 they stay on the Triton kernel."""
    assert main(["info", "--no-sass", "--arch", "sm_90"]) == 0
    out = capsys.readouterr().out
    route = next(line for line in out.splitlines() if line.strip().startswith("lora_linear_fp8_block "))
    assert "cuBLASLt block-scaled FP8" in route
    assert main(["info", "--no-sass", "--arch", "sm_89"]) == 0
    out = capsys.readouterr().out
    route = next(line for line in out.splitlines() if line.strip().startswith("lora_linear_fp8_block "))
    assert "always this Triton kernel" in route


def test_train_a_moe_model_dir_trains_lora_on_every_expert(tmp_path, cache, capsys):
    """`surogate train` on a user's Qwen3-MoE folder: the experts get LoRA by default and run as grouped ops
    (qfp8: block-FP8 experts, FP8 compute), and the adapter PEFT writes holds each expert's factors."""
    model_dir = save_tiny_model(tmp_path / "moe", arch="qwen3_moe")
    raw = tiny_raw_config(model_dir, tmp_path / "out", recipe="qfp8", lora_target_modules=["q_proj", "v_proj"],
                          max_steps=2, eval_steps=2)
    assert main(["train", write_config(tmp_path / "moe.yaml", raw)]) == 0
    out, err = capsys.readouterr()
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    attention = 4 * ((32 + 32) + (32 + 16))
    experts = 4 * 4 * ((32 + 2 * 16) + (16 + 32))  # r x E x (gate_up: K + N, down: K + N)
    assert metrics["parameters"]["trainable"] == attention + experts
    assert math.isfinite(metrics["final_train_loss"])
    report = (tmp_path / "out" / "compile_report.txt").read_text()
    assert "experts: 1 MoE blocks run as grouped ops (SurogateExperts: weights fp8_block, fp8 MMAs" in report
    adapter_cfg = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter_cfg["target_parameters"]) == ["experts.down_proj", "experts.gate_up_proj"]


def test_git_commit_flags_files_that_differ_from_head(tmp_path, monkeypatch):
    """Benchmark results name their commit; "+modified" when tracked files differ from HEAD (uncommitted work,
    or a copied tree whose .git is behind, as on the GPU machine), $GIT_COMMIT wins, no repository: unknown."""
    from surogate.training.info import git_commit

    monkeypatch.delenv("GIT_COMMIT", raising=False)
    assert git_commit(str(tmp_path)) == "unknown"
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    (tmp_path / "a.py").write_text("x = 1\n")
    for args in (["init", "-q"], ["add", "a.py"], ["commit", "-qm", "one"]):
        subprocess.run(["git", *args], cwd=tmp_path, env=env, check=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True,
                          text=True).stdout.strip()
    assert git_commit(str(tmp_path)) == head
    (tmp_path / "untracked.txt").write_text("not part of the tree\n")
    assert git_commit(str(tmp_path)) == head
    (tmp_path / "a.py").write_text("x = 2\n")
    assert git_commit(str(tmp_path)) == f"{head}+modified"
    monkeypatch.setenv("GIT_COMMIT", "abc1234")
    assert git_commit(str(tmp_path)) == "abc1234"


def test_train_on_a_mix_of_datasets(tmp_path, tiny_model_dir, cache, capsys):
    """`dataset` as a list: an Alpaca file and a chat file (ChatML) trained on together, from the CLI."""
    examples = Path(__file__).parents[1] / "examples" / "data"
    mix = [{"path": str(examples / "alpaca.jsonl"), "val_set_size": 2},
           {"path": str(examples / "chat.jsonl"), "chat_template": "chatml"}]
    raw = tiny_raw_config(tiny_model_dir, tmp_path / "out", max_steps=2, sequence_len=256)
    raw["dataset"] = mix
    assert main(["train", write_config(tmp_path / "mix.yaml", raw)]) == 0
    err = capsys.readouterr().err
    data_line = next(line for line in err.splitlines() if line.startswith("data: ") and "train tokens" in line)
    assert f"({examples / 'alpaca.jsonl'}, {examples / 'chat.jsonl'})" in data_line and "1 eval row " in data_line
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and [e["step"] for e in metrics["eval"]] == [0, 2]


@pytest.mark.parametrize("seconds, text", [(0.4, "0s"), (44.6, "45s"), (59.6, "1m00s"), (200, "3m20s"),
                                           (3599, "59m59s"), (3600, "1h00m"), (7530, "2h05m"), (-3, "0s")])
def test_the_time_left_reads_as_a_person_writes_it(seconds, text):
    from surogate.training.outputs import duration

    assert duration(seconds) == text
