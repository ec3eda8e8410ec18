"""Fine-tuning throughput on real text: GSM8K examples of their own lengths (DESIGN.md section 5).

    python bench/sft.py                                         # 3 models x 2 modes x every system here
    python bench/sft.py --models 0.6B --modes padded --systems hf_eager,surogate:bf16 --steps 4

Data: GSM8K train (the 800-example sample bundled in the package unless --data names another JSONL),
tokenized with the bundled byte-level BPE (vocab 2048: valid ids for every model below), the prompt
masked from the loss (labels -100), EOS appended. Two modes:
- padded: micro-batches of --batch (8) examples in a seeded shuffled order, right-padded to the batch's
  longest. Peers get `attention_mask`; surogate systems do not (the padding follows every real token and
  its labels are -100, so causal attention is exact without it; what `surogate train` does), and
  GraphedStep pads each batch further to its shape bucket: the smallest of up to 12 lengths chosen from the
  timed micro-batches' widths (`surogate.training.buckets.choose`, as `surogate train` chooses them from an
  epoch's batches for a long run: this measures the steady state, after every bucket's capture; a short run
  takes fewer, `choose(runs=...)`), or with "+pad128" the next multiple of 128 (before those were chosen).
- grouped (named with --modes): padded, the batches of examples of similar lengths (`group_by_length: true`,
  surogate.training.data.grouped_batch_rows) for every system.
- packed: whole examples first-fit into rows of --seq (4096) tokens, `position_ids` restarting at each
  example (peers: transformers builds the block-diagonal mask from them; surogate: its attention reads
  them), --rows (1) row per micro-batch: 4096 tokens a micro-step, as bench/tps.py's 2 x 2048.
The micro-batch sequence is fixed (seeded; epochs repeat, reshuffled, when --steps asks for more).
Every optimizer step is --accum (4) micro-batches, then fused AdamW.

Models: Qwen3-0.6B, Qwen3-8B and Llama-3-8B by default, or any other dense model of bench/tps.py by its key
there (e.g. 1.7B, Gemma-2-2B) or a local directory with a model's config.json (your own model; its vocabulary
must hold the bundled tokenizer's 2048 ids): its configs, random weights, bf16; LoRA r=16, alpha 32 as its lora_config
(the 7 projections; Phi-3: its 4 linears). Systems: HF+PEFT eager, HF+PEFT under torch.compile(dynamic=True),
Liger-Kernel where importable, and every recipe native on this GPU ("surogate:<recipe>", suffixes as in
bench/tps.py; an emulated recipe runs only when named, labelled so). Each (model, system, mode) runs in
its own subprocess under --time-limit seconds: one that runs out is recorded as "timeout" with the last
progress line it printed (phase, optimizer steps done, partial tokens/s of the timed steps done).

Warm-up: first one micro-batch of every shape bucket (batch rows, length padded to its bucket) that the
timed micro-batches contain, in order of first appearance, then the next timed micro-batches until at
least --warmup optimizer steps are filled. So every shape the timed steps see has been compiled, tuned
and (surogate) captured before the clock starts; packed mode has one shape. Then the timed pass runs
all --steps optimizer steps. Counted over the timed steps only:
- tokens_per_s: non-padding tokens (prompt included) / the summed wall time of the timed optimizer steps
  (torch.cuda.synchronize around each);
- autotune_runs: `surogate.kernels.tuning.stats()["tuning_runs"]` (shape buckets benchmarked);
- recompiles: `torch._dynamo.utils.counters["stats"]["unique_graphs"]` (graphs Dynamo compiled; every
  recompilation and every graph break adds one; present in torch 2.0 to 2.13). frames_compiled is
  `counters["frames"]["ok"]` (frames converted), recorded beside it.
step_s is the median timed optimizer step, step_times_s each of them (the same batches for every system: an
outlier shows there). peak_gib is the whole run's max_memory_allocated; first_step_s the time from the start of
model build to the end of the first optimizer step (compilation included; disk caches of earlier subprocesses
help).

Writes bench/results/sft.json (one record per (model, system, mode)), sft.md (speed-up of each surogate
recipe over the best peer per (model, mode), and the targets: padded, every native recipe >= 1.5x the
best peer; packed, within 10% of bench/results/tps.json for the same model and recipe; Llama-3-8B fp8
packed >= 17k tokens/s) and sft.png. The data preparation, records and reports are tested on CPU by
tests/test_sft_smoke.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench/: microbench

from microbench import load_script  # noqa: E402

RESULTS = HERE / "results"
tps = load_script("tps")

# The default models: key here -> bench/tps.py's key (records carry tps.model_name of it: "Llama-3-8B").
MODELS = {"0.6B": "0.6B", "8B": "8B", "llama3-8B": "Llama-3-8B"}
MODES = ("padded", "grouped", "packed")
PEERS = ["hf_eager", "hf_compile", "liger"]
PAD_TO = 128  # GraphedStep's shape bucket
MARK = "SFT-PROGRESS "  # worker stdout lines the parent reads (the last one says how far a timeout got)
DONE = "SFT-RESULT "
PADDED_TARGET, PACKED_TARGET, LLAMA_FP8_TARGET = 1.5, 0.9, 17e3


def tps_key(key: str) -> str:
    """bench/tps.py's key of model `key`: "Llama-3-8B" for "llama3-8B"; a dense model of bench/tps.py (Qwen3
    size, ARCHS name or a local model directory) as is. MoE models are not run here."""
    key = MODELS.get(key, key)
    if key in tps.QWEN3 or key in tps.ARCHS or (tps.local_config_dir(key) is not None and not tps.is_moe(key)):
        return key
    raise ValueError(f"unknown model {key!r}; known: {', '.join(dict.fromkeys([*MODELS, *tps.QWEN3, *tps.ARCHS]))}, "
                     "or a local directory with the config.json of a dense model")


def model_name(key: str) -> str:
    """"Qwen3-0.6B" for "0.6B", "Llama-3-8B" for "llama3-8B": bench/tps.py's record names."""
    return tps.model_name(tps_key(key))


def model_config(key: str):
    """The model's config, `use_cache=False`: with a KV cache transformers skips the packed-sequence mask
    it builds from `position_ids` (and training needs no cache; surogate.compile sets the same)."""
    config = tps.model_config(tps_key(key))
    config.use_cache = False
    return config


def default_systems(arch: str) -> list[str]:
    """The peers and every recipe native on `arch` (emulated ones, fp4/qfp4 on sm_90, only when named)."""
    from surogate.kernels.plan import native_recipes

    return PEERS + [f"surogate:{r}" for r in native_recipes(arch)]


def check_system(system: str) -> None:
    """Raise ValueError for a name that is no peer and no valid surogate:<recipe>[+option...]."""
    if system.startswith("surogate:"):
        from surogate.recipes import get

        get(tps.surogate_system(system)[0])
    elif system not in PEERS:
        raise ValueError(f"unknown system {system!r}; use {', '.join(PEERS)} or surogate:<recipe>")


def available(system: str, key: str) -> str | None:
    """None if `system` can train model `key` here, else why not (bench/tps.py's checks, plus Liger's
    patch function for the model's architecture)."""
    why = tps.available(system) or tps.unsupported(tps_key(key), system)
    if why or system != "liger":
        return why
    fn = tps.LIGER[model_config(key).model_type]
    try:
        module = importlib.import_module("liger_kernel.transformers")
        getattr(module, fn)
    except Exception as e:  # an installed wheel that does not import with these torch/transformers versions
        return f"liger_kernel.transformers.{fn} does not import: {type(e).__name__}: {e}"
    return None


# ----------------------------------------------------------------------------- data (CPU)


def load_examples(data: "str | os.PathLike | None", limit: int | None = None) -> list:
    """GSM8K examples of `data` (default: the bundled train sample), tokenized, prompt masked."""
    from surogate.training.data import (
        bundled_dataset_dir,
        read_jsonl,
        tokenize_examples,
    )
    from surogate.training.tokenizer import load_tokenizer

    path = Path(data) if data else bundled_dataset_dir() / "train.jsonl"
    rows = read_jsonl(path, limit)
    if not rows:
        raise ValueError(f"{path} has no examples")
    return tokenize_examples(rows, "gsm8k", load_tokenizer(None))


def check_vocabularies(keys: list[str]) -> None:
    """Refuse, before any worker starts, a model whose embedding cannot take the bundled tokenizer's ids (a
    local model's, say): on the GPU such an id is a device-side assert, not an error message."""
    from surogate.training.tokenizer import load_tokenizer

    ids = len(load_tokenizer(None))
    small = [f"{model_name(k)} ({model_config(k).vocab_size})" for k in keys if model_config(k).vocab_size < ids]
    if small:
        raise SystemExit(f"sft: the vocabulary of {', '.join(small)} is smaller than the bundled tokenizer's {ids} "
                         "ids; measure a model with at least that many")


def micro_batches(examples: list, mode: str, count: int, batch: int = 8, rows: int = 1, seq: int = 4096,
                  pad_id: int = 0, seed: int = 0) -> list:
    """The first `count` micro-batches (`surogate.training.data.Batch`, CPU) of the fixed sequence a mode trains on:
    padded, `batch` examples per micro-batch; packed, `rows` rows of `seq` tokens. Epochs repeat with the
    order reshuffled (seed + epoch) when one is not enough; a short last batch is dropped."""
    from surogate.training.data import one_per_row, pack_examples

    if mode == "packed":
        layout, size = pack_examples(examples, seq, pad_id), rows
    elif mode in ("padded", "grouped"):
        layout, size = one_per_row(examples, seq, pad_id), batch
    else:
        raise ValueError(f"unknown mode {mode!r}; use {' or '.join(MODES)}")
    if len(layout) < size:
        raise ValueError(f"{mode}: {len(layout)} rows, fewer than one micro-batch of {size}")
    out: list = []
    epoch = 0
    while len(out) < count:
        for b in layout.batches(size, shuffle=True, seed=seed + epoch, drop_last=True,
                                group_by_length=mode == "grouped"):
            if len(out) == count:
                break
            out.append(b)
        epoch += 1
    return out


def shape_buckets(timed: list, mode: str) -> tuple[int, ...]:
    """The CUDA graph lengths `surogate train` would choose for these micro-batches (`buckets.choose` over their
    widths; packed rows: none, they have one shape)."""
    from surogate.training import buckets

    return () if mode == "packed" else buckets.choose([b["input_ids"].shape[1] for b in timed])


def shape_key(batch, chosen: tuple[int, ...] = ()) -> tuple[int, int]:
    """(rows, length padded to its shape bucket: one of `chosen`, else a multiple of 128): what decides a compiled
    shape and a CUDA graph."""
    from surogate.training.buckets import padded_length

    n, length = batch["input_ids"].shape
    return n, padded_length(length, chosen, PAD_TO)


def warmup_indices(timed: list, accum: int, warmup_steps: int, chosen: tuple[int, ...] = ()) -> list[int]:
    """Indices into `timed` for the warm-up: the first micro-batch of each shape bucket, then the next
    ones until `warmup_steps` optimizer steps of `accum` are filled (whole steps where `timed` allows)."""
    seen: set = set()
    idx = []
    for i, b in enumerate(timed):
        if shape_key(b, chosen) not in seen:
            seen.add(shape_key(b, chosen))
            idx.append(i)
    chosen = set(idx)
    for i in range(len(timed)):
        if len(idx) >= warmup_steps * accum and len(idx) % accum == 0:
            break
        if i not in chosen:
            idx.append(i)
    return idx


def data_summary(batches: list, chosen: tuple[int, ...] = ()) -> dict:
    """Real tokens, shape buckets and padding shares of a list of micro-batches: before the bucket padding
    (pad_fraction) and after it (bucket_pad_fraction, what a CUDA-graphed surogate step computes)."""
    real = sum(b.num_tokens for b in batches)
    fed = sum(b["input_ids"].numel() for b in batches)
    bucketed = sum(shape_key(b, chosen)[0] * shape_key(b, chosen)[1] for b in batches)
    return {"micro_batches": len(batches), "tokens": real, "buckets": len({shape_key(b, chosen) for b in batches}),
            "shape_buckets": list(chosen), "pad_fraction": 1 - real / fed if fed else 0.0,
            "bucket_pad_fraction": 1 - real / bucketed if bucketed else 0.0}


# ----------------------------------------------------------------------------- worker (GPU)


def build(key: str, system: str):
    """The model a system trains (bench/tps.py's `build` for any config): random bf16 weights on CUDA."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    config = model_config(key)
    if system == "liger":
        tps.apply_liger(config.model_type)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    if system.startswith("surogate:"):
        import surogate

        recipe, options = tps.surogate_system(system)
        options.pop("cuda_graphs", None)  # driver options (micro_step_fn), not compile options
        options.pop("data_buckets", None)
        emulated = tps.recipe_of(system)[1]  # only when named: default_systems() has native recipes only
        return surogate.compile(model, recipe=recipe, lora=tps.lora_config(tps_key(key)), allow_emulation=emulated,
                                **options)
    model = get_peft_model(model, tps.lora_config(tps_key(key)))
    if system == "hf_compile":
        model = torch.compile(model, dynamic=True)
    return model


def micro_step_fn(model, system: str, accum: int, chosen: tuple[int, ...] = ()):
    """(`batch -> loss`, the GraphedStep or None): forward + backward of one micro-batch (loss / accum);
    surogate systems replay it from CUDA graphs unless "+nograph" (their shapes: the `chosen` buckets, as
    `surogate train` chooses them, unless "+pad128": every multiple of 128), peers run eagerly."""
    options = tps.surogate_system(system)[1] if system.startswith("surogate:") else {}
    if system.startswith("surogate:") and options.get("cuda_graphs", True):
        from surogate.training.graphed_step import GraphedStep

        graphed = GraphedStep(model, loss_scale=1 / accum, buckets=chosen if options.get("data_buckets", True) else ())
        return (lambda batch: graphed(**batch)), graphed

    def eager(batch):
        loss = model(**batch).loss
        (loss / accum).backward()
        return loss.detach()

    return eager, None


def _say(prefix: str, payload: dict) -> None:
    print(prefix + json.dumps(payload), flush=True)


def worker(key: str, system: str, mode: str, steps: int, warmup: int, batch: int, rows: int, seq: int, accum: int,
           data: str | None, limit: int | None, seed: int) -> dict:
    import torch
    from torch._dynamo.utils import counters

    from surogate.kernels import tuning

    examples = load_examples(data, limit)
    timed_cpu = micro_batches(examples, mode, steps * accum, batch=batch, rows=rows, seq=seq, seed=seed)
    data_buckets = system.startswith("surogate:") and tps.surogate_system(system)[1].get("data_buckets", True)
    chosen = shape_buckets(timed_cpu, mode) if data_buckets else ()
    warm_idx = warmup_indices(timed_cpu, accum, warmup, chosen)
    drop_mask = system.startswith("surogate:")  # right padding, labels -100: causal attention is exact
    gpu = [{k: v.cuda() for k, v in b.items() if not (drop_mask and k == "attention_mask")} for b in timed_cpu]
    tokens = [b.num_tokens for b in timed_cpu]

    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model = build(key, system)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0,
                            fused=True)
    micro_step, graphed = micro_step_fn(model, system, accum, chosen)
    state = {"first_step_s": None, "timed_s": 0.0, "timed_tokens": 0, "losses": [], "times": []}

    def run(indices: list[int], phase: str) -> None:
        n_steps = -(-len(indices) // accum)
        for s in range(n_steps):
            group = indices[s * accum:(s + 1) * accum]
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            losses = [micro_step(gpu[i]).clone() for i in group]
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            if state["first_step_s"] is None:
                state["first_step_s"] = t1 - start
            if phase == "timed":
                state["timed_s"] += t1 - t0
                state["timed_tokens"] += sum(tokens[i] for i in group)
                state["times"].append(t1 - t0)
            state["losses"].append(float(torch.stack(losses).mean()))
            _say(MARK, {"phase": phase, "done": s + 1, "of": n_steps, "elapsed_s": round(t1 - start, 1),
                        "first_step_s": state["first_step_s"], "timed_s": state["timed_s"],
                        "timed_tokens": state["timed_tokens"], "peak_gib": torch.cuda.max_memory_allocated() / 2**30})

    _say(MARK, {"phase": "warm-up", "done": 0, "of": -(-len(warm_idx) // accum),
                "elapsed_s": round(time.perf_counter() - start, 1)})  # built
    run(warm_idx, "warm-up")
    tuned0, graphs0, frames0 = (tuning.stats()["tuning_runs"], counters["stats"]["unique_graphs"],
                                counters["frames"]["ok"])
    eager0 = graphed.eager_calls if graphed else 0
    run(list(range(len(gpu))), "timed")
    losses = state["losses"]
    return {
        "model": model_name(key), "system": system, "mode": mode, "status": "ok",
        "tokens_per_s": state["timed_tokens"] / state["timed_s"],
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "first_step_s": state["first_step_s"],
        "autotune_runs": tuning.stats()["tuning_runs"] - tuned0,
        "recompiles": counters["stats"]["unique_graphs"] - graphs0,
        "frames_compiled": counters["frames"]["ok"] - frames0, "autotune_runs_warmup": tuned0,
        "step_s": statistics.median(state["times"]), "step_times_s": state["times"], "steps": steps,
        "warmup_micro_batches": len(warm_idx),
        "cuda_graphs": len(graphed.graphs) if graphed else 0,
        "eager_calls": (graphed.eager_calls - eager0) if graphed else None,
        "graph_failure": graphed.failure if graphed else None, "loss_first": losses[0], "loss_last": losses[-1],
        "finite": all(map(math.isfinite, losses)),
        "data": str(data) if data else "bundled gsm8k/train.jsonl", "examples": len(examples),
        **data_summary(timed_cpu, chosen),
    }


# ----------------------------------------------------------------------------- parent


def run_worker(cmd: list[str], timeout: float) -> tuple[int | None, str, str]:
    """(return code, or None when killed at `timeout`; stdout; stderr). The worker runs in a session of
    its own, so that a timeout kills it with whatever it started (Inductor's compile workers)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # it ended between the timeout and the kill
            pass
        out, err = proc.communicate()
        return None, out or "", err or ""


def _last(stdout: str, prefix: str) -> dict | None:
    lines = [line[len(prefix):] for line in stdout.splitlines() if line.startswith(prefix)]
    return json.loads(lines[-1]) if lines else None


def progress_text(p: dict | None) -> str:
    if p is None:
        return "not built (model build or data preparation)"
    if p["done"] == 0 and p["phase"] == "warm-up":
        return f"built at {p['elapsed_s']:.0f} s, no optimizer step finished"
    return f"{p['phase']} {p['done']}/{p['of']} optimizer steps at {p['elapsed_s']:.0f} s"


def record_from_run(key: str, system: str, mode: str, rc: int | None, stdout: str, stderr: str,
                    time_limit: float) -> dict:
    """The record of one worker run: its result, or a timeout / error record with how far it got."""
    result = _last(stdout, DONE)
    if rc == 0 and result is not None:
        return result
    p = _last(stdout, MARK)
    record = {"model": model_name(key), "system": system, "mode": mode, "tokens_per_s": None,
              "peak_gib": (p or {}).get("peak_gib"), "first_step_s": (p or {}).get("first_step_s"),
              "autotune_runs": None, "recompiles": None, "progress": progress_text(p),
              "steps_done": p["done"] if p and p["phase"] == "timed" else 0}
    if p and p.get("timed_s"):
        record["partial_tokens_per_s"] = p["timed_tokens"] / p["timed_s"]
    if rc is None:
        record.update(status="timeout", error=f"did not finish in {time_limit:.0f} s: {record['progress']}")
    else:
        tail = (stderr.strip() or stdout.strip())[-400:]
        record.update(status="error", error=f"exit {rc} ({record['progress']}): {tail}")
    return record


def _ok(r: dict | None) -> bool:
    return r is not None and r.get("status") == "ok"


def _system_order(system: str) -> tuple:
    """Peers first (PEERS order), then surogate recipes in bench/tps.py's order."""
    if system in PEERS:
        return (0, PEERS.index(system), "", system)
    return (1,) + tps.system_order(system)[1:]


def _cell(r: dict | None) -> str:
    if r is None:
        return "-"
    if _ok(r):
        return f"{r['tokens_per_s'] / 1e3:.1f}k ({r['peak_gib']:.1f}, {r['first_step_s']:.0f})"
    return f"{r['status']}: {r.get('progress', '?')}"


def _best_peer(by: dict, model: str, mode: str) -> tuple[str, float] | None:
    peers = [(s, by[(model, s, mode)]["tokens_per_s"]) for s in PEERS if _ok(by.get((model, s, mode)))]
    return max(peers, key=lambda x: x[1]) if peers else None


def tps_reference(path: Path) -> dict[tuple[str, str], dict]:
    """(model, system) -> record of bench/results/tps.json's fixed-shape measurements (errors left out)."""
    if not path.is_file():
        return {}
    return {(r["model"], r["system"]): r for r in json.loads(path.read_text())["records"]
            if "error" not in r and r.get("tokens_per_s")}


def _is_plain_native(r: dict) -> bool:
    return r["system"].startswith("surogate:") and "+" not in r["system"] and not r.get("emulated")


def target_lines(records: list[dict], tps_ref: dict, gpu: str) -> list[str]:
    """The three targets of the benchmark, one line per (model, recipe) they apply to."""
    by = {(r["model"], r["system"], r["mode"]): r for r in records}
    lines = [f"Padded: every native surogate recipe >= {PADDED_TARGET}x the best peer (same model):", ""]
    for r in records:
        if r["mode"] != "padded" or not _is_plain_native(r):
            continue
        best = _best_peer(by, r["model"], "padded")
        if not _ok(r):
            lines.append(f"- {r['model']} {r['system']}: missed ({r['status']})")
        elif best is None:
            lines.append(f"- {r['model']} {r['system']}: no peer measured")
        else:
            x = r["tokens_per_s"] / best[1]
            verdict = "met" if x >= PADDED_TARGET else "missed"
            lines.append(f"- {r['model']} {r['system']}: {x:.2f}x {best[0]}: {verdict}")
    lines += ["", f"Packed: within {1 - PACKED_TARGET:.0%} of the fixed-shape figure of bench/results/tps.json "
              "(same model and recipe):", ""]
    for r in records:
        ref = tps_ref.get((r["model"], r["system"]))
        if r["mode"] != "packed" or not r["system"].startswith("surogate:") or ref is None:
            continue
        where = "" if ref.get("gpu") == gpu else f"; tps figure from {ref.get('gpu', '?')}, another GPU"
        if not _ok(r):
            lines.append(f"- {r['model']} {r['system']}: missed ({r['status']}){where}")
            continue
        x = r["tokens_per_s"] / ref["tokens_per_s"]
        verdict = "met" if x >= PACKED_TARGET else "missed"
        lines.append(f"- {r['model']} {r['system']}: {r['tokens_per_s'] / 1e3:.1f}k vs "
                     f"{ref['tokens_per_s'] / 1e3:.1f}k = {x:.2f}x: {verdict}{where}")
    llama = by.get(("Llama-3-8B", "surogate:fp8", "packed"))
    if llama is None:
        verdict = "not measured"
    elif not _ok(llama):
        verdict = f"missed ({llama['status']})"
    else:
        verdict = f"{llama['tokens_per_s'] / 1e3:.1f}k: " + ("met" if llama["tokens_per_s"] >= LLAMA_FP8_TARGET
                                                            else "missed")
    lines += ["", f"Llama-3-8B surogate:fp8 packed >= {LLAMA_FP8_TARGET / 1e3:.0f}k tokens/s: {verdict}"]
    return lines


def write_results(records: list[dict], skipped: dict[str, str], env: dict, settings: dict, out: Path,
                  tps_json: Path = RESULTS / "tps.json") -> str:
    """sft.json, sft.md and sft.png under `out`; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "sft.json").write_text(json.dumps({"environment": env, "settings": settings, "skipped": skipped,
                                              "records": records}, indent=2))
    models = list(dict.fromkeys(r["model"] for r in records))
    modes = [m for m in MODES if any(r["mode"] == m for r in records)]
    systems = sorted(dict.fromkeys(r["system"] for r in records), key=_system_order)
    emulated = {r["system"] for r in records if r.get("emulated")}
    by = {(r["model"], r["system"], r["mode"]): r for r in records}
    head = "| model | " + " | ".join(s + (" (emulated)" if s in emulated else "") for s in systems) + " |"
    rule = "|---|" + "---|" * len(systems)
    lines = [f"# Fine-tuning throughput on GSM8K ({env['gpu']}, torch {env['torch']}, triton {env['triton']}, "
             f"commit {env['commit']})", "",
             f"Data: {settings.get('data', '?')} ({settings.get('examples', '?')} examples), bundled tokenizer, prompt "
             f"masked. padded: {settings.get('batch')} examples a micro-batch, padded per batch; packed: "
             f"{settings.get('rows')} x {settings.get('seq')}-token rows, boundaries kept; grad accum "
             f"{settings.get('accum')}, {settings.get('steps')} timed optimizer steps after warm-up; time limit "
             f"{settings.get('time_limit')} s per run. Non-padding tokens/s (peak GiB, first step s)."]
    for mode in modes:
        lines += ["", f"## {mode}", "", head, rule]
        lines += [f"| {m} | " + " | ".join(_cell(by.get((m, s, mode))) for s in systems) + " |" for m in models
                  if any((m, s, mode) in by for s in systems)]
    lines += ["", "Autotune runs / recompiles after warm-up:", "", "| model, mode | " + head[len("| model | "):], rule]
    for m in models:
        for mode in [mode for mode in modes if any((m, s, mode) in by for s in systems)]:
            cells = [f"{r['autotune_runs']} / {r['recompiles']}" if _ok(r := by.get((m, s, mode))) else "-"
                     for s in systems]
            lines.append(f"| {m}, {mode} | " + " | ".join(cells) + " |")
    lines += ["", "Speed-up of each surogate system over the best peer of the same model and mode:", ""]
    for m in models:
        for mode in modes:
            best = _best_peer(by, m, mode)
            for s in systems:
                r = by.get((m, s, mode))
                if best and s.startswith("surogate:") and _ok(r):
                    lines.append(f"- {m} {mode} {s}: {r['tokens_per_s'] / best[1]:.2f}x ({best[0]} "
                                 f"{best[1] / 1e3:.1f}k)")
    lines += ["", "## Targets", ""] + target_lines(records, tps_reference(tps_json), env["gpu"])
    commits = sorted({r.get("commit", "?") for r in records})
    if len(commits) > 1:
        lines += ["", "Records come from several commits (each record's `commit` in sft.json): " + ", ".join(commits)]
    failed = [r for r in records if not _ok(r)]
    if failed or skipped:
        lines += ["", "## Not measured", ""]
        lines += [f"- {r['model']} {r['system']} {r['mode']}: {r.get('error', r['status'])}" for r in failed]
        lines += [f"- {k}: {v}" for k, v in skipped.items()]
    md = "\n".join(lines) + "\n"
    (out / "sft.md").write_text(md)
    plot(records, out / "sft.png")
    return md


def plot(records: list[dict], path: Path) -> None:
    """One panel per mode: groups of bars (one per system) per model; a run that did not finish is an X."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    modes = [m for m in MODES if any(r["mode"] == m for r in records)]
    if not modes:
        return
    models = list(dict.fromkeys(r["model"] for r in records))
    systems = sorted(dict.fromkeys(r["system"] for r in records), key=_system_order)
    by = {(r["model"], r["system"], r["mode"]): r for r in records}
    width = 0.8 / len(systems)
    fig = Figure(figsize=(2 + 0.45 * len(systems) * len(models), 3.8 * len(modes)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(modes), 1, squeeze=False)[:, 0]
    colors = {s: (f"C{i}" if s.startswith("surogate:") else f"{0.35 + 0.2 * i:.2f}") for i, s in enumerate(systems)}
    for ax, mode in zip(axes, modes):
        for j, s in enumerate(systems):
            xs = [i - 0.4 + width * (j + 0.5) for i in range(len(models))]
            rs = [by.get((m, s, mode)) for m in models]
            ax.bar([x for x, r in zip(xs, rs) if _ok(r)], [r["tokens_per_s"] / 1e3 for r in rs if _ok(r)],
                   width, color=colors[s])
            failed = [x for x, r in zip(xs, rs) if r is not None and not _ok(r)]
            ax.plot(failed, [0] * len(failed), "x", color=colors[s], markersize=10, markeredgewidth=3)
        ax.set_xticks(range(len(models)), models)
        ax.set_ylabel("k non-padding tokens/s")
        ax.set_title(f"{mode} (x: timeout or error)")
    axes[0].legend(handles=[Patch(color=colors[s], label=s) for s in systems], fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)} "
                   f"(or another dense model of bench/tps.py by its key there: a Qwen3 size, or a name of its ARCHS)")
    p.add_argument("--modes", default="padded,packed", help="comma list of padded, grouped (padded batches of "
                   "similar lengths: group_by_length), packed")
    p.add_argument("--systems", default="all", help="comma list of hf_eager, hf_compile, liger, surogate:<recipe>"
                   "[+option], or 'all' (the peers and every recipe native on this GPU)")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps (each --accum micro-batches)")
    p.add_argument("--warmup", type=int, default=2, help="optimizer steps of warm-up, at least (see above)")
    p.add_argument("--batch", type=int, default=8, help="examples per padded micro-batch")
    p.add_argument("--rows", type=int, default=1, help="packed rows per micro-batch")
    p.add_argument("--seq", type=int, default=4096, help="packed row length (and the longest padded example)")
    p.add_argument("--accum", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="order of the examples")
    p.add_argument("--data", default=None, help="GSM8K-format JSONL (default: the bundled 800-example sample)")
    p.add_argument("--limit", type=int, default=None, help="read only the first N examples")
    p.add_argument("--time-limit", type=int, default=300, help="seconds per (model, system, mode) subprocess")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tps-json", type=Path, default=RESULTS / "tps.json", help="fixed-shape figures to compare")
    p.add_argument("--append", action="store_true", help="keep the records already in --out/sft.json "
                   "(a re-measured (model, system, mode) replaces its own)")
    p.add_argument("--worker", nargs=3, metavar=("MODEL", "SYSTEM", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        args.models = args.models.split(",")
        for key in args.models:
            model_name(key)
        args.modes = args.modes.split(",")
        if bad := [m for m in args.modes if m not in MODES]:
            raise ValueError(f"unknown mode {bad[0]!r}; use {' or '.join(MODES)}")
        if args.systems != "all":
            args.systems = args.systems.split(",")
            for s in args.systems:
                check_system(s)
    except ValueError as e:
        p.error(str(e))
    if min(args.steps, args.warmup, args.batch, args.rows, args.accum) < 1:
        p.error("--steps, --warmup, --batch, --rows and --accum must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shape = dict(steps=args.steps, warmup=args.warmup, batch=args.batch, rows=args.rows, seq=args.seq,
                 accum=args.accum, seed=args.seed)
    if args.worker:
        _say(DONE, worker(*args.worker, **shape, data=args.data, limit=args.limit))
        return 0

    from surogate.recipes import current_arch

    systems = default_systems(current_arch()) if args.systems == "all" else args.systems
    examples = load_examples(args.data, args.limit)  # fails here, once, on bad data; builds the tokenizer cache
    check_vocabularies(args.models)
    env = tps.environment()
    settings = {**shape, "data": args.data or "bundled gsm8k/train.jsonl", "examples": len(examples),
                "time_limit": args.time_limit}
    saved = args.out / "sft.json"
    previous = json.loads(saved.read_text()) if args.append and saved.is_file() else {}
    records, skipped = previous.get("records", []), previous.get("skipped", {})
    flags = [f"--{k}={v}" for k, v in shape.items()] + (["--data", args.data] if args.data else []) + \
        ([f"--limit={args.limit}"] if args.limit else [])
    for key in args.models:
        for system in systems:
            why = available(system, key)
            if why:
                skipped[f"{model_name(key)} {system}"] = why
                print(f"skip {model_name(key)} {system}: {why}", flush=True)
                continue
            for mode in args.modes:
                cmd = [sys.executable, __file__, "--worker", key, system, mode] + flags
                rc, out, err = run_worker(cmd, args.time_limit)
                record = record_from_run(key, system, mode, rc, out, err, args.time_limit)
                record.update(env)
                record["recipe"], record["emulated"] = tps.recipe_of(system)
                records = [r for r in records if (r["model"], r["system"], r["mode"]) !=
                           (record["model"], system, mode)] + [record]
                shown = (f"{record['tokens_per_s']:9.0f} tok/s  {record['peak_gib']:5.1f} GiB  first step "
                         f"{record['first_step_s']:6.1f} s  autotune {record['autotune_runs']}  recompiles "
                         f"{record['recompiles']}") if _ok(record) else record["error"].splitlines()[-1][:200]
                print(f"{record['model']:14} {system:22} {mode:6} {shown}", flush=True)
                write_results(records, skipped, env, settings, args.out, args.tps_json)
    print(write_results(records, skipped, env, settings, args.out, args.tps_json) if records else "no records")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
