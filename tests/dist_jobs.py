"""The jobs tests/test_distributed.py (and test_train_distributed.py) run under `python -m torch.distributed.run
--nproc-per-node 2`.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_jobs.py JOB OUT_DIR [ARGS] [+ JOB [ARGS]]...

Jobs joined by "+" run one after the other in the same ranks (a launch's start-up, ~10 s on 2 cores,
once); their results share one dict, keyed by case. Each rank writes what the test checks to
OUT_DIR/rank<r>.pt. The single-process reference
(`train_single`) runs the same model, data and optimizer on the whole global batch, in the test's own
process. Tiny models from a config (2-layer Qwen3, hidden 64, vocab 128, bf16), the reference backend.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surogate.training import distributed

GLOBAL_BATCH, SEQ, VOCAB, LR, STEPS = 4, 16, 128, 1e-2, 5
NATIVE_FLOAT_VIEWS = distributed._FLOAT_VIEWS_FOR_FSDP  # what this torch needs (True before 2.13)


def tiny_model(recipe: str, checkpoint: bool = False):
    import transformers as T

    import surogate

    torch.manual_seed(0)
    cfg = T.Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, vocab_size=VOCAB)
    model = T.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    # B starts non-zero so that both LoRA factors get gradients from the first step.
    return surogate.compile(model, recipe=recipe, arch="cpu", checkpoint=checkpoint,
                            lora={"r": 8, "lora_alpha": 16, "init_lora_weights": False})


def global_batch(step: int) -> dict[str, torch.Tensor]:
    """The global batch of optimizer step `step`, the same on every rank. Labels are masked unevenly (the
    last rows lose more targets), so the ranks hold different numbers of real tokens."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    labels = ids.clone()
    for row in range(GLOBAL_BATCH):
        labels[row, SEQ - 3 * row:] = -100
    return {"input_ids": ids, "labels": labels}


def optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.01)


def step(model, opt, batch, accum: int = 1) -> float:
    """One optimizer step on this rank's rows, in `accum` micro-batches (reduced after the last only);
    returns the loss of the global batch (the mean over its tokens)."""
    items = distributed.items_per_rank(batch["labels"])
    total = 0.0
    for k in range(accum):
        last = k == accum - 1
        with contextlib.nullcontext() if last else distributed.no_sync(model):
            loss = model(**distributed.shard(batch, k, accum), num_items_in_batch=items).loss
            loss.backward()
        total = total + loss.detach()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(distributed.mean_over_ranks(total))


def lora_state(model) -> dict[str, torch.Tensor]:
    """The LoRA weights, whole (gathered under FSDP), by name."""
    from torch.distributed.tensor import DTensor

    peft = distributed.unwrap(model)
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in peft.named_parameters() if p.requires_grad}


def train_single(recipe: str, steps: int = STEPS) -> dict:
    """The reference: one process, the whole global batch."""
    model = tiny_model(recipe)
    opt = optimizer(model)
    losses = [step(model, opt, global_batch(s)) for s in range(steps)]
    return {"losses": losses, "lora": lora_state(model), "frozen_bytes": distributed.frozen_bytes(model)}


# --- jobs ---------------------------------------------------------------------------------------------

def job_train(out: dict, *cases: str) -> None:
    """Train each case for STEPS steps, one after the other: "ddp:bf16", "graphed:bf16", or
    "fsdp:qnf4:sharded:2[:views|:hsdp|:ac]" (parallelism, recipe, LoRA placement, micro-batches per
    optimizer step, a variant: see `_train`)."""
    for case in cases:
        kind, recipe, *rest = case.split(":")
        out[case] = {}
        if kind == "graphed":
            _train_graphed(out[case], recipe)
        else:
            _train(out[case], kind, recipe, *rest)


def _train(out: dict, parallelism: str, recipe: str, lora: str = "-", accum: str = "1", views: str = "",
           ckpt: Path | None = None) -> None:
    # "views": hold integer bytes as float views, as FSDP2 before torch 2.13 requires (the path taken there);
    # "hsdp": shard_size=1, the 2-D mesh of hybrid sharding (2 replicas of 1 shard); "ac": activation
    # checkpointing, each block's gathered bytes kept from its forward to its backward. With `ckpt`, a
    # checkpoint (and the adapter) is saved there after SAVE_AT steps, and training goes on.
    distributed._FLOAT_VIEWS_FOR_FSDP = views == "views" or NATIVE_FLOAT_VIEWS
    options = {"shard_size": 1} if views == "hsdp" else {"reshard_after_forward": False} if views == "ac" else {}
    model = tiny_model(recipe, checkpoint=views == "ac")
    parts = {n: [t.clone() for t in m.weight_list()] for n, m in model.named_modules()
             if type(m).__name__ == "SurogateLinear"}
    out["full_parts"] = {n: [tuple(t.shape) for t in ts] for n, ts in parts.items()}
    model = distributed.wrap(model, parallelism, lora=None if lora == "-" else lora, **options)
    opt = optimizer(model)
    t0 = time.perf_counter()
    out["losses"] = []
    for s in range(STEPS):
        out["losses"].append(step(model, opt, distributed.shard(global_batch(s)), int(accum)))
        if ckpt is not None and s + 1 == SAVE_AT:
            distributed.save_checkpoint(model, opt, ckpt, step=s + 1)
            distributed.save_adapter(model, ckpt / "adapter")
            out["lora_at_save"] = lora_state(model)
    out["train_s"] = time.perf_counter() - t0
    out["lora"] = lora_state(model)
    out["frozen_bytes"] = distributed.frozen_bytes(model)
    out["report"] = str(distributed.unwrap(model).surogate_report)
    out["describe"] = distributed.describe(model)
    out["param_dtypes"] = sorted({str(p.dtype) for p in distributed.unwrap(model).parameters()})
    reducer = getattr(model, "_surogate_reducer", None)
    out["all_reduces"] = None if reducer is None else reducer.all_reduces
    if parallelism == "fsdp":
        out["gathered_equal"], out["local_parts"] = _gathered_parts(model, parts)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


def _gathered_parts(model, before: dict) -> tuple[dict, dict]:
    """Per SurogateLinear of every block: whether the bytes FSDP gathers equal those stored before
    sharding (bit for bit), and the shapes this rank stores of each part."""
    from torch.distributed.tensor import DTensor

    peft = distributed.unwrap(model)
    modules = dict(peft.named_modules())
    equal, local = {}, {}
    for block in distributed._decoder_blocks(peft):
        block.unshard()
        for _, m in block.named_modules():
            if type(m).__name__ != "SurogateLinear":
                continue
            full = next(n for n, x in modules.items() if x is m)
            got = m.weight_list()
            equal[full] = all(a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bytes(a), _bytes(b))
                              for a, b in zip(got, before[full]))
        block.reshard()
        for _, m in block.named_modules():
            if type(m).__name__ == "SurogateLinear":
                full = next(n for n, x in modules.items() if x is m)
                local[full] = [tuple((t.to_local() if isinstance(t, DTensor) else t).shape) for t in m.weight_list()]
    return equal, local


def _train_graphed(out: dict, recipe: str) -> None:
    """GraphedStep (EagerCapture: the CUDA-graph bookkeeping on CPU) on the unwrapped model, two
    micro-batches per optimizer step, then one all_reduce_grads outside the graph."""
    from surogate.training.graphed_step import EagerCapture, GraphedStep

    model = tiny_model(recipe)
    distributed.broadcast_trainable(model)
    opt = optimizer(model)
    graphed = GraphedStep(model, loss_scale=1.0, capture=EagerCapture(), pad_to=1)
    losses, reduces = [], 0
    for s in range(STEPS):
        batch = distributed.shard(global_batch(s))
        items = distributed.items_per_rank(batch["labels"])
        micro = [distributed.shard(batch, k, 2) for k in range(2)]
        step_loss = sum(graphed(**m, num_items_in_batch=items).clone() for m in micro)
        reduces += distributed.all_reduce_grads([p for p in model.parameters() if p.requires_grad])
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(distributed.mean_over_ranks(step_loss)))
    out.update(losses=losses, lora=lora_state(model), replays=graphed.replays, reduces=reduces)


SAVE_AT = 2


def job_save(out: dict, ckpt_root: str, *cases: str) -> None:
    """Per case ("fsdp:qnf4:sharded:1", "ddp:bf16:-:2", no variant): job_train's run, which also saves a
    checkpoint (and the adapter) to ckpt_root/<case> after SAVE_AT of its STEPS steps."""
    for case in cases:
        kind, recipe, lora, accum = case.split(":")
        out[case] = {}
        _train(out[case], kind, recipe, lora, accum, ckpt=Path(ckpt_root) / case.replace(":", "-"))


def job_resume(out: dict, ckpt_root: str, *cases: str) -> None:
    """Per case of job_save: a fresh model and optimizer, the checkpoint loaded, the steps after it."""
    for case in cases:
        parallelism, recipe, lora, accum = case.split(":")
        distributed._FLOAT_VIEWS_FOR_FSDP = NATIVE_FLOAT_VIEWS
        model = distributed.wrap(tiny_model(recipe), parallelism, lora=None if lora == "-" else lora)
        opt = optimizer(model)
        meta = distributed.load_checkpoint(model, opt, Path(ckpt_root) / case.replace(":", "-"))
        out[case] = {"meta": meta, "lora_loaded": lora_state(model)}
        out[case]["losses"] = [step(model, opt, distributed.shard(global_batch(s)), int(accum))
                               for s in range(meta["step"], STEPS)]


def job_raise(out: dict, where: str) -> None:
    """Rank 1 raises; rank 0 waits in a collective (`collective`) or computes without one (`compute`)."""
    import torch.distributed as dist

    if dist.get_rank() == 1:
        time.sleep(0.5)
        raise ValueError("rank 1 broke on purpose")
    if where == "collective":
        dist.all_reduce(torch.ones(1))
    else:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            time.sleep(0.05)
    raise AssertionError("rank 0 was not stopped")


def job_cli_graphed(out: dict, *args: str) -> None:
    """`surogate train ARGS` down its CUDA-graph path under DDP, on the CPU: MicroStep's GraphedStep with
    EagerCapture (the graph bookkeeping, each replay run eagerly), the model unwrapped, the gradients
    all-reduced after the last micro-step (tests/test_train_distributed.py)."""
    from surogate.training import graphed_step, steps
    from surogate.training.cli import main as cli

    class Eager(graphed_step.GraphedStep):
        def __init__(self, model, **kwargs):
            super().__init__(model, capture=graphed_step.EagerCapture(), pad_to=1, **kwargs)

    graphed_step.GraphedStep = Eager
    steps.wants_cuda_graphs = lambda cfg, device: True
    out["code"] = cli(["train", *args])


JOBS = {"train": job_train, "save": job_save, "resume": job_resume, "raise": job_raise,
        "cli_graphed": job_cli_graphed}


def main() -> None:
    job, out_dir, *args = sys.argv[1:]
    jobs = [[job]]
    for arg in args:
        if arg == "+":
            jobs.append([])
        else:
            jobs[-1].append(arg)
    info = distributed.init(timeout_s=300)
    with distributed.fail_fast(poll_s=0.2):
        out: dict = {}
        for name, *job_args in jobs:
            JOBS[name](out, *job_args)
        torch.save(out, Path(out_dir) / f"rank{info.rank}.pt")
    distributed.cleanup()


if __name__ == "__main__":
    main()
