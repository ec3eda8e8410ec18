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
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import os
import sys
import threading
import traceback
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["DistInfo", "LoraPlacement", "Parallelism", "all_reduce_grads", "barrier", "broadcast_trainable",
           "cleanup", "describe",
           "fail_fast", "frozen_bytes", "gather_trainable_state", "info", "init", "is_main", "items_per_rank",
           "load_checkpoint", "mean_over_ranks", "no_sync", "save_adapter", "save_checkpoint",
           "scatter_trainable_state", "shard", "unwrap", "wrap"]

CHECKPOINT_FILE = "distributed_state.pt"
_FAILED_KEY = "surogate/failed"  # the first rank that fails writes its error here (see fail_fast)
T = TypeVar("T")


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


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """This process's place in the job. One process: rank 0 of world 1, `backend` None."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


# --- process group --------------------------------------------------------------------------------

def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def init(backend: str | None = None, *, timeout_s: float | None = None) -> DistInfo:
    """Join the job `torchrun` (or `accelerate launch`) started, from its env vars (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT); without them, or with WORLD_SIZE=1, nothing is initialised.

    `backend` None picks NCCL when CUDA is present, else gloo. On CUDA the process takes GPU
    `LOCAL_RANK`. `timeout_s` bounds every collective (torch's default when None: 10 min NCCL, 30 min
    gloo). Calling it again returns the same info.
    """
    if _env_int("WORLD_SIZE", 1) <= 1 and not dist.is_initialized():
        return DistInfo(0, 1, 0, _default_device(), None)
    local_rank = _env_int("LOCAL_RANK", 0)
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        kwargs: dict[str, Any] = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
        dist.init_process_group(backend, **kwargs)
    return info()


def info() -> DistInfo:
    """The current process's `DistInfo` (rank 0 of 1 when no process group is up)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo(0, 1, 0, _default_device(), None)
    backend = dist.get_backend()
    local_rank = _env_int("LOCAL_RANK", 0)
    device = torch.device("cuda", local_rank) if "nccl" in backend else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes logs, checkpoints and the adapter."""
    return info().is_main


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Leave the job (destroy the process group); a no-op in one process."""
    if dist.is_initialized():
        dist.destroy_process_group()


def describe(model: nn.Module | None = None) -> str:
    """One line for logs and `surogate info`: how many ranks, which backend, and what `wrap` did."""
    i = info()
    if not i.distributed:
        return "single process"
    what = getattr(model, "_surogate_parallelism", None) if model is not None else None
    return f"{what or 'unwrapped model'} over {i.world} ranks ({i.backend}, rank {i.rank} on {i.device})"


# --- failure ----------------------------------------------------------------------------------------

class _Watchdog(threading.Thread):
    """Polls the job's store for a failure another rank recorded; exits this process when it sees one."""

    def __init__(self, store: "dist.Store", rank: int, interval_s: float) -> None:
        super().__init__(daemon=True, name="surogate-fail-fast")
        self.store, self.rank, self.interval_s = store, rank, interval_s
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            try:
                if not self.store.check([_FAILED_KEY]):
                    continue
                message = self.store.get(_FAILED_KEY).decode(errors="replace")
            except Exception:  # the store went away (job ending): nothing left to watch
                return
            if self.stopped.is_set():
                return
            print(f"[rank {self.rank}] stopping: {message}", file=sys.stderr, flush=True)
            os._exit(1)  # the main thread may sit in a collective that never returns


@contextlib.contextmanager
def fail_fast(poll_s: float = 1.0) -> Iterator[None]:
    """Make an exception on one rank end the whole job with that error, instead of a hang.

    On an exception inside the block this rank prints it with its rank, records "rank r failed: ..."
    in the job's store (the first failure wins), and re-raises, so the process exits non-zero with
    its traceback. Every other rank inside `fail_fast` polls the store every `poll_s` seconds from a
    daemon thread; seeing the record, it prints it and exits with status 1 at once, even from inside
    a collective that would otherwise wait until the timeout (NCCL does not notice a dead peer).
    Under torchrun the agent also stops the other workers when one exits non-zero, and reports the
    failing rank's error (decorate `main` with `torch.distributed.elastic.multiprocessing.errors.record`
    for the traceback in its summary); under `torch.multiprocessing.spawn`, `join` raises the error.
    A no-op in one process.
    """
    if not dist.is_initialized():
        yield
        return
    rank = dist.get_rank()
    try:
        store = dist.distributed_c10d._get_default_store()  # per job attempt: torchrun prefixes it
    except Exception:  # a process group without a store: torchrun's agent is the only guard left
        store = None
    watchdog = None if store is None else _Watchdog(store, rank, poll_s)
    if watchdog is not None:
        watchdog.start()
    try:
        yield
    except BaseException as error:
        if isinstance(error, SystemExit) and error.code in (0, None):
            raise
        if watchdog is not None:
            watchdog.stopped.set()
        line = "".join(traceback.format_exception_only(type(error), error)).strip()
        print(f"[rank {rank}] failed: {line}", file=sys.stderr, flush=True)
        if store is not None:
            with contextlib.suppress(Exception):
                store.compare_set(_FAILED_KEY, "", f"rank {rank} failed: {line}")
        raise
    finally:
        if watchdog is not None:
            watchdog.stopped.set()


# --- data ---------------------------------------------------------------------------------------------

def shard(batch: T, rank: int | None = None, world: int | None = None) -> T:
    """This rank's contiguous 1/world of a global batch, so that the ranks' pieces, in rank order, are
    the global batch: a tensor (split along dim 0), a mapping of tensors (each along dim 0), or a
    sequence (examples, indices). `rank`/`world` default to this process's. The global batch must
    split evenly: every rank then runs the same shapes, and world x per-rank batch == the global batch.
    """
    if rank is None or world is None:
        i = info()
        rank, world = i.rank if rank is None else rank, i.world if world is None else world
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world}")
    if isinstance(batch, Mapping):
        sizes = {k: len(v) for k, v in batch.items()
                 if isinstance(v, (Tensor, Sequence)) and not isinstance(v, (str, bytes))}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"the batch's fields have different lengths {sizes}; shard splits them along dim 0")
        return type(batch)({k: shard(v, rank, world) if k in sizes else v for k, v in batch.items()})
    if not isinstance(batch, (Tensor, Sequence)) or isinstance(batch, (str, bytes)):
        raise TypeError(f"shard takes a tensor, a mapping of tensors or a sequence, got {type(batch).__name__}")
    n = len(batch)
    if n % world:
        raise ValueError(f"a global batch of {n} rows does not split over {world} ranks; make it a multiple of "
                         f"{world} (per-rank batch x world size)")
    per = n // world
    return batch[rank * per:(rank + 1) * per]


def items_per_rank(labels: "Tensor | Iterable[Tensor]", ignore_index: int = -100) -> Tensor:
    """The `num_items_in_batch` to pass every rank so that the gradient DDP/FSDP averages over the ranks
    is the gradient of the global token mean, even when ranks hold different numbers of real tokens.

    A rank's loss is then sum(its token losses) x world / N, with N the tokens that have a target in
    the global batch (labels shifted by one, as the causal-LM loss does; a list of label tensors for
    the micro-batches of one optimizer step). A collective: call it on every rank.
    """
    if isinstance(labels, Tensor):
        labels = [labels]
    count = sum((lab[..., 1:] != ignore_index).sum() for lab in labels)
    count = torch.as_tensor(count, dtype=torch.float32)
    if not dist.is_initialized():
        return count
    count = count.to(info().device)
    dist.all_reduce(count)
    return count / dist.get_world_size()


def mean_over_ranks(value: Tensor) -> Tensor:
    """The mean of a (loss) tensor over the ranks, for rank 0's log; a collective."""
    if not dist.is_initialized():
        return value.detach()
    out = value.detach().clone().to(torch.float32)
    dist.all_reduce(out)
    return out / dist.get_world_size()


# --- gradients ------------------------------------------------------------------------------------

def _buckets(params: list[nn.Parameter], bucket_bytes: int) -> list[list[nn.Parameter]]:
    """Consecutive runs of `params` of one dtype and device, each up to `bucket_bytes` (at least one)."""
    out: list[list[nn.Parameter]] = []
    size = 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        last = out[-1] if out else None
        if last is None or size + nbytes > bucket_bytes or (last[0].dtype, last[0].device) != (p.dtype, p.device):
            out.append([])
            size = 0
        out[-1].append(p)
        size += nbytes
    return out


def _reduce_bucket(bucket: list[nn.Parameter], group, async_op: bool):
    for p in bucket:
        if p.grad is None:  # every rank must send the same buffer: a missing gradient is a zero one
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in bucket])
    return flat, dist.all_reduce(flat, group=group, async_op=async_op)


def _unflatten_into(bucket: list[nn.Parameter], flat: Tensor, world: int) -> None:
    flat.div_(world)  # gloo has no AVG: sum, then divide (exact for a power-of-two world)
    for p, piece in zip(bucket, flat.split([p.numel() for p in bucket])):
        p.grad.copy_(piece.view_as(p.grad))


def all_reduce_grads(params: Iterable[nn.Parameter], *, bucket_mb: float = 25.0, group=None) -> int:
    """Average `.grad` of `params` over the ranks, in place (the tensors stay the same objects, as
    `GraphedStep` requires), in buckets of about `bucket_mb` MiB; returns the number of all-reduces.

    For the CUDA-graph step: replay every micro-step of an optimizer step, then call this once, outside
    the graph. Every rank must pass the same parameters in the same order (a missing `.grad` counts as
    zeros). A no-op in one process.
    """
    params = [p for p in params if p.requires_grad]
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return 0
    world = dist.get_world_size(group)
    buckets = _buckets(params, int(bucket_mb * 2**20))
    for bucket in buckets:
        flat, _ = _reduce_bucket(bucket, group, async_op=False)
        _unflatten_into(bucket, flat, world)
    return len(buckets)


class _OverlappedReducer:
    """All-reduce gradients in buckets while the backward runs (for LoRA replicated under FSDP).

    A post-accumulate-grad hook counts the gradients of each bucket; a bucket whose gradients are all
    in is launched asynchronously, in bucket order on every rank (the ranks' collectives must match),
    and a callback at the end of the backward launches what is left, waits and writes the averages
    back. Buckets run in reverse parameter order, roughly the order the backward produces them.
    """

    def __init__(self, params: list[nn.Parameter], bucket_mb: float, group=None) -> None:
        self.group, self.world = group, dist.get_world_size(group)
        self.buckets = _buckets(list(reversed(params)), int(bucket_mb * 2**20))
        self.bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self.enabled = True  # False inside no_sync(): gradients accumulate locally
        self.all_reduces = 0  # launched so far (what a test or a profile counts)
        self._reset()
        for p in params:
            p.register_post_accumulate_grad_hook(self._ready)

    def _reset(self) -> None:
        self.left = [len(b) for b in self.buckets]
        self.launched = 0
        self.inflight: list[tuple[int, Tensor, Any]] = []
        self.queued = False

    def _ready(self, p: Tensor) -> None:
        if not self.enabled:
            return
        if not self.queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
            self.queued = True
        self.left[self.bucket_of[id(p)]] -= 1
        while self.launched < len(self.buckets) and self.left[self.launched] <= 0:
            self._launch(self.launched)

    def _launch(self, i: int) -> None:
        flat, work = _reduce_bucket(self.buckets[i], self.group, async_op=True)
        self.inflight.append((i, flat, work))
        self.all_reduces += 1
        self.launched = i + 1

    def _finish(self) -> None:
        while self.launched < len(self.buckets):  # parameters this backward did not reach
            self._launch(self.launched)
        for i, flat, work in self.inflight:
            work.wait()
            _unflatten_into(self.buckets[i], flat, self.world)
        self._reset()


@contextlib.contextmanager
def no_sync(model: nn.Module) -> Iterator[None]:
    """Accumulate gradients locally (no reduction) for the micro-steps inside; the backward after the
    block reduces the sum. Works for `wrap`'s DDP and FSDP models and in one process."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
        return
    reducer = getattr(model, "_surogate_reducer", None)
    sharded = isinstance(model, FSDPModule)
    if sharded:
        model.set_requires_gradient_sync(False)
    if reducer is not None:
        reducer.enabled = False
    try:
        yield
    finally:
        if sharded:
            model.set_requires_gradient_sync(True)
        if reducer is not None:
            reducer.enabled = True


# --- wrapping -----------------------------------------------------------------------------------------

def _decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The longest ModuleList of identically typed blocks that hold trainable (LoRA) parameters."""
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best) and len({type(b) for b in module}) == 1:
            if any(p.requires_grad for p in module[0].parameters()):
                best = list(module)
    return best


# Root cause: FSDP2 before torch 2.13 wraps every shard as `nn.Parameter(dtensor)` with the default
# requires_grad=True, which integer tensors refuse ("only Tensors of floating point dtype can require
# gradients"), so it cannot hold NF4 / NVFP4 bytes (uint8). There the bytes are held as a float dtype of
# the same element size (a view: no copy, no conversion) and `SurogateLinear.weight_list` views them back.
_FLOAT_VIEWS_FOR_FSDP = tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 13)
_FLOAT_OF_SIZE = {1: torch.float8_e4m3fn, 2: torch.bfloat16, 4: torch.float32, 8: torch.float64}


def _quantized_parts_as_parameters(model: nn.Module) -> int:
    """Re-register each `SurogateLinear`'s weight list (`w0..wn`, buffers) as frozen parameters, which
    FSDP2 shards (it leaves buffers whole). 0-d parts (a tensor scale, an NF4 mean: 4 bytes) stay
    buffers, as `fully_shard` refuses scalar parameters. The bytes themselves are not touched."""
    from surogate.modules import SurogateLinear

    moved = 0
    for module in model.modules():
        if not isinstance(module, SurogateLinear):
            continue
        for i in range(module._n_parts):
            name = f"w{i}"
            part = module._buffers.get(name)
            if part is None or part.dim() == 0:
                continue
            del module._buffers[name]
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
    if not getattr(_peft(model), "_surogate_compiled", False):
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
        model._surogate_reducer = _OverlappedReducer(trainable, bucket_mb)
    hybrid = "" if shards == i.world else f", hybrid: {i.world // shards} replicas of {shards} shards"
    model._surogate_parallelism = f"fsdp (LoRA {placement.value}{hybrid})"
    _note(model, f"distributed: fsdp2 over {i.world} ranks ({i.backend}{hybrid}); {len(blocks)} decoder blocks + root "
                 f"sharded, {moved} quantized weight tensors held as frozen parameters; this rank stores "
                 f"{_size(frozen_bytes(model))} of {_size(before)} frozen bytes, gathered per block "
                 f"({'forward and backward' if reshard_after_forward else 'forward, kept for the backward'}); "
                 f"LoRA ({_size(lora_bytes)}) {placement.value}")
    return model


def _peft(model: nn.Module) -> nn.Module:
    from surogate.training.adapters import find_peft_model

    return find_peft_model(model)


def unwrap(model: nn.Module) -> nn.Module:
    """The PEFT model inside what `wrap` returned (DDP's `.module`; FSDP shards in place)."""
    return _peft(model)


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


# --- checkpoints --------------------------------------------------------------------------------------

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
    from surogate.training.adapters import save_adapter as write

    peft_model = unwrap(model)
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
