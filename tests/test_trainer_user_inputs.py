"""What `surogate train` does with what a new user does: Ctrl-C at the end of a run, an output_dir that holds
another run (its checkpoints, its TensorBoard curves, the run itself still going), GPU settings on a machine
without one, num_epochs that steps cannot hit, and the summary's "eval loss before -> after". On the CPU
reference backend with a tiny model, a few steps each."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_checkpoint import _cfg, _quiet, cache, model_dir  # noqa: F401, F811  (test_checkpoint's fixtures and helpers)
from tiny_models import tiny_raw_config, write_config

from surogate.training import checkpoint, run_lock
from surogate.training.cli import main
from surogate.training.config import ConfigError, from_dict
from surogate.training.train import _epochs_line, train

NO_EVAL = {"eval_steps": None, "dataset": {"eval_split": None}}


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("surogate: error: ") and "Traceback" not in err, err
    return err


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- Ctrl-C after the last step ---------------------------------------------------------------------

def _sigint_in(monkeypatch, module, name: str, when=lambda *args: True) -> None:
    """`module.name` sends this process a SIGINT (as Ctrl-C would) when `when(*its args)`, then runs."""
    real = getattr(module, name)

    def interrupted(*args, **kwargs):
        if when(*args):
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, interrupted)


def test_ctrl_c_during_the_first_imports_is_one_line_and_status_130(monkeypatch, capsys):
    """Ctrl-C in the first seconds (torch importing, the dependency check) gave a KeyboardInterrupt traceback."""
    import surogate.compat

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(surogate.compat, "check_dependencies", interrupted)
    assert main(["train"]) == 130
    assert capsys.readouterr().err == "surogate: interrupted\n"


def test_ctrl_c_during_the_final_eval_keeps_the_adapter_and_a_checkpoint(model_dir, tmp_path, monkeypatch, capsys):
    """SIGINT in the final eval (was: the handler already gone, a KeyboardInterrupt, nothing saved) drops the
    eval at once, saves the trained adapter and the last step's checkpoint, says where, exits 130; the resume
    runs the eval and writes the rest."""
    from surogate.training import steps

    evaluate = steps.evaluate
    _sigint_in(monkeypatch, steps, "evaluate")
    out = tmp_path / "out"
    raw = tiny_raw_config(model_dir, out, max_steps=2, eval_steps=None, eval_on_start=False)
    assert main(["train", write_config(tmp_path / "c.yaml", raw)]) == 130
    err = capsys.readouterr().err
    assert f"interrupted during the final eval: checkpoint saved to {out / 'checkpoint-2'}, the trained adapter " \
           f"to {out / 'adapter'}; continue with `--set resume_from_checkpoint=true`" in err
    assert err.rstrip().endswith("surogate: interrupted")
    assert [step for step, _ in checkpoint.list_checkpoints(out)] == [2]
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and not (out / "metrics.json").exists()

    monkeypatch.setattr(steps, "evaluate", evaluate)
    resumed = train(_cfg(model_dir, out, max_steps=2, eval_steps=None, eval_on_start=False,
                         resume_from_checkpoint=True), log=_quiet)
    assert resumed.first_step_s is None and resumed.final_eval_loss is not None
    assert (out / "metrics.json").is_file()


def test_ctrl_c_while_the_outputs_are_written_waits_for_them(model_dir, tmp_path, monkeypatch, capsys):
    """SIGINT while the adapter is written: the outputs are finished first (none half written), then exit 130."""
    from surogate.training import distributed

    _sigint_in(monkeypatch, distributed, "save_adapter")
    out = tmp_path / "out"
    assert main(["train", write_config(tmp_path / "c.yaml", tiny_raw_config(model_dir, out, max_steps=1,
                                                                            **NO_EVAL))]) == 130
    assert f"interrupted while writing the outputs: they are complete in {out}" in capsys.readouterr().err
    assert (out / "metrics.json").is_file() and (out / "adapter" / "adapter_model.safetensors").is_file()


# --- an output_dir that holds another run -----------------------------------------------------------

def _stale_checkpoint(out: Path, step: int) -> Path:
    """A checkpoint folder as another run left it (what list_checkpoints counts: its state file)."""
    path = out / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / checkpoint.STATE_FILE).write_text(f'{{"global_step": {step}}}\n')
    return path


def test_a_fresh_run_into_another_runs_checkpoints_is_refused(model_dir, tmp_path, capsys):
    """Rotation and resume_from_checkpoint: true go by step, so another run's checkpoint-40 would outrank this
    run's (was: B's own checkpoint rotated away, resume picking A's). Refused in one line, files untouched."""
    out = tmp_path / "out"
    _stale_checkpoint(out, 40)
    before = _snapshot(out)
    config = write_config(tmp_path / "c.yaml", tiny_raw_config(model_dir, out, save_steps=1, save_total_limit=2,
                                                               **NO_EVAL))
    assert main(["train", config]) == 2
    err = _one_line_error(capsys)
    assert "output_dir: " in err and "holds checkpoints of an earlier run (checkpoint-40); continue it with " \
                                     "resume_from_checkpoint: true" in err and "overwrite_output_dir: true" in err
    assert _snapshot(out) == before
    # resuming from an older checkpoint of the folder: the later ones are another branch
    _stale_checkpoint(out, 10)
    with pytest.raises(ConfigError, match=r"holds checkpoint-40, not on the way to checkpoint-10"):
        train(_cfg(model_dir, out, resume_from_checkpoint=str(out / "checkpoint-10"), **NO_EVAL), log=_quiet)


def test_overwrite_output_dir_replaces_the_other_runs_checkpoints_and_tensorboard_keeps_runs_apart(model_dir,
                                                                                                  tmp_path):
    """overwrite_output_dir: the other run's checkpoints go when this run writes its first one; rotation and
    resume then see this run's only. Each fresh run gets its own TensorBoard folder (was: two runs' events in
    one runs/ folder); the resume goes on in its run's folder."""
    out = tmp_path / "out"
    extra = {"max_steps": 3, "save_steps": 1, "save_total_limit": 2, "report_to": "tensorboard", **NO_EVAL}
    train(_cfg(model_dir, out, **extra), log=_quiet)
    first_runs = sorted(p.name for p in (out / "runs").iterdir())
    stale = _stale_checkpoint(out, 40)
    lines: list[str] = []
    train(_cfg(model_dir, out, overwrite_output_dir=True, **{**extra, "max_steps": 2}), log=lines.append)
    assert not stale.exists() and [step for step, _ in checkpoint.list_checkpoints(out)] == [1, 2]
    assert "overwrite_output_dir: removed checkpoint-2, checkpoint-3, checkpoint-40 of an earlier run" in lines
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert len(runs) == 2 and set(first_runs) < set(runs)
    resumed = train(_cfg(model_dir, out, resume_from_checkpoint=True, **{**extra, "max_steps": 3}), log=_quiet)
    assert resumed.resumed_from == out / "checkpoint-2"
    assert sorted(p.name for p in (out / "runs").iterdir()) == runs
    own = set(runs) - set(first_runs)
    assert len(list((out / "runs" / own.pop()).glob("events.out.tfevents.*"))) == 2  # the run's, then its resume


def test_a_second_run_into_a_busy_output_dir_is_one_line(model_dir, tmp_path, capsys):
    """Two runs in one output_dir corrupted each other; the second is refused with the first one's pid."""
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", tiny_raw_config(model_dir, out, **NO_EVAL))
    with run_lock.hold(out):
        assert main(["train", config]) == 2
    err = _one_line_error(capsys)
    assert f"output_dir: {str(out)!r} is in use by another surogate train (pid {os.getpid()}); wait for it" in err
    assert not (out / run_lock.LOCK_FILE).exists() and not out.exists()  # released, and nothing left behind


def test_a_lock_left_by_a_dead_run_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    out = tmp_path / "out"
    out.mkdir()
    (out / run_lock.LOCK_FILE).write_text(f"{dead.stdout.strip()} somehost\n")
    with run_lock.hold(out) as path:
        assert path.read_text().split()[0] == str(os.getpid())
    assert not path.exists() and out.is_dir()


# --- GPU settings without a GPU ---------------------------------------------------------------------

@pytest.mark.parametrize("extra, expect", [
    ({"arch": "sm_90"}, "arch: sm_90 needs a GPU, and this machine has none"),
    ({"cuda_graphs": True}, "cuda_graphs: true needs a GPU, and this machine has none"),
])
def test_gpu_settings_on_a_machine_without_a_gpu_are_one_line_before_the_data(extra, expect, model_dir, tmp_path,
                                                                             monkeypatch, capsys):
    """Were a traceback after the data loaded (arch at compile, cuda_graphs after the step-0 eval)."""
    from surogate.training import data, setup

    monkeypatch.setattr(setup, "pick_device", lambda: torch.device("cpu"))

    def no_data(*args, **kwargs):
        raise AssertionError("the data loaded before the error")

    monkeypatch.setattr(data, "load_splits", no_data)
    config = write_config(tmp_path / "c.yaml", tiny_raw_config(model_dir, tmp_path / "out", **extra))
    assert main(["train", config]) == 2
    assert expect in _one_line_error(capsys)


# --- what the log and the summary say ---------------------------------------------------------------

def test_num_epochs_rounded_up_to_whole_steps_is_said():
    """3 rows in one micro-batch an epoch, 4 micro-batches a step: num_epochs 1 trains 4 epochs (was silent)."""
    cfg = from_dict({"num_epochs": 1, "gradient_accumulation_steps": 4})
    assert _epochs_line(cfg, 1, 1) == ("num_epochs: 1 is 1 micro-batch (an epoch is 1), rounded up to 1 optimizer "
                                       "step of 4: the run trains 4 epochs (set max_steps, or lower "
                                       "gradient_accumulation_steps, to train fewer)")
    assert _epochs_line(from_dict({"num_epochs": 2, "gradient_accumulation_steps": 2}), 3, 3) is None
    assert _epochs_line(from_dict({"max_steps": 1, "gradient_accumulation_steps": 4}), 1, 1) is None


def test_the_summary_compares_with_the_eval_before_training_only(model_dir, tmp_path):
    """With eval_on_start: false the first eval is a mid-run one: the summary gave it as "before"."""
    result = train(_cfg(model_dir, tmp_path / "out", max_steps=2, eval_steps=1, eval_on_start=False), log=_quiet)
    assert result.first_eval_loss is None and "->" not in result.summary()
    result = train(_cfg(model_dir, tmp_path / "out2", max_steps=1, eval_steps=None), log=_quiet)
    assert result.first_eval_loss is not None and "->" in result.summary()
