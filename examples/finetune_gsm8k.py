"""Fine-tune LoRA adapters on GSM8K with a plain PyTorch loop over a surogate.compile'd model.

    python examples/finetune_gsm8k.py                                  # tiny embedded Qwen3, CPU is fine
    python examples/finetune_gsm8k.py --model Qwen/Qwen3-0.6B --recipe qfp8 --seq-len 2048 \\
        --data-dir ../shared/data/gsm8k --steps 200                    # a real run on a GPU

The loop is written out: AdamW over the LoRA parameters, linear warmup + decay, gradient
accumulation weighted by target tokens, fixed-length packed sequences, eval loss on the test split, the adapter at the end.
`surogate train CONFIG.yaml` runs the same loop (surogate/training/train.py) from a config file.
"""

from __future__ import annotations

import argparse
import time

import torch

import surogate
from surogate.training.config import from_dict
from surogate.training.data import build_split
from surogate.training.setup import load_base_model, load_tokenizer_for, lora_config, make_scheduler, pick_device
from surogate.training.steps import evaluate, step_items


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="'default' (tiny Qwen3), a local HF directory or a hub id")
    p.add_argument("--recipe", default="bf16", help=f"one of {', '.join(surogate.recipes.names())}")
    p.add_argument("--data-dir", default=None, help="directory with train.jsonl/test.jsonl (default: bundled sample)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--eval-samples", type=int, default=40)
    p.add_argument("--output-dir", default="surogate-out/finetune_gsm8k")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    # The same checks as `surogate train` (unknown recipe, missing directories) before any work.
    cfg = from_dict({"model": args.model, "recipe": args.recipe, "sequence_len": args.seq_len,
                     "dataset": {"path": args.data_dir, "max_eval_samples": args.eval_samples},
                     "output_dir": args.output_dir, "max_steps": args.steps})
    torch.manual_seed(cfg.seed)
    device = pick_device()

    tokenizer = load_tokenizer_for(cfg, print)
    train_set = build_split(args.data_dir, "train", "gsm8k", tokenizer, args.seq_len, packing=True)
    eval_set = build_split(args.data_dir, "test", "gsm8k", tokenizer, args.seq_len, packing=True,
                           limit=args.eval_samples)
    model = load_base_model(cfg, tokenizer).to(device)  # bf16 base (random weights for 'default')
    model = surogate.compile(model, recipe=args.recipe, lora=lora_config(cfg, model))

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    sched = make_scheduler(opt, "linear", args.warmup, args.steps)
    batches = train_set.batches(args.batch_size, shuffle=True, seed=cfg.seed, drop_last=True)
    print(f"eval loss before: {evaluate(model, eval_set, args.batch_size, device):.4f}")
    model.train()
    for step in range(1, args.steps + 1):
        t0, step_loss, step_batches = time.perf_counter(), 0.0, []
        for _ in range(args.grad_accum):
            batch = next(batches, None)
            if batch is None:  # next epoch
                batches = train_set.batches(args.batch_size, shuffle=True, seed=cfg.seed + step, drop_last=True)
                batch = next(batches)
            step_batches.append(batch)
        # Every micro-batch's loss divides its token sum by the step's target tokens / accumulation: the step's loss
        # is the mean over all its target tokens (as Hugging Face's Trainer), counted on the host (no GPU sync).
        items = step_items(step_batches, args.grad_accum, device)
        for batch in step_batches:
            loss = model(**{k: v.to(device) for k, v in batch.items()}, num_items_in_batch=items).loss
            (loss / args.grad_accum).backward()
            step_loss += loss.item() / args.grad_accum
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens = args.batch_size * args.seq_len * args.grad_accum
        print(f"step {step:>3}/{args.steps}  loss {step_loss:.4f}  {tokens / (time.perf_counter() - t0):,.0f} tokens/s")
    print(f"eval loss after: {evaluate(model, eval_set, args.batch_size, device):.4f}")
    out = surogate.save_adapter(model, f"{args.output_dir}/adapter")
    print(f"adapter: {out}")


if __name__ == "__main__":
    main()
