"""QLoRA with FSDP2 in a plain PyTorch loop: each rank stores 1/world of every frozen weight in the
recipe's format (NF4 codes, FP8 bytes and their scales); each decoder block gathers its bytes for its
forward and again for its backward, and the fused ops take them as stored (docs/distributed.md).

    torchrun --nproc-per-node 2 examples/fsdp_loop.py                       # CPU (gloo) or GPUs (NCCL)
    torchrun --nproc-per-node 8 examples/fsdp_loop.py --model 8B --recipe qnf4 --lora sharded

`--model tiny` (the default) is the embedded tiny Qwen3 on the bundled GSM8K sample; a Qwen3 size of
bench/tps.py ("0.6B", "8B") is that config with random weights on random tokens. `--lora replicated`
(default) keeps the LoRA weights whole on every rank and all-reduces their gradients; `sharded`
shards them (and their Adam moments) with their block. `--accum N` accumulates N micro-batches per optimizer step, reducing
after the last one only. Only rank 0 prints and writes the adapter.
"""
import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

import surogate
from surogate.training import distributed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddp_loop import load  # noqa: E402  (the same model and data as the DDP example)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--recipe", default="qnf4")
    p.add_argument("--lora", default="replicated", choices=["replicated", "sharded"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--per-rank-batch", type=int, default=2)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--checkpoint", action="store_true", help="recompute each block in the backward")
    p.add_argument("--out", default="fsdp-adapter")
    args = p.parse_args()

    info = distributed.init()
    with distributed.fail_fast():
        torch.manual_seed(0)
        model, batches = load(args.model, args.per_rank_batch * args.accum * info.world, args.seq)
        whole = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        model = surogate.compile(model.to(info.device), recipe=args.recipe, lora={"r": 16, "lora_alpha": 32},
                                 checkpoint=args.checkpoint)
        model = distributed.wrap(model, "fsdp", lora=args.lora)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)  # after wrap
        if info.is_main:
            print(distributed.describe(model), f"recipe {args.recipe}: rank 0 stores "
                  f"{distributed.frozen_bytes(model) / 2**20:.1f} MiB of frozen weights "
                  f"({whole / 2**20:.1f} MiB in bf16 on one process)", flush=True)
        t0, tokens = None, 0
        for step, global_batch in zip(range(args.steps), batches):
            if step == 2:  # after compilation
                torch.cuda.synchronize() if info.device.type == "cuda" else None
                t0, tokens = time.perf_counter(), 0
            batch = distributed.shard(global_batch)
            items = distributed.items_per_rank(batch["labels"])
            loss = 0.0
            for k in range(args.accum):
                micro = {key: v.to(info.device) for key, v in distributed.shard(batch, k, args.accum).items()}
                last = k == args.accum - 1
                with contextlib.nullcontext() if last else distributed.no_sync(model):
                    micro_loss = model(**micro, num_items_in_batch=items).loss
                    micro_loss.backward()
                loss = loss + micro_loss.detach()
            opt.step()
            opt.zero_grad()
            loss = distributed.mean_over_ranks(loss)
            tokens += global_batch["input_ids"].numel()
            if info.is_main:
                print(f"step {step}  loss {loss.item():.4f}", flush=True)
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        if info.is_main and t0 is not None and args.steps > 3:
            peak = (f"; rank 0 peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
                    if info.device.type == "cuda" else "")
            print(f"{tokens / (time.perf_counter() - t0):,.0f} tokens/s over {info.world} ranks{peak}", flush=True)
        distributed.save_adapter(model, args.out)  # a collective: the LoRA shards are gathered, rank 0 writes
    distributed.cleanup()


if __name__ == "__main__":
    main()
