"""Recipe accuracy study: does each low-precision recipe fine-tune as well as bf16?

A random base would tell nothing (any recipe "matches" bf16 on noise), so the study first
pretrains a small Qwen3 on a real corpus that is on every machine and unlike GSM8K: the Python
standard library's own sources (`.py` files under sysconfig's stdlib path, sorted, up to a byte
budget). Then it LoRA-fine-tunes that same base on GSM8K train once per recipe, with the same
seed, data order and hyperparameters (`surogate.training.train.train`, the loop behind `surogate train`),
and compares the recipes' GSM8K test losses with bf16's.

Phases (each one a separate command, so that each GPU call stays under 10 minutes):
  pretrain  byte-level BPE (surogate.training.tokenizer, trained on stdlib + GSM8K train), then the base
            pretrained in bf16 autocast over FP32 master weights, saved in bf16 under
            <work>/base-<base>-<key>/ (key: every setting + Python version + data hash): built once.
  finetune  for each recipe: LoRA on the cached base, then evaluation with the same recipe:
            eval loss = mean cross-entropy over the *answer* tokens of GSM8K test examples
            ("Question: ...\\nAnswer:" is masked; the answer, "#### N" and EOS are scored; one
            example per row, never packed), the same loss with the LoRA B matrices zeroed (the base
            as the recipe stores it) and, with --exact-match K, greedy-decoded "#### N" accuracy
            on the first K test questions. One record per recipe: <work>/runs/<key>/<recipe>.json.
            A fine-tune whose loss turns NaN/Inf (the trainer's FloatingPointError) is a result too: its
            record says "diverged" (message, step, the train losses so far, no eval), the other recipes
            of the call still run, and the command then exits non-zero.
  report    fidelity.json, fidelity.md (targets met/missed; DIVERGED rows; "No record:" for the recipes
            this machine runs that have none, e.g. a crashed run) and fidelity_loss.png in --out.

CPU smoke (tests/test_fidelity_smoke.py):
    python bench/fidelity.py --base tiny --recipes bf16,qfp8 --out /tmp/fid --work /tmp/fid/work

The GPU study, --base small (the default), one H100, each line one call of under 10 minutes. A GPU
machine keeps files only 30 s after a call, so the work dir (runs/fidelity, git-ignored: base 41 MB
in 15 MB shards + records) comes back through $OUT as 15 MB tar parts and is carried into the next
call, with the full GSM8K copied to runs/gsm8k (cp -r ../shared/data/gsm8k runs/):
    python bench/fidelity.py --phase pretrain && python bench/fidelity.py --phase finetune --recipes bf16
    python bench/fidelity.py --phase finetune --recipes fp8,qfp8,qfp8-bf16
    python bench/fidelity.py --phase finetune --recipes qnf4,fp4,qfp4 && python bench/fidelity.py --phase report

Ablation of the sm_90 persistent GEMM route (surogate.kernels.variants.PERSISTENT_SM90): fp8 is routed there from
1,024 rows (this study's 2 x 512). With Triton 3.6's warp-specialized configs, which the library no longer offers,
fp8's loss turned NaN within 41 steps in 7 runs of 7 under CUDA graphs (bench/NOTES.md runs 63-70).
--persistent on sends every variant the persistent kernel runs there at any row count (True), off none
(False); it changes nothing off sm_90. The record is kept beside
the default run's as <recipe>+persistent / <recipe>+nopersistent (then -seed<N>). To reproduce the old fault, set
surogate.kernels.configs.PERSISTENT_WARP_SPECIALIZE = True and run
    python bench/fidelity.py --phase finetune --recipes fp8 --persistent on
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import re
import shutil
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FORMAT_VERSION = "1"  # bump when a change to this file changes what a cached base or record holds
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Eval-loss ceilings relative to bf16 (ratio = recipe / bf16). qfp8-bf16 stores the same weights as qfp8.
LOSS_TARGETS = {"fp8": 1.01, "qfp8": 1.01, "qfp8-bf16": 1.01, "qnf4": 1.02, "fp4": 1.03, "qfp4": 1.03}
# --persistent on/off -> the record name's suffix (no suffix: the library's own routing).
PERSISTENT_TAGS = {"on": "+persistent", "off": "+nopersistent"}
# What only a fine-tune that finished puts in its record (the evaluation, the speed): None where it diverged.
RESULT_KEYS = ("eval_loss", "eval_examples", "eval_tokens", "eval_row_len", "exact_match", "eval_loss_base", "eval_s",
               "tokens_per_s", "time_to_first_step_s", "compile")


@dataclass(frozen=True)
class BaseSpec:
    """A pretrained base and the defaults of the study run on it."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    seq: int  # pretraining and fine-tuning row length
    corpus_bytes: int  # stdlib text budget
    pretrain_steps: int
    pretrain_batch: int  # rows per pretraining step
    pretrain_lr: float
    finetune_steps: int
    eval_samples: int | None  # GSM8K test examples in the eval loss (None: all 1,319)


BASES = {
    # ~1M parameters, seconds on a CPU: exercises every code path, proves nothing about accuracy.
    "tiny": BaseSpec(hidden=128, intermediate=384, layers=2, heads=4, kv_heads=2, head_dim=32, vocab=1024, seq=64,
                     corpus_bytes=400_000, pretrain_steps=60, pretrain_batch=8, pretrain_lr=3e-3,
                     finetune_steps=6, eval_samples=16),
    # 20.7M parameters (41 MB in bf16: small enough to travel between GPU calls), all 31.5 MB of the
    # stdlib (8.7M tokens at vocab 8192), 1,200 x 64 x 512 = 39M pretraining tokens (~4.5 epochs);
    # fine-tuning 300 steps x 4,096 tokens = 0.94 epoch of GSM8K train (1.31M tokens).
    "small": BaseSpec(hidden=512, intermediate=1280, layers=6, heads=8, kv_heads=4, head_dim=64, vocab=8192,
                      seq=512, corpus_bytes=40_000_000, pretrain_steps=1200, pretrain_batch=64,
                      pretrain_lr=2e-3, finetune_steps=300, eval_samples=None),
}


def log(line: str) -> None:
    print(f"[fidelity] {line}", file=sys.stderr, flush=True)


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def _file_sha(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


# --- settings ------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    import surogate

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", default="all", choices=("all", "pretrain", "finetune", "report"))
    p.add_argument("--base", default="small", choices=sorted(BASES))
    p.add_argument("--recipes", default=None,
                   help=f"comma list of {', '.join(surogate.recipes.names(include_aliases=False))}; "
                        "default: every recipe this machine runs (emulated ones included, labelled)")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning optimizer steps (default: the base's)")
    p.add_argument("--seq", type=int, default=None, help="tokens per row (default: the base's)")
    p.add_argument("--corpus-bytes", type=int, default=None, help="stdlib text budget (default: the base's)")
    p.add_argument("--pretrain-steps", type=int, default=None)
    p.add_argument("--eval-samples", type=int, default=None, help="GSM8K test examples in the eval loss "
                   "(default: the base's; 0: all)")
    p.add_argument("--exact-match", type=int, default=0, metavar="K",
                   help="also greedy-decode the first K test questions and score their '#### N' (0: off)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="decoding budget per question for --exact-match")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--finetune-seed", type=int, default=None,
                   help="seed of the fine-tuning only (LoRA init, data order), on the same base; default --seed. "
                        "A record of another seed is kept beside the main one as <recipe>-seed<N>: bf16 at "
                        "several seeds gives the report its noise floor")
    p.add_argument("--persistent", default=None, choices=tuple(PERSISTENT_TAGS),
                   help="finetune: force the sm_90 persistent GEMM route on (variants.PERSISTENT_SM90 = True) or "
                        "off (False); default: the library's routing. The record becomes <recipe>+persistent or "
                        "<recipe>+nopersistent")
    p.add_argument("--data", default=None, help="directory with GSM8K train.jsonl/test.jsonl (default: "
                   "../shared/data/gsm8k beside the repo, else runs/gsm8k inside it)")
    p.add_argument("--work", default=str(REPO / "runs" / "fidelity"), help="cache of bases and per-recipe runs")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="where the report goes")
    p.add_argument("--redo", action="store_true", help="fine-tune again a recipe that already has a record")
    args = p.parse_args(argv)
    spec = BASES[args.base]
    overrides = {"seq": args.seq, "corpus_bytes": args.corpus_bytes, "pretrain_steps": args.pretrain_steps,
                 "finetune_steps": args.steps}
    spec = dataclasses.replace(spec, **{k: v for k, v in overrides.items() if v is not None})
    if args.eval_samples is not None:
        spec = dataclasses.replace(spec, eval_samples=args.eval_samples or None)
    args.spec = spec
    args.data = _data_dir(args.data)
    return args


def _data_dir(given: str | None) -> Path:
    candidates = [Path(given)] if given else [REPO.parent / "shared" / "data" / "gsm8k", REPO / "runs" / "gsm8k"]
    for c in candidates:
        if (c / "train.jsonl").is_file() and (c / "test.jsonl").is_file():
            return c.resolve()
    raise SystemExit(f"fidelity: no GSM8K train.jsonl/test.jsonl in {', '.join(map(str, candidates))}; pass "
                     "--data DIR (the bundled 800/200 sample is surogate/data/gsm8k)")


def base_settings(args) -> dict:
    """Everything the pretrained base depends on (its cache key)."""
    import tokenizers
    import transformers

    return {"format": FORMAT_VERSION, "spec": {k: v for k, v in dataclasses.asdict(args.spec).items()
                                               if k not in ("finetune_steps", "eval_samples")},
            "seed": args.seed, "python": platform.python_version_tuple()[:2],  # the stdlib is the corpus
            "tokenizers": tokenizers.__version__, "transformers": transformers.__version__.split(".")[0],
            "gsm8k_train": _file_sha(args.data / "train.jsonl")}


def base_dir(args) -> Path:
    return Path(args.work) / f"base-{args.base}-{_sha(base_settings(args))}"


def finetune_settings(args) -> dict:
    """Everything a recipe's record depends on besides the recipe (the runs directory's key)."""
    return {"base": base_dir(args).name, "steps": args.spec.finetune_steps, "seq": args.spec.seq,
            "batch": 2, "grad_accum": 4, "lr": 2e-4, "warmup": 20, "weight_decay": 0.001, "scheduler": "linear",
            "lora_rank": 16, "lora_alpha": 32, "targets": list(TARGETS), "seed": args.seed,
            "eval_samples": args.spec.eval_samples, "exact_match": args.exact_match,
            "max_new_tokens": args.max_new_tokens, "gsm8k": _file_sha(args.data / "train.jsonl",
                                                                      args.data / "test.jsonl")}


def runs_dir(args) -> Path:
    return Path(args.work) / "runs" / f"{args.base}-{_sha(finetune_settings(args))}"


def environment() -> dict:
    from surogate.training.info import run_record

    return run_record(str(REPO))


# --- phase 1: tokenizer, corpus, pretrained base -------------------------------------------------

def stdlib_texts(budget: int) -> list[str]:
    """The stdlib's .py files (site-/dist-packages excluded), sorted by path, until `budget` bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in ("site-packages", "dist-packages", "__pycache__")]
        files += [Path(folder, n) for n in names if n.endswith(".py")]
    files.sort()
    texts, used = [], 0
    for path in files:
        raw = path.read_bytes()
        if used + len(raw) > budget:
            break
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError:  # a few test files are deliberately in other encodings
            continue
        used += len(raw)
    if not texts:
        raise SystemExit(f"fidelity: no stdlib .py file under {root} fits a budget of {budget} bytes")
    return texts


def gsm8k_texts(data: Path, split: str, limit: int | None = None) -> list[str]:
    from surogate.training.data import format_example, read_jsonl

    return [format_example(e, "gsm8k") for e in read_jsonl(data / f"{split}.jsonl", limit)]


def build_tokenizer(corpus: list[str], gsm8k: list[str], vocab: int):
    """A byte-level BPE trained on both corpora (surogate.training.tokenizer's trainer), as a fast tokenizer."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from surogate.training.tokenizer import EOS_TOKEN, train_default_tokenizer_json

    raw = Tokenizer.from_str(train_default_tokenizer_json(vocab, corpus + gsm8k))
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                                   model_max_length=1 << 20)


def qwen3_config(spec: BaseSpec, tokenizer):
    from transformers import Qwen3Config

    eos = tokenizer.eos_token_id
    return Qwen3Config(vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                       num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                       num_key_value_heads=spec.kv_heads, head_dim=spec.head_dim,
                       max_position_embeddings=max(2048, spec.seq), tie_word_embeddings=True,
                       bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)


def pretrain(args) -> Path:
    """Build (or find) the cached base: tokenizer + Qwen3 pretrained on the stdlib, saved in bf16."""
    from transformers import AutoModelForCausalLM

    from surogate.training.data import TokenDataset, pack, tokenize
    from surogate.training.setup import make_scheduler, pick_device, set_seed
    from surogate.training.steps import evaluate

    out = base_dir(args)
    if (out / "base.json").is_file():
        log(f"base: cached at {out}")
        return out
    spec, t0 = args.spec, time.perf_counter()
    corpus = stdlib_texts(spec.corpus_bytes)
    tokenizer = build_tokenizer(corpus, gsm8k_texts(args.data, "train"), spec.vocab)
    log(f"tokenizer: byte-level BPE, {len(tokenizer)} tokens ({time.perf_counter() - t0:.1f}s)")
    rows = pack(tokenize(corpus, tokenizer), spec.seq)
    n_val = max(spec.pretrain_batch, len(rows) // 100)  # 1% held out (rows chosen by the seed)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed))
    train_ids, val_ids = rows.input_ids[order[n_val:]], rows.input_ids[order[:n_val]]
    train_set, val_set = TokenDataset(train_ids, train_ids, None), TokenDataset(val_ids, val_ids, None)
    log(f"corpus: {len(corpus)} stdlib files, {sum(map(len, corpus)):,} chars, {rows.num_tokens:,} tokens "
        f"-> {len(train_set)} train / {len(val_set)} held-out rows of {spec.seq}")

    device = pick_device()
    set_seed(args.seed)
    model = AutoModelForCausalLM.from_config(qwen3_config(spec, tokenizer)).to(device)  # FP32 master weights
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=spec.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.type == "cuda")
    warmup = max(1, spec.pretrain_steps // 20)
    sched = make_scheduler(opt, "cosine", warmup, spec.pretrain_steps)
    # bf16 autocast over FP32 master weights on a GPU; FP32 on a CPU, where bf16 matmuls without AVX512-BF16
    # run ~7x slower (measured on the tiny base) and the tiny base only has to exercise the pipeline.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    log(f"pretrain: Qwen3 {n_params:,} params, {spec.pretrain_steps} steps x {spec.pretrain_batch} x {spec.seq} "
        f"tokens, lr {spec.pretrain_lr} (warmup {warmup}, cosine), "
        f"{'bf16 autocast' if device.type == 'cuda' else 'FP32'} on {device.type}")
    batches, epoch, history = iter(()), 0, []
    t_train = time.perf_counter()
    model.train()
    for step in range(1, spec.pretrain_steps + 1):
        batch = next(batches, None)
        if batch is None:  # next epoch, reshuffled with seed + epoch
            batches = train_set.batches(spec.pretrain_batch, shuffle=True, seed=args.seed + epoch, drop_last=True)
            batch, epoch = next(batches), epoch + 1
        ids = batch["input_ids"].to(device)
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % max(1, spec.pretrain_steps // 20) == 0 or step == spec.pretrain_steps:
            elapsed = time.perf_counter() - t_train
            history.append({"step": step, "loss": loss.item(), "elapsed_s": round(elapsed, 2)})
            log(f"pretrain step {step}/{spec.pretrain_steps} | loss {history[-1]['loss']:.4f} | "
                f"{step * ids.numel() / elapsed:,.0f} tokens/s | {elapsed:.0f}s")
    gsm8k_set = pack(tokenize(gsm8k_texts(args.data, "test", spec.eval_samples or 200), tokenizer), spec.seq)
    with autocast:
        val_loss = evaluate(model, val_set, spec.pretrain_batch, device)
        gsm8k_loss = evaluate(model, gsm8k_set, spec.pretrain_batch, device)  # how far GSM8K is from the corpus
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    log(f"pretrain: held-out stdlib loss {val_loss:.4f}, packed GSM8K test loss {gsm8k_loss:.4f}, "
        f"{time.perf_counter() - t0:.0f}s in all")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), max_shard_size="15MB")  # shards < 16 MiB travel back from a GPU call
    tokenizer.save_pretrained(str(tmp))
    meta = {"settings": base_settings(args), "params": n_params, "stdlib_files": len(corpus),
            "corpus_tokens": rows.num_tokens, "train_rows": len(train_set),
            "epochs": round(spec.pretrain_steps * spec.pretrain_batch / len(train_set), 2),
            "heldout_loss": val_loss, "gsm8k_test_loss_packed": gsm8k_loss, "history": history,
            "pretrain_s": round(time.perf_counter() - t0, 1), **environment()}
    (tmp / "base.json").write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out)  # base.json last inside, the directory renamed at once: no half-written cache
    log(f"base: saved to {out}")
    return out


# --- phase 2: LoRA fine-tuning and evaluation, one recipe at a time -------------------------------

EVAL_BATCH = 8  # rows per eval batch (GSM8K examples, one per row)
DECODE_BATCH = 16  # questions decoded together for --exact-match


def runnable_recipes() -> dict[str, str]:
    """{recipe: support label} for every recipe (aliases left out) that this machine runs."""
    from surogate.recipes import names
    from surogate.kernels.plan import Support, plan

    supports = {name: plan(name).support for name in names(include_aliases=False)}
    return {name: s.value for name, s in supports.items() if s is not Support.REFUSED}


def chosen_recipes(args) -> dict[str, str]:
    from surogate.recipes import get

    runnable = runnable_recipes()
    if args.recipes is None:
        return runnable
    chosen = {}
    for name in (r.strip() for r in args.recipes.split(",") if r.strip()):
        name = get(name).name  # an alias becomes its recipe; an unknown name raises with the list
        if name not in runnable:
            raise SystemExit(f"fidelity: recipe {name} is refused on this machine; runnable: {', '.join(runnable)}")
        chosen[name] = runnable[name]
    return chosen


def answer_dataset(data: Path, tokenizer, limit: int | None):
    """GSM8K test examples, one per row, labels only on the answer (+ EOS). Rows are right-padded to the
    longest example (rounded up to 64), so no answer is cut; returns the dataset."""
    from surogate.training.data import (
        IGNORE_INDEX,
        format_example,
        pad,
        read_jsonl,
        tokenize,
    )

    examples = read_jsonl(data / "test.jsonl", limit)
    texts = [format_example(e, "gsm8k") for e in examples]
    prompt_chars = [len(f"Question: {e['question'].strip()}\nAnswer:") for e in examples]
    offsets = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    seqs = tokenize(texts, tokenizer)
    ds = pad(seqs, -(-max(map(len, seqs)) // 64) * 64, tokenizer.pad_token_id)
    for i, (offs, chars) in enumerate(zip(offsets, prompt_chars)):
        ds.labels[i, :sum(1 for start, _ in offs if start < chars)] = IGNORE_INDEX  # the prompt is not scored
    return ds


def final_answer(text: str) -> str | None:
    """The number after "####", commas dropped (GSM8K's answer format)."""
    m = re.search(r"####\s*(-?[\d,]*\.?\d+)", text)
    return None if m is None else m.group(1).replace(",", "").rstrip(".")


def _same_number(a: str | None, b: str | None) -> bool:
    try:
        return a is not None and b is not None and math.isclose(float(a), float(b), rel_tol=0, abs_tol=1e-6)
    except ValueError:
        return False


@torch.no_grad()
def exact_match(model, tokenizer, data: Path, k: int, max_new_tokens: int, device) -> dict:
    """Greedy decoding (no KV cache, left padding, explicit positions) of the first `k` test questions."""
    from surogate.training.data import read_jsonl

    examples = read_jsonl(data / "test.jsonl", k)
    eos, correct, samples = tokenizer.eos_token_id, 0, []
    for start in range(0, len(examples), DECODE_BATCH):
        chunk = examples[start:start + DECODE_BATCH]
        prompts = tokenizer([f"Question: {e['question'].strip()}\nAnswer:" for e in chunk],
                            add_special_tokens=False)["input_ids"]
        prompts += prompts[-1:] * (DECODE_BATCH - len(prompts))  # one batch shape: no recompilation
        width = max(map(len, prompts))
        ids = torch.full((DECODE_BATCH, width), eos, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
        ids, mask = ids.to(device), mask.to(device)
        done = torch.zeros(DECODE_BATCH, dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            positions = (mask.cumsum(-1) - 1).clamp_min(0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits
            token = torch.where(done, eos, logits[:, -1].argmax(-1))
            ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            done |= token == eos
            if bool(done.all()):
                break
        for i, e in enumerate(chunk):
            new = ids[i, width:].tolist()
            text = tokenizer.decode(new[:new.index(eos)] if eos in new else new)
            pred, gold = final_answer(text), final_answer(e["answer"])
            correct += _same_number(pred, gold)
            if len(samples) < 3:
                samples.append({"question": e["question"][:200], "generated": text[:400], "pred": pred, "gold": gold})
    return {"k": len(examples), "correct": correct, "accuracy": correct / max(1, len(examples)), "samples": samples}


def evaluate_adapter(args, base: Path, adapter_dir: Path, recipe: str, emulated: bool) -> dict:
    """Eval loss of base + adapter under `recipe`; again with LoRA B zeroed (the base as the recipe stores it)."""
    import surogate
    from surogate.training.setup import pick_device
    from surogate.training.steps import evaluate
    from surogate.training.tokenizer import load_tokenizer

    device = pick_device()
    tokenizer = load_tokenizer(str(base))
    answers = answer_dataset(args.data, tokenizer, args.spec.eval_samples)
    model = surogate.load_adapter(str(base), str(adapter_dir)).to(device)
    model = surogate.compile(model, recipe=recipe, allow_emulation=emulated)
    model.eval()
    t0 = time.perf_counter()
    result = {"eval_loss": evaluate(model, answers, EVAL_BATCH, device), "eval_examples": len(answers),
              "eval_tokens": int((answers.labels[:, 1:] != -100).sum()), "eval_row_len": answers.seq_len}
    if args.exact_match:
        result["exact_match"] = exact_match(model, tokenizer, args.data, args.exact_match, args.max_new_tokens,
                                            device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.zero_()
    result["eval_loss_base"] = evaluate(model, answers, EVAL_BATCH, device)
    result["eval_s"] = round(time.perf_counter() - t0, 1)
    return result


def finetune_seed(args) -> int:
    return args.seed if args.finetune_seed is None else args.finetune_seed


def record_name(args, recipe: str) -> str:
    """The record's file stem: <recipe>[+persistent|+nopersistent][-seed<N>], so that an ablation or another
    fine-tuning seed is kept beside the default run's record instead of replacing it."""
    seed = finetune_seed(args)
    return recipe + PERSISTENT_TAGS.get(args.persistent, "") + ("" if seed == args.seed else f"-seed{seed}")


@contextlib.contextmanager
def persistent_routing(choice: str | None):
    """variants.PERSISTENT_SM90 forced True ("on") or False ("off") while the block runs (None: the library's
    routing), then restored, so that a later recipe or an in-process caller gets the default again."""
    from surogate.kernels import variants

    saved = variants.PERSISTENT_SM90
    if choice is not None:
        variants.PERSISTENT_SM90 = choice == "on"
    try:
        yield
    finally:
        variants.PERSISTENT_SM90 = saved


def finetune(args, recipe: str, support: str) -> dict:
    """LoRA on the cached base with `recipe` (surogate.training.train.train), then its evaluation; writes the
    record. A loss that turns NaN/Inf (the trainer raises FloatingPointError) writes a "diverged" record
    instead: a recipe that cannot train is a result the report must show, not a missing row."""
    from surogate.training.config import from_dict
    from surogate.training.train import train

    base = base_dir(args)
    if not (base / "base.json").is_file():
        raise SystemExit(f"fidelity: no pretrained base at {base}; run --phase pretrain with the same settings")
    out = runs_dir(args)
    seed, name = finetune_seed(args), record_name(args, recipe)
    record_path = out / f"{name}.json"
    if record_path.is_file() and not args.redo:
        log(f"{name}: cached record {record_path} (--redo to run it again)")
        return json.loads(record_path.read_text())
    settings = finetune_settings(args)
    cfg = from_dict({
        "model": str(base), "tokenizer": str(base), "recipe": recipe, "allow_emulation": support == "emulated",
        "sequence_len": settings["seq"], "sample_packing": True, "per_device_train_batch_size": settings["batch"],
        "gradient_accumulation_steps": settings["grad_accum"], "learning_rate": settings["lr"],
        "warmup_steps": settings["warmup"], "weight_decay": settings["weight_decay"],
        "lr_scheduler_type": settings["scheduler"], "lora_rank": settings["lora_rank"],
        "lora_alpha": settings["lora_alpha"], "lora_dropout": 0.0, "lora_target_modules": settings["targets"],
        "dataset": {"path": str(args.data), "format": "gsm8k", "eval_split": None},
        "output_dir": str(out / name), "max_steps": settings["steps"], "seed": seed,
        "logging_steps": max(1, settings["steps"] // 20)})
    torch._dynamo.reset()  # no compiled graph of the previous recipe may serve this one
    t0 = time.perf_counter()
    losses: list[float] = []  # each finished step's train loss: all a diverged run leaves
    diverged = None
    with persistent_routing(args.persistent):  # the evaluation runs the same GEMMs as the training
        try:
            result = train(cfg, log=lambda line: log(f"{name}: {line}"), on_step=lambda r: losses.append(r["loss"]))
        except FloatingPointError as error:  # raised before the step's update and its on_step: len(losses) + 1
            diverged = str(error)
            outcome = {**dict.fromkeys(RESULT_KEYS), "steps": len(losses),
                       "final_train_loss": losses[-1] if losses else None}
        else:
            metrics = json.loads(result.metrics_path.read_text())
            outcome = {**dict.fromkeys(RESULT_KEYS), **evaluate_adapter(args, base, result.adapter_dir, recipe,
                                                                        support == "emulated"),
                       "steps": result.steps, "final_train_loss": result.final_train_loss,
                       "tokens_per_s": result.tokens_per_s,
                       "time_to_first_step_s": metrics.get("time_to_first_step_s"), "compile": metrics.get("compile")}
    record = {"recipe": recipe, "support": support, "persistent": args.persistent, "diverged": diverged,
              "diverged_step": len(losses) + 1 if diverged else None, **outcome,
              "seed": seed, "train_loss": losses, "wall_s": round(time.perf_counter() - t0, 1),
              "settings": settings, **environment()}
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    em = record["exact_match"]
    log(f"{name} ({support}): " + (f"DIVERGED: {diverged}" if diverged else
                                   f"eval loss {record['eval_loss']:.4f} (base under the recipe "
                                   f"{record['eval_loss_base']:.4f})"
                                   + ("" if em is None else f", exact match {em['correct']}/{em['k']}"))
        + f", {record['wall_s']:.0f}s -> {record_path}")
    return record


# --- phase 3: report ------------------------------------------------------------------------------

def _label(rec: dict) -> str:
    """The recipe, then what sets the run apart from the default one: "bf16", "fp8 (+persistent)",
    "bf16 (+nopersistent, seed 43)". Records written before --persistent have no such field."""
    tags = [PERSISTENT_TAGS[rec["persistent"]]] if rec.get("persistent") else []
    tags += [] if rec["seed"] == rec["settings"]["seed"] else [f"seed {rec['seed']}"]
    return rec["recipe"] + (f" ({', '.join(tags)})" if tags else "")


def _sort_key(rec: dict, order: list[str]) -> tuple:
    """The library's recipe order; after each recipe's default run its ablations, then its other seeds."""
    return (order.index(rec["recipe"]) if rec["recipe"] in order else len(order), rec.get("persistent") or "",
            rec["seed"] != rec["settings"]["seed"], rec["seed"])


def _bf16_runs(records: list[dict]) -> list[dict]:
    """bf16 runs that can serve as the reference or the noise floor: not diverged, default routing."""
    return [r for r in records if r["recipe"] == "bf16" and not r.get("persistent") and not r.get("diverged")]


def _row(rec: dict, bf16: dict | None) -> dict:
    diverged = rec.get("diverged")
    ratio = None if bf16 is None or diverged else rec["eval_loss"] / bf16["eval_loss"]
    target = None if rec["recipe"] == "bf16" else LOSS_TARGETS.get(rec["recipe"])
    em = rec.get("exact_match")
    return {"recipe": _label(rec), "support": rec["support"], "persistent": rec.get("persistent"),
            "diverged": diverged, "diverged_step": rec.get("diverged_step"), "eval_loss": rec["eval_loss"],
            "ratio_to_bf16": ratio, "target_ratio": target,
            "target_met": False if diverged else None if ratio is None or target is None else ratio <= target,
            "eval_loss_base": rec["eval_loss_base"], "exact_match": None if em is None else em["accuracy"],
            "exact_match_k": None if em is None else em["k"], "final_train_loss": rec["final_train_loss"],
            "steps": rec["steps"], "seed": rec["seed"], "tokens_per_s": rec["tokens_per_s"],
            **{k: rec[k] for k in ("gpu", "torch", "triton", "transformers", "commit")}}


def _verdict(row: dict) -> str:
    if row["diverged"]:
        return f"DIVERGED (step {row['diverged_step']})"
    if row["recipe"] == "bf16":
        return "reference"
    if row["recipe"].startswith("bf16 (seed"):
        return "noise floor"
    if row["target_met"] is None:
        return "no bf16 run" if row["ratio_to_bf16"] is None else "no target"
    return "met" if row["target_met"] else "MISSED"


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table_lines(rows: list[dict]) -> list[str]:
    lines = ["| recipe | support | eval loss | vs bf16 | target | verdict | base loss (recipe, no LoRA) | exact match |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        target = "-" if r["target_ratio"] is None else f"<= +{(r['target_ratio'] - 1) * 100:.0f}%"
        em = "-" if r["exact_match"] is None else f"{r['exact_match']:.1%} of {r['exact_match_k']}"
        lines.append(f"| {r['recipe']} | {r['support']} | {_fmt(r['eval_loss'], '.4f')} | "
                     f"{_fmt(r['ratio_to_bf16'], '.4f')} | {target} | {_verdict(r)} | "
                     f"{_fmt(r['eval_loss_base'], '.4f')} | {em} |")
    return lines


def noise_floor(records: list[dict], reference: dict | None) -> dict | None:
    """bf16's eval loss over the fine-tuning seeds run on the same base: how far a recipe's ratio to bf16
    can move with the seed alone (None with fewer than two bf16 seeds that finished)."""
    losses = {r["seed"]: r["eval_loss"] for r in _bf16_runs(records)}
    if reference is None or len(losses) < 2:
        return None
    ratios = [v / reference["eval_loss"] for v in losses.values()]
    return {"seeds": sorted(losses), "eval_losses": [losses[s] for s in sorted(losses)],
            "max_ratio_spread": max(ratios) - min(ratios)}


def noise_line(noise: dict | None) -> str:
    if noise is None:
        return "Noise floor: bf16 ran at one seed only (--finetune-seed N adds others)."
    return (f"Noise floor: bf16 at {len(noise['seeds'])} fine-tuning seeds ({', '.join(map(str, noise['seeds']))}) on "
            f"the same base: eval loss {min(noise['eval_losses']):.4f}-{max(noise['eval_losses']):.4f}, a spread "
            f"of {noise['max_ratio_spread']:.2%} of bf16's; a recipe's 'vs bf16' within that is seed noise.")


def no_record_lines(missing: list[str]) -> list[str]:
    return [f"No record: {', '.join(missing)}.", ""] if missing else []


def plot_curves(records: list[dict], reference: dict | None, path: Path, title: str) -> None:
    """Train loss per step of every recipe (top) and its difference to the bf16 reference's, 10-step mean
    (bottom). A diverged run's curve stops at its last finite step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 6.5), dpi=120)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": (2, 1)})
    bf16 = None if reference is None else reference["train_loss"]
    for r in (r for r in records if r["train_loss"]):
        steps = range(1, len(r["train_loss"]) + 1)
        label = _label(r) + (" (emulated)" if r["support"] == "emulated" else "") + \
            (" (diverged)" if r.get("diverged") else "")
        top.plot(steps, r["train_loss"], lw=1.0, label=label)
        if bf16 is not None:
            diff = torch.tensor(r["train_loss"][:len(bf16)]) - torch.tensor(bf16[:len(r["train_loss"])])
            window = min(10, len(diff))
            smooth = diff.unfold(0, window, 1).mean(1) if window else diff
            bottom.plot(range(window, len(diff) + 1), smooth.tolist(), lw=1.0, label=label)
    top.set_ylabel("train cross-entropy")
    top.set_title(title, fontsize=9)
    top.legend(fontsize=8)
    bottom.set_xlabel("optimizer step")
    bottom.set_ylabel("minus bf16 (10-step mean)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(str(path))


def _records_dir(args) -> Path:
    """This machine's runs directory, or else the only one of this base in the work dir: the report
    may run where the fine-tuning did not (another Python or tokenizers version changes the key)."""
    own = runs_dir(args)
    if own.is_dir():
        return own
    found = sorted((Path(args.work) / "runs").glob(f"{args.base}-*"))
    if len(found) == 1:
        log(f"report: {own.name} not here; reading the only {args.base} run, {found[0].name}")
        return found[0]
    return own


def report(args) -> list[dict]:
    from surogate.recipes import names

    src = _records_dir(args)
    records = {p.stem: json.loads(p.read_text()) for p in src.glob("*.json")} if src.is_dir() else {}
    if not records:
        raise SystemExit(f"fidelity: no recipe records in {src}; run --phase finetune with the same settings")
    order = names(include_aliases=False)
    records = sorted(records.values(), key=lambda r: _sort_key(r, order))
    reference = min(_bf16_runs(records), key=lambda r: r["seed"] != r["settings"]["seed"], default=None)
    rows = [_row(r, reference) for r in records]
    noise = noise_floor(records, reference)
    # a recipe this machine runs by default without any record: a run that crashed, or was never made
    missing = [n for n in runnable_recipes() if n not in {r["recipe"] for r in records}]
    evaluated = next((r for r in records if not r.get("diverged")), None)
    scored = ("no run finished" if evaluated is None else
              f"{evaluated['eval_examples']} examples, {evaluated['eval_tokens']:,} scored tokens")
    settings = records[0]["settings"]  # as the GPU run wrote them (this machine may key them differently)
    base_meta = json.loads((Path(args.work) / settings["base"] / "base.json").read_text())
    study = {"base": args.base, "base_dir": settings["base"], "base_params": base_meta["params"],
             "base_heldout_loss": base_meta["heldout_loss"], "pretrain_tokens":
             args.spec.pretrain_steps * args.spec.pretrain_batch * args.spec.seq, "pretrain_s": base_meta["pretrain_s"],
             "eval": "mean cross-entropy over the answer tokens (answer, '#### N', EOS) of GSM8K test examples, "
                     "one per row, prompt masked", **settings}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fidelity.json").write_text(json.dumps({"study": study, "recipes": rows, "bf16_noise": noise,
                                                   "no_record": missing}, indent=2) + "\n")
    r0 = records[0]
    md = [f"# Recipe fidelity: LoRA on a pretrained Qwen3-{args.base} ({base_meta['params'] / 1e6:.1f}M params), GSM8K",
          "",
          f"{r0['gpu']}, torch {r0['torch']}, triton {r0['triton']}, commit {r0['commit']}. "
          f"Base: pretrained on {study['pretrain_tokens']:,} tokens of Python stdlib source "
          f"(held-out loss {base_meta['heldout_loss']:.3f}). "
          f"Fine-tuning: {settings['steps']} steps x {settings['batch']} x {settings['seq']} tokens x "
          f"{settings['grad_accum']} accumulation, lr {settings['lr']} (warmup {settings['warmup']}, linear), "
          f"weight decay {settings['weight_decay']}, LoRA r={settings['lora_rank']} alpha={settings['lora_alpha']} "
          f"on the 7 projections, seed {settings['seed']}, same data order for every recipe.",
          "",
          f"Eval loss: {study['eval']} ({scored}). 'vs bf16' = eval loss / bf16's; a target is met when "
          "the ratio is at or under it. 'base loss' is the same loss with the LoRA B matrices zeroed: the "
          "pretrained base as the recipe stores it." + (" Exact match: greedy decoding, '#### N' compared "
                                                       "as numbers." if args.exact_match else
                                                       " Exact match: not measured in this run (--exact-match K "
                                                       "decodes the first K test questions)."),
          "", *table_lines(rows), "", *no_record_lines(missing), noise_line(noise), "",
          "Train-loss curves: fidelity_loss.png."]
    (out / "fidelity.md").write_text("\n".join(md) + "\n")
    plot_curves(records, reference, out / "fidelity_loss.png",
                f"LoRA on Qwen3-{args.base} (pretrained on the stdlib), GSM8K, {r0['gpu']}")
    print("\n".join([*table_lines(rows), *no_record_lines(missing)]))
    log(f"report: {out / 'fidelity.json'}, {out / 'fidelity.md'}, {out / 'fidelity_loss.png'}")
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.phase in ("all", "pretrain"):
        pretrain(args)
    diverged = []
    if args.phase in ("all", "finetune"):
        for recipe, support in chosen_recipes(args).items():
            record = finetune(args, recipe, support)
            if record.get("diverged"):
                diverged.append(f"{record_name(args, recipe)} ({record['diverged']})")
    if args.phase in ("all", "report"):
        report(args)
    if diverged:  # after the other recipes and the report: the records are written, the exit status tells
        raise SystemExit(f"fidelity: diverged (recorded): {'; '.join(diverged)}")


if __name__ == "__main__":
    main()
