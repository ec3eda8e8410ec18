"""LoRA with DDP in a plain PyTorch loop: every rank holds the whole (quantized) model; the LoRA
gradients are averaged over the ranks during the backward (docs/distributed.md).

    torchrun --nproc-per-node 2 examples/ddp_loop.py                       # CPU (gloo) or GPUs (NCCL)
    torchrun --nproc-per-node 8 examples/ddp_loop.py --model 0.6B --recipe qfp8 --cuda-graphs

Every rank draws the same global batch and trains on its 1/world of the rows, so the loss curve is
that of one process with the whole batch (tests/test_distributed.py checks it). `--model tiny` (the
default) is the embedded tiny Qwen3 on the bundled GSM8K sample; a Qwen3 size of bench/tps.py
("0.6B", "8B") is that config with random weights on random tokens. Only rank 0 prints and writes
the adapter. `--cuda-graphs` replays each micro-step from a CUDA graph (surogate.GraphedStep) of the
unwrapped model and averages the gradients after the replays, outside the graph.
"""
import argparse
import importlib.util
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import surogate
from surogate.training import distributed

REPO = Path(__file__).resolve().parents[1]


def load(name: str, global_batch: int, seq: int):
    """The bf16 model and an endless iterator of global batches (the same on every rank)."""
    if name == "tiny":
        from surogate.training.data import build_split
        from surogate.training.setup import embedded_model_config
        from surogate.training.tokenizer import load_tokenizer

        tokenizer = load_tokenizer()
        model = AutoModelForCausalLM.from_config(embedded_model_config(tokenizer), dtype=torch.bfloat16)
        data = build_split(None, "train", "gsm8k", tokenizer, seq_len=seq)
        batches = (b for epoch in range(10**6) for b in data.batches(global_batch, shuffle=True, seed=epoch,
                                                                       drop_last=True))
        return model, batches
    spec = importlib.util.spec_from_file_location("tps", REPO / "bench" / "tps.py")
    tps = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tps)
    config = tps.qwen3_config(name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)

    def random_tokens():
        while True:
            ids = torch.randint(0, config.vocab_size, (global_batch, seq), generator=g)
            yield {"input_ids": ids, "labels": ids}

    return model, random_tokens()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--recipe", default="bf16")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--per-rank-batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--cuda-graphs", action="store_true")
    p.add_argument("--out", default="ddp-adapter")
    args = p.parse_args()

    info = distributed.init()
    with distributed.fail_fast():
        torch.manual_seed(0)
        model, batches = load(args.model, args.per_rank_batch * info.world, args.seq)
        model = surogate.compile(model.to(info.device), recipe=args.recipe, lora={"r": 16, "lora_alpha": 32})
        if args.cuda_graphs:  # DDP's hooks cannot run inside a captured graph: reduce after the replays
            distributed.broadcast_trainable(model)
            graphed = surogate.GraphedStep(model)
        else:
            model = distributed.wrap(model, "ddp")
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=args.lr)
        if info.is_main:
            print(distributed.describe(model), f"recipe {args.recipe}", flush=True)
        t0, tokens = None, 0
        for step, global_batch in zip(range(args.steps), batches):
            if step == 2:  # after compilation and capture
                torch.cuda.synchronize() if info.device.type == "cuda" else None
                t0, tokens = time.perf_counter(), 0
            batch = {k: v.to(info.device) for k, v in distributed.shard(global_batch).items()}
            items = distributed.items_per_rank(batch["labels"])  # the global token mean, however ranks differ
            if args.cuda_graphs:
                loss = graphed(**batch, num_items_in_batch=items)
                distributed.all_reduce_grads(params)
            else:
                loss = model(**batch, num_items_in_batch=items).loss
                loss.backward()
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
        distributed.save_adapter(model, args.out)  # every rank calls it; rank 0 writes
    distributed.cleanup()


if __name__ == "__main__":
    main()
