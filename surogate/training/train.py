"""The training loop behind `surogate train`: a plain PyTorch loop over a surogate.compile'd model.

Nothing here hides the loop: AdamW over the LoRA parameters, a warmup + decay schedule,
gradient accumulation weighted by target tokens (a step's loss is the mean over all its target tokens, as
in Hugging Face's Trainer since 4.46: `steps.step_items`), fixed-length packed batches, eval loss on a
held-out split (before the first step, every `eval_steps`, at the end), each step's numbers appended to
`metrics.jsonl` as it happens, checkpoints every `save_steps` and on Ctrl-C (surogate/training/checkpoint.py) that
`resume_from_checkpoint` continues exactly, then the adapter, a metrics JSON and a loss chart in
`output_dir`, which the run holds alone (`run_lock`) and whose checkpoints must be its own
(`train_checks.check_output_dir`). What the config cannot know alone (the model's positions and layer
names) is checked from the model's config before any weight loads. The parts are public, each in its file, so that the
examples can write the same loop by hand: `setup` builds the model, optimizer and schedule, `steps` runs
micro-batches and the eval loss, `outputs` writes what a finished run leaves.

Under `torchrun --nproc-per-node N` the same loop runs on N ranks (surogate/training/distributed.py): every rank
draws the same seeded order of global micro-batches of N x `per_device_train_batch_size` rows and trains
its 1/N of each (`distributed.shard`), the loss of each rank normalised by the optimizer step's global
target count (`num_items_in_batch`: `steps.step_items`), so that N ranks of B rows take the steps of one
process of N x B rows. The model is wrapped per `parallelism` (DDP, or FSDP2), gradients
accumulate under `no_sync` until the last micro-step; with CUDA graphs under DDP the model stays
unwrapped and `all_reduce_grads` runs after the last replay. Rank 0 alone logs and writes; an error
on one rank ends the job (`distributed.fail_fast`); the ranks agree on where a Ctrl-C stops.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from surogate.training import (
    checkpoint,
    distributed,
    outputs,
    run_lock,
    setup,
    steps,
    train_checks,
)
from surogate.training.config import TrainConfig, dataset_sources, every_steps, load_config
from surogate.training.outputs import TrainResult, counted
from surogate.training.setup import Log, log_stderr


def _silent(line: str) -> None:
    """The log of ranks other than 0: rank 0 speaks for the job (errors print with their rank: fail_fast)."""


class StopOnInterrupt:
    """From the first step to the last output, the first Ctrl-C (SIGINT) or, in one process, SIGTERM (what
    SLURM and other schedulers send before they kill a job) asks the run to stop after the current step,
    where a checkpoint is saved (during the final eval: at once, `stop_at_once`; while the outputs are
    written: once they are); a second one stops at once. Under torchrun SIGTERM keeps its default: the
    agent sends it to the other ranks when one fails, and they must end then, not finish a step. Outside
    the main thread nothing is installed."""

    def __init__(self, log: Log, distributed: bool = False) -> None:
        self.log, self.requested, self.immediate, self._previous = log, False, False, {}
        self.signals = (signal.SIGINT,) if distributed else (signal.SIGINT, signal.SIGTERM)

    def stop_at_once(self, on: bool = True) -> None:
        """From now on (`on`) the first signal stops at once, as in work that can be dropped and redone (the
        final eval); one that came already stops here."""
        self.immediate = on
        if on and self.requested:
            raise KeyboardInterrupt

    def __enter__(self) -> "StopOnInterrupt":
        try:
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: signals go to the main one
            pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested or self.immediate:
            self.requested = True
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


class _AgreedStop(KeyboardInterrupt):
    """Every rank stops after the same step (a Ctrl-C that the ranks agreed on, its checkpoint saved)."""


def _total_steps(cfg: TrainConfig, batches_per_epoch: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.num_epochs * batches_per_epoch / cfg.gradient_accumulation_steps))


def _epochs_line(cfg: TrainConfig, batches_per_epoch: int, total: int) -> str | None:
    """The log line when `num_epochs` is not what the run trains: a step takes whole micro-batches
    (`gradient_accumulation_steps` of them), so the steps round up; None when they fit (or max_steps is set)."""
    if cfg.max_steps is not None:
        return None
    ga = cfg.gradient_accumulation_steps
    epochs = total * ga / batches_per_epoch
    if math.isclose(epochs, cfg.num_epochs):
        return None
    wanted = cfg.num_epochs * batches_per_epoch
    return (f"num_epochs: {cfg.num_epochs:g} is {wanted:g} micro-batch{'' if wanted == 1 else 'es'} (an epoch is "
            f"{batches_per_epoch}), rounded up to {total} optimizer step{'s' if total != 1 else ''} of {ga}: the "
            f"run trains {epochs:.4g} epochs (set max_steps, or lower gradient_accumulation_steps, to train fewer)")


def _spread(model: nn.Module, cfg: TrainConfig, info: distributed.DistInfo, device: torch.device,
            log: Log) -> tuple[nn.Module, bool, bool]:
    """The model to train on this job's ranks, whether its micro-steps may run as CUDA graphs, and
    whether the gradients are reduced by hand after the last micro-step (CUDA graphs under DDP)."""
    graphs = steps.wants_cuda_graphs(cfg, device)
    if not info.distributed:
        if (cfg.parallelism, cfg.fsdp_lora) != ("ddp", "replicated"):
            log(f"parallelism: {cfg.parallelism} ignored: a single process (launch with torchrun --nproc-per-node N "
                "to spread the job over N)")
        return model, graphs, False
    if cfg.parallelism == "fsdp" and graphs:
        log("cuda_graphs: off under fsdp (FSDP gathers and frees each block's weights from host-side hooks, which "
            "a CUDA graph cannot record); every micro-step runs eagerly")
        graphs = False
    if cfg.parallelism == "ddp" and graphs:  # the model stays unwrapped: gradients averaged after the last replay
        return distributed.replicate_unwrapped(model), True, True
    lora = cfg.fsdp_lora if cfg.parallelism == "fsdp" else None
    return distributed.wrap(model, cfg.parallelism, lora=lora), graphs, False


def train(config: "TrainConfig | str | os.PathLike | None" = None, log: Log = log_stderr,
          on_step: Callable[[dict], None] | None = None) -> TrainResult:
    """Run one LoRA fine-tuning job from a config (a TrainConfig, a YAML path, or None: the default).

    `on_step(record)` is called after each optimizer step (its metrics line written, its eval and
    checkpoint done). A KeyboardInterrupt (Ctrl-C, or raised by `on_step`) saves a checkpoint of the last
    finished step (after the last step, during the final eval, the adapter too), then propagates.

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
            with run_lock.hold(cfg.output_dir) if info.is_main else contextlib.nullcontext():  # one run a folder
                result = _train(cfg, info, log if info.is_main else _silent, on_step)
        except _AgreedStop:  # not a failure: every rank saved the checkpoint and stops here
            stopped = True
    if info.distributed and not joined:
        distributed.cleanup()
    if stopped:
        raise KeyboardInterrupt
    return result


def non_finite_loss_message(step: int, loss: float, lr: float, recipe: str) -> str:
    """The one line a NaN / Inf loss stops the run with. It is checked before the optimizer step, so the
    LoRA weights stay those of the last finite step; the cause is either the training (a learning rate too
    high for the data) or the numerics (the recipe, a kernel), and the same config in bf16 tells which."""
    other = "" if recipe == "bf16" else f", or train the same config with recipe: bf16 to tell a {recipe} fault " \
        "from the training's"
    return (f"step {step}: the loss is {loss} (learning rate {lr:.3g}); the weights are step {step - 1}'s, "
            f"not updated with it. Lower learning_rate{other}")


def _train(cfg: TrainConfig, info: distributed.DistInfo, log: Log,
           on_step: Callable[[dict], None] | None) -> TrainResult:
    from surogate.kernels.plan import plan
    from surogate.ops.modules import parameter_counts
    from surogate.training.data import load_splits
    from surogate.training.run_log import NullRunLog, RunLog, new_tensorboard_dir

    t_start = time.perf_counter()
    main, world = info.is_main, info.world
    device = info.device if info.distributed else setup.pick_device()
    train_checks.check_device(cfg, device)  # arch or cuda_graphs that need a GPU this machine lacks
    plan(cfg.recipe, cfg.arch).check(cfg.allow_emulation)  # refuse before loading anything
    resume_dir = train_checks.resume_path(cfg)
    out = Path(cfg.output_dir).expanduser()
    replaced = train_checks.check_output_dir(cfg, resume_dir)  # other runs' checkpoints: refused or replaced
    targets_checked = train_checks.check_model(cfg)  # positions and LoRA targets, from the model's config
    setup.set_seed(cfg.seed)  # the same on every rank: the same LoRA init, data order and dropout draws

    tokenizer = setup.load_tokenizer_for(cfg, log)
    train_checks.check_vocab(cfg, tokenizer)  # before the data is tokenized with ids the model lacks
    train_set, eval_set = load_splits(cfg, tokenizer, log)
    paths = ", ".join(ds.path or "bundled GSM8K sample" for ds in dataset_sources(cfg))
    layout = (f"packed into rows of {cfg.sequence_len} tokens (example boundaries kept)" if train_set.packed
              else f"one example per row (up to {cfg.sequence_len} tokens, padded per batch)")
    log(f"data: {train_set.num_tokens:,} train tokens in {counted(len(train_set), 'row')}, {layout}"
        + ("" if eval_set is None else f", {counted(len(eval_set), 'eval row')}") + f" ({paths})")
    for line in train_set.log_lines() + ([] if eval_set is None else eval_set.log_lines()):
        log(line)  # examples left out or cut, per split and file
    micro = steps.MicroBatches(train_set, cfg, world=world)  # before the model: a split too small for the ranks
    fingerprint = train_checks.data_fingerprint(train_set, cfg)
    state = None
    if resume_dir is not None:
        state = checkpoint.read_state(resume_dir)
        train_checks.check_resumable(cfg, state, fingerprint, resume_dir, world)
    if main:
        out.mkdir(parents=True, exist_ok=True)

    base = setup.load_base_model(cfg, tokenizer)
    note = steps.own_loss_note(base, cfg.gradient_accumulation_steps * world)
    if note and main:
        log(note)
    if not targets_checked:
        train_checks.check_lora_targets(cfg, base)
    base_ref = str(Path(cfg.model).expanduser().resolve()) if train_checks.is_local_model(cfg.model) else cfg.model
    if cfg.model == "default":  # random weights: keep them, or the adapter would have no base
        base_dir = out / "base_model"
        if main:
            base.save_pretrained(str(base_dir))
            tokenizer.save_pretrained(str(base_dir))
        base_ref = str(base_dir.resolve())
    # On a GPU, compile takes the model from the host and moves it one target at a time, quantized on the way:
    # the bf16 model is never on the GPU whole (an 8B q-recipe run fits a 16 GB card).
    on_host = device.type == "cuda" and str(cfg.arch).lower() != "cpu"
    core = setup.compile_model(base if on_host else base.to(device), cfg, log)  # what surogate.compile returned
    core.train()
    counts = parameter_counts(core, cfg.recipe)
    log(f"model: {cfg.model}, recipe {cfg.recipe}, LoRA r={cfg.lora_rank} on {device.type}: {counts}")
    model, graphs, reduce_by_hand = _spread(core, cfg, info, device, log)
    wrapped = info.distributed and not reduce_by_hand  # DDP or FSDP: no_sync until the last micro-step
    if info.distributed:
        rows = min(micro.batch_size, len(train_set)) // world  # fewer than per_device_train_batch_size: a small split
        log(f"distributed: {distributed.describe(model)}; {counted(rows, 'row')} per rank per micro-step, global "
            f"micro-batch {world} x {rows} = {world * rows} rows; rank 0 logs and writes")

    if micro.left_out:
        log(f"data: an epoch is {counted(micro.per_epoch, 'micro-batch', 'micro-batches')} of "
            f"{counted(micro.batch_size, 'row')}, so {micro.left_out} of the {counted(len(train_set), 'row')} "
            f"{'is' if micro.left_out == 1 else 'are'} left out of each (others each epoch: the order is reshuffled)")
    if cfg.group_by_length and train_set.packed:
        log("group_by_length: no effect with sample_packing: true (every packed row has sequence_len tokens)")
    total = _total_steps(cfg, micro.per_epoch)
    intervals = {"logging_steps": cfg.logging_steps, "eval_steps": cfg.eval_steps, "save_steps": cfg.save_steps}
    log_every, eval_every, save_every = (every_steps(v, total) if v else None for v in intervals.values())
    ratios = [f"{key}: {v:g} of {total} steps is every {every_steps(v, total)}"
              for key, v in intervals.items() if isinstance(v, float)]
    warmup = every_steps(cfg.warmup_steps, total) if cfg.warmup_steps else 0
    if isinstance(cfg.warmup_steps, float):
        ratios.append(f"warmup_steps: {cfg.warmup_steps:g} of {total} steps is {warmup}")
    if ratios:  # Hugging Face's ratios of the run's steps
        log("; ".join(ratios))
    micro_steps = total * cfg.gradient_accumulation_steps  # the whole run's (a resumed run keeps its buckets)
    padding = train_set.padding_note(micro.batch_size, cfg.seed, graphs, cfg.group_by_length,
                                     runs=micro_steps / micro.per_epoch)
    if padding:
        log(padding)
    line = _epochs_line(cfg, micro.per_epoch, total)
    if line:
        log(line)
    eval_bs = cfg.per_device_eval_batch_size or cfg.per_device_train_batch_size
    train_bound = micro.labelled_bound(micro_steps)  # the LM head's rows: the labelled tokens of the run's batches
    head_bound = steps.bound_head_rows(core, train_bound, cfg.sequence_len)
    line = steps.head_rows_line(head_bound, cfg.per_device_train_batch_size, cfg.sequence_len, train_set.packed)
    if line:
        log(line)
    opt = setup.make_optimizer(model, cfg.learning_rate, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2),
                               cfg.adam_epsilon)
    sched = setup.make_scheduler(opt, cfg.lr_scheduler_type, warmup, total)
    history: list[dict] = []
    evals: list[dict] = []
    tokens_total, start = 0, 1
    tensorboard_dir = None
    if state is not None:
        train_checks.check_resume_steps(state, total, resume_dir)
        state = checkpoint.restore(resume_dir, model, opt, sched)
        history, evals, tokens_total = state["history"], state["evals"], state["tokens_total"]
        tensorboard_dir = state.get("tensorboard_dir")  # the resumed run's curves go on in its folder
        start = state["global_step"] + 1
        micro = steps.MicroBatches(train_set, cfg, epoch=state["epoch"], index=state["micro_batch"], world=world)
        log(f"resumed from {resume_dir}: step {start - 1} of {total} done, epoch {state['epoch']}, "
            f"micro-batch {state['micro_batch']} of its order")
    if "tensorboard" in cfg.report_to and tensorboard_dir is None:
        tensorboard_dir = new_tensorboard_dir(out)
    run_log = (RunLog(out, cfg.report_to, outputs.merged_log(history, evals), None if state is None else start - 1,
                      tensorboard_dir) if main else NullRunLog())

    def run_eval(step: int) -> None:
        t_eval = time.perf_counter()
        steps.bound_head_rows(core, steps.labelled_bound(eval_set, eval_bs), cfg.sequence_len)  # its own batches
        try:
            evals.append({"step": step, "loss": steps.evaluate(core, eval_set, eval_bs, device, world)})
        finally:
            steps.bound_head_rows(core, train_bound, cfg.sequence_len)
        run_log.eval({"step": step, "eval_loss": evals[-1]["loss"]})
        log(f"eval  step {step}: loss {evals[-1]['loss']:.4f} ({time.perf_counter() - t_eval:.1f}s)")

    def take_over() -> None:  # overwrite_output_dir: other runs' checkpoints go once this run writes its own
        if replaced and main:
            for path in replaced:
                shutil.rmtree(path, ignore_errors=True)
            log(f"overwrite_output_dir: removed {', '.join(p.name for p in replaced)} of an earlier run")
        replaced.clear()

    # the checkpoint this run resumed from is one of its own: an interrupt right away need not write it again
    saved: list[int] = [start - 1] if resume_dir is not None and resume_dir.parent.resolve() == out.resolve() and \
        resume_dir.name == f"checkpoint-{start - 1}" else []

    def save_checkpoint(step: int) -> Path:  # every rank: FSDP gathers the shards, rank 0 writes
        take_over()
        trainer_state = {"global_step": step, "total_steps": total, "epoch": micro.epoch, "micro_batch": micro.index,
                         "micro_batches_per_epoch": micro.per_epoch,
                         "tokens_total": tokens_total, "history": history, "evals": evals,
                         "resume_keys": train_checks.resume_keys(cfg), "train_data": fingerprint,
                         "tensorboard_dir": tensorboard_dir, **train_checks.run_layout(cfg, world)}
        path = checkpoint.save(out, step, model, opt, sched, trainer_state, tokenizer, base_ref)
        if cfg.save_total_limit and main:
            checkpoint.rotate(out, cfg.save_total_limit, protect=path)
        saved.append(step)
        return path

    def save_adapter() -> Path:  # every rank: FSDP gathers the shards, rank 0 writes
        take_over()
        adapter_dir = distributed.save_adapter(model, out / "adapter", base_model_name_or_path=base_ref)
        if main:
            tokenizer.save_pretrained(str(adapter_dir))
        return adapter_dir

    def save_interrupted(step: int, when: str) -> None:
        """What an interrupt after `step` keeps: its checkpoint, and once every step is done the adapter too."""
        path = out / f"checkpoint-{step}" if step in saved else save_checkpoint(step)
        adapter = f", the trained adapter to {save_adapter()}" if step == total else ""
        log(f"interrupted {when}: checkpoint saved to {path}{adapter}; continue with "
            "`--set resume_from_checkpoint=true`" + (f" (on {world} ranks again)" if info.distributed else ""))

    try:
        if eval_set is not None and cfg.eval_on_start and state is None:
            run_eval(0)
        if state is not None:
            checkpoint.restore_rng(resume_dir)  # last: nothing between here and the first step draws from them
        micro_step = steps.MicroStep(model, cfg, device, log, graphs=graphs,
                                     shape_buckets=micro.shape_buckets(micro_steps) if graphs else ())
        params = setup.trainable_parameters(model)
        first_step_s = time_to_first_step = None
        steady_tokens, steady_s, window_tokens, window_s = 0, 0.0, 0, 0.0
        steady_steps = 0  # steps after the first (compile), whose mean time says how long the rest will take
        t_train = time.perf_counter()
        elapsed_before = history[-1].get("elapsed_s", 0.0) if history else 0.0  # a resumed run's clock goes on
        step, in_step = start - 1, False
        with StopOnInterrupt(log, info.distributed) as stop:
            try:
                for step in range(start, total + 1):
                    in_step, t0 = True, time.perf_counter()
                    # The step's global micro-batches first, on the host (counting costs no GPU sync): the loss of
                    # every micro-step divides by the step's target tokens (steps.step_items), not its own.
                    step_batches = [next(micro) for _ in range(cfg.gradient_accumulation_steps)]
                    step_tokens = sum(steps.real_tokens(batch) for batch in step_batches)
                    items = steps.step_items(step_batches, cfg.gradient_accumulation_steps * world, device)
                    losses = []
                    for k, batch in enumerate(step_batches):
                        if info.distributed:
                            batch = distributed.shard(batch)
                        last = k == cfg.gradient_accumulation_steps - 1
                        with contextlib.nullcontext() if last or not wrapped else distributed.no_sync(model):
                            losses.append(micro_step(steps.to_device(batch, device, core), items).clone())
                    if reduce_by_hand:  # CUDA graphs under DDP: one all-reduce after the last replay
                        distributed.all_reduce_grads(params)
                    agreed_stop = False
                    # The micro-steps' losses are their token sums x accumulation x world / the step's targets: their
                    # mean (over the ranks too) is the step's token mean.
                    if info.distributed:  # one collective: the loss's mean over the ranks, and any rank's Ctrl-C
                        flag = torch.full((), float(stop.requested), device=device)
                        both = distributed.mean_over_ranks(torch.stack([torch.stack(losses).mean().float(), flag]))
                        step_loss, agreed_stop = float(both[0]), float(both[1]) > 0  # the step's one host sync
                    else:
                        step_loss = float(torch.stack(losses).mean())  # the step's one host sync
                    lr = opt.param_groups[0]["lr"]
                    if not math.isfinite(step_loss):  # the mean over the ranks: every rank stops here
                        raise FloatingPointError(non_finite_loss_message(step, step_loss, lr, cfg.recipe))
                    if cfg.max_grad_norm:
                        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                    in_step, now = False, time.perf_counter()
                    if first_step_s is None:  # compilation included: reported apart, never in tokens/s
                        first_step_s, time_to_first_step = now - t0, now - t_start
                    else:
                        steady_tokens, steady_s = steady_tokens + step_tokens, steady_s + (now - t0)
                        steady_steps += 1
                        window_tokens, window_s = window_tokens + step_tokens, window_s + (now - t0)
                    tokens_total += step_tokens
                    record = {"step": step, "epoch": micro.epochs_done, "loss": step_loss, "lr": lr,
                              "tokens": step_tokens, "elapsed_s": round(elapsed_before + now - t_train, 3)}
                    history.append(record)
                    run_log.train(record)
                    if step == start or step % log_every == 0 or step == total:
                        speed = (f"first step {first_step_s:.1f} s (compile)" if step == start
                                 else f"{window_tokens / max(window_s, 1e-9):,.0f} tokens/s")
                        # the steps left at the mean steady step (evals and checkpoints not counted)
                        left = (f" | {outputs.duration(steady_s / steady_steps * (total - step))} left"
                                if steady_steps and step < total else "")
                        log(f"step {step:>{len(str(total))}}/{total} | loss {step_loss:.4f} | lr {lr:.2e} | "
                            f"{speed} | {now - t_start:.1f}s{left}")
                        window_tokens, window_s = 0, 0.0
                    if eval_set is not None and eval_every and step % eval_every == 0 and step != total:
                        run_eval(step)
                    # and the last step, as HF's Trainer does: a run of 9 steps with save_steps 4 left no checkpoint of
                    # its end, so it could not be extended (more max_steps or num_epochs) without losing step 9
                    if save_every and (step % save_every == 0 or step == total):
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
                    save_interrupted(step, f"after step {step}")
                raise
            t_end = time.perf_counter()
            tokens_per_s = steady_tokens / steady_s if steady_s > 0 else None

            if eval_set is not None:
                # one process: a Ctrl-C drops the final eval at once (a resume runs it again); several: every
                # rank is in its collectives, so it finishes and the ranks agree below
                try:
                    stop.stop_at_once(not info.distributed)
                    run_eval(total)
                    stop.stop_at_once(False)
                except KeyboardInterrupt:
                    if not info.distributed:
                        save_interrupted(total, "during the final eval")
                    raise
            # the loss before training: step 0's eval (none with eval_on_start: false, or a resume without it)
            first_eval = evals[0]["loss"] if evals and evals[0]["step"] == 0 and len(evals) > 1 else None

            # a Ctrl-C from here on waits for the outputs: they take seconds, and half of them would be worse
            adapter_dir = save_adapter()  # every rank
            chart = out / "loss.png"
            if main:
                where = device.type if not info.distributed else f"{world} x {device.type}"
                outputs.plot_losses(history, evals, chart,
                                    title=f"{cfg.model} | recipe {cfg.recipe} | LoRA r={cfg.lora_rank} | {where}")
            result = TrainResult(
                output_dir=out, adapter_dir=adapter_dir, metrics_path=out / "metrics.json", chart_path=chart,
                steps=total, train_tokens=tokens_total, tokens_per_s=tokens_per_s,
                final_train_loss=history[-1]["loss"] if history else float("nan"),
                final_eval_loss=evals[-1]["loss"] if evals else None, first_eval_loss=first_eval,
                wall_s=time.perf_counter() - t_start, history=history, first_step_s=first_step_s,
                resumed_from=resume_dir, rank=info.rank, world_size=world)
            report = getattr(core, "surogate_report", None)
            if main:
                if report is not None:
                    (out / "compile_report.txt").write_text(f"{report}\n")
                    log(f"compile: {len(report.rewritten)} of {len(report.linears)} linears rewritten "
                        f"({report.backend}); details in {out / 'compile_report.txt'}")
                outputs.write_metrics(result, cfg, evals, device, time_to_first_step, report, counts,
                                      t_end - t_train, distributed.describe(model) if info.distributed else None)
            if _stop_requested(stop, info, device):
                log(f"interrupted while writing the outputs: they are complete in {out}")
                raise _AgreedStop if info.distributed else KeyboardInterrupt
    finally:
        run_log.close()
    return result


def _stop_requested(stop: StopOnInterrupt, info: distributed.DistInfo, device: torch.device) -> bool:
    """Whether a Ctrl-C came (on any rank: one collective) while the run finished."""
    if not info.distributed:
        return stop.requested
    return float(distributed.mean_over_ranks(torch.full((), float(stop.requested), device=device))) > 0
