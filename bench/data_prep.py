"""Start-up and data-path costs of `surogate train` at user scale, on the CPU: synthetic data sets built from the
bundled examples (chat, alpaca, plain text, parquet), a tiny model (hidden 64, 2 layers) so that compute is nil.

  PYTHONPATH=. python bench/data_prep.py [--rows 100000] [--phases all]

Times each phase in this process (import, config, tokenizing one process / forked, the cache's first and second
read, packing, padded batching with group_by_length, the eval split) and a whole `surogate train` run (wall time,
peak RSS by /usr/bin/time -v); prints a table and writes bench/results/data_prep_cpu.{json,md}.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = Path(os.environ.get("H5_DATA", "/tmp/h5_data"))
MODELS = Path(os.environ.get("H5_MODELS", "/tmp/h5_models"))


# --- synthetic data --------------------------------------------------------------------------------------------

def _gsm8k() -> list[dict]:
    with open(ROOT / "surogate/data/gsm8k/train.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def _long_answer(rng: random.Random, pool: list[dict], words: int) -> str:
    out, n = [], 0
    while n < words:
        a = rng.choice(pool)["answer"]
        out.append(a)
        n += len(a.split())
    return "\n\n".join(out)


def make_chat(path: Path, rows: int, seed: int = 0) -> None:
    rng, pool = random.Random(seed), _gsm8k()
    systems = ["You are a concise math tutor.", "You are a helpful assistant. Think step by step and show the work.",
               "Answer as briefly as you can."]
    with open(path, "w") as f:
        for i in range(rows):
            msgs = [{"role": "system", "content": rng.choice(systems)}] if rng.random() < 0.7 else []
            for _ in range(rng.choice((1, 1, 2, 3))):
                q = rng.choice(pool)
                long = rng.random() < 0.05  # 1-4k tokens
                answer = _long_answer(rng, pool, rng.randint(700, 2800)) if long else q["answer"]
                msgs += [{"role": "user", "content": q["question"]}, {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": msgs}) + "\n")


def make_alpaca(path: Path, rows: int, seed: int = 1) -> None:
    rng, pool = random.Random(seed), _gsm8k()
    with open(path, "w") as f:
        for i in range(rows):
            q = rng.choice(pool)
            row = {"instruction": "Solve the problem.", "input": q["question"] if rng.random() < 0.6 else "",
                   "output": q["answer"]}
            if not row["input"]:
                row["instruction"] = q["question"]
            f.write(json.dumps(row) + "\n")


def make_text(path: Path, megabytes: int = 20, seed: int = 2) -> None:
    rng, pool = random.Random(seed), _gsm8k()
    size = 0
    with open(path, "w") as f:
        while size < megabytes * 1_000_000:
            text = "\n\n".join(f"{q['question']}\n{q['answer']}" for q in rng.sample(pool, rng.randint(1, 12)))
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            size += len(line)


def make_parquet(path: Path, source: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open(source) as f:
        rows = [json.loads(line) for line in f]
    pq.write_table(pa.Table.from_pylist(rows), path)


def make_model(path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from surogate.training.tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    cfg = AutoConfig.from_pretrained(ROOT / "surogate/data/qwen3-tiny.json")
    cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size = 64, 2, 128
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 4, 2, 16
    cfg.max_position_embeddings = 8192
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)


def build(rows: int) -> dict[str, Path]:
    DATA.mkdir(parents=True, exist_ok=True)
    files = {"chat": DATA / f"chat-{rows}.jsonl", "alpaca": DATA / "alpaca-50000.jsonl",
             "text": DATA / "text-20mb.jsonl", "parquet": DATA / "alpaca-50000.parquet"}
    for name, make in (("chat", lambda p: make_chat(p, rows)), ("alpaca", lambda p: make_alpaca(p, 50_000)),
                       ("text", make_text), ("parquet", lambda p: make_parquet(p, files["alpaca"]))):
        if not files[name].exists():
            make(files[name])
    if not (MODELS / "tiny" / "config.json").exists():
        make_model(MODELS / "tiny")
    return files


# --- phases --------------------------------------------------------------------------------------------------

def _digest(rows) -> str:
    """A digest of laid-out rows (ids, labels, positions, offsets): equal before and after a change."""
    h = hashlib.sha256()
    for a in (rows.ids, rows.targets, rows.pos, rows.offsets):
        if a is not None:
            h.update(a.tobytes())
    return h.hexdigest()[:16]


def _flat_digest(flat) -> str:
    h = hashlib.sha256()
    for a in (flat.ids, flat.labels, flat.offsets):
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def timed(results: list, phase: str, fn, **extra):
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    results.append({"phase": phase, "seconds": round(seconds, 3), **extra})
    print(f"{phase:<48} {seconds:8.2f} s  {extra}", flush=True)
    return out


def phases(files: dict[str, Path], results: list, cache: str) -> None:
    from surogate.training import data_files
    from surogate.training.chat_template import resolve_chat_template
    from surogate.training.data import one_per_row, pack_examples
    from surogate.training.data_cache import examples_key
    import surogate.training.data_formats as df
    from surogate.training.tokenizer import load_tokenizer

    os.environ["SUROGATE_CACHE_DIR"] = cache
    tok = timed(results, "load tokenizer (default)", lambda: load_tokenizer(None))
    chatml = resolve_chat_template("chatml")
    for name, fmt, template in (("chat", "messages", chatml), ("alpaca", "alpaca", None), ("text", "text", None),
                                ("parquet", "alpaca", None)):
        rows = timed(results, f"{name}: read rows", lambda: data_files.read_split(files[name], "train", None),
                     set=name)
        n = len(rows)
        results[-1].update(rows=n)
        if name == "chat":  # one process on a slice: the per-row cost without the fork
            saved, df.PARALLEL_MIN_ROWS = df.PARALLEL_MIN_ROWS, 10 ** 9
            sub = data_files.Rows(rows.source, rows.rows[:5000], rows.lines[:5000])
            try:
                one = timed(results, f"{name}: tokenize 5,000 rows, one process",
                            lambda: df.tokenize_flat(sub, fmt, tok, False, template), set=name, rows=len(sub))
            finally:
                df.PARALLEL_MIN_ROWS = saved
            results[-1].update(tokens=int(one.offsets[-1]), digest=_flat_digest(one))
            key = examples_key(rows, fmt, tok, False, template)
            other = load_tokenizer(MODELS / "tiny")
            results.append({"phase": "chat: cache key checks", "seconds": 0, "digest": " ".join(
                f"{what}:{'same' if k == key else 'new'}" for what, k in (
                    ("tokenizer copy", examples_key(rows, fmt, other, False, template)),
                    ("template", examples_key(rows, fmt, tok, False, chatml + " ")),
                    ("train_on_inputs", examples_key(rows, fmt, tok, True, template))))})
        from surogate.training.data_cache import cached_examples

        def tokenize(note):
            return df.tokenize_flat(rows, fmt, tok, False, template, note)

        flat = timed(results, f"{name}: tokenize (forked workers) + cache save",
                     lambda: cached_examples(rows, fmt, tok, False, template, tokenize, name), set=name, rows=n)
        results[-1].update(tokens=int(flat.offsets[-1]), digest=_flat_digest(flat))
        again = timed(results, f"{name}: cache hit (key + read back)",
                      lambda: cached_examples(rows, fmt, tok, False, template, tokenize, name), set=name, rows=n)
        results[-1].update(digest=_flat_digest(again))
        seq = 1024 if name == "text" else 2048
        packed = timed(results, f"{name}: pack (sample_packing, seq {seq})", lambda: pack_examples(flat, seq),
                       set=name, rows=n)
        results[-1].update(packed_rows=len(packed), digest=_digest(packed))
        if name in ("chat", "alpaca"):
            padded = timed(results, f"{name}: one_per_row (seq {seq})", lambda: one_per_row(flat, seq), set=name)
            results[-1].update(digest=_digest(padded))
            timed(results, f"{name}: group_by_length batches + padding note",
                  lambda: (padded.batch_rows(8, True, 42, True, True), padded.padding_note(8, 42, True, False)),
                  set=name)
            timed(results, f"{name}: first 50 padded grouped batches",
                  lambda: [b for _, b in zip(range(50), padded.batches(8, True, 42, True, True))], set=name)
    os.environ.pop("SUROGATE_CACHE_DIR")


def whole_run(name: str, config: dict, results: list, label: str) -> None:
    """`surogate train` end to end in a fresh process: wall time, peak RSS, the log's timestamps."""
    import yaml

    cfg_path = DATA / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "surogate", "train", str(cfg_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - start
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    first = re.search(r"first step ([\d.]+) s", p.stderr)
    results.append({"phase": f"surogate train: {label}", "seconds": round(seconds, 2), "rc": p.returncode,
                    "peak_rss_mb": int(rss.group(1)) // 1024 if rss else None,
                    "first_step_s": float(first.group(1)) if first else None})
    print(f"{'surogate train: ' + label:<48} {seconds:8.2f} s  rc {p.returncode}  peak "
          f"{results[-1]['peak_rss_mb']} MB", flush=True)
    if p.returncode:
        print(p.stderr[-3000:])


def main() -> None:
    import tempfile

    sys.path.insert(0, str(HERE))
    from microbench import command_line, table, write_results

    args, env = command_line(__doc__, "--rows", type=int, default=100_000)
    env["gpu"] = "cpu"
    files = build(args.rows)
    results: list[dict] = []
    cfg_line = ["/usr/bin/time", "-v", sys.executable, "-m", "surogate", "train", "--print-config"]
    for _ in range(2):
        start = time.perf_counter()
        p = subprocess.run(cfg_line, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                           cwd=ROOT)
        rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
        results.append({"phase": "surogate train --print-config (import + config checks)",
                        "seconds": round(time.perf_counter() - start, 2),
                        "peak_rss_mb": int(rss.group(1)) // 1024 if rss else None})
    with tempfile.TemporaryDirectory() as cache:
        phases(files, results, cache)
        os.environ["SUROGATE_CACHE_DIR"] = cache  # the whole runs find the phases' examples: warm
        base = {"model": str(MODELS / "tiny"), "sequence_len": 2048, "max_steps": 2, "per_device_train_batch_size": 2,
                "logging_steps": 1, "arch": "cpu", "eval_on_start": False}
        chat = {"path": str(files["chat"]), "format": "messages", "chat_template": "chatml"}
        whole_run("chat", {**base, "dataset": chat, "output_dir": str(DATA / "out-chat"),
                           "overwrite_output_dir": True}, results, "chat, packed, cache warm")
        whole_run("chat-pad", {**base, "sample_packing": False, "group_by_length": True, "dataset": chat,
                               "output_dir": str(DATA / "out-chat-pad"), "overwrite_output_dir": True}, results,
                  "chat, padded+grouped, warm")
        os.environ.pop("SUROGATE_CACHE_DIR")
    lines = [f"# data_prep: start-up and data path, {os.cpu_count()} CPUs (commit {env.get('commit')})", "",
             f"chat rows: {args.rows}; alpaca 50,000; text 20 MB; parquet = the alpaca rows.", ""]
    lines += table([("phase", "phase"), ("s", "seconds"), ("rows", lambda r: str(r.get("rows", ""))),
                    ("tokens", lambda r: str(r.get("tokens", ""))),
                    ("peak MB", lambda r: str(r.get("peak_rss_mb", "") or "")),
                    ("digest", lambda r: r.get("digest", ""))], results)
    md = write_results(args.out, f"data_prep_{args.rows}", env, {"rows": args.rows, "results": results}, lines)
    print("\n".join(lines))
    print(md)


if __name__ == "__main__":
    main()
