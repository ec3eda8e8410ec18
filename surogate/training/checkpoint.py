"""Checkpoints of `surogate train`: written every `save_steps` and on Ctrl-C, resumed exactly.

`output_dir/checkpoint-<step>/` holds everything the run needs to go on as if it had not stopped:

| file | what |
|---|---|
| `adapter_model.safetensors`, `adapter_config.json` (+ tokenizer) | the LoRA adapter, PEFT format, as the final one |
| `optimizer.pt` | AdamW's state_dict (moments and step counts) |
| `scheduler.pt` | the learning-rate scheduler's state_dict |
| `rng_state.pth` | Python's, torch's CPU and (when CUDA is in use) every GPU's generator state |
| `trainer_state.json` | the step; the data position (epoch, micro-batches taken in that epoch's seeded |
|   | shuffled order); the log so far; what a resume must match (keys, a fingerprint of the train rows) |

Writes are atomic: the files go into a hidden `.checkpoint-<step>.tmp` directory that is renamed to
`checkpoint-<step>` once complete, so an interrupt while saving leaves nothing `latest` would pick.
Every file is read back with `torch.load(weights_only=True)` (tensors and plain values only).

Several processes (`surogate.training.distributed`): every rank calls `save` and `restore`; rank 0 alone writes.
Under DDP every rank holds the whole LoRA weights and optimizer state, so rank 0 writes its own
(`optimizer.pt` is a plain `state_dict`) and every rank restores the same files. Under FSDP they are
gathered whole first (`distributed.gather_trainable_state`, a collective; `optimizer.pt` then holds
the whole state by parameter name) and restored by rank 0 reading and broadcasting them
(`scatter_trainable_state`), each rank keeping its part. The RNG states are rank 0's: every rank
draws the same numbers in the same order, so they are every rank's.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

from surogate.training.config import ConfigError

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng_state.pth"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_TEMP_PREFIX = ".checkpoint-"


def is_checkpoint(path: "str | os.PathLike") -> bool:
    """Whether `path` is a complete checkpoint directory (its state file is written last)."""
    return (Path(path) / STATE_FILE).is_file()


def list_checkpoints(output_dir: "str | os.PathLike") -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints in `output_dir`, oldest step first."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    found = []
    for child in d.iterdir():
        m = _NAME.match(child.name)
        if m and child.is_dir() and is_checkpoint(child):
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest(output_dir: "str | os.PathLike") -> Path | None:
    """The checkpoint of the highest step in `output_dir`, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def not_continued(output_dir: "str | os.PathLike", resume: "str | os.PathLike | None") -> list[Path]:
    """The checkpoints in `output_dir` that a run from checkpoint `resume` (None: a fresh run) does not
    continue: all of them, unless `resume` is one of them; then those of later steps (another branch)."""
    out = Path(output_dir)
    found = list_checkpoints(out)
    if resume is None or not out.is_dir() or Path(resume).resolve().parent != out.resolve():
        return [path for _, path in found]
    m = _NAME.match(Path(resume).name)
    step = int(m.group(1)) if m else -1
    return [path for s, path in found if s > step and path.name != Path(resume).name]


def read_state(path: "str | os.PathLike") -> dict[str, Any]:
    return json.loads((Path(path) / STATE_FILE).read_text())


def rng_state() -> dict[str, Any]:
    import torch

    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sharded(model) -> bool:
    """Whether `model` was spread with FSDP (`distributed.wrap(model, "fsdp")`): its LoRA weights and
    optimizer state may be shards, gathered to be saved."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def save(output_dir: "str | os.PathLike", step: int, model, optimizer, scheduler, state: dict[str, Any],
         tokenizer=None, base_model_name_or_path: str | None = None) -> Path:
    """Write `output_dir/checkpoint-<step>/` atomically; returns its path. `state` goes to trainer_state.json.
    In a job of several processes every rank calls it (see the module docstring); rank 0 writes."""
    import torch

    from surogate.training import distributed
    from surogate.training.adapters import save_adapter

    out = Path(output_dir)
    final = out / f"checkpoint-{step}"
    weights = optimizer_state = None
    if _sharded(model):
        weights, optimizer_state = distributed.gather_trainable_state(model, optimizer)  # every rank
    if not distributed.is_main():
        distributed.barrier()  # rank 0 writes
        return final
    for stale in out.glob(f"{_TEMP_PREFIX}*"):  # left by an interrupt while saving
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out / f"{_TEMP_PREFIX}{step}.tmp"
    try:
        save_adapter(model, tmp, base_model_name_or_path=base_model_name_or_path, state_dict=weights)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        torch.save(optimizer.state_dict() if optimizer_state is None else optimizer_state, tmp / OPTIMIZER_FILE)
        torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
        torch.save(rng_state(), tmp / RNG_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")  # last: marks the directory complete
        if final.exists():  # from an earlier run in the same output_dir: move it aside, then drop it
            old = out / f"{_TEMP_PREFIX}{step}.old"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except (OSError, RuntimeError) as e:  # a full disk: torch.save's is "unexpected pos 295360 vs 295252"
        raise CheckpointWriteError(_write_failure(final, e)) from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    distributed.barrier()
    return final


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a folder turned read-only): `surogate train` prints it as
    one line and exits with status 1; the temporary folder is removed, the earlier checkpoints stay."""


def _write_failure(final: Path, e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = (text[0] if text else type(e).__name__)[:200]
    try:
        free = f"; {shutil.disk_usage(final.parent).free / 1e6:,.1f} MB free there"
    except OSError:
        free = ""
    kept = latest(final.parent)
    return (f"checkpoint: could not write {final} ({first}{free}); free space or write to another output_dir, then "
            + (f"resume from {kept.name} with --set resume_from_checkpoint=true" if kept is not None
               else "run again (no checkpoint was kept)"))


def rotate(output_dir: "str | os.PathLike", keep: int, protect: "str | os.PathLike | None" = None) -> list[Path]:
    """Delete all but the `keep` newest checkpoints in `output_dir` (never `protect`, the one just written);
    returns the deleted paths."""
    found = [(step, path) for step, path in list_checkpoints(output_dir)
             if protect is None or path != Path(protect)]
    gone = [path for _, path in found[:max(0, len(found) - keep + (protect is not None))]]
    for path in gone:
        shutil.rmtree(path, ignore_errors=True)
    return gone


def restore(path: "str | os.PathLike", model, optimizer, scheduler) -> dict[str, Any]:
    """Load the adapter weights into `model` (in place) and the optimizer and scheduler states from the
    checkpoint at `path`; returns its trainer state. The RNG states are set apart (`restore_rng`), right
    before the first step, so that nothing in between draws from them."""
    import torch
    from safetensors.torch import load_file

    from surogate.training.adapters import ADAPTER_WEIGHTS, find_peft_model, load_lora_weights

    d = Path(path)
    if _sharded(model):
        _restore_sharded(d, model, optimizer)
        scheduler.load_state_dict(torch.load(d / SCHEDULER_FILE, map_location="cpu", weights_only=True))
        _follow_schedule(optimizer, scheduler)
        return read_state(d)
    mismatch = load_lora_weights(find_peft_model(model), load_file(str(d / ADAPTER_WEIGHTS)), "the checkpoint")
    if mismatch is not None:
        # a ConfigError (one line, exit 2): a resume with another model of the same tokenizer passes every check
        # before the load, and PEFT's own error was a traceback of one size-mismatch line per layer
        raise ConfigError(f"resume_from_checkpoint: {d.name}'s adapter does not fit this model's LoRA layers "
                          f"({mismatch}); resume with the model and LoRA settings it was trained with, or start a "
                          "new run in another output_dir")
    optimizer.load_state_dict(torch.load(d / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(d / SCHEDULER_FILE, map_location="cpu", weights_only=True))
    _follow_schedule(optimizer, scheduler)
    return read_state(d)


def _follow_schedule(optimizer, scheduler) -> None:
    """Set each group's learning rate to what this run's schedule gives at the restored step. The optimizer
    state brings back the rate the checkpoint's run had there (its schedule's, for its total steps); a resume
    with another max_steps follows the new total from its first step, not from the second."""
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is None:  # not a LambdaLR: its state is the schedule
        return
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def _restore_sharded(d: Path, model, optimizer) -> None:
    """FSDP: rank 0 reads the adapter (renamed back to parameter names) and the whole optimizer state,
    `scatter_trainable_state` broadcasts them and each rank keeps its shards. Every rank calls it."""
    import torch
    from safetensors.torch import load_file

    from surogate.training import distributed
    from surogate.training.adapters import (
        ADAPTER_WEIGHTS,
        COMPILE_PREFIX,
        find_peft_model,
    )

    weights: dict = {}
    optimizer_state: dict = {}
    if distributed.is_main():
        saved = load_file(str(d / ADAPTER_WEIGHTS))
        peft_model = find_peft_model(model)
        tag = f".{peft_model.active_adapter}"
        # PEFT's saved names: the parameter's, less the adapter name (and torch.compile's prefix)
        names = {COMPILE_PREFIX.sub(r"\1", n).replace(tag, ""): n
                 for n, p in peft_model.named_parameters() if p.requires_grad}
        if set(names) != set(saved):
            raise RuntimeError(f"{d / ADAPTER_WEIGHTS} does not fit this model's LoRA layers (different targets or "
                               "rank?); resume with the config the checkpoint was trained with")
        weights = {names[k]: v for k, v in saved.items()}
        optimizer_state = torch.load(d / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    distributed.scatter_trainable_state(model, optimizer, weights, optimizer_state)


def restore_rng(path: "str | os.PathLike") -> None:
    import torch

    set_rng_state(torch.load(Path(path) / RNG_FILE, map_location="cpu", weights_only=True))
