"""The training loop behind `surogate train`: a plain PyTorch loop over a surogate.compile'd model.

Nothing here hides the loop: AdamW over the LoRA parameters, a warmup + decay schedule,
gradient accumulation, fixed-length packed batches, eval loss on a held-out split (before the
first step, every `eval_steps`, at the end), each step's numbers appended to `metrics.jsonl` as
it happens, checkpoints every `save_steps` and on Ctrl-C (surogate/training/checkpoint.py) that
`resume_from_checkpoint` continues exactly, then the adapter, a metrics JSON and a loss chart in
`output_dir`. What the config cannot know alone (the model's positions and layer names) is checked
from the model's config before any weight loads. The helpers are public so that the examples can
write the same loop by hand. `compile_model` is the one place that calls `surogate.compile`.

Under `torchrun --nproc-per-node N` the same loop runs on N ranks (surogate/training/distributed.py): every rank
draws the same seeded order of global micro-batches of N x `per_device_train_batch_size` rows and trains
its 1/N of each (`distributed.shard`), the loss of each rank normalised by the global micro-batch's
target count (`num_items_in_batch`, as `distributed.items_per_rank`), so that N ranks of B rows take the
steps of one process of N x B rows. The model is wrapped per `parallelism` (DDP, or FSDP2), gradients
accumulate under `no_sync` until the last micro-step; with CUDA graphs under DDP the model stays
unwrapped and `all_reduce_grads` runs after the last replay. Rank 0 alone logs and writes; an error
on one rank ends the job (`distributed.fail_fast`); the ranks agree on where a Ctrl-C stops.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from surogate.training import checkpoint, distributed, train_checks
from surogate.training.config import TrainConfig, load_config
from surogate.training.train_checks import is_local_model as _is_local

Log = Callable[[str], None]


def log_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _silent(line: str) -> None:
    """The log of ranks other than 0: rank 0 speaks for the job (errors print with their rank: fail_fast)."""


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


# --- model and tokenizer -------------------------------------------------------------------------

def load_tokenizer_for(cfg: TrainConfig, log: Log = log_stderr):
    """The tokenizer for `cfg`: explicit > the model directory's own > the embedded default."""
    from surogate.training.tokenizer import has_tokenizer_files, load_tokenizer

    if cfg.tokenizer is not None or cfg.model == "default":
        return load_tokenizer(cfg.tokenizer)
    if _is_local(cfg.model) and not has_tokenizer_files(Path(cfg.model).expanduser()):
        log(f"{cfg.model} has no tokenizer; using the embedded default (set `tokenizer:` to choose one)")
        return load_tokenizer(None)
    return load_tokenizer(cfg.model)


def embedded_model_config(tokenizer=None):
    """The embedded tiny Qwen3 config (surogate/data/qwen3-tiny.json) sized to `tokenizer` (None: as stored)."""
    from transformers import Qwen3Config

    from surogate.training.data_files import package_data_dir

    raw = json.loads((package_data_dir() / "qwen3-tiny.json").read_text())
    if tokenizer is not None:
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


def wants_cuda_graphs(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether `cfg.cuda_graphs` asks for CUDA graphs on `device` ("true" on a CPU is refused by MicroStep)."""
    return cfg.cuda_graphs == "true" or (cfg.cuda_graphs == "auto" and device.type == "cuda")


class MicroStep:
    """Forward + backward of one micro-batch, the loss scaled for gradient accumulation; replayed from
    CUDA graphs (`surogate.GraphedStep`, one per shape bucket) when `cfg.cuda_graphs` allows. Returns the loss.
    A capture that fails warns once and the run continues eagerly (`cuda_graphs: true` makes it an error).
    `graphs=False` turns the graphs off whatever the config says (FSDP); `items`, when given, is the
    `num_items_in_batch` the loss divides its sum by (several ranks: see `surogate.training.distributed`)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, device: torch.device, log: Log = log_stderr,
                 graphs: bool = True) -> None:
        self.model, self.mode, self.log = model, cfg.cuda_graphs, log
        self.loss_scale = 1.0 / cfg.gradient_accumulation_steps
        if self.mode == "true" and device.type != "cuda":
            raise ValueError("cuda_graphs: true needs a CUDA device; set cuda_graphs: auto or false")
        self.graphed = None
        if graphs and wants_cuda_graphs(cfg, device):
            from surogate.training.graphed_step import GraphedStep

            self.graphed = GraphedStep(model, loss_scale=self.loss_scale, strict=self.mode == "true")
        self._said = False

    def eager(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = self.model(**batch).loss
        (loss * self.loss_scale).backward()
        return loss.detach()

    def __call__(self, batch: dict[str, torch.Tensor], items: torch.Tensor | None = None) -> torch.Tensor:
        if items is not None:
            batch = {**batch, "num_items_in_batch": items}
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
    from peft import PeftModel

    from surogate.attention import original_implementation

    hf = model.base_model.model if isinstance(model, PeftModel) else model  # evaluate() takes plain models too
    drop = model is not None and original_implementation(hf) is not None
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
def evaluate(model: nn.Module, dataset, batch_size: int, device: torch.device, world: int = 1) -> float:
    """Mean cross-entropy per predicted token over `dataset`.

    `world` > 1 (a job of several processes; every rank calls it with the same `dataset`): each global
    batch of `world` x `batch_size` rows is split over the ranks, each runs its rows (padding rows
    included, so that FSDP's gathers match), and the token sums and counts are added over the ranks:
    the result equals one process's with `world` x `batch_size` rows a batch.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    rows = batch_size * world
    try:
        for batch in dataset.batches(rows):
            batch = _pad_rows(batch, rows)
            if world > 1:
                batch = distributed.shard(batch)
            n = _predicted_tokens(batch)
            loss = model(**_to(batch, device, model)).loss
            if n:
                total += float(loss) * n
                count += n
    finally:
        model.train(was_training)
    if world > 1:
        sums = torch.tensor([total, count], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(sums)
        total, count = sums.tolist()
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
    tokens_per_s: float | None  # steady state: after the first step of this process (None: no step after it)
    final_train_loss: float
    final_eval_loss: float | None
    first_eval_loss: float | None
    wall_s: float
    history: list[dict] = field(default_factory=list, repr=False)
    first_step_s: float | None = None  # the first step of this process, compilation included
    resumed_from: Path | None = None
    rank: int = 0  # this process's rank (a job of several: only rank 0 wrote the outputs)
    world_size: int = 1

    def summary(self) -> str:
        ev = "" if self.final_eval_loss is None else (
            f", eval loss {self.first_eval_loss:.4f} -> {self.final_eval_loss:.4f}"
            if self.first_eval_loss is not None else f", eval loss {self.final_eval_loss:.4f}")
        if self.first_step_s is None:
            speed = "no step run (resumed at the last step)"
        elif self.tokens_per_s is None:
            speed = f"first step {self.first_step_s:.1f} s (compile), no steady-state tokens/s from one step"
        else:
            speed = f"first step {self.first_step_s:.1f} s (compile), then {self.tokens_per_s:,.0f} tokens/s"
        final = "n/a" if math.isnan(self.final_train_loss) else f"{self.final_train_loss:.4f}"
        return (f"done: {self.steps} steps, {self.train_tokens:,} tokens in {self.wall_s:.1f}s; {speed}; "
                f"final train loss {final}{ev}\n"
                f"adapter: {self.adapter_dir}\nloss chart: {self.chart_path}\nmetrics: {self.metrics_path}")


def _total_steps(cfg: TrainConfig, batches_per_epoch: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.num_epochs * batches_per_epoch / cfg.gradient_accumulation_steps))


class MicroBatches:
    """Shuffled micro-batches, epoch after epoch (reshuffled with seed + epoch), forever, with their
    position: `epoch` and `index` (micro-batches of that epoch taken), which a checkpoint stores and a
    resumed run starts from. With `world` ranks these are the global micro-batches of `world` x
    `per_device_train_batch_size` rows, the same on every rank (each trains its `distributed.shard`):
    the order of one process with a batch `world` times larger."""

    def __init__(self, dataset, cfg: TrainConfig, epoch: int = 0, index: int = 0, world: int = 1) -> None:
        self.dataset, self.batch_size, self.seed = dataset, cfg.per_device_train_batch_size * world, cfg.seed
        self.drop_last = len(dataset) >= self.batch_size
        self.per_epoch = max(1, len(dataset) // self.batch_size if self.drop_last else 1)
        self.epoch, self.index = epoch, index
        self._it = None

    def __iter__(self) -> "MicroBatches":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.dataset.batches(self.batch_size, shuffle=True, seed=self.seed + self.epoch,
                                                     drop_last=self.drop_last))
                for _ in range(self.index):  # resumed in the middle of this epoch: its order, from there
                    next(self._it)
            batch = next(self._it, None)
            if batch is not None:
                self.index += 1
                return batch
            self.epoch, self.index, self._it = self.epoch + 1, 0, None
        raise RuntimeError("the train split yields no batch")

    @property
    def epochs_done(self) -> float:
        """Epochs as a fraction (for the log)."""
        return round(self.epoch + self.index / self.per_epoch, 4)


class StopOnInterrupt:
    """While the loop runs, the first Ctrl-C (SIGINT) or, in one process, SIGTERM (what SLURM and other
    schedulers send before they kill a job) asks it to stop after the current step, where a checkpoint is
    saved; a second one stops at once. Under torchrun SIGTERM keeps its default: the agent sends it to the
    other ranks when one fails, and they must end then, not finish a step. Outside the main thread nothing
    is installed."""

    def __init__(self, log: Log, distributed: bool = False) -> None:
        self.log, self.requested, self._previous = log, False, {}
        self.signals = (signal.SIGINT,) if distributed else (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> "StopOnInterrupt":
        try:
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: signals go to the main one
            pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        try:
            self.log(f"{signal.Signals(signum).name}: stopping after this step to save a checkpoint "
                     "(Ctrl-C again to stop at once)")
        except RuntimeError:  # the signal came in the middle of a write to the same stream ("reentrant call")
            pass

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def _merged_log(history: list[dict], evals: list[dict]) -> list[dict]:
    """Train and eval records in the order metrics.jsonl lists them (a step's eval after its train line)."""
    lines = [(h["step"], 0, h) for h in history] + [(e["step"], 1, {"step": e["step"], "eval_loss": e["loss"]})
                                                    for e in evals]
    return [record for _, _, record in sorted(lines, key=lambda t: (t[0], t[1]))]


class _AgreedStop(KeyboardInterrupt):
    """Every rank stops after the same step (a Ctrl-C that the ranks agreed on, its checkpoint saved)."""


def _spread(model: nn.Module, cfg: TrainConfig, info: distributed.DistInfo, device: torch.device,
            log: Log) -> tuple[nn.Module, bool, bool]:
    """The model to train on this job's ranks, whether its micro-steps may run as CUDA graphs, and
    whether the gradients are reduced by hand after the last micro-step (CUDA graphs under DDP)."""
    graphs = wants_cuda_graphs(cfg, device)
    if not info.distributed:
        if (cfg.parallelism, cfg.fsdp_lora) != ("ddp", "replicated"):
            log(f"parallelism: {cfg.parallelism} ignored: a single process (launch with torchrun --nproc-per-node N "
                "to spread the job over N)")
        return model, graphs, False
    if cfg.parallelism == "fsdp" and graphs:
        log("cuda_graphs: off under fsdp (FSDP gathers and frees each block's weights from host-side hooks, which "
            "a CUDA graph cannot record); every micro-step runs eagerly")
        graphs = False
    if cfg.parallelism == "ddp" and graphs:
        # DDP's reducer runs from autograd hooks that a captured graph cannot replay: the model stays
        # unwrapped, LoRA starts from rank 0's weights, gradients are averaged after the last replay.
        distributed.broadcast_trainable(model)
        model._surogate_parallelism = "ddp (CUDA graphs: gradients all-reduced after the last micro-step)"
        report = getattr(model, "surogate_report", None)
        if report is not None:
            report.note(f"distributed: ddp over {info.world} ranks ({info.backend}) with CUDA graphs: the model is "
                        "not wrapped; the LoRA gradients are all-reduced once per optimizer step, after the last "
                        "replayed micro-step (distributed.all_reduce_grads)")
        return model, True, True
    lora = cfg.fsdp_lora if cfg.parallelism == "fsdp" else None
    return distributed.wrap(model, cfg.parallelism, lora=lora), graphs, False


def train(config: "TrainConfig | str | os.PathLike | None" = None, log: Log = log_stderr,
          on_step: Callable[[dict], None] | None = None) -> TrainResult:
    """Run one LoRA fine-tuning job from a config (a TrainConfig, a YAML path, or None: the default).

    `on_step(record)` is called after each optimizer step (its metrics line written, its eval and
    checkpoint done). A KeyboardInterrupt (Ctrl-C, or raised by `on_step`) saves a checkpoint of the last
    finished step, then propagates.

    Launched by torchrun (RANK, WORLD_SIZE... in the environment), every rank runs it: it joins the job
    (`distributed.init`), and an exception on any rank ends every rank with that error
    (`distributed.fail_fast`). Only rank 0 logs (`log`) and writes; every rank returns the result.
    A SIGINT to any rank (torchrun passes the agent's on to every worker) stops every rank after the
    same step, where the checkpoint is saved; a KeyboardInterrupt raised on one rank alone ends the job
    without a checkpoint.
    """
    cfg = config if isinstance(config, TrainConfig) else load_config(config)
    joined = torch.distributed.is_available() and torch.distributed.is_initialized()
    info = distributed.init()
    stopped = False
    with distributed.fail_fast():
        try:
            result = _train(cfg, info, log if info.is_main else _silent, on_step)
        except _AgreedStop:  # not a failure: every rank saved the checkpoint and stops here
            stopped = True
    if info.distributed and not joined:
        distributed.cleanup()
    if stopped:
        raise KeyboardInterrupt
    return result


def _train(cfg: TrainConfig, info: distributed.DistInfo, log: Log,
           on_step: Callable[[dict], None] | None) -> TrainResult:
    from surogate import recipes
    from surogate.training.data import load_splits
    from surogate.modules import parameter_counts
    from surogate.training.run_log import NullRunLog, RunLog

    t_start = time.perf_counter()
    main, world = info.is_main, info.world
    recipes.plan(cfg.recipe, cfg.arch).check(cfg.allow_emulation)  # refuse before loading anything
    resume_dir = train_checks.resume_path(cfg)
    targets_checked = train_checks.check_model(cfg)  # positions and LoRA targets, from the model's config
    device = info.device if info.distributed else pick_device()
    out = Path(cfg.output_dir).expanduser()
    set_seed(cfg.seed)  # the same on every rank: the same LoRA init, data order and dropout draws

    tokenizer = load_tokenizer_for(cfg, log)
    ds = cfg.dataset
    train_set, eval_set = load_splits(cfg, tokenizer)
    layout = (f"packed into rows of {cfg.sequence_len} tokens (example boundaries kept)" if train_set.packed
              else f"one example per row (up to {cfg.sequence_len} tokens, padded per batch)")
    log(f"data: {train_set.num_tokens:,} train tokens in {len(train_set)} rows, {layout}"
        + ("" if eval_set is None else f", {len(eval_set)} eval rows") + f" ({ds.path or 'bundled GSM8K sample'})")
    fingerprint = train_checks.data_fingerprint(train_set, cfg)
    state = None
    if resume_dir is not None:
        state = checkpoint.read_state(resume_dir)
        train_checks.check_resumable(cfg, state, fingerprint, resume_dir, world)
    elif checkpoint.list_checkpoints(out):
        log(f"{out} holds checkpoints of an earlier run; this run starts over (resume_from_checkpoint: true "
            "continues the latest)")
    if main:
        out.mkdir(parents=True, exist_ok=True)

    base = load_base_model(cfg, tokenizer)
    if not targets_checked:
        train_checks.check_lora_targets(cfg, base)
    base_ref = str(Path(cfg.model).expanduser().resolve()) if _is_local(cfg.model) else cfg.model
    if cfg.model == "default":  # random weights: keep them, or the adapter would have no base
        base_dir = out / "base_model"
        if main:
            base.save_pretrained(str(base_dir))
            tokenizer.save_pretrained(str(base_dir))
        base_ref = str(base_dir.resolve())
    core = compile_model(base.to(device), cfg)  # what surogate.compile returned: the PEFT model
    core.train()
    counts = parameter_counts(core, cfg.recipe)
    log(f"model: {cfg.model}, recipe {cfg.recipe}, LoRA r={cfg.lora_rank} on {device.type}: {counts}")
    model, graphs, reduce_by_hand = _spread(core, cfg, info, device, log)
    wrapped = info.distributed and not reduce_by_hand  # DDP or FSDP: no_sync until the last micro-step
    if info.distributed:
        rows = cfg.per_device_train_batch_size
        log(f"distributed: {distributed.describe(model)}; {rows} rows per rank per micro-step, global micro-batch "
            f"{world} x {rows} = {world * rows} rows; rank 0 logs and writes")

    micro = MicroBatches(train_set, cfg, world=world)
    total = _total_steps(cfg, micro.per_epoch)
    opt = make_optimizer(model, cfg.learning_rate, cfg.weight_decay)
    sched = make_scheduler(opt, cfg.lr_scheduler_type, cfg.warmup_steps, total)
    eval_bs = cfg.per_device_eval_batch_size or cfg.per_device_train_batch_size
    history: list[dict] = []
    evals: list[dict] = []
    tokens_total, start = 0, 1
    if state is not None:
        state = checkpoint.restore(resume_dir, model, opt, sched)
        history, evals, tokens_total = state["history"], state["evals"], state["tokens_total"]
        start = state["global_step"] + 1
        micro = MicroBatches(train_set, cfg, epoch=state["epoch"], index=state["micro_batch"], world=world)
        log(f"resumed from {resume_dir}: step {start - 1} of {total} done, epoch {state['epoch']}, "
            f"micro-batch {state['micro_batch']} of its order")
    run_log = (RunLog(out, cfg.report_to, _merged_log(history, evals), None if state is None else start - 1)
               if main else NullRunLog())

    def run_eval(step: int) -> None:
        t_eval = time.perf_counter()
        evals.append({"step": step, "loss": evaluate(core, eval_set, eval_bs, device, world)})
        run_log.eval({"step": step, "eval_loss": evals[-1]["loss"]})
        log(f"eval  step {step}: loss {evals[-1]['loss']:.4f} ({time.perf_counter() - t_eval:.1f}s)")

    saved: list[int] = []

    def save_checkpoint(step: int) -> Path:  # every rank: FSDP gathers the shards, rank 0 writes
        trainer_state = {"global_step": step, "total_steps": total, "epoch": micro.epoch, "micro_batch": micro.index,
                         "micro_batches_per_epoch": micro.per_epoch,
                         "tokens_total": tokens_total, "history": history, "evals": evals,
                         "resume_keys": train_checks.resume_keys(cfg), "train_data": fingerprint,
                         **train_checks.run_layout(cfg, world)}
        path = checkpoint.save(out, step, model, opt, sched, trainer_state, tokenizer, base_ref)
        if cfg.save_total_limit and main:
            checkpoint.rotate(out, cfg.save_total_limit, protect=path)
        saved.append(step)
        return path

    try:
        if eval_set is not None and cfg.eval_on_start and state is None:
            run_eval(0)
        if state is not None:
            checkpoint.restore_rng(resume_dir)  # last: nothing between here and the first step draws from them
        micro_step = MicroStep(model, cfg, device, log, graphs=graphs)
        params = trainable_parameters(model)
        first_step_s = time_to_first_step = None
        steady_tokens, steady_s, window_tokens, window_s = 0, 0.0, 0, 0.0
        t_train = time.perf_counter()
        step, in_step = start - 1, False
        with StopOnInterrupt(log, info.distributed) as stop:
            try:
                for step in range(start, total + 1):
                    in_step, t0 = True, time.perf_counter()
                    losses, step_tokens = [], 0
                    for k in range(cfg.gradient_accumulation_steps):
                        batch = next(micro)  # on the host: counting its tokens costs no GPU sync
                        step_tokens += _real_tokens(batch)  # the global micro-batch's
                        items = None
                        if info.distributed:
                            # = distributed.items_per_rank(labels), without its all-reduce: every rank holds
                            # the global micro-batch. Each rank's loss is then its token sum x world / (the
                            # global micro-batch's targets): averaged by DDP/FSDP, the global token mean.
                            items = torch.full((), max(_predicted_tokens(batch), 1) / world, device=device)
                            batch = distributed.shard(batch)
                        last = k == cfg.gradient_accumulation_steps - 1
                        with contextlib.nullcontext() if last or not wrapped else distributed.no_sync(model):
                            losses.append(micro_step(_to(batch, device, core), items).clone())
                    if reduce_by_hand:  # CUDA graphs under DDP: one all-reduce after the last replay
                        distributed.all_reduce_grads(params)
                    agreed_stop = False
                    if info.distributed:  # one collective: the loss's mean over the ranks, and any rank's Ctrl-C
                        flag = torch.full((), float(stop.requested), device=device)
                        both = distributed.mean_over_ranks(torch.stack([torch.stack(losses).mean().float(), flag]))
                        step_loss, agreed_stop = float(both[0]), float(both[1]) > 0  # the step's one host sync
                    else:
                        step_loss = float(torch.stack(losses).mean())  # the step's one host sync
                    if cfg.max_grad_norm:
                        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    lr = opt.param_groups[0]["lr"]
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                    in_step, now = False, time.perf_counter()
                    if not math.isfinite(step_loss):  # the mean over the ranks: every rank stops here
                        raise FloatingPointError(f"step {step}: the loss is {step_loss}; lower learning_rate")
                    if first_step_s is None:  # compilation included: reported apart, never in tokens/s
                        first_step_s, time_to_first_step = now - t0, now - t_start
                    else:
                        steady_tokens, steady_s = steady_tokens + step_tokens, steady_s + (now - t0)
                        window_tokens, window_s = window_tokens + step_tokens, window_s + (now - t0)
                    tokens_total += step_tokens
                    record = {"step": step, "epoch": micro.epochs_done, "loss": step_loss, "lr": lr,
                              "tokens": step_tokens, "elapsed_s": round(now - t_train, 3)}
                    history.append(record)
                    run_log.train(record)
                    if step == start or step % cfg.logging_steps == 0 or step == total:
                        speed = (f"first step {first_step_s:.1f} s (compile)" if step == start
                                 else f"{window_tokens / max(window_s, 1e-9):,.0f} tokens/s")
                        log(f"step {step:>{len(str(total))}}/{total} | loss {step_loss:.4f} | lr {lr:.2e} | "
                            f"{speed} | {now - t_start:.1f}s")
                        window_tokens, window_s = 0, 0.0
                    if eval_set is not None and cfg.eval_steps and step % cfg.eval_steps == 0 and step != total:
                        run_eval(step)
                    if cfg.save_steps and step % cfg.save_steps == 0:
                        log(f"checkpoint: {save_checkpoint(step)}")
                    if on_step is not None:
                        on_step(dict(record))
                    if agreed_stop:  # several ranks: what they all saw in this step's all-reduce
                        raise _AgreedStop
                    if stop.requested and not info.distributed:
                        raise KeyboardInterrupt
            except KeyboardInterrupt as interrupt:
                if info.distributed and not isinstance(interrupt, _AgreedStop):
                    # on this rank alone (a second Ctrl-C, or on_step): the others are elsewhere, so no
                    # collective checkpoint; fail_fast ends the job
                    log(f"interrupted at once during step {step}: no checkpoint")
                    raise
                if in_step:
                    log(f"interrupted during step {step}: no checkpoint of it (a step half done)")
                elif step < start:
                    log("interrupted before the first step: nothing to save")
                else:
                    path = out / f"checkpoint-{step}" if step in saved else save_checkpoint(step)
                    log(f"interrupted after step {step}: checkpoint saved to {path}; continue with "
                        "`--set resume_from_checkpoint=true`"
                        + (f" (on {world} ranks again)" if info.distributed else ""))
                raise
        t_end = time.perf_counter()
        tokens_per_s = steady_tokens / steady_s if steady_s > 0 else None

        first_eval = None
        if eval_set is not None:
            run_eval(total)
            first_eval = evals[0]["loss"] if len(evals) > 1 else None
    finally:
        run_log.close()

    adapter_dir = distributed.save_adapter(model, out / "adapter", base_model_name_or_path=base_ref)  # every rank
    chart = out / "loss.png"
    if main:
        tokenizer.save_pretrained(str(adapter_dir))
        where = device.type if not info.distributed else f"{world} x {device.type}"
        plot_losses(history, evals, chart,
                    title=f"{cfg.model} | recipe {cfg.recipe} | LoRA r={cfg.lora_rank} | {where}")
    result = TrainResult(
        output_dir=out, adapter_dir=adapter_dir, metrics_path=out / "metrics.json", chart_path=chart, steps=total,
        train_tokens=tokens_total, tokens_per_s=tokens_per_s,
        final_train_loss=history[-1]["loss"] if history else float("nan"),
        final_eval_loss=evals[-1]["loss"] if evals else None, first_eval_loss=first_eval,
        wall_s=time.perf_counter() - t_start, history=history, first_step_s=first_step_s, resumed_from=resume_dir,
        rank=info.rank, world_size=world)
    report = getattr(core, "surogate_report", None)
    if main:
        if report is not None:
            (out / "compile_report.txt").write_text(f"{report}\n")
            log(f"compile: {len(report.rewritten)} of {len(report.linears)} linears rewritten "
                f"({report.backend}); details in {out / 'compile_report.txt'}")
        _write_metrics(result, cfg, evals, device, time_to_first_step, report, counts, t_end - t_train,
                       distributed.describe(model) if info.distributed else None)
    return result


def _write_metrics(r: TrainResult, cfg: TrainConfig, evals: list[dict], device: torch.device,
                   time_to_first_step: float | None, report=None, counts=None, train_s: float | None = None,
                   spread: str | None = None) -> None:
    import surogate

    metrics = {
        "surogate_version": surogate.__version__, "torch_version": torch.__version__,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "world_size": r.world_size, "distributed": spread,
        "recipe": cfg.recipe, "model": cfg.model, "steps": r.steps, "train_tokens": r.train_tokens,
        "tokens_per_s": r.tokens_per_s, "first_step_s": r.first_step_s, "time_to_first_step_s": time_to_first_step,
        "train_s": train_s, "wall_s": r.wall_s, "final_train_loss": r.final_train_loss,
        "final_eval_loss": r.final_eval_loss,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        "parameters": None if counts is None else {
            "trainable": counts.trainable, "frozen": counts.frozen, "frozen_bytes": counts.frozen_bytes},
        "resumed_from": None if r.resumed_from is None else str(r.resumed_from),
        "adapter_dir": str(r.adapter_dir), "chart": str(r.chart_path),
        "compile": None if report is None else {
            "backend": report.backend, "graphs": report.graphs, "rewritten": len(report.rewritten),
            "linears": len(report.linears), "fallbacks": [list(f) for f in report.fallbacks]},
        "train": r.history, "eval": evals, "config": cfg.to_dict(),
    }
    r.metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
