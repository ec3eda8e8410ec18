"""Several processes on CPU: 2 ranks of gloo launched by torchrun, tiny models on the reference backend.

The jobs live in tests/dist_jobs.py; each runs as `python -m torch.distributed.run --nproc-per-node 2`
in a subprocess with a deadline (a hang fails the test, its processes are killed) and writes what the
ranks saw to files. The single-process reference (the same model, data and optimizer on the whole
global batch) runs here. A global batch of 4 rows masks its labels unevenly, so the ranks hold
different numbers of real tokens: `items_per_rank` must make the average over the ranks the global
token mean for the losses to agree.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import dist_jobs
import pytest
import torch

from surogate.training import distributed

REPO = Path(__file__).resolve().parents[1]
JOBS = Path(__file__).with_name("dist_jobs.py")
LOSS_ATOL = 1e-4  # the bound after 5 steps; measured: within 5e-7
LORA_ATOL = 1e-5


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("WORLD_SIZE", None)
    return env


def _run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run `cmd` in a session of its own; past `timeout` kill the whole session and fail the test."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=env or _env(), cwd=REPO)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd[-4:])} did not finish in {timeout} s (hang?):\n{out[-4000:]}")
    return proc.returncode, out


def torchrun(out_dir: Path, job: str, *args: str, timeout: float = 240) -> list[dict]:
    """Launch `job` on 2 ranks; returns each rank's results."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(JOBS), job, str(out_dir), *args]
    code, out = _run(cmd, timeout)
    assert code == 0, f"job {job} failed:\n{out[-6000:]}"
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(2)]


@functools.cache
def single(recipe: str) -> dict:
    """One process, twice the per-rank batch: the reference every 2-rank run must equal."""
    return dist_jobs.train_single(recipe)


def _assert_close_to_single(ranks: list[dict], reference: dict) -> None:
    for rank in ranks:
        torch.testing.assert_close(torch.tensor(rank["losses"]), torch.tensor(reference["losses"]), rtol=0,
                                   atol=LOSS_ATOL)
        assert rank["lora"].keys() == reference["lora"].keys()
        for name, value in reference["lora"].items():
            torch.testing.assert_close(rank["lora"][name], value, rtol=0, atol=LORA_ATOL, msg=name)
    # Training moved: equal losses are not those of a model that never learned.
    assert abs(reference["losses"][-1] - reference["losses"][0]) > 1e-3


# --- data parallel ----------------------------------------------------------------------------------

DDP_CASES = ("ddp:bf16:-:2", "graphed:bf16")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, list[dict]]:
    """The DDP and FSDP cases in one launch (its start-up, imports on 2 cores, ~10 s, costs more than a
    case); those of CKPT_CASES also save a checkpoint (to root/<case>) and train on."""
    root = tmp_path_factory.mktemp("ckpt")
    plain = [case for case in (*DDP_CASES, *FSDP_CASES) if case not in CKPT_CASES]
    ranks = torchrun(root / "train", "train", *plain, "+", "save", str(root), *CKPT_CASES, timeout=480)
    return root, ranks


@pytest.fixture(scope="module")
def ddp_runs(trained) -> dict[str, list[dict]]:
    return {case: [r[case] for r in trained[1]] for case in DDP_CASES}


def test_ddp_equals_one_process_with_twice_the_batch(ddp_runs):
    ranks = ddp_runs["ddp:bf16:-:2"]
    _assert_close_to_single(ranks, single("bf16"))
    assert ranks[0]["describe"] == "ddp over 2 ranks (gloo, rank 0 on cpu)"
    assert "distributed: ddp over 2 ranks (gloo); 28 LoRA tensors" in ranks[0]["report"]
    # Frozen weights stay whole on every rank under DDP.
    assert ranks[0]["frozen_bytes"] == ranks[1]["frozen_bytes"] == single("bf16")["frozen_bytes"]


def test_graphed_step_with_all_reduce_after_the_replays_equals_one_process(ddp_runs):
    ranks = ddp_runs["graphed:bf16"]
    _assert_close_to_single(ranks, single("bf16"))
    for rank in ranks:
        assert rank["replays"] == 2 * dist_jobs.STEPS  # every micro-step replayed, none eager
        assert rank["reduces"] == dist_jobs.STEPS  # one bucket (the LoRA grads are 64 KiB) per optimizer step


# --- sharded frozen weights -------------------------------------------------------------------------

# parallelism:recipe:LoRA placement:micro-batches per optimizer step (all but the last under no_sync),
# and "views": NF4 bytes held as float8 views of themselves, the path FSDP2 before torch 2.13 needs.
# "hsdp": shard_size=1, 2 replicas of 1 shard: the 2-D mesh of several nodes, each rank whole;
# "ac": activation checkpointing with reshard_after_forward=False.
FSDP_CASES = ("fsdp:qnf4:sharded:1", "fsdp:qfp8:replicated:2", "fsdp:bf16:sharded:2", "fsdp:qnf4:replicated:2:views",
              "fsdp:qnf4:sharded:1:hsdp", "fsdp:qnf4:replicated:1:ac")


@pytest.fixture(scope="module")
def fsdp_runs(trained) -> dict[str, list[dict]]:
    return {case: [r[case] for r in trained[1]] for case in FSDP_CASES}


@pytest.mark.parametrize("case", FSDP_CASES)
def test_fsdp_equals_one_process_with_twice_the_batch(fsdp_runs, case):
    recipe, lora = case.split(":")[1:3]
    ranks = fsdp_runs[case]
    _assert_close_to_single(ranks, single(recipe))
    hybrid = ", hybrid: 2 replicas of 1 shards" if case.endswith(":hsdp") else ""
    assert ranks[1]["describe"] == f"fsdp (LoRA {lora}{hybrid}) over 2 ranks (gloo, rank 1 on cpu)"
    assert f"LoRA (65.5 kB) {lora}" in ranks[0]["report"]
    # Replicated LoRA is all-reduced by surogate's hooks once per optimizer step (one 64 KiB bucket),
    # not after the micro-batches under no_sync.
    assert ranks[0]["all_reduces"] == (dist_jobs.STEPS if lora == "replicated" else None)


@pytest.mark.parametrize("case", FSDP_CASES)
def test_fsdp_each_rank_stores_half_the_frozen_bytes(fsdp_runs, case):
    whole = single(case.split(":")[1])["frozen_bytes"]
    stored = [rank["frozen_bytes"] for rank in fsdp_runs[case]]
    if case.endswith(":hsdp"):  # 2 replicas of 1 shard: every rank whole
        assert stored == [whole, whole]
        return
    # Every frozen parameter is split on dim 0 (the ranks' pieces add up to it); what stays whole on
    # both ranks is the buffers: RoPE's inverse frequencies and the 0-d scales (4 bytes each).
    assert all(0.5 * whole - 64 <= s <= 0.51 * whole for s in stored), (stored, whole)
    assert sum(stored) >= whole
    local = [rank["local_parts"] for rank in fsdp_runs[case]] if "local_parts" in fsdp_runs[case][0] else None
    for name, shapes in fsdp_runs[case][0]["full_parts"].items():
        for k, full in enumerate(shapes):
            if len(full) == 0:
                continue  # a 0-d scale: replicated
            rows = [ranks[name][k][0] for ranks in local]
            assert sum(rows) == full[0] and max(rows) == math.ceil(full[0] / 2), (name, k, rows, full)


@pytest.mark.parametrize("case", [c for c in FSDP_CASES if not c.startswith("fsdp:bf16")])
def test_fsdp_gathers_the_stored_quantized_bytes_unchanged(fsdp_runs, case):
    # NF4 bytes are sharded as uint8 parameters, or as float8 views of the same bytes (torch < 2.13).
    uint8_held = "torch.uint8" in fsdp_runs[case][0]["param_dtypes"]
    views = case.endswith(":views") or dist_jobs.NATIVE_FLOAT_VIEWS
    assert uint8_held == (case.startswith("fsdp:qnf4") and not views)
    for rank in fsdp_runs[case]:
        equal = rank["gathered_equal"]
        assert len(equal) == 14  # 7 projections x 2 blocks
        assert all(equal.values()), [name for name, ok in equal.items() if not ok]


# --- checkpoints --------------------------------------------------------------------------------------

CKPT_CASES = ("ddp:bf16:-:2", "fsdp:qnf4:sharded:1", "fsdp:qfp8:replicated:2")  # trained above, saved at step 2


@pytest.fixture(scope="module")
def resumed(trained) -> tuple[Path, list[dict], list[dict]]:
    root, saved = trained
    resumed = torchrun(root / "resume", "resume", str(root), *CKPT_CASES)  # new processes, as a real resume
    return root, saved, resumed


@pytest.mark.parametrize("case", CKPT_CASES)
def test_a_checkpoint_saved_by_two_ranks_resumes_on_two_ranks(resumed, case):
    _, saved, again = resumed
    uninterrupted = saved[0][case]
    for rank in again:
        assert rank[case]["meta"] == {"step": dist_jobs.SAVE_AT}
        for name, value in uninterrupted["lora_at_save"].items():
            assert torch.equal(rank[case]["lora_loaded"][name], value), name
        # The optimizer state came back too: the steps after the resume are those of the run that went on.
        torch.testing.assert_close(torch.tensor(rank[case]["losses"]),
                                   torch.tensor(uninterrupted["losses"][dist_jobs.SAVE_AT:]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", CKPT_CASES)
def test_the_checkpoint_holds_whole_tensors_and_rank0_wrote_the_adapter(resumed, case):
    from safetensors.torch import load_file

    root, saved, _ = resumed
    ckpt = root / case.replace(":", "-")
    at_save = saved[0][case]["lora_at_save"]
    adapter = load_file(ckpt / "adapter" / "adapter_model.safetensors")
    assert len(adapter) == len(at_save) == 28
    for name, value in at_save.items():
        assert torch.equal(adapter[name.replace(".default.", ".")], value), name
    # A 2-rank checkpoint refuses a 1-process resume unless asked, then loads whole tensors into a plain model.
    model = dist_jobs.tiny_model(case.split(":")[1])  # the saved state loads whatever the placement was
    opt = dist_jobs.optimizer(model)
    with pytest.raises(ValueError, match="saved by 2 ranks, this job has 1"):
        distributed.load_checkpoint(model, opt, ckpt)
    assert distributed.load_checkpoint(model, opt, ckpt, same_world=False) == {"step": dist_jobs.SAVE_AT}
    for name, value in dist_jobs.lora_state(model).items():
        assert torch.equal(value, at_save[name]), name
    assert len(opt.state) == 28 and all(int(s["step"]) == dist_jobs.SAVE_AT for s in opt.state.values())


# --- failures -----------------------------------------------------------------------------------------

def test_a_rank_that_raises_brings_the_torchrun_job_down_with_its_error(tmp_path):
    start = time.monotonic()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(JOBS), "raise", str(tmp_path), "collective"]
    code, out = _run(cmd, timeout=90)
    assert code != 0
    assert "[rank 1] failed: ValueError: rank 1 broke on purpose" in out
    assert "rank 0 was not stopped" not in out
    assert time.monotonic() - start < 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fail_fast_stops_the_other_ranks_without_a_launcher(tmp_path):
    """No agent to kill the survivors: rank 0 computes (no collective to fail) and must still stop,
    with rank 1's error, because fail_fast's watchdog reads it from the job's store."""
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, str(JOBS), "raise", str(tmp_path), "compute"], env=env,
                                      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    outs = []
    try:
        for proc in procs:
            outs.append(proc.communicate(timeout=60)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("a rank kept running after the other failed")
    assert [p.returncode for p in procs] == [1, 1]
    assert "[rank 0] stopping: rank 1 failed: ValueError: rank 1 broke on purpose" in outs[0]
    assert "rank 0 was not stopped" not in outs[0]


# --- one process: the API without a job ---------------------------------------------------------------

def test_shard_splits_a_global_batch_in_rank_order():
    batch = {"input_ids": torch.arange(12).view(6, 2), "labels": torch.arange(12).view(6, 2), "note": "x"}
    pieces = [distributed.shard(batch, r, 3) for r in range(3)]
    assert all(p["input_ids"].shape == (2, 2) and p["note"] == "x" for p in pieces)
    assert torch.equal(torch.cat([p["input_ids"] for p in pieces]), batch["input_ids"])
    assert distributed.shard(list(range(8)), 1, 2) == [4, 5, 6, 7]
    assert distributed.shard(list(range(8))) == list(range(8))  # one process: everything
    with pytest.raises(ValueError, match="5 rows does not split over 2 ranks"):
        distributed.shard(torch.zeros(5, 3), 0, 2)
    with pytest.raises(ValueError, match="different lengths"):
        distributed.shard({"a": torch.zeros(4), "b": torch.zeros(2)}, 0, 2)
    with pytest.raises(ValueError, match="outside a world of 2"):
        distributed.shard([1, 2], 2, 2)


def test_one_process_is_rank_0_of_1_and_every_collective_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    i = distributed.init()
    assert (i.rank, i.world, i.backend, i.is_main, i.distributed) == (0, 1, None, True, False)
    assert distributed.describe() == "single process"
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    assert distributed.all_reduce_grads([p]) == 0 and torch.equal(p.grad, torch.full((3,), 2.0))
    labels = torch.tensor([[1, 2, -100, 4], [5, -100, -100, -100]])
    assert float(distributed.items_per_rank(labels)) == 2  # targets after the shift by one: 2 + 0
    with distributed.fail_fast():
        distributed.barrier()


def test_wrap_refuses_what_it_cannot_spread():
    with pytest.raises(ValueError, match="unknown Parallelism 'tp'; valid: ddp, fsdp"):
        distributed.Parallelism.from_name("tp")
    with pytest.raises(ValueError, match="valid: replicated, sharded"):
        distributed.LoraPlacement.from_name("offloaded")
    with pytest.raises(TypeError, match="holds no LoRA adapter"):
        distributed.wrap(torch.nn.Linear(2, 2))
    model = dist_jobs.tiny_model("bf16")
    with pytest.raises(ValueError, match="needs parallelism='fsdp'"):
        distributed.wrap(model, "ddp", lora="sharded")
    assert distributed.wrap(model, "fsdp") is model  # one process: nothing to spread
