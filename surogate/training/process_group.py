"""This process's place in a job of several (torchrun's env vars), the one rule that a failing rank ends
them all (`fail_fast`), and what the ranks compute together about a batch: each rank's rows (`shard`), the
loss normaliser (`items_per_rank`), the logged loss (`mean_over_ranks`).

The bottom of the distributed layer: plain `torch.distributed`, no model; `surogate.training.distributed`
is the API a training loop calls and re-exports all of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading
import time
import traceback
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

_FAILED_KEY = "surogate/failed"  # the first rank that fails writes its error here (see fail_fast)
_STOP_GRACE_S = 5.0  # how long a rank that saw another fail waits for it to exit before exiting itself


T = TypeVar("T")


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


# --- failure --------------------------------------------------------------------------------------

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
            # The failing rank exits first, so that torchrun's summary names it as the root cause (this rank,
            # exiting at once, was named instead); its agent then stops this one, or the exit below does.
            time.sleep(_STOP_GRACE_S)
            os._exit(1)  # the main thread may sit in a collective that never returns


@contextlib.contextmanager
def fail_fast(poll_s: float = 1.0) -> Iterator[None]:
    """Make an exception on one rank end the whole job with that error, instead of a hang.

    On an exception inside the block this rank prints it with its rank, records "rank r failed: ..."
    in the job's store (the first failure wins), and re-raises, so the process exits non-zero with
    its traceback. Every other rank inside `fail_fast` polls the store every `poll_s` seconds from a
    daemon thread; seeing the record, it prints it and exits with status 1 after a 5 s grace (the failing
    rank exits first), even from inside a collective that would otherwise wait until the timeout (NCCL
    does not notice a dead peer).
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


# --- data -----------------------------------------------------------------------------------------

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
