"""What leaves the ranks: the trainable (LoRA) weights and the optimizer state gathered whole, whatever the
parallelism and LoRA placement, for the PEFT adapter (`save_adapter`) and a checkpoint that any wrapping of
the same world size loads back (`save_checkpoint`, `load_checkpoint`).

Every function is a collective under FSDP (the shards are gathered): every rank calls it; rank 0 writes.
`surogate.training.distributed` re-exports them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from surogate.training.process_group import barrier, info, is_main

CHECKPOINT_FILE = "distributed_state.pt"


def _state_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, ignore_frozen_params=True, **kwargs)


def gather_trainable_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None
                           ) -> tuple[dict[str, Tensor], dict | None]:
    """The trainable (LoRA) weights and the optimizer state, whole and on the CPU, keyed by parameter
    name (wrappers' prefixes removed): on rank 0; the other ranks get empty dicts. A collective under
    FSDP (the shards are gathered): every rank calls it. The same format whatever the placement."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = _state_options(cpu_offload=dist.is_initialized())
    weights = get_model_state_dict(model, options=opts)
    optim = None if optimizer is None else get_optimizer_state_dict(model, optimizer, options=opts)
    return weights, optim


def scatter_trainable_state(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                            weights: dict[str, Tensor], optim: dict | None) -> None:
    """Load what `gather_trainable_state` returned: rank 0 passes it, the other ranks pass empty dicts
    and receive their part (broadcast from rank 0). Every rank calls it, the optimizer fresh."""
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = _state_options(broadcast_from_rank0=dist.is_initialized(), strict=False)
    set_model_state_dict(model, weights, options=opts)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, optim or {}, options=opts)


def save_adapter(model: nn.Module, out_dir: "str | os.PathLike", **kwargs: Any) -> Path:
    """`surogate.save_adapter` for a wrapped model: every rank calls it (FSDP gathers the LoRA shards),
    rank 0 writes the PEFT adapter; the others wait for it. Returns the directory."""
    from surogate.training.adapters import find_peft_model
    from surogate.training.adapters import save_adapter as write

    peft_model = find_peft_model(model)
    weights, _ = gather_trainable_state(model) if dist.is_initialized() else (None, None)
    if is_main():  # under FSDP2 `model.state_dict()` holds shards: PEFT takes the gathered weights instead
        write(peft_model, out_dir, state_dict=weights, **kwargs)
    barrier()
    return Path(out_dir)


def save_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, out_dir: "str | os.PathLike",
                    **meta: Any) -> Path:
    """Every rank calls it; rank 0 writes `out_dir/distributed_state.pt`: the LoRA weights and the
    optimizer state, whole (`gather_trainable_state`), `meta` (plain values: step, data position, ...)
    and the world size. Frozen weights are not saved (they come from the base checkpoint)."""
    weights, optim = gather_trainable_state(model, optimizer)
    out = Path(out_dir)
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        state = {"model": weights, "optimizer": optim, "world": info().world, "meta": meta}
        tmp = out / (CHECKPOINT_FILE + ".tmp")
        torch.save(state, tmp)
        tmp.replace(out / CHECKPOINT_FILE)  # a crash mid-write never leaves a half checkpoint
    barrier()
    return out


def load_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, out_dir: "str | os.PathLike",
                    same_world: bool = True) -> dict:
    """Every rank calls it, on a wrapped model (any parallelism and LoRA placement) and a fresh optimizer
    of the kind saved: rank 0 reads the file and broadcasts it, each rank keeps its part. Returns `meta`.

    `same_world` refuses another world size: the weights would load, but the data order and the
    per-rank batch of the run were those of the saved world (what resume must reproduce).
    """
    path = Path(out_dir) / CHECKPOINT_FILE
    state = torch.load(path, map_location="cpu", weights_only=True) if is_main() else None
    header = [None if state is None else {"world": state["world"], "meta": state["meta"]}]
    if dist.is_initialized():
        dist.broadcast_object_list(header, src=0)
    world, meta = header[0]["world"], header[0]["meta"]
    if same_world and world != info().world:
        raise ValueError(f"{path} was saved by {world} ranks, this job has {info().world}; resume with the same "
                         "world size (or pass same_world=False to load the weights anyway)")
    scatter_trainable_state(model, optimizer, {} if state is None else state["model"],
                            {} if state is None else state["optimizer"])
    barrier()
    return meta
