"""Checkpoints, resume, Ctrl-C and the per-step logs of `surogate train`, on the CPU reference backend.

The resume test is exact: a run interrupted after step k and resumed from its checkpoint logs the same
losses (==, not approximately) and ends with the same adapter (torch.equal) as a run that never stopped,
across an epoch boundary, with gradient accumulation and LoRA dropout (so the RNG states matter).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import save_tiny_model, tiny_raw_config, write_config

from surogate.training import checkpoint
from surogate.training.config import ConfigError, from_dict
from surogate.training.train import train


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SUROGATE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "surogate-cache"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen3"))


def _quiet(line: str) -> None:
    pass


def _cfg(model_dir: Path, out: Path, **extra):
    return from_dict(tiny_raw_config(model_dir, out, **extra))


# 8 examples -> 7 packed rows of 192 (one prompt does not fit) -> 3 micro-batches of 2 an epoch: 4 steps of 2
# micro-batches cross two epoch boundaries, and the interrupt after step 2 falls inside the second epoch.
RESUME = {"max_steps": 4, "eval_steps": None, "lora_dropout": 0.1,
          "dataset": {"max_train_samples": 8, "eval_split": None}}


def _stop_at(step: int):
    def hook(record: dict) -> None:
        if record["step"] == step:
            raise KeyboardInterrupt

    return hook


def test_interrupted_then_resumed_run_equals_an_uninterrupted_one(model_dir, tmp_path):
    straight = train(_cfg(model_dir, tmp_path / "straight", **RESUME), log=_quiet)

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(model_dir, tmp_path / "cut", **RESUME), log=_quiet, on_step=_stop_at(2))
    assert [step for step, _ in checkpoint.list_checkpoints(tmp_path / "cut")] == [2]
    state = checkpoint.read_state(tmp_path / "cut" / "checkpoint-2")
    assert state["global_step"] == 2 and state["micro_batches_per_epoch"] == 3
    assert (state["epoch"], state["micro_batch"]) == (1, 1)  # 4 micro-batches taken: 3 of epoch 0, 1 of epoch 1

    resumed = train(_cfg(model_dir, tmp_path / "cut", **RESUME, resume_from_checkpoint=True), log=_quiet)
    assert resumed.resumed_from == tmp_path / "cut" / "checkpoint-2"
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4]
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    assert [h["lr"] for h in resumed.history] == [h["lr"] for h in straight.history]
    assert resumed.train_tokens == straight.train_tokens
    a = load_file(straight.adapter_dir / "adapter_model.safetensors")
    b = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # metrics.jsonl lists every step once: the resumed run rewrote it from the checkpoint's log
    lines = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    elapsed = [r["elapsed_s"] for r in lines]
    assert elapsed == sorted(elapsed)  # the resumed run's clock goes on from the checkpoint's (it restarted at 0)


def test_a_resume_with_more_steps_follows_the_new_schedule_from_its_first_step(model_dir, tmp_path):
    """A 2-step run (its schedule decays to 0 at step 2) resumed with max_steps 4: steps 3 and 4 take the
    learning rates of a straight 4-step run; the optimizer state's saved rate (the old schedule's) is not
    used for step 3. Resuming it with fewer steps than it has done is refused, and its outputs stay."""
    extra = {"eval_steps": None, "lr_scheduler_type": "linear", "warmup_steps": 0, "save_steps": 2,
             "dataset": {"max_train_samples": 8, "eval_split": None}}
    straight = train(_cfg(model_dir, tmp_path / "straight", max_steps=4, **extra), log=_quiet)
    short = train(_cfg(model_dir, tmp_path / "grow", max_steps=2, **extra), log=_quiet)
    assert [step for step, _ in checkpoint.list_checkpoints(tmp_path / "grow")] == [2]
    grown = train(_cfg(model_dir, tmp_path / "grow", max_steps=4, resume_from_checkpoint=True, **extra), log=_quiet)
    lrs = [h["lr"] for h in straight.history]
    assert lrs[2] > 0 and [h["lr"] for h in grown.history][2:] == lrs[2:]
    adapter = (grown.adapter_dir / "adapter_model.safetensors").read_bytes()
    metrics = (tmp_path / "grow" / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="is at step 4, past this run's 3 steps; set max_steps"):
        train(_cfg(model_dir, tmp_path / "grow", max_steps=3, resume_from_checkpoint=True, **extra), log=_quiet)
    assert short.adapter_dir == grown.adapter_dir
    assert (grown.adapter_dir / "adapter_model.safetensors").read_bytes() == adapter  # the 4 steps' adapter, kept
    assert (tmp_path / "grow" / "metrics.jsonl").read_text() == metrics


def test_the_last_step_is_checkpointed_so_a_finished_run_can_be_extended(model_dir, tmp_path):
    """save_steps 2 over 3 steps: checkpoint-3 too (as HF's Trainer), else more max_steps could not go on from
    step 3."""
    out = tmp_path / "run"
    extra = {"eval_steps": None, "save_steps": 2, "dataset": {"eval_split": None}}
    train(_cfg(model_dir, out, max_steps=3, **extra), log=_quiet)
    assert [step for step, _ in checkpoint.list_checkpoints(out)] == [2, 3]
    lines: list[str] = []
    train(_cfg(model_dir, out, max_steps=4, resume_from_checkpoint=True, **extra), log=lines.append)
    assert any(line.startswith(f"resumed from {out / 'checkpoint-3'}: step 3 of 4 done") for line in lines)


def test_the_log_says_how_many_rows_an_epoch_leaves_out(model_dir, tmp_path):
    """8 examples -> 7 packed rows -> 3 micro-batches of 2 an epoch: 1 row waits for the next epoch's shuffle,
    and the log says so (it was left out without a word)."""
    lines: list[str] = []
    result = train(_cfg(model_dir, tmp_path / "run", max_steps=1, eval_steps=None,
                        dataset={"max_train_samples": 8, "eval_split": None}), log=lines.append)
    assert any("an epoch is 3 micro-batches of 2 rows, so 1 of the 7 rows is left out of each" in line
               for line in lines), lines
    assert result.summary().startswith("done: 1 step, ")  # one, not "1 steps"


def test_step_intervals_given_as_ratios_of_the_run(model_dir, tmp_path):
    """eval_steps / save_steps below 1 (Hugging Face's ratios) run every ceil(ratio x steps): 0.5 of 4 is every 2."""
    out, lines = tmp_path / "run", []
    train(_cfg(model_dir, out, max_steps=4, save_steps=0.5, eval_steps=0.3, logging_steps=0.5, warmup_steps=0.3,
               lr_scheduler_type="constant"), log=lines.append)
    assert [step for step, _ in checkpoint.list_checkpoints(out)] == [2, 4]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 2, 4]
    assert "logging_steps: 0.5 of 4 steps is every 2; eval_steps: 0.3 of 4 steps is every 2; save_steps: 0.5 of 4 " \
           "steps is every 2; warmup_steps: 0.3 of 4 steps is 2" in lines
    # warmup over ceil(0.3 x 4) = 2 steps: step k of them at k / 3 of the rate, then the constant rate
    lr = _cfg(model_dir, out).learning_rate
    assert [r["lr"] for r in records if "lr" in r] == pytest.approx([lr / 3, 2 * lr / 3, lr, lr])
    assert [line.split("|")[0].strip() for line in lines if line.startswith("step ")] == ["step 1/4", "step 2/4",
                                                                                         "step 4/4"]


def test_checkpoint_contents_and_rotation(model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    result = train(_cfg(model_dir, out, max_steps=4, save_steps=2, save_total_limit=1, eval_steps=None,
                        dataset={"eval_split": None}), log=_quiet)
    assert [step for step, _ in checkpoint.list_checkpoints(out)] == [4]  # checkpoint-2 rotated away
    ck = out / "checkpoint-4"
    names = {p.name for p in ck.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt", "rng_state.pth",
            "trainer_state.json", "tokenizer.json"} <= names
    assert not list(out.glob(".checkpoint-*"))  # no temp directory left
    # the adapter: PEFT's format, equal to the final one (the checkpoint is of the last step)
    final = load_file(result.adapter_dir / "adapter_model.safetensors")
    saved = load_file(ck / "adapter_model.safetensors")
    assert final.keys() == saved.keys() and all(torch.equal(final[k], saved[k]) for k in final)
    base = AutoModelForCausalLM.from_pretrained(json.loads((ck / "adapter_config.json").read_text())
                                                ["base_model_name_or_path"])
    PeftModel.from_pretrained(base, ck)
    opt = torch.load(ck / "optimizer.pt", weights_only=True)
    assert len(opt["state"]) == 3 * 2 and all(int(s["step"]) == 4 for s in opt["state"].values())  # A, B per target
    assert torch.load(ck / "scheduler.pt", weights_only=True)["last_epoch"] == 4
    rng = torch.load(ck / "rng_state.pth", weights_only=True)
    assert set(rng) >= {"python", "torch"} and rng["torch"].dtype == torch.uint8
    state = checkpoint.read_state(ck)
    assert state["global_step"] == 4 and len(state["history"]) == 4
    # the data position: 4 steps x 2 micro-batches taken, counted as whole epochs + the index in the current one
    assert state["epoch"] * state["micro_batches_per_epoch"] + state["micro_batch"] == 4 * 2


def test_interrupt_while_saving_leaves_no_checkpoint(model_dir, tmp_path, monkeypatch):
    """A checkpoint is renamed into place once complete; an interrupt before that leaves the older one latest."""
    out = tmp_path / "run"
    train(_cfg(model_dir, out, max_steps=2, save_steps=1, eval_steps=None, dataset={"eval_split": None}),
          log=_quiet)
    assert checkpoint.latest(out) == out / "checkpoint-2"

    real_save = torch.save

    def interrupted(obj, path, *args, **kwargs):
        if str(path).endswith(checkpoint.RNG_FILE):
            raise KeyboardInterrupt
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", interrupted)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=2, target_modules=["q_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(out, 3, model, opt, sched, {"global_step": 3})
    assert checkpoint.latest(out) == out / "checkpoint-2" and not (out / "checkpoint-3").exists()
    assert not list(out.glob(".checkpoint-*"))


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_earlier_checkpoint(model_dir, tmp_path, monkeypatch,
                                                                                capsys):
    """torch.save on a full disk raises "unexpected pos ..." (a RuntimeError): the command said only that, in a
    traceback. Now one line names the checkpoint, the free space and the one to resume from; exit status 1."""
    from surogate.training.cli import main

    out = tmp_path / "run"
    cfg = tiny_raw_config(model_dir, out, max_steps=3, save_steps=1, eval_steps=None, dataset={"eval_split": None})
    real_save = torch.save

    def full(obj, path, *args, **kwargs):
        if Path(path).parent.name == ".checkpoint-2.tmp":
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 295360 vs 295252")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full)
    assert main(["train", write_config(tmp_path / "cfg.yaml", cfg)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"surogate: error: checkpoint: could not write {out / 'checkpoint-2'} ([enforce fail")
    assert "MB free there); free space or write to another output_dir, then resume from checkpoint-1" in err
    assert checkpoint.latest(out) == out / "checkpoint-1" and not list(out.glob(".checkpoint-*"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_saves_a_checkpoint_and_exits_130(model_dir, tmp_path, monkeypatch, capsys, sig):
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler's notice) during a step: the step finishes, a checkpoint of
    it is saved, the CLI exits 130."""
    import surogate.training.train as train_module
    from surogate.training.cli import main

    def sigint_at_step_2(record: dict) -> None:
        if record["step"] == 2:
            os.kill(os.getpid(), sig)  # as Ctrl-C, `timeout -s INT` or a scheduler would

    real_train = train_module.train
    monkeypatch.setattr(train_module, "train", lambda cfg: real_train(cfg, on_step=sigint_at_step_2))
    config = write_config(tmp_path / "c.yaml", tiny_raw_config(model_dir, tmp_path / "out", max_steps=5,
                                                                eval_steps=None, dataset={"eval_split": None}))
    previous = signal.getsignal(sig)
    assert main(["train", config]) == 130
    assert signal.getsignal(sig) is previous  # the handler is the loop's only
    err = capsys.readouterr().err
    assert "checkpoint saved to" in err and err.rstrip().endswith("surogate: interrupted")
    assert [step for step, _ in checkpoint.list_checkpoints(tmp_path / "out")] == [2]
    assert not (tmp_path / "out" / "adapter").exists()  # the run did not finish
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]


def test_step_logs_as_they_happen_metrics_jsonl_and_tensorboard(model_dir, tmp_path):
    """metrics.jsonl has step k's line when step k has finished (eval at step 0 first); TensorBoard gets the
    same scalars with report_to: tensorboard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    seen = []

    def read_log(record: dict) -> None:  # the file as it stands when step k has just finished
        seen.append([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()])

    train(_cfg(model_dir, out, max_steps=3, eval_steps=2, report_to="tensorboard"), log=_quiet, on_step=read_log)
    assert seen[0][0]["step"] == 0 and "eval_loss" in seen[0][0]  # eval before the first step
    for k, lines in enumerate(seen, start=1):
        steps = [r for r in lines if "loss" in r]
        assert [r["step"] for r in steps] == list(range(1, k + 1))
        assert all({"step", "loss", "lr", "tokens", "epoch", "elapsed_s"} <= set(r) and r["tokens"] > 0 for r in steps)
    final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], "eval_loss" in r) for r in final] == [(0, True), (1, False), (2, False), (2, True),
                                                              (3, False), (3, True)]

    (run_dir,) = (out / "runs").iterdir()  # the run's own folder
    assert list(run_dir.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["loss"] for r in final if "loss" in r])
    assert [e.step for e in events.Scalars("eval/loss")] == [0, 2, 3]
    assert {"train/learning_rate", "train/tokens"} <= set(events.Tags()["scalars"])


def test_resume_refuses_other_data_order_before_the_model_loads(model_dir, tmp_path, monkeypatch):
    from surogate.training import setup

    out = tmp_path / "run"
    train(_cfg(model_dir, out, max_steps=1, save_steps=1, eval_steps=None, dataset={"eval_split": None}), log=_quiet)

    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded before the resume check")

    monkeypatch.setattr(setup, "load_base_model", no_load)
    with pytest.raises(ConfigError, match=r"^resume_from_checkpoint: checkpoint-1 was trained with seed: 42"):
        train(_cfg(model_dir, out, seed=7, resume_from_checkpoint=True, eval_steps=None,
                   dataset={"eval_split": None}), log=_quiet)
    with pytest.raises(ConfigError, match=r"^resume_from_checkpoint: the train rows differ"):
        train(_cfg(model_dir, out, resume_from_checkpoint=str(out / "checkpoint-1"), eval_steps=None,
                   dataset={"max_train_samples": 12, "eval_split": None}), log=_quiet)
    # the restored optimizer and scheduler states would bring the checkpoint's values back without a word
    with pytest.raises(ConfigError, match=r"^resume_from_checkpoint: checkpoint-1 was trained with learning_rate: "):
        train(_cfg(model_dir, out, learning_rate=1e-5, resume_from_checkpoint=True, eval_steps=None,
                   dataset={"eval_split": None}), log=_quiet)
    with pytest.raises(ConfigError, match=r"^resume_from_checkpoint: checkpoint-1 was trained with weight_decay: 0.0, "
                                          r"the config has 0.5"):
        train(_cfg(model_dir, out, weight_decay=0.5, resume_from_checkpoint=True, eval_steps=None,
                   dataset={"eval_split": None}), log=_quiet)
    with pytest.raises(ConfigError, match=r"^resume_from_checkpoint: checkpoint-1 was trained with adam_beta2: 0.999, "
                                          r"the config has 0.95"):
        train(_cfg(model_dir, out, adam_beta2=0.95, resume_from_checkpoint=True, eval_steps=None,
                   dataset={"eval_split": None}), log=_quiet)
    # the schedule rebuilt at the restored step with another shape: the learning rate would jump
    with pytest.raises(ConfigError, match=r"^resume_from_checkpoint: checkpoint-1 was trained with lr_scheduler_type: "
                                          r"'linear', the config has 'cosine'"):
        train(_cfg(model_dir, out, lr_scheduler_type="cosine", resume_from_checkpoint=True, eval_steps=None,
                   dataset={"eval_split": None}), log=_quiet)
    with pytest.raises(ConfigError, match=r"^resume_from_checkpoint: checkpoint-1 was trained with warmup_steps: 1, "
                                          r"the config has 3"):
        train(_cfg(model_dir, out, warmup_steps=3, resume_from_checkpoint=True, eval_steps=None,
                   dataset={"eval_split": None}), log=_quiet)


def test_adam_keys_reach_the_optimizer_the_checkpoint_holds(model_dir, tmp_path):
    """adam_beta1 / adam_beta2 / adam_epsilon are the optimizer's (its saved param groups say so)."""
    out = tmp_path / "run"
    train(_cfg(model_dir, out, max_steps=1, save_steps=1, eval_steps=None, adam_beta1=0.8, adam_beta2=0.95,
               adam_epsilon=1e-6, dataset={"eval_split": None}), log=_quiet)
    group = torch.load(out / "checkpoint-1" / "optimizer.pt", weights_only=True)["param_groups"][0]
    assert (tuple(group["betas"]), group["eps"]) == ((0.8, 0.95), 1e-6)


@pytest.mark.parametrize("shape", [{"num_hidden_layers": 2}, {"hidden_size": 64}])
def test_resume_on_another_model_is_one_config_error(model_dir, tmp_path, shape):
    """A resume whose `model:` changed to another model of the same tokenizer passes the checks before the load;
    its adapter then does not fit: one line naming a tensor that differs, not PEFT's traceback."""
    out = tmp_path / "run"
    train(_cfg(model_dir, out, max_steps=1, save_steps=1, eval_steps=None, dataset={"eval_split": None}), log=_quiet)
    other = save_tiny_model(tmp_path / "other", **shape)
    with pytest.raises(ConfigError, match=r"^resume_from_checkpoint: checkpoint-1's adapter does not fit this "
                                          r"model's LoRA layers \((\d+ LoRA tensors differ|.* is \[)[^\n]*$"):
        train(_cfg(other, out, max_steps=2, resume_from_checkpoint=True, eval_steps=None,
                   dataset={"eval_split": None}), log=_quiet)


def test_resume_keys_checked_by_the_config(tmp_path):
    with pytest.raises(ConfigError, match=r"^resume_from_checkpoint: true, but output_dir .* holds no checkpoint"):
        from_dict({"output_dir": str(tmp_path), "resume_from_checkpoint": True})
    with pytest.raises(ConfigError, match=r"^resume_from_checkpoint: .* is not a checkpoint folder"):
        from_dict({"resume_from_checkpoint": str(tmp_path)})
    assert from_dict({"resume_from_checkpoint": False}).resume_from_checkpoint is None


def test_a_non_finite_loss_stops_the_run_before_its_update(model_dir, tmp_path, monkeypatch, capsys):
    """A NaN loss at step 2 stops the run before the optimizer applies it: the LoRA weights stay step 1's, the
    error names the step, the learning rate and what to try, and the CLI prints it as one line (exit 1)."""
    import surogate.training.train as train_module
    from surogate.training import setup, steps
    from surogate.training.cli import main

    real_eager, real_compile = steps.MicroStep.eager, setup.compile_model
    seen: dict = {"calls": 0}

    def nan_from_the_second_micro_step(self, batch):
        loss = real_eager(self, batch)
        seen["calls"] += 1
        return loss * float("nan") if seen["calls"] >= 2 else loss

    def keep_model(model, cfg, *log):
        seen["model"] = real_compile(model, cfg, *log)
        return seen["model"]

    def snapshot(record: dict) -> None:
        seen["after_1"] = {n: p.detach().clone() for n, p in seen["model"].named_parameters() if p.requires_grad}

    monkeypatch.setattr(steps.MicroStep, "eager", nan_from_the_second_micro_step)
    monkeypatch.setattr(setup, "compile_model", keep_model)
    raw = tiny_raw_config(model_dir, tmp_path / "out", max_steps=3, gradient_accumulation_steps=1,
                          recipe="qfp8", eval_steps=None, dataset={"eval_split": None})
    with pytest.raises(FloatingPointError, match=r"^step 2: the loss is nan \(learning rate .*\); the weights are "
                                                 r"step 1's, not updated with it\. Lower learning_rate, or train the "
                                                 r"same config with recipe: bf16"):
        train(from_dict(raw), log=_quiet, on_step=snapshot)
    now = {n: p.detach() for n, p in seen["model"].named_parameters() if p.requires_grad}
    assert now.keys() == seen["after_1"].keys() and all(torch.equal(now[n], seen["after_1"][n]) for n in now)

    seen["calls"] = 0
    real_train = train_module.train
    monkeypatch.setattr(train_module, "train", lambda cfg: real_train(cfg, log=_quiet))
    assert main(["train", write_config(tmp_path / "c.yaml", raw)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("surogate: error: step 2: the loss is nan") and "Traceback" not in "\n".join(err)
