"""The training loop behind `surogate train`: a plain PyTorch loop over a surogate.compile'd model.

Nothing here hides the loop: AdamW over the LoRA parameters, a warmup + decay schedule,
gradient accumulation, fixed-length packed batches, eval loss on a held-out split, then the
adapter, a metrics JSON and a loss chart in `output_dir`. The helpers are public so that the
examples can write the same loop by hand. `compile_model` is the one place that calls
`surogate.compile`.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from surogate.config import TrainConfig, load_config

Log = Callable[[str], None]


def log_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


# --- model and tokenizer -------------------------------------------------------------------------

def _is_local(name: str) -> bool:
    return Path(name).expanduser().is_dir()


def load_tokenizer_for(cfg: TrainConfig, log: Log = log_stderr):
    """The tokenizer for `cfg`: explicit > the model directory's own > the embedded default."""
    from surogate.tokenizer import has_tokenizer_files, load_tokenizer

    if cfg.tokenizer is not None or cfg.model == "default":
        return load_tokenizer(cfg.tokenizer)
    if _is_local(cfg.model) and not has_tokenizer_files(Path(cfg.model).expanduser()):
        log(f"{cfg.model} has no tokenizer; using the embedded default (set `tokenizer:` to choose one)")
        return load_tokenizer(None)
    return load_tokenizer(cfg.model)


def embedded_model_config(tokenizer):
    """The embedded tiny Qwen3 config (surogate/data/qwen3-tiny.json) sized to `tokenizer`."""
    from transformers import Qwen3Config

    from surogate.data import package_data_dir

    raw = json.loads((package_data_dir() / "qwen3-tiny.json").read_text())
    raw.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return Qwen3Config(**{k: v for k, v in raw.items() if k not in ("model_type", "architectures")})


def load_base_model(cfg: TrainConfig, tokenizer, seed: int | None = None) -> nn.Module:
    """The frozen base in bf16: random weights for the embedded default, else from_pretrained."""
    from transformers import AutoModelForCausalLM

    if cfg.model == "default":
        torch.manual_seed(cfg.seed if seed is None else seed)
        model = AutoModelForCausalLM.from_config(embedded_model_config(tokenizer), dtype=torch.bfloat16)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(Path(cfg.model).expanduser()) if _is_local(cfg.model)
                                                     else cfg.model, dtype=torch.bfloat16)
    vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {vocab}; "
                         "set `tokenizer:` to the model's own tokenizer")
    return model


def lora_config(cfg: TrainConfig):
    """The PEFT LoraConfig the run trains (rank, alpha, dropout, targets from `cfg`)."""
    from peft import LoraConfig

    targets = cfg.lora_target_modules
    return LoraConfig(
        r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
        target_modules="all-linear" if targets == ["all-linear"] else list(targets), task_type="CAUSAL_LM",
    )


def compile_model(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """The single integration point with `surogate.compile`: attach LoRA and compile for the recipe."""
    import importlib

    compile_fn = importlib.import_module("surogate.compiler").compile
    options = {"checkpoint": True} if cfg.gradient_checkpointing else {}
    return compile_fn(model, recipe=cfg.recipe, lora=lora_config(cfg), arch=cfg.arch,
                      allow_emulation=cfg.allow_emulation, **options)


# --- optimizer, schedule, evaluation -------------------------------------------------------------

def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("the model has no trainable parameters; LoRA was not attached "
                           "(check lora_target_modules against the model's module names)")
    return params


def make_optimizer(model: nn.Module, learning_rate: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW over the trainable (LoRA) parameters only; the fused CUDA kernel (one launch for every
    parameter) when they live on a GPU."""
    params = trainable_parameters(model)
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay, fused=fused)


class MicroStep:
    """Forward + backward of one micro-batch, the loss scaled for gradient accumulation; replayed from
    CUDA graphs (`surogate.GraphedStep`, one per shape bucket) when `cfg.cuda_graphs` allows. Returns the loss.
    A capture that fails warns once and the run continues eagerly (`cuda_graphs: true` makes it an error)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, device: torch.device, log: Log = log_stderr) -> None:
        self.model, self.mode, self.log = model, cfg.cuda_graphs, log
        self.loss_scale = 1.0 / cfg.gradient_accumulation_steps
        if self.mode == "true" and device.type != "cuda":
            raise ValueError("cuda_graphs: true needs a CUDA device; set cuda_graphs: auto or false")
        self.graphed = None
        if self.mode == "true" or (self.mode == "auto" and device.type == "cuda"):
            from surogate.graphed_step import GraphedStep

            self.graphed = GraphedStep(model, loss_scale=self.loss_scale, strict=self.mode == "true")
        self._said = False

    def eager(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = self.model(**batch).loss
        (loss * self.loss_scale).backward()
        return loss.detach()

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.graphed is None:
            return self.eager(batch)
        loss = self.graphed(**batch)
        if not self._said:
            self._said = True
            if self.graphed.failure is None:
                self.log("cuda_graphs: each micro-step (forward + backward) is captured and replayed as a CUDA "
                         f"graph, one per shape bucket (rows padded to a multiple of {self.graphed.pad_to})")
            else:
                self.log(f"cuda_graphs: capture failed ({self.graphed.failure}); training without CUDA graphs")
        return loss


def lr_factor(step: int, kind: str, warmup_steps: int, total_steps: int) -> float:
    """The learning-rate multiplier at optimizer `step` (0-based): linear warmup, then decay to 0."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_scheduler_type {kind!r}; use linear, cosine or constant")


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup_steps: int,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, kind, warmup_steps, total_steps))


def _to(batch: dict[str, torch.Tensor], device: torch.device, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """`batch` on `device`. Right-padded rows drop their `attention_mask` when the model runs surogate
    attention: the padding follows every real token, so causal attention never shows it to one, and its
    labels are -100; without a mask the step keeps the causal flash kernel."""
    from surogate.attention import original_implementation

    drop = model is not None and original_implementation(model.base_model.model) is not None
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if not (drop and k == "attention_mask")}


def _real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens of the examples in `batch` (padding not counted): the batch's own count where it has one."""
    count = getattr(batch, "num_tokens", None)
    if count is not None:
        return count
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()


def _predicted_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the loss averages over (labels shift by one inside the model)."""
    return int((batch["labels"][:, 1:] != -100).sum())


def _pad_rows(batch: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """`batch` grown to `rows` rows that the loss ignores, so that every eval batch has one shape
    (a short last batch would cost a recompilation)."""
    have = batch["input_ids"].shape[0]
    if have == rows:
        return batch
    fill = {"input_ids": 0, "labels": -100, "attention_mask": 0, "position_ids": 0}
    return {k: torch.cat([v, v.new_full((rows - have, *v.shape[1:]), fill[k])]) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model: nn.Module, dataset, batch_size: int, device: torch.device) -> float:
    """Mean cross-entropy per predicted token over `dataset`."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in dataset.batches(batch_size):
            n = _predicted_tokens(batch)
            total += float(model(**_to(_pad_rows(batch, batch_size), device, model)).loss) * n
            count += n
    finally:
        model.train(was_training)
    return total / max(count, 1)


# --- outputs -------------------------------------------------------------------------------------

def plot_losses(history: list[dict], evals: list[dict], path: "str | os.PathLike", title: str = "") -> Path:
    """A PNG of train loss per step (and eval loss points); Agg canvas, no global pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss", lw=1.5)
    if evals:
        ax.plot([e["step"] for e in evals], [e["loss"] for e in evals], "o--", label="eval loss")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(str(path))
    return Path(path)


@dataclass
class TrainResult:
    """Where the run wrote its outputs and what it measured."""

    output_dir: Path
    adapter_dir: Path
    metrics_path: Path
    chart_path: Path
    steps: int
    train_tokens: int
    tokens_per_s: float
    final_train_loss: float
    final_eval_loss: float | None
    first_eval_loss: float | None
    wall_s: float
    history: list[dict] = field(default_factory=list, repr=False)

    def summary(self) -> str:
        ev = "" if self.final_eval_loss is None else (
            f", eval loss {self.first_eval_loss:.4f} -> {self.final_eval_loss:.4f}"
            if self.first_eval_loss is not None else f", eval loss {self.final_eval_loss:.4f}")
        return (f"done: {self.steps} steps, {self.train_tokens:,} tokens in {self.wall_s:.1f}s, "
                f"{self.tokens_per_s:,.0f} tokens/s; final train loss {self.final_train_loss:.4f}{ev}\n"
                f"adapter: {self.adapter_dir}\nloss chart: {self.chart_path}\nmetrics: {self.metrics_path}")


def _total_steps(cfg: TrainConfig, batches_per_epoch: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.num_epochs * batches_per_epoch / cfg.gradient_accumulation_steps))


def _micro_batches(dataset, cfg: TrainConfig):
    """Shuffled micro-batches, epoch after epoch (reshuffled with seed + epoch), forever."""
    epoch = 0
    while True:
        yield from dataset.batches(cfg.per_device_train_batch_size, shuffle=True, seed=cfg.seed + epoch,
                                   drop_last=len(dataset) >= cfg.per_device_train_batch_size)
        epoch += 1


def train(config: "TrainConfig | str | os.PathLike | None" = None, log: Log = log_stderr) -> TrainResult:
    """Run one LoRA fine-tuning job from a config (a TrainConfig, a YAML path, or None: the default)."""
    from surogate import recipes
    from surogate.adapters import save_adapter
    from surogate.data import load_splits

    cfg = config if isinstance(config, TrainConfig) else load_config(config)
    t_start = time.perf_counter()
    recipes.plan(cfg.recipe, cfg.arch).check(cfg.allow_emulation)  # refuse before loading anything
    device = pick_device()
    out = Path(cfg.output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)

    tokenizer = load_tokenizer_for(cfg, log)
    ds = cfg.dataset
    train_set, eval_set = load_splits(cfg, tokenizer)
    layout = (f"packed into rows of {cfg.sequence_len} tokens (example boundaries kept)" if train_set.packed
              else f"one example per row (up to {cfg.sequence_len} tokens, padded per batch)")
    log(f"data: {train_set.num_tokens:,} train tokens in {len(train_set)} rows, {layout}"
        + ("" if eval_set is None else f", {len(eval_set)} eval rows") + f" ({ds.path or 'bundled GSM8K sample'})")

    base = load_base_model(cfg, tokenizer)
    base_ref = str(Path(cfg.model).expanduser().resolve()) if _is_local(cfg.model) else cfg.model
    if cfg.model == "default":  # random weights: keep them, or the adapter would have no base
        base_dir = out / "base_model"
        base.save_pretrained(str(base_dir))
        tokenizer.save_pretrained(str(base_dir))
        base_ref = str(base_dir.resolve())
    model = compile_model(base.to(device), cfg)
    model.train()
    n_lora = sum(p.numel() for p in trainable_parameters(model))
    log(f"model: {cfg.model} ({sum(p.numel() for p in base.parameters()):,} params), recipe {cfg.recipe}, "
        f"LoRA r={cfg.lora_rank} ({n_lora:,} trainable) on {device.type}")

    batches_per_epoch = max(1, len(train_set) // cfg.per_device_train_batch_size)
    total = _total_steps(cfg, batches_per_epoch)
    opt = make_optimizer(model, cfg.learning_rate, cfg.weight_decay)
    sched = make_scheduler(opt, cfg.lr_scheduler_type, cfg.warmup_steps, total)
    eval_bs = cfg.per_device_eval_batch_size or cfg.per_device_train_batch_size
    micro = _micro_batches(train_set, cfg)
    micro_step = MicroStep(model, cfg, device, log)

    history: list[dict] = []
    evals: list[dict] = []
    tokens_total, t_first_step, window_tokens, eval_s = 0, None, 0, 0.0
    t_train = t_window = time.perf_counter()
    for step in range(1, total + 1):
        losses, step_tokens = [], 0
        for _ in range(cfg.gradient_accumulation_steps):
            batch = next(micro)  # on the host: counting its tokens costs no GPU sync
            losses.append(micro_step(_to(batch, device, model)).clone())
            step_tokens += _real_tokens(batch)
        step_loss = float(torch.stack(losses).mean())  # the step's one host sync
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable_parameters(model), cfg.max_grad_norm)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"step {step}: the loss is {step_loss}; lower learning_rate")
        now = time.perf_counter()
        if t_first_step is None:
            t_first_step = now - t_start  # compile and first step included
            t_steady, tokens_steady = now, 0
        else:
            tokens_steady += step_tokens
        tokens_total += step_tokens
        window_tokens += step_tokens
        history.append({"step": step, "loss": step_loss, "lr": lr, "tokens": step_tokens,
                        "elapsed_s": now - t_train})
        if step % cfg.logging_steps == 0 or step == total:
            log(f"step {step:>{len(str(total))}}/{total} | loss {step_loss:.4f} | lr {lr:.2e} | "
                f"{window_tokens / max(now - t_window, 1e-9):,.0f} tokens/s | {now - t_start:.1f}s")
            t_window, window_tokens = time.perf_counter(), 0
        if eval_set is not None and cfg.eval_steps and step % cfg.eval_steps == 0 and step != total:
            t_eval = time.perf_counter()
            evals.append({"step": step, "loss": evaluate(model, eval_set, eval_bs, device)})
            eval_s += time.perf_counter() - t_eval
            log(f"eval  step {step}: loss {evals[-1]['loss']:.4f} ({time.perf_counter() - t_eval:.1f}s)")
            t_window = time.perf_counter()
    t_end = time.perf_counter()
    train_s = t_end - t_train
    # Steady-state throughput: after the first step (which pays for compilation), as DESIGN.md §5.
    steady_s = t_end - t_steady - eval_s
    tokens_per_s = tokens_steady / steady_s if total > 1 and steady_s > 0 else tokens_total / train_s

    first_eval = None
    if eval_set is not None:
        t_eval = time.perf_counter()
        evals.append({"step": total, "loss": evaluate(model, eval_set, eval_bs, device)})
        first_eval = evals[0]["loss"] if len(evals) > 1 else None
        log(f"eval  step {total}: loss {evals[-1]['loss']:.4f} ({time.perf_counter() - t_eval:.1f}s)")

    adapter_dir = save_adapter(model, out / "adapter", base_model_name_or_path=base_ref)
    tokenizer.save_pretrained(str(adapter_dir))
    chart = plot_losses(history, evals, out / "loss.png",
                        title=f"{cfg.model} | recipe {cfg.recipe} | LoRA r={cfg.lora_rank} | {device.type}")
    result = TrainResult(
        output_dir=out, adapter_dir=adapter_dir, metrics_path=out / "metrics.json", chart_path=chart, steps=total,
        train_tokens=tokens_total, tokens_per_s=tokens_per_s, final_train_loss=history[-1]["loss"],
        final_eval_loss=evals[-1]["loss"] if evals else None, first_eval_loss=first_eval,
        wall_s=time.perf_counter() - t_start, history=history)
    report = getattr(model, "surogate_report", None)
    if report is not None:
        (out / "compile_report.txt").write_text(f"{report}\n")
        log(f"compile: {len(report.rewritten)} of {len(report.linears)} linears rewritten "
            f"({report.backend}); details in {out / 'compile_report.txt'}")
    _write_metrics(result, cfg, evals, device, t_first_step, report)
    return result


def _write_metrics(r: TrainResult, cfg: TrainConfig, evals: list[dict], device: torch.device,
                   time_to_first_step: float | None, report=None) -> None:
    import surogate

    metrics = {
        "surogate_version": surogate.__version__, "torch_version": torch.__version__,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "recipe": cfg.recipe, "model": cfg.model, "steps": r.steps, "train_tokens": r.train_tokens,
        "tokens_per_s": r.tokens_per_s, "time_to_first_step_s": time_to_first_step, "wall_s": r.wall_s,
        "final_train_loss": r.final_train_loss, "final_eval_loss": r.final_eval_loss,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        "adapter_dir": str(r.adapter_dir), "chart": str(r.chart_path),
        "compile": None if report is None else {
            "backend": report.backend, "graphs": report.graphs, "rewritten": len(report.rewritten),
            "linears": len(report.linears), "fallbacks": [list(f) for f in report.fallbacks]},
        "train": r.history, "eval": evals, "config": cfg.to_dict(),
    }
    r.metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
