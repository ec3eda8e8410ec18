"""Several processes, one training job: DDP over the LoRA gradients, FSDP2 over the frozen quantized bytes.

The engine is PyTorch's own (`torch.distributed`: DDP, FSDP2 `fully_shard`, NCCL on GPUs, gloo on CPU);
this module is the small layer a training loop calls, launched by `torchrun` or `accelerate launch`:

    info = distributed.init()                            # from torchrun's env; a no-op in one process
    with distributed.fail_fast():                        # an error on one rank ends every rank
        model = surogate.compile(load().to(info.device), recipe="qnf4")
        model = distributed.wrap(model, "fsdp")          # or "ddp"
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])   # after wrap
        for global_batch in loader:                      # the same global batch on every rank
            batch = distributed.shard(global_batch)      # this rank's rows
            model(**batch).loss.backward(); opt.step(); opt.zero_grad()
    distributed.cleanup()

What is reduced and gathered (docs/distributed.md has the bytes and the scaling):
- `ddp`: each rank holds the whole model; DDP all-reduces (averages) the LoRA gradients only, in
  buckets while the backward runs. Frozen weights and the quantized buffers are excluded from DDP's
  parameter and buffer syncs. The LoRA weights are broadcast from rank 0 once, when wrapping.
- `fsdp`: `fully_shard` on every decoder block, then on the root. The quantized parts of every
  `SurogateLinear` (NF4 codes, FP8 bytes, NVFP4 nibbles and their scales) become frozen parameters so
  that FSDP2 shards them on dim 0: a rank stores 1/world of each. Before a block's forward (and again
  before its backward) FSDP2 all-gathers the block's bytes, viewed as uint8 when dtypes mix, with no
  mixed-precision cast: the fused op receives the stored bytes unchanged, never a dequantized weight.
  LoRA weights are kept whole on every rank (`lora="replicated"`, the default: left out of FSDP,
  gradients all-reduced in buckets from autograd hooks while the backward runs, once per optimizer
  step) or sharded with their block (`lora="sharded"`: gathered with it for the forward and the
  backward of every micro-step, gradients reduce-scattered; 1/world of the LoRA weights, gradients and
  Adam moments per rank). Replicated moves fewer bytes and keeps the optimizer on plain tensors; it
  ran faster on CPU (docs/distributed.md); sharded saves 16 bytes per LoRA parameter per rank.

CUDA graphs (`surogate.GraphedStep`) record the step of the unwrapped model: reduce the gradients
after the last replayed micro-step with `all_reduce_grads`, outside the graph (one all-reduce per
optimizer step, as DDP's `no_sync` accumulation would do). FSDP's hooks allocate and free the gathered
weights on the host side, which a CUDA graph cannot record: with `fsdp`, run the step eagerly.

This module wraps the model and is the whole API; it re-exports the three layers below it, each one
concern: `process_group` (joining the job, ranks, `fail_fast`, `shard`), `grad_sync` (gradients reduced
outside DDP, `no_sync`) and `distributed_checkpoint` (LoRA and optimizer state gathered whole).
"""

from __future__ import annotations

import contextlib
import enum

import torch
import torch.distributed as dist
from torch import nn

from surogate.training.distributed_checkpoint import (
    gather_trainable_state,
    load_checkpoint,
    save_adapter,
    save_checkpoint,
    scatter_trainable_state,
)
from surogate.training.grad_sync import all_reduce_grads, no_sync, overlap_reduction
from surogate.training.process_group import (
    DistInfo,
    barrier,
    cleanup,
    fail_fast,
    info,
    init,
    is_main,
    items_per_rank,
    mean_over_ranks,
    shard,
)

__all__ = ["DistInfo", "LoraPlacement", "Parallelism", "all_reduce_grads", "barrier", "broadcast_trainable",
           "cleanup", "describe",
           "fail_fast", "frozen_bytes", "gather_trainable_state", "info", "init", "is_main", "items_per_rank",
           "load_checkpoint", "mean_over_ranks", "no_sync", "replicate_unwrapped", "save_adapter",
           "save_checkpoint", "scatter_trainable_state", "shard", "unwrap", "wrap"]


class _Choice(str, enum.Enum):
    @classmethod
    def from_name(cls, name: str | _Choice) -> _Choice:
        try:
            return cls(name)
        except ValueError:
            raise ValueError(f"unknown {cls.__name__} {name!r}; valid: {', '.join(m.value for m in cls)}") from None


class Parallelism(_Choice):
    """How the ranks split the work: the whole model on each (DDP) or each frozen tensor in `world` pieces."""

    DDP = "ddp"
    FSDP = "fsdp"


class LoraPlacement(_Choice):
    """Where the LoRA weights live under FSDP: whole on every rank, or sharded with their block."""

    REPLICATED = "replicated"
    SHARDED = "sharded"


def describe(model: nn.Module | None = None) -> str:
    """One line for logs and `surogate info`: how many ranks, which backend, and what `wrap` did."""
    i = info()
    if not i.distributed:
        return "single process"
    what = getattr(model, "_surogate_parallelism", None) if model is not None else None
    return f"{what or 'unwrapped model'} over {i.world} ranks ({i.backend}, rank {i.rank} on {i.device})"


# --- wrapping -------------------------------------------------------------------------------------

def _decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The longest ModuleList of blocks that each hold trainable (LoRA) parameters (of one class, or of two in a
    hybrid: compiler._decoder_blocks)."""
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            if all(any(p.requires_grad for p in block.parameters()) for block in module):
                best = list(module)
    return best


_FLOAT_VIEWS_FOR_FSDP = tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 13)

_FLOAT_OF_SIZE = {1: torch.float8_e4m3fn, 2: torch.bfloat16, 4: torch.float32, 8: torch.float64}


def _quantized_parts_as_parameters(model: nn.Module) -> int:
    """Re-register each `SurogateLinear`'s weight list (`w0..wn`, buffers) as frozen parameters, which
    FSDP2 shards (it leaves buffers whole). 0-d parts (a tensor scale, an NF4 mean: 4 bytes) stay
    buffers, as `fully_shard` refuses scalar parameters. The bytes themselves are not touched."""
    from surogate.ops.modules import SurogateLinear

    moved = 0
    for module in model.modules():
        if not isinstance(module, SurogateLinear):
            continue
        module.unpack()  # a packed group's buffer is shared by its members; each member's rows are sharded alone
        buffers = dict(module.named_buffers(recurse=False))
        for i in range(len(module.weight_list())):
            name = f"w{i}"
            part = buffers.get(name)
            if part is None or part.dim() == 0:
                continue
            delattr(module, name)
            if _FLOAT_VIEWS_FOR_FSDP and not part.is_floating_point():
                part = part.view(_FLOAT_OF_SIZE[part.element_size()])
            module.register_parameter(name, nn.Parameter(part, requires_grad=False))
            moved += 1
    return moved


def _note(model: nn.Module, text: str) -> None:
    from surogate.training.adapters import find_peft_model

    with contextlib.suppress(TypeError):
        report = getattr(find_peft_model(model), "surogate_report", None)
        if report is not None:
            report.note(text)


def _size(nbytes: float) -> str:
    """Decimal units, as the compile report's own notes."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes:.0f} B"


def wrap(model: nn.Module, parallelism: "str | Parallelism" = Parallelism.DDP, *,
         lora: "str | LoraPlacement | None" = None, reshard_after_forward: bool = True,
         shard_size: int | None = None, bucket_mb: float = 25.0, static_graph: bool = False) -> nn.Module:
    """Spread a `surogate.compile`d model over the job's ranks; returns the model to train.

    `ddp`: a `DistributedDataParallel` around the model (`unwrap` gives the PEFT model back) that
    reduces the trainable (LoRA) gradients only, in buckets of `bucket_mb` MiB overlapped with the
    backward; frozen parameters and buffers are ignored by DDP (never broadcast, never reduced).
    `static_graph=True` is passed to DDP.
    `fsdp`: FSDP2 `fully_shard` on each decoder block, then on the root, in place (the same model comes
    back); the frozen quantized parts are sharded (see the module docstring), LoRA as `lora` says
    ("replicated" when None).
    `reshard_after_forward=False` keeps each block's gathered bytes from its forward to its backward
    (one all-gather a step instead of two, at the memory of the whole unsharded model). `shard_size`
    (HSDP) shards over groups of that many consecutive ranks (one node: its GPUs) and replicates over
    the groups, so that only gradients cross the slower links between them; None shards over all ranks.

    Build the optimizer after wrapping (FSDP replaces parameters by their shards). Every rank must hold
    the same frozen weights (load the same checkpoint); LoRA weights are taken from rank 0. In one
    process this returns the model unchanged.
    """
    parallelism = Parallelism.from_name(parallelism)
    placement = LoraPlacement.REPLICATED if lora is None else LoraPlacement.from_name(lora)
    if parallelism is Parallelism.DDP and lora is not None and placement is not LoraPlacement.REPLICATED:
        raise ValueError("ddp keeps the LoRA weights whole on every rank; lora='sharded' needs parallelism='fsdp'")
    if getattr(unwrap(model), "surogate_report", None) is None:  # what surogate.compile attaches
        raise ValueError("wrap takes the model surogate.compile returned; compile first, then wrap")
    if hasattr(model, "_surogate_parallelism"):
        raise ValueError(f"the model is already wrapped ({model._surogate_parallelism})")
    i = info()
    if not i.distributed:
        return model
    trainable = [p for p in model.parameters() if p.requires_grad]
    lora_bytes = sum(p.numel() * p.element_size() for p in trainable)
    if parallelism is Parallelism.DDP:
        from torch.nn.parallel import DistributedDataParallel

        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        frozen += [n for n, _ in model.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
        wrapped = DistributedDataParallel(model, device_ids=[i.device] if i.device.type == "cuda" else None,
                                          bucket_cap_mb=bucket_mb, static_graph=static_graph)
        wrapped._surogate_parallelism = "ddp"
        _note(model, f"distributed: ddp over {i.world} ranks ({i.backend}); {len(trainable)} LoRA tensors "
                     f"({_size(lora_bytes)}) all-reduced each optimizer step in {bucket_mb:g} MiB buckets during "
                     f"the backward; frozen weights whole on every rank ({_size(frozen_bytes(model))})")
        return wrapped

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    shards = i.world if shard_size is None else shard_size
    if shards < 1 or i.world % shards:
        raise ValueError(f"shard_size {shard_size} must divide the world size {i.world}")
    before = frozen_bytes(model)
    moved = _quantized_parts_as_parameters(model)
    broadcast_trainable(model)  # sharded or not, LoRA starts from rank 0's weights
    mesh = (init_device_mesh(i.device.type, (i.world,)) if shards == i.world else
            init_device_mesh(i.device.type, (i.world // shards, shards), mesh_dim_names=("replicate", "shard")))
    ignored = set(trainable) if placement is LoraPlacement.REPLICATED else None
    blocks = _decoder_blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored)
    if ignored:
        overlap_reduction(model, trainable, bucket_mb)
    hybrid = "" if shards == i.world else f", hybrid: {i.world // shards} replicas of {shards} shards"
    model._surogate_parallelism = f"fsdp (LoRA {placement.value}{hybrid})"
    _note(model, f"distributed: fsdp2 over {i.world} ranks ({i.backend}{hybrid}); {len(blocks)} decoder blocks + root "
                 f"sharded, {moved} quantized weight tensors held as frozen parameters; this rank stores "
                 f"{_size(frozen_bytes(model))} of {_size(before)} frozen bytes, gathered per block "
                 f"({'forward and backward' if reshard_after_forward else 'forward, kept for the backward'}); "
                 f"LoRA ({_size(lora_bytes)}) {placement.value}")
    return model


def replicate_unwrapped(model: nn.Module) -> nn.Module:
    """DDP by hand, for CUDA graphs: DDP's reducer runs from autograd hooks that a captured graph cannot
    replay, so the model stays unwrapped; LoRA starts from rank 0's weights (`broadcast_trainable`) and the
    loop averages the gradients with `all_reduce_grads` after the last replayed micro-step. `describe` and
    the compile report say so. In one process this returns the model unchanged."""
    i = info()
    if not i.distributed:
        return model
    broadcast_trainable(model)
    model._surogate_parallelism = "ddp (CUDA graphs: gradients all-reduced after the last micro-step)"
    _note(model, f"distributed: ddp over {i.world} ranks ({i.backend}) with CUDA graphs: the model is not wrapped; "
                 "the LoRA gradients are all-reduced once per optimizer step, after the last replayed micro-step "
                 "(distributed.all_reduce_grads)")
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The PEFT model inside what `wrap` returned (DDP's `.module`; FSDP shards in place)."""
    from surogate.training.adapters import find_peft_model

    return find_peft_model(model)


def broadcast_trainable(model: nn.Module) -> None:
    """Copy rank 0's trainable (LoRA) weights to every rank; what `wrap` does first. Call it yourself
    when driving an unwrapped model on several ranks (`GraphedStep` + `all_reduce_grads`)."""
    if not dist.is_initialized():
        return
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, src=0)


def frozen_bytes(model: nn.Module) -> int:
    """Bytes of frozen tensors this rank stores: frozen parameters (their local shard under FSDP) and
    buffers. What FSDP divides by the world size; LoRA weights and optimizer state are not counted."""
    from torch.distributed.tensor import DTensor

    total = 0
    for p in model.parameters():
        if not p.requires_grad:
            local = p.to_local() if isinstance(p, DTensor) else p
            total += local.numel() * local.element_size()
    return total + sum(b.numel() * b.element_size() for b in model.buffers())
