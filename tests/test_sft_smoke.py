"""bench/sft.py on a CPU: data preparation, warm-up choice, worker records (timeouts included), the result
files and the command line. The training runs themselves need a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
from bench_module import REPO, load_bench

from surogate.training.data import IGNORE_INDEX, Batch

sft = load_bench("sft")
ENV = dict(gpu="NVIDIA H200", torch="2.11", triton="3.6", commit="abc1234")


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    import os

    old = os.environ.get("SUROGATE_CACHE_DIR")
    os.environ["SUROGATE_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    try:
        yield sft.load_examples(None, limit=64)
    finally:
        if old is None:
            os.environ.pop("SUROGATE_CACHE_DIR")
        else:
            os.environ["SUROGATE_CACHE_DIR"] = old


def test_examples_mask_the_prompt(examples):
    assert len(examples) == 64
    for ex in examples:
        prompt = next(i for i, t in enumerate(ex.labels) if t != IGNORE_INDEX)
        assert prompt > 5  # "Question: ...\nAnswer:" is masked
        assert ex.labels[prompt:] == ex.input_ids[prompt:]
        assert max(ex.input_ids) < 2048  # bundled tokenizer: valid ids for the Qwen3 and Llama-3 vocabularies


def test_padded_batches_of_8_padded_per_batch(examples):
    batches = sft.micro_batches(examples, "padded", 10, batch=8, seed=0)
    assert len(batches) == 10  # 64 examples are 8 batches: a second epoch, reshuffled, supplies the rest
    assert not torch.equal(batches[0]["input_ids"][:, :50], batches[8]["input_ids"][:, :50])
    first_epoch = sum(b.num_tokens for b in batches[:8])
    assert first_epoch == sum(len(ex.input_ids) for ex in examples)
    for b in batches:
        mask = b["attention_mask"]
        assert b["input_ids"].shape[0] == 8 and "position_ids" not in b
        assert int(mask.sum()) == b.num_tokens
        assert mask[:, -1].any()  # padded to the batch's longest row, not further
        assert (b["labels"][mask == 0] == IGNORE_INDEX).all()


def test_grouped_batches_and_the_chosen_buckets_pad_less(examples):
    """grouped: batches of similar lengths (group_by_length); surogate's CUDA graph lengths chosen from the widths
    (buckets.choose) pad less than the 128-token multiples, and the warm-up meets each of them once first."""
    padded = sft.micro_batches(examples, "padded", 8, batch=8, seed=0)
    grouped = sft.micro_batches(examples, "grouped", 8, batch=8, seed=0)
    assert sum(b.num_tokens for b in grouped) == sum(b.num_tokens for b in padded)  # the same epoch's rows
    assert sft.data_summary(grouped)["pad_fraction"] < sft.data_summary(padded)["pad_fraction"] / 2
    chosen = sft.shape_buckets(grouped, "grouped")
    assert chosen and sft.shape_buckets(grouped, "packed") == ()
    with_chosen, by_128 = sft.data_summary(grouped, chosen), sft.data_summary(grouped)
    assert with_chosen["bucket_pad_fraction"] < by_128["bucket_pad_fraction"]
    assert with_chosen["shape_buckets"] == list(chosen)
    warm = sft.warmup_indices(grouped, 4, 1, chosen)
    assert {sft.shape_key(grouped[i], chosen) for i in warm} == {sft.shape_key(b, chosen) for b in grouped}


def test_packed_rows_keep_boundaries_within_4096(examples):
    batches = sft.micro_batches(examples, "packed", 3, rows=1, seq=4096, seed=0)
    assert all(b["input_ids"].shape == (1, 4096) for b in batches)
    for b in batches:
        n = b.num_tokens
        assert 0 < n <= 4096
        pos = b["position_ids"][0, :n]
        starts = (pos == 0).nonzero().flatten()
        assert len(starts) > 1  # several examples in a row, positions restart at each
        assert (b["labels"][0, starts] == IGNORE_INDEX).all()  # no target across a boundary
        assert (b["labels"][0, n:] == IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="unknown mode"):
        sft.micro_batches(examples, "sorted", 1)


def _batch(width: int, rows: int = 8) -> Batch:
    b = Batch(input_ids=torch.zeros(rows, width, dtype=torch.long))
    b.num_tokens = rows * width
    return b


def test_warmup_visits_every_shape_bucket():
    timed = [_batch(w) for w in (200, 300, 210, 500, 260, 390, 129, 250)]
    # buckets 256, 384, 256, 512, 384, 512, 256, 256: first of each (0, 1, 3), then filled to one step of 4
    assert sft.warmup_indices(timed, accum=4, warmup_steps=1) == [0, 1, 3, 2]
    assert sft.warmup_indices(timed, accum=4, warmup_steps=2) == [0, 1, 3, 2, 4, 5, 6, 7]
    packed = [_batch(4096, rows=1) for _ in range(12)]
    assert sft.warmup_indices(packed, accum=4, warmup_steps=2) == list(range(8))
    assert sft.data_summary(timed)["buckets"] == 3


def _progress(phase: str, done: int, of: int, **extra) -> str:
    return sft.MARK + json.dumps({"phase": phase, "done": done, "of": of, "elapsed_s": 99.0, **extra})


def test_worker_runs_become_records_with_how_far_they_got():
    out = "\n".join(["compiling...", _progress("warm-up", 0, 2), _progress("warm-up", 2, 2, first_step_s=80.0),
                     _progress("timed", 3, 8, timed_s=2.0, timed_tokens=12000, peak_gib=7.5)])
    timeout = sft.record_from_run("0.6B", "hf_compile", "padded", None, out, "", 300)
    assert timeout["status"] == "timeout" and timeout["tokens_per_s"] is None
    assert timeout["steps_done"] == 3 and timeout["partial_tokens_per_s"] == 6000
    assert timeout["progress"] == "timed 3/8 optimizer steps at 99 s" and "300 s" in timeout["error"]
    built = sft.record_from_run("llama3-8B", "liger", "packed", None, _progress("warm-up", 0, 2), "", 300)
    assert built["model"] == "Llama-3-8B" and built["progress"].startswith("built at 99 s")
    crash = sft.record_from_run("8B", "surogate:fp8", "packed", 1, "", "Traceback\nCUDA out of memory", 300)
    assert crash["status"] == "error" and "out of memory" in crash["error"]
    ok = {"model": "Qwen3-0.6B", "status": "ok", "tokens_per_s": 1.0}
    assert sft.record_from_run("0.6B", "hf_eager", "packed", 0, out + "\n" + sft.DONE + json.dumps(ok), "", 9) == ok


def test_a_worker_past_its_time_limit_is_killed_with_its_progress_kept():
    script = f"import json, time; print({sft.MARK!r} + json.dumps(dict(phase='timed', done=1, of=8, " \
             "elapsed_s=1.0)), flush=True); time.sleep(60)"
    t0 = time.perf_counter()
    rc, out, _ = sft.run_worker([sys.executable, "-c", script], timeout=3)
    assert rc is None and time.perf_counter() - t0 < 20
    assert sft.record_from_run("0.6B", "hf_eager", "padded", rc, out, "", 3)["steps_done"] == 1


def _record(model: str, system: str, mode: str, tok: float | None, status: str = "ok") -> dict:
    r = dict(model=model, system=system, mode=mode, status=status, tokens_per_s=tok, peak_gib=7.0,
             first_step_s=30.0, autotune_runs=0, recompiles=0, recipe=system.split(":")[-1], emulated=False, **ENV)
    if status != "ok":
        r.update(tokens_per_s=None, progress="warm-up 1/2 optimizer steps at 290 s", error="did not finish in 300 s")
    return r


def test_results_compare_with_peers_and_targets(tmp_path):
    records = [_record("Qwen3-0.6B", "hf_eager", "padded", 2e3),
               _record("Qwen3-0.6B", "hf_compile", "padded", None, status="timeout"),
               _record("Qwen3-0.6B", "surogate:bf16", "padded", 4e3),
               _record("Qwen3-0.6B", "surogate:fp8", "padded", 2.5e3),
               _record("Qwen3-0.6B", "hf_eager", "packed", 20e3),
               _record("Qwen3-0.6B", "surogate:bf16", "packed", 58e3),
               _record("Qwen3-0.6B", "surogate:fp8", "packed", 40e3),
               _record("Llama-3-8B", "surogate:fp8", "packed", 16e3)]
    tps_json = tmp_path / "tps.json"
    tps_json.write_text(json.dumps({"records": [
        dict(model="Qwen3-0.6B", system="surogate:bf16", tokens_per_s=60e3, gpu="NVIDIA H200"),
        dict(model="Qwen3-0.6B", system="surogate:fp8", tokens_per_s=56e3, gpu="NVIDIA H100 80GB HBM3"),
        dict(model="Qwen3-0.6B", system="surogate:qfp8", error="oom")]}))
    settings = dict(steps=8, warmup=2, batch=8, rows=1, seq=4096, accum=4, data="bundled", examples=800,
                    time_limit=300)
    md = sft.write_results(records, {"Qwen3-0.6B liger": "liger_kernel is not installed"}, ENV, settings,
                           tmp_path, tps_json)
    assert md == (tmp_path / "sft.md").read_text()
    assert "## padded" in md and "## packed" in md
    assert "| Qwen3-0.6B | 2.0k (7.0, 30) | timeout: warm-up 1/2 optimizer steps at 290 s | 4.0k" in md
    assert "- Qwen3-0.6B padded surogate:bf16: 2.00x (hf_eager 2.0k)" in md  # the timed-out peer does not count
    assert "- Qwen3-0.6B surogate:bf16: 2.00x hf_eager: met" in md
    assert "- Qwen3-0.6B surogate:fp8: 1.25x hf_eager: missed" in md
    assert "- Qwen3-0.6B surogate:bf16: 58.0k vs 60.0k = 0.97x: met" in md
    assert "40.0k vs 56.0k = 0.71x: missed; tps figure from NVIDIA H100 80GB HBM3, another GPU" in md
    assert "Llama-3-8B surogate:fp8 packed >= 17k tokens/s: 16.0k: missed" in md
    assert "- Qwen3-0.6B hf_compile padded: did not finish in 300 s" in md
    assert "- Qwen3-0.6B liger: liger_kernel is not installed" in md
    saved = json.loads((tmp_path / "sft.json").read_text())
    assert [(r["system"], r["mode"]) for r in saved["records"]] == [(r["system"], r["mode"]) for r in records]
    assert saved["records"][1]["status"] == "timeout" and saved["settings"]["accum"] == 4
    assert (tmp_path / "sft.png").read_bytes()[:4] == b"\x89PNG"


def test_command_line_and_system_list():
    args = sft.parse_args([])
    assert args.models == ["0.6B", "8B", "llama3-8B"] and args.modes == ["padded", "packed"]
    assert args.systems == "all" and args.time_limit == 300 and args.out == sft.RESULTS
    assert sft.default_systems("sm_90") == ["hf_eager", "hf_compile", "liger", "surogate:bf16", "surogate:fp8",
                                            "surogate:qfp8", "surogate:qfp8-bf16", "surogate:qnf4"]
    args = sft.parse_args(["--models", "0.6B", "--modes", "packed", "--systems", "hf_eager,surogate:fp4+nograph"])
    assert args.systems == ["hf_eager", "surogate:fp4+nograph"] and args.modes == ["packed"]
    for bad in (["--models", "70B"], ["--modes", "sorted"], ["--systems", "surogate:fp6"],
                ["--systems", "deepspeed"], ["--steps", "0"]):
        with pytest.raises(SystemExit):
            sft.parse_args(bad)


def test_model_configs():
    llama = sft.model_config("llama3-8B")
    assert (llama.model_type, llama.hidden_size, llama.intermediate_size, llama.num_hidden_layers) == \
        ("llama", 4096, 14336, 32)
    assert (llama.num_key_value_heads, llama.vocab_size, llama.tie_word_embeddings) == (8, 128256, False)
    assert llama.rope_parameters["rope_theta"] == 500000.0 and llama.max_position_embeddings == 8192
    qwen = sft.model_config("8B")
    assert qwen.model_type == "qwen3" and qwen.vocab_size == 151936 and not qwen.use_cache and not llama.use_cache
    assert sft.model_name("1.7B") == "Qwen3-1.7B"


def test_help_runs():
    done = subprocess.run([sys.executable, str(REPO / "bench" / "sft.py"), "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "--time-limit" in done.stdout
