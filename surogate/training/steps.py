"""Batches in, losses out: the resumable order of micro-batches, one micro-step (eager, or replayed as a
CUDA graph) and the eval loss, each as the loop and a hand-written loop (examples/) both call them.

The token counts live here too, taken on the host before a batch moves (`real_tokens` for tokens/s,
`predicted_tokens` and `step_items` for the loss's denominator), so that counting never costs a GPU sync.
"""

from __future__ import annotations

import functools
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from surogate.training import buckets, distributed
from surogate.training.config import ConfigError, TrainConfig
from surogate.training.setup import Log, log_stderr


def wants_cuda_graphs(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether `cfg.cuda_graphs` asks for CUDA graphs on `device` ("true" on a CPU is refused by MicroStep)."""
    return cfg.cuda_graphs == "true" or (cfg.cuda_graphs == "auto" and device.type == "cuda")


class MicroStep:
    """Forward + backward of one micro-batch, the loss scaled by 1 / accumulation; replayed from
    CUDA graphs (`surogate.GraphedStep`, one per shape bucket) when `cfg.cuda_graphs` allows. Returns the loss.
    A capture that fails warns once and the run continues eagerly (`cuda_graphs: true` makes it an error).
    `graphs=False` turns the graphs off whatever the config says (FSDP); `items`, when given, is the
    `num_items_in_batch` the loss divides its sum by (`step_items`: the step's token mean); None: the
    micro-batch's own token mean."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, device: torch.device, log: Log = log_stderr,
                 graphs: bool = True, shape_buckets: tuple[int, ...] = ()) -> None:
        self.model, self.mode, self.log = model, cfg.cuda_graphs, log
        self.loss_scale = 1.0 / cfg.gradient_accumulation_steps
        if self.mode == "true" and device.type != "cuda":
            raise ValueError("cuda_graphs: true needs a CUDA device; set cuda_graphs: auto or false")
        self.graphed = None
        if graphs and wants_cuda_graphs(cfg, device):
            from surogate.training.graphed_step import GraphedStep

            self.graphed = GraphedStep(model, loss_scale=self.loss_scale, strict=self.mode == "true",
                                       buckets=shape_buckets)
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
        before, start = set(self.graphed.graphs), time.perf_counter()
        loss = self.graphed(**batch)
        new = set(self.graphed.graphs) - before
        if new and self._said:  # a later bucket's first batch: say why this step is slow
            self.log(f"cuda_graphs: captured the graph of rows padded to {next(iter(new))[-1]} tokens in "
                     f"{time.perf_counter() - start:.1f} s (warm-up, capture; {len(self.graphed.graphs)} graphs now)")
        if not self._said:
            self._said = True
            if self.graphed.failure is None:
                chosen = self.graphed.buckets
                if len(chosen) > 1:
                    shapes = (f"rows padded to one of {len(chosen)} lengths chosen from the data and the run's "
                              f"length, {', '.join(map(str, chosen))}")
                elif chosen:
                    shapes = f"rows padded to {chosen[0]}, the one length chosen from the data and the run's length"
                else:
                    shapes = f"rows padded to a multiple of {self.graphed.pad_to}"
                self.log("cuda_graphs: each micro-step (forward + backward) is captured and replayed as a CUDA "
                         f"graph, one per shape bucket ({shapes})")
            else:
                self.log(f"cuda_graphs: capture failed ({self.graphed.failure}); training without CUDA graphs")
        return loss


class MicroBatches:
    """Shuffled micro-batches, epoch after epoch (reshuffled with seed + epoch), forever, with their
    position: `epoch` and `index` (micro-batches of that epoch taken), which a checkpoint stores and a
    resumed run starts from. With `world` ranks these are the global micro-batches of `world` x
    `per_device_train_batch_size` rows, the same on every rank (each trains its `distributed.shard`):
    the order of one process with a batch `world` times larger. `cfg.group_by_length` batches padded rows of
    similar lengths together (`data.grouped_batch_rows`); `shape_buckets` are the CUDA graph lengths chosen
    from the widths of its first epoch's batches (padded rows; later epochs have other batches of the same
    rows)."""

    def __init__(self, dataset, cfg: TrainConfig, epoch: int = 0, index: int = 0, world: int = 1) -> None:
        self.dataset, self.batch_size, self.seed = dataset, cfg.per_device_train_batch_size * world, cfg.seed
        self.world = world
        self.group_by_length = cfg.group_by_length
        rows = len(dataset)
        if rows < self.batch_size and rows % world:  # one short batch, which must split evenly over the ranks
            if rows < world:
                raise ConfigError(f"the train split has {rows} row{'s' if rows > 1 else ''} for {world} ranks, and "
                                  "every rank needs one: add rows, or run on fewer processes")
            self.batch_size = rows - rows % world  # the rest is left out of each epoch (reshuffled), as drop_last
        self.drop_last = rows >= self.batch_size
        self.per_epoch = max(1, len(dataset) // self.batch_size if self.drop_last else 1)
        self.epoch, self.index = epoch, index
        self._it = None

    def __iter__(self) -> "MicroBatches":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        for _ in range(2):
            if self._it is None:
                grouped = {"group_by_length": True} if self.group_by_length else {}  # TokenDataset has no such
                self._it = iter(self.dataset.batches(self.batch_size, shuffle=True, seed=self.seed + self.epoch,
                                                     drop_last=self.drop_last, **grouped))
                for _ in range(self.index):  # resumed in the middle of this epoch: its order, from there
                    next(self._it)
            batch = next(self._it, None)
            if batch is not None:
                self.index += 1
                return batch
            self.epoch, self.index, self._it = self.epoch + 1, 0, None
        raise RuntimeError("the train split yields no batch")

    def shape_buckets(self, micro_steps: int | None = None) -> tuple[int, ...]:
        """The CUDA graph lengths for these micro-batches (`buckets.choose` over the first epoch's batch widths,
        as many as pay for themselves over the run's `micro_steps`, when given); none for packed rows, which have
        one shape."""
        if getattr(self.dataset, "packed", True):  # packed rows (and TokenDataset) have one shape
            return ()
        runs = None if micro_steps is None else micro_steps / self.per_epoch
        return buckets.choose(self.dataset.widths(self.batch_size, self.seed, self.group_by_length), runs=runs)

    def labelled_bound(self, micro_steps: int) -> "int | Callable[[int], int] | None":
        """The most tokens with a label that one rank's rows of a micro-batch hold, over the micro-batches of the
        run's `micro_steps`: the rows the LM head must run on (`bound_head_rows`). Every epoch's order follows
        from the seed, so the run's batches are known, and their largest is often well below the sum of the
        largest rows (`ExampleRows.max_trained`, the bound of runs too long to go through). Packed rows: one
        number; padded rows: a function of the width (the batches no wider than it), one bound per graph shape.
        None where the dataset cannot say (a TokenDataset)."""
        data = self.dataset
        if not hasattr(data, "trained_counts"):
            return None
        per_rank = self.batch_size // self.world
        epochs = -(-max(int(micro_steps), 1) // self.per_epoch)
        grouped = self.group_by_length and not data.packed
        if epochs * len(data) > (_GROUPED_ROWS_READ if grouped else _BOUND_ROWS_READ):
            return labelled_bound(data, per_rank)
        counts, lengths = data.trained_counts(), np.diff(data.offsets)
        sums, widths = [], []
        for epoch in range(epochs):
            rows = data.epoch_rows(self.batch_size, self.seed + epoch, self.drop_last, self.group_by_length)
            shares = self.world if rows.shape[1] % self.world == 0 else 1  # distributed.shard's split
            sums.append(counts[rows].reshape(len(rows), shares, -1).sum(-1).max(-1))
            widths.append(lengths[rows].max(-1))
        sums, widths = np.concatenate(sums), np.concatenate(widths)
        if data.packed:
            return int(sums.max())
        order = np.argsort(widths, kind="stable")
        widest, most = widths[order], np.maximum.accumulate(sums[order])

        @functools.cache
        def bound(width: int) -> int:
            i = int(np.searchsorted(widest, width, side="right"))
            return int(most[i - 1]) if i else data.max_trained(per_rank, width)  # narrower than any batch

        return bound

    @property
    def left_out(self) -> int:
        """Rows each epoch leaves out: those past the last whole micro-batch (every micro-batch has one shape, so
        one CUDA graph serves them all). The order is reshuffled every epoch, so over several epochs they differ."""
        return len(self.dataset) - self.per_epoch * self.batch_size if self.drop_last else 0

    @property
    def epochs_done(self) -> float:
        """Epochs as a fraction (for the log)."""
        return round(self.epoch + self.index / self.per_epoch, 4)


# --- batches on the device, their tokens ---------------------------------------------------------

def to_device(batch: dict[str, torch.Tensor], device: torch.device,
              model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """`batch` on `device`. Right-padded rows drop their `attention_mask` when the model runs surogate
    attention: the padding follows every real token, so causal attention never shows it to one, and its
    labels are -100; without a mask the step keeps the causal flash kernel."""
    from peft import PeftModel

    from surogate.ops.attention import original_implementation

    hf = model.base_model.model if isinstance(model, PeftModel) else model  # evaluate() takes plain models too
    drop = model is not None and original_implementation(hf) is not None
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if not (drop and k == "attention_mask")}


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens of the examples in `batch` (padding not counted): the batch's own count where it has one."""
    count = getattr(batch, "num_tokens", None)
    if count is not None:
        return count
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()


def predicted_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the loss averages over (labels shift by one inside the model)."""
    return int((batch["labels"][:, 1:] != -100).sum())


def step_items(batches: list[dict[str, torch.Tensor]], shares: int, device: torch.device) -> torch.Tensor:
    """The `num_items_in_batch` of every micro-step of one optimizer step, so that its loss and gradient are
    the mean over all the step's target tokens (Hugging Face's Trainer since 4.46), not an equal average of
    micro-batch means that lets a micro-batch of few targets weigh as much as one of many.

    `batches` are the step's global micro-batches (every rank's rows), counted on the host (no GPU sync);
    `shares` is accumulation x world: a micro-step's loss, its token sum x shares / the step's targets,
    scaled by 1 / accumulation (MicroStep) and averaged over the ranks (DDP/FSDP), sums to the step's
    token mean. A step without targets divides by 1 (loss 0, zero gradients, not 0/0)."""
    targets = sum(predicted_tokens(batch) for batch in batches)
    return torch.full((), max(targets, 1) / shares, device=device)


def own_loss_note(model: nn.Module, shares: int) -> str | None:
    """The line saying that `step_items` cannot reach `model`'s loss, or None when it can or need not (`shares`,
    accumulation x world, is 1). A forward that neither calls transformers' `loss_function` nor names
    `num_items_in_batch` (remote code with its own `CrossEntropyLoss()`) drops the count: each micro-batch's loss is
    its own mean, and the micro-batches weigh equally."""
    import inspect

    code = getattr(inspect.unwrap(type(model).forward), "__code__", None)
    if shares <= 1 or code is None or "loss_function" in code.co_names or "num_items_in_batch" in code.co_varnames:
        return None
    return (f"note: {type(model).__name__} computes its own loss (its forward takes no num_items_in_batch): with "
            f"{shares} micro-batches a step, each weighs the same whatever its target count (Hugging Face's Trainer "
            "before 4.46), not the step's token mean; one micro-batch a step (gradient_accumulation_steps: 1, "
            "one process) avoids it")


# --- evaluation ----------------------------------------------------------------------------------

def _pad_rows(batch: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """`batch` grown to `rows` rows that the loss ignores, so that every eval batch has one shape
    (a short last batch would cost a recompilation)."""
    have = batch["input_ids"].shape[0]
    if have == rows:
        return batch
    fill = {"input_ids": 0, "labels": -100, "attention_mask": 0, "position_ids": 0}
    return {k: torch.cat([v, v.new_full((rows - have, *v.shape[1:]), fill[k])]) for k, v in batch.items()}


# `MicroBatches.labelled_bound` goes through the run's batches up to this many rows read (epochs x rows), each
# about half a second on a 2-core CPU (grouping by length sorts in Python); past it, the bound of any rows.
_BOUND_ROWS_READ, _GROUPED_ROWS_READ = 4_000_000, 400_000


def labelled_bound(dataset, batch_size: int) -> "int | Callable[[int], int] | None":
    """The most tokens with a label any `batch_size` rows of `dataset` hold (`ExampleRows.max_trained`): for
    padded rows a function of the batch width (the rows no wider); None where the dataset cannot say."""
    if not hasattr(dataset, "max_trained"):
        return None
    if dataset.packed:
        return dataset.max_trained(batch_size)
    return functools.cache(functools.partial(dataset.max_trained, batch_size))


def bound_head_rows(model: nn.Module, bound: "int | Callable[[int], int] | None", widest: int) -> int | None:
    """Tell the compiled model the most labelled tokens one of its calls holds (`MicroBatches.labelled_bound`
    for training, `labelled_bound` for eval), so that its LM head runs on those rows only
    (`surogate.forward.bound_trained_tokens`); None lifts it. The bound at the `widest` batch, or None where
    there is none or the model has no chunked head."""
    from surogate.forward import bound_trained_tokens

    if not bound_trained_tokens(model, bound) or bound is None:
        return None
    return bound(widest) if callable(bound) else bound


def head_rows_line(bound: int | None, batch_size: int, seq_len: int, packed: bool = True) -> str | None:
    """The log's line on the LM head's rows when the bound cuts them at full width (None when it does not)."""
    from surogate.ops.loss import compacted_rows
    from surogate.training.outputs import counted

    tokens = batch_size * seq_len
    rows = compacted_rows(tokens, bound)
    if rows is None:
        return None
    narrower = "" if packed else "; narrower padded batches by the bound of their rows"
    return (f"lm head: on {rows:,} rows of a micro-batch's {tokens:,} tokens at most (the run's micro-batches of "
            f"{counted(batch_size, 'row')} hold at most {bound:,} tokens with a label: prompts and padding are "
            f"masked, so the head skips them{narrower})")


@torch.no_grad()
def evaluate(model: nn.Module, dataset, batch_size: int, device: torch.device, world: int = 1) -> float:
    """Mean cross-entropy per predicted token over `dataset`.

    `world` > 1 (a job of several processes; every rank calls it with the same `dataset`): each global
    batch of `world` x `batch_size` rows is split over the ranks, each runs its rows (padding rows
    included, so that FSDP's gathers match), and the token sums and counts are added over the ranks:
    the result equals one process's with `world` x `batch_size` rows a batch. Padded example rows are batched
    longest first (`group_by_length`): the mean does not depend on the order, and batches of similar lengths
    compute little padding.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    rows = batch_size * world
    grouped = {"group_by_length": True} if not getattr(dataset, "packed", True) else {}  # TokenDataset: no such
    try:
        for batch in dataset.batches(rows, **grouped):
            batch = _pad_rows(batch, rows)
            if world > 1:
                batch = distributed.shard(batch)
            n = predicted_tokens(batch)
            loss = model(**to_device(batch, device, model)).loss
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
