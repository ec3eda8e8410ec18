"""`surogate train` under torchrun: 2 CPU ranks of gloo, the tiny model folder of tests/tiny_models.py.

Each job is `python -m torch.distributed.run --nproc-per-node 2 -m surogate train cfg.yaml` in a
subprocess with a deadline (tests/test_distributed.py's `_run`: a hang fails the test and kills the
process group). Two launches by default: DDP (bf16), and that run resumed from its checkpoint and
stopped with SIGINT to the torchrun agent. Four more are `slow` (a launch is ~10 s of start-up on 2
cores), each with the default test that covers its behaviour named beside it: FSDP (qnf4, LoRA
sharded) and its resume with SIGINT, a run whose rank 0 fails, and the DDP run down the CUDA-graph
path (tests/dist_jobs.py `cli_graphed`, EagerCapture on the CPU). The references run in this process: one process with
`per_device_train_batch_size` (and the eval batch) doubled, the same seed and data order, which 2 ranks
must equal (measured: within 5e-7 of loss).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import REPO, _env, _run, torchrun
from tiny_models import save_tiny_model, tiny_raw_config, write_config

from surogate.training import checkpoint
from surogate.training.config import ConfigError, from_dict
from surogate.training.train import train

LOSS_ATOL = 1e-4  # the bound; measured within 5e-7 (4 steps, 2 micro-batches each)
STEPS, SAVE_AT = 4, 2
# Constant learning rate: the resumed run below goes on past STEPS (until SIGINT) on the same schedule.
RUN = {"max_steps": STEPS, "save_steps": SAVE_AT, "lr_scheduler_type": "constant", "warmup_steps": 0,
       "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "eval_steps": 2}
LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
          "-m", "surogate", "train"]


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    cache = str(tmp_path_factory.getbasetemp() / "surogate-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SUROGATE_CACHE_DIR", cache)  # the references here and the ranks (env copied from here) share it
        yield {**_env(), "SUROGATE_CACHE_DIR": cache}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen3"))


def _torchrun(config: str, env: dict, *args: str, timeout: float = 240) -> str:
    code, out = _run([*LAUNCH, config, *args], timeout, env)
    assert code == 0, f"torchrun surogate train failed:\n{out[-6000:]}"
    return out


def _two_ranks(root: Path, model_dir: Path, env: dict, **extra) -> tuple[Path, str]:
    out = root / "out"
    config = write_config(root / "cfg.yaml", tiny_raw_config(model_dir, out, **RUN, **extra))
    return out, _torchrun(config, env)


def _one_process(root: Path, model_dir: Path, **extra):
    """The reference: the 2-rank config with twice the rows per micro-batch (train and eval), in this process."""
    lines: list[str] = []
    raw = tiny_raw_config(model_dir, root / "single", **{**RUN, "save_steps": None, **extra,
                                                         "per_device_train_batch_size": 4,
                                                         "per_device_eval_batch_size": 4})
    return train(from_dict(raw), log=lines.append), lines


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory, model_dir, cache_env):
    root = tmp_path_factory.mktemp("ddp")
    out, text = _two_ranks(root, model_dir, cache_env)
    return out, text, _one_process(root, model_dir)


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory, model_dir, cache_env):
    root = tmp_path_factory.mktemp("fsdp")
    out, text = _two_ranks(root, model_dir, cache_env, recipe="qnf4", parallelism="fsdp", fsdp_lora="sharded")
    # The reference keeps parallelism: fsdp, which one process ignores (and says so).
    return out, text, _one_process(root, model_dir, recipe="qnf4", parallelism="fsdp", fsdp_lora="sharded")


def _assert_equal_to_one_process(out: Path, result) -> None:
    two = _log(out)
    train_lines = [r for r in two if "loss" in r]
    assert [r["step"] for r in train_lines] == [h["step"] for h in result.history] == list(range(1, STEPS + 1))
    for a, b in zip(train_lines, result.history):
        assert abs(a["loss"] - b["loss"]) <= LOSS_ATOL, (a, b)
        assert (a["tokens"], a["lr"], a["epoch"]) == (b["tokens"], b["lr"], b["epoch"])  # global counts, one order
    evals = [r for r in two if "eval_loss" in r]
    reference = json.loads(result.metrics_path.read_text())["eval"]
    assert [r["step"] for r in evals] == [e["step"] for e in reference] == [0, 2, 4]
    for a, b in zip(evals, reference):
        assert abs(a["eval_loss"] - b["loss"]) <= LOSS_ATOL, (a, b)  # eval batches split over the ranks too
    # The adapters agree too, and training moved (equal losses are not those of a model that never learned).
    ours, theirs = load_file(out / "adapter" / "adapter_model.safetensors"), load_file(
        result.adapter_dir / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-5, msg=name)
    assert abs(train_lines[-1]["loss"] - train_lines[0]["loss"]) > 1e-3


def test_ddp_run_equals_one_process_with_twice_the_batch(ddp):
    out, text, (result, _) = ddp
    _assert_equal_to_one_process(out, result)
    assert "distributed: ddp over 2 ranks (gloo, rank 0 on cpu); 2 rows per rank per micro-step" in text
    assert "distributed: ddp over 2 ranks (gloo)" in (out / "compile_report.txt").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["world_size"], metrics["distributed"]) == (2, "ddp over 2 ranks (gloo, rank 0 on cpu)")


def test_rank_0_alone_logs_and_writes(ddp):
    out, text, _ = ddp
    # One writer: each file once, each metrics line once (two writers would truncate and interleave).
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "checkpoint-2", "checkpoint-4", "compile_report.txt",
                                                     "loss.png", "metrics.json", "metrics.jsonl"]
    assert [(r["step"], "loss" in r) for r in _log(out)] == [(0, False), (1, True), (2, True), (2, False), (3, True),
                                                             (4, True), (4, False)]
    # One speaker: rank 1 prints neither progress nor the summary.
    assert text.count("step 1/4 |") == 1 and text.count("done: 4 steps") == 1
    assert text.count(" train tokens in ") == 1  # the data line (other "data: " lines may follow it)
    assert text.count("checkpoint: ") == 2
    state = checkpoint.read_state(out / "checkpoint-2")
    assert (state["world_size"], state["parallelism"], state["global_step"]) == (2, "ddp", SAVE_AT)
    opt = torch.load(out / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert len(opt["state"]) == 6 and all(int(s["step"]) == SAVE_AT for s in opt["state"].values())  # DDP: plain


# slow: GraphedStep with all_reduce_grads on 2 ranks is test_distributed.py's
# test_graphed_step_with_all_reduce_after_the_replays_equals_one_process, MicroStep's graph mode
# test_graphed_step.py's; this is their glue in `surogate train`.
@pytest.mark.slow
def test_cuda_graph_path_under_ddp_takes_the_same_steps(ddp, tmp_path, cache_env):
    """The GPU path (cuda_graphs auto): the model stays unwrapped, each micro-step is replayed from its
    graph, `all_reduce_grads` runs after the last one. On the CPU through tests/dist_jobs.py's
    `cli_graphed` (EagerCapture); the same run as DDP's, step for step."""
    out, _, _ = ddp
    graphed = tmp_path / "graphed"
    ranks = torchrun(tmp_path / "ranks", "cli_graphed", str(out.parent / "cfg.yaml"), "--output-dir", str(graphed))
    assert [r["code"] for r in ranks] == [0, 0]
    for a, b in zip(_log(graphed), _log(out), strict=True):
        assert a.keys() == b.keys() and a["step"] == b["step"]
        key = "loss" if "loss" in a else "eval_loss"
        assert abs(a[key] - b[key]) <= 1e-6, (a, b)  # measured: equal
    metrics = json.loads((graphed / "metrics.json").read_text())
    assert metrics["distributed"] == ("ddp (CUDA graphs: gradients all-reduced after the last micro-step) over 2 "
                                      "ranks (gloo, rank 0 on cpu)")
    assert "distributed: ddp over 2 ranks (gloo) with CUDA graphs: the model is not wrapped" in (
        graphed / "compile_report.txt").read_text()


def test_resume_with_another_world_size_is_refused_before_the_model_loads(ddp, model_dir, tmp_path):
    out, _, _ = ddp
    raw = tiny_raw_config(model_dir, tmp_path / "again", **RUN, resume_from_checkpoint=str(out / "checkpoint-2"))
    with pytest.raises(ConfigError, match=r"^resume_from_checkpoint: checkpoint-2 was written by a job of 2 "
                                          r"processes, this one has 1; resume with the same world size"):
        train(from_dict(raw), log=lambda line: None)


# slow: FSDP (qnf4, LoRA sharded) equal to one process is test_distributed.py's
# test_fsdp_equals_one_process_with_twice_the_batch[fsdp:qnf4:sharded:1], its checkpoint's whole tensors
# test_the_checkpoint_holds_whole_tensors_and_rank0_wrote_the_adapter; the CLI under torchrun is the DDP run.
@pytest.mark.slow
def test_fsdp_run_equals_one_process_with_twice_the_batch(fsdp):
    out, text, (result, lines) = fsdp
    _assert_equal_to_one_process(out, result)
    assert "distributed: fsdp (LoRA sharded) over 2 ranks (gloo, rank 0 on cpu)" in text
    report = (out / "compile_report.txt").read_text()
    assert "distributed: fsdp2 over 2 ranks (gloo)" in report and "LoRA (3.3 kB) sharded" in report
    # The checkpoint holds whole tensors, by parameter name (gathered from the shards).
    opt = torch.load(out / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert len(opt["state"]) == 6 and all(".lora_" in name for name in opt["state"])
    assert any("parallelism: fsdp ignored: a single process" in line for line in lines)  # the reference said so


# slow for FSDP: its resume from a checkpoint of sharded LoRA is test_distributed.py's
# test_a_checkpoint_saved_by_two_ranks_resumes_on_two_ranks[fsdp:qnf4:sharded].
@pytest.mark.parametrize("run", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_resumed_run_continues_and_sigint_stops_every_rank_after_one_step(run, request, cache_env, tmp_path):
    """Resumed from its checkpoint-2, the 2-rank run repeats steps 3 and 4 of the run that never stopped;
    it goes on (max_steps 400) until SIGINT to the torchrun agent, which passes it to both workers: they
    agree on a step, save its checkpoint and stop, before torchrun's 30 s grace runs out."""
    out, _, _ = request.getfixturevalue(run)
    again = tmp_path / "again"
    cmd = [*LAUNCH, str(out.parent / "cfg.yaml"), "--set", "max_steps=400", "--set",
           f"resume_from_checkpoint={out / 'checkpoint-2'}", "--output-dir", str(again)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=cache_env, cwd=REPO)
    deadline = time.monotonic() + 180
    try:
        while not any(r.get("step", 0) > STEPS for r in _lines(again / "metrics.jsonl")):
            assert proc.poll() is None, "the resumed run ended before the interrupt"
            assert time.monotonic() < deadline, "the resumed run did not reach step 5"
            time.sleep(0.05)
        sent = time.monotonic()
        os.kill(proc.pid, signal.SIGINT)  # the agent: as Ctrl-C in the terminal torchrun runs in
        text, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the job did not stop after SIGINT:\n{proc.communicate()[0][-4000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert time.monotonic() - sent < 30  # within torchrun's grace, no SIGKILL
    assert "] failed:" not in text and text.count("interrupted after step") == 1, text[-4000:]
    lines = [r for r in _lines(again / "metrics.jsonl") if "loss" in r]
    stopped = lines[-1]["step"]
    assert f"interrupted after step {stopped}: checkpoint saved to {again / f'checkpoint-{stopped}'}" in text
    assert checkpoint.read_state(again / f"checkpoint-{stopped}")["global_step"] == stopped
    straight = {r["step"]: r["loss"] for r in _log(out) if "loss" in r}
    resumed = {r["step"]: r["loss"] for r in lines}
    assert [resumed[s] for s in (1, 2)] == [straight[s] for s in (1, 2)]  # the checkpoint's log, rewritten
    for s in (3, 4):
        assert abs(resumed[s] - straight[s]) <= 1e-6, (s, resumed[s], straight[s])  # measured: equal
    assert not (again / "adapter").exists()  # the run did not finish


def _lines(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    except FileNotFoundError:
        return []


# slow: a failing rank bringing the torchrun job down with its error, and fail_fast stopping the other,
# are test_distributed.py's test_a_rank_that_raises_brings_the_torchrun_job_down_with_its_error and
# test_fail_fast_stops_the_other_ranks_without_a_launcher.
@pytest.mark.slow
def test_a_rank_that_fails_ends_the_job_with_its_error(model_dir, cache_env, tmp_path):
    """Rank 0 cannot open metrics.jsonl (a folder is in the way); rank 1, which writes nothing, has gone
    on into the step-0 eval's all-reduce. fail_fast's watchdog stops it with rank 0's error, no hang."""
    out = tmp_path / "out"
    (out / "metrics.jsonl").mkdir(parents=True)
    config = write_config(tmp_path / "cfg.yaml", tiny_raw_config(model_dir, out, **RUN))
    start = time.monotonic()
    code, text = _run([*LAUNCH, config], timeout=120, env=cache_env)
    assert code != 0
    assert "[rank 0] failed: IsADirectoryError" in text
    assert "[rank 1] stopping: rank 0 failed: IsADirectoryError" in text or "Connection closed by peer" in text
    assert time.monotonic() - start < 90
