"""GPU smoke run: Qwen3 from config (random weights) trained on GSM8K text under each recipe native on
this GPU, beside HF+PEFT eager on the same data; time to first step vs plain torch.compile of HF+PEFT.

    python bench/train_smoke.py --out DIR [--model 0.6B] [--runs eager,torch.compile,native]

Text is tokenized as UTF-8 bytes (ids 0-255 of Qwen3's vocabulary): no tokenizer download is needed
and the loss must still fall. Writes one JSON line per run to <out>/train_smoke.jsonl.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time

import torch

SIZES = {  # Qwen3 configs (hidden, intermediate, layers, heads, kv heads)
    "0.6B": (1024, 3072, 28, 16, 8),
    "8B": (4096, 12288, 36, 32, 8),
}


def qwen3(size: str):
    from transformers import AutoModelForCausalLM, Qwen3Config

    h, i, n, a, kv = SIZES[size]
    cfg = Qwen3Config(hidden_size=h, intermediate_size=i, num_hidden_layers=n, num_attention_heads=a,
                      num_key_value_heads=kv, head_dim=128, vocab_size=151936, tie_word_embeddings=size == "0.6B",
                      max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)


def batches(path: str, batch: int, seq: int, steps: int):
    """`steps` packed batches of UTF-8 bytes of question + answer text."""
    text = []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            text.append(row["question"] + "\n" + row["answer"] + "\n\n")
    data = torch.tensor(list("".join(text).encode()), dtype=torch.long)
    need = batch * seq
    out = []
    for s in range(steps):
        start = (s * need) % (len(data) - need)
        out.append(data[start:start + need].view(batch, seq).cuda())
    return out


def lora_model(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"]))


def train(model, data, lr=1e-3) -> dict:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses, times = [], []
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i, ids in enumerate(data):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # syncs
        times.append(time.perf_counter() - t)
        if i == 0:
            first = time.perf_counter() - t0
    steady = sorted(times[5:])[len(times[5:]) // 2] if len(times) > 6 else float("nan")
    tokens = data[0].numel()
    return {"first_step_s": round(first, 2), "median_step_s": round(steady, 4),
            "tokens_per_s": round(tokens / steady) if steady == steady else None,
            "loss_first": round(losses[0], 4), "loss_last5": round(sum(losses[-5:]) / 5, 4),
            "finite": all(math.isfinite(x) for x in losses), "falling": sum(losses[-5:]) / 5 < losses[0],
            "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def main() -> None:
    import surogate
    from surogate.kernels.plan import native_recipes

    p = argparse.ArgumentParser()
    p.add_argument("--data", default="surogate/data/gsm8k/train.jsonl")
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="0.6B", choices=sorted(SIZES))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--runs", default="eager,torch.compile,native",
                   help="comma list of: eager, torch.compile, native (every native recipe), or recipe names "
                        "(recipe:nohz+noce switches horizontal fusion / the chunked loss off)")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    arch = surogate.recipes.current_arch()
    data = batches(args.data, args.batch, args.seq, args.steps)
    runs = []
    for r in args.runs.split(","):
        runs += [n for n in native_recipes(arch) if n not in ("fp4", "qfp4")] if r == "native" else [r]
    base = qwen3(args.model).cpu()
    for run in runs:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        torch._dynamo.reset()
        model = copy.deepcopy(base).cuda()
        row = {"model": f"Qwen3-{args.model}", "run": run, "arch": arch, "batch": args.batch, "seq": args.seq,
               "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
        t = time.perf_counter()
        try:
            if run == "eager":
                model = lora_model(model)
            elif run == "torch.compile":
                model = lora_model(model)
                model.base_model.model.compile()
            else:  # "recipe" or "recipe:opt+opt" with opts nohz (horizontal=False), noce (chunked_loss=False)
                recipe, _, opts = run.partition(":")
                model = surogate.compile(model, recipe=recipe, horizontal="nohz" not in opts,
                                         chunked_loss="noce" not in opts)
            row["prepare_s"] = round(time.perf_counter() - t, 2)
            row.update(train(model, data))
            row["time_to_first_step_s"] = round(row["prepare_s"] + row["first_step_s"], 2)
            if run not in ("eager", "torch.compile"):
                rep = model.surogate_report
                row["rewritten"] = f"{len(rep.rewritten)}/{len(rep.linears)}"
                row["graphs"] = rep.graphs
        except Exception as e:  # one recipe failing must not hide the others' figures
            row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        print(json.dumps(row), flush=True)
        with open(os.path.join(args.out, "train_smoke.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        del model
    print(f"{'run':<14}{'ttfs s':>8}{'step s':>8}{'tok/s':>9}{'loss0':>8}{'loss-5':>8}{'mem GB':>8}")
    with open(os.path.join(args.out, "train_smoke.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            print(f"{r['run']:<14}{r.get('time_to_first_step_s', '-'):>8}{r.get('median_step_s', '-'):>8}"
                  f"{r.get('tokens_per_s', '-') or '-':>9}{r.get('loss_first', '-'):>8}{r.get('loss_last5', '-'):>8}"
                  f"{r.get('peak_mem_gb', '-'):>8}  {r.get('error', '')[:80]}")


if __name__ == "__main__":
    main()
