"""Training data: dataset rows -> token rows, packed with their boundaries kept or padded per batch.

`load_splits` is the one entry point of `surogate train`: rows come from `data_files` (a .jsonl/.json/
.parquet file, a folder of `<split>.<ext>` files, a Hugging Face dataset; `val_set_size` held out of
train), become examples through `data_formats` (gsm8k, alpaca, completion, text, messages, auto: the read
part masked from the loss, the trained part not; kept between runs by `data_cache`), and are laid out here
(a mix of sources: each laid out on its own, then joined). Rows are stored flat (`ExampleRows`). Two layouts:
- packed (`pack_examples`, the default of `surogate train`): whole examples placed into rows of
  `seq_len` tokens (first fit), in Hugging Face's padding-free convention (TRL's `padding_free`,
  `DataCollatorWithFlattening`): `position_ids` restart at 0 at each example, and the first token of
  each example is not a target (it would be predicted from the previous example). surogate's attention
  reads the boundaries from `position_ids`, so no token attends across examples. Rows are padded to
  `seq_len`: every batch has one shape.
- padded: one example per row, each batch right-padded to its longest row (GraphedStep rounds that up
  to a shape bucket); padding is masked from the loss. With `group_by_length` (`grouped_batch_rows`) each
  batch takes examples of similar lengths, so it holds little padding (`padding_share` measures it).
`pack` / `pad` / `TokenDataset` are the plain-text layouts (a stream cut into rows), used for pretraining
corpora where boundaries do not matter (bench/fidelity.py).

The package directory `surogate/data/` (no `__init__.py`: files, not code; `data_files.package_data_dir`)
holds the bundled GSM8K sample, the default config and the embedded model config.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from surogate.training import buckets
from surogate.training.config import EXCESS_LENGTH_STRATEGIES
from surogate.training.data_files import (DataError, Rows, bundled_dataset_dir, hold_out,  # noqa: F401
                                          package_data_dir, read_jsonl_rows, read_split)
from surogate.training.chat_template import chatml_marker_note, resolve_chat_template
from surogate.training.data_cache import cached_examples
from surogate.training.data_formats import (FORMAT_NAMES, FORMATS, IGNORE_INDEX, Example,  # noqa: F401
                                            FlatExamples, check_row, flat_int32, offsets_of, resolve_format,
                                            tokenize_examples, tokenize_flat)
from surogate.training.outputs import counted


def read_jsonl(path: "str | os.PathLike", limit: int | None = None) -> list[dict]:
    """The first `limit` (all when None) JSON objects of a JSON-lines file; blank lines skipped."""
    return read_jsonl_rows(path, limit).rows


def prompt_and_completion(example: dict, fmt: str) -> tuple[str, str]:
    """The part of an example the model reads (masked from the loss) and the part it learns to write, for
    the formats with one of each (gsm8k, alpaca, completion; text: "" and the text)."""
    if fmt not in FORMATS or FORMATS[fmt].pieces is None:
        raise ValueError(f"format {fmt!r} has no single prompt and completion; use one of "
                         f"{', '.join(n for n, f in FORMATS.items() if f.pieces is not None)}")
    form = FORMATS[fmt]
    pieces = form.pieces(check_row(example, form, "example"))
    return "".join(t for t, trained in pieces if not trained), "".join(t for t, trained in pieces if trained)


def format_example(example: dict, fmt: str) -> str:
    """One training text. gsm8k: "Question: ...\nAnswer: ..." (answer kept whole, "#### N" included)."""
    return "".join(prompt_and_completion(example, fmt))


def row_order(n: int, shuffle: bool = False, seed: int = 0) -> torch.Tensor:
    """The order `batch_rows` takes `n` rows in: one permutation drawn from `seed` when shuffled."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)


def batch_rows(n: int, batch_size: int, shuffle: bool = False, seed: int = 0,
               drop_last: bool = False) -> Iterator[torch.Tensor]:
    """Row indices of each batch over `n` rows; `shuffle` draws one permutation from `seed`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = row_order(n, shuffle, seed)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]


# Examples sorted by length within windows of this many batches (Hugging Face's LengthGroupedSampler's 50).
GROUP_WINDOW = 50


def grouped_batch_rows(lengths: list[int], batch_size: int, seed: int = 0,
                       drop_last: bool = False) -> list[torch.Tensor]:
    """Row indices of each batch over rows of `lengths`, rows of similar lengths together (`group_by_length`).

    The rows are shuffled by `seed`, cut into windows of `GROUP_WINDOW` batches, and each window sorted longest
    first and cut into batches; the batches are then shuffled (by `seed` too), except that the one holding the
    longest row comes first, so the peak memory (and the largest CUDA graph) is met at the first step. Which rows
    meet in a batch depends on the seed, not only on their lengths. With `drop_last` the one short batch (the
    last window's tail) is left out."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=gen).tolist()
    window = GROUP_WINDOW * batch_size
    batches = []
    for start in range(0, len(order), window):
        rows = sorted(order[start:start + window], key=lambda i: -lengths[i])  # stable: ties keep the shuffle
        batches += [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if not batches:
        return []
    shuffled = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
    first = max(range(len(shuffled)), key=lambda b: max(lengths[i] for i in shuffled[b]))
    shuffled.insert(0, shuffled.pop(first))
    return [torch.tensor(b) for b in shuffled]


def batch_widths(lengths: list[int], batches: list[torch.Tensor]) -> list[int]:
    """The width each batch of `batches` (row indices) is padded to: its longest row."""
    return [max(lengths[i] for i in b.tolist()) for b in batches]


def padding_share(lengths: list[int], batches: list[torch.Tensor], shape_buckets: tuple[int, ...] = (),
                  pad_to: int = 1) -> float:
    """The share of the tokens computed that are padding when each batch of `batches` (row indices) is padded
    to its longest row, then to GraphedStep's shape bucket (`buckets.padded_length`)."""
    real = computed = 0
    for b, width in zip(batches, batch_widths(lengths, batches)):
        real += sum(lengths[i] for i in b.tolist())
        computed += buckets.padded_length(width, shape_buckets, pad_to) * len(b)
    return 1.0 - real / computed if computed else 0.0


class Batch(dict):
    """Model keyword arguments (a dict) that also know how many real tokens they hold (`num_tokens`)."""

    num_tokens: int = 0


class ExampleRows:
    """Rows of whole examples: packed (several per row, `positions` restarting at each) or one per row.

    Stored flat: every row's tokens one after another in int32 arrays, with the rows' offsets: 12 bytes a token
    with the positions, where lists of Python ints took ~86 (gigabytes on every rank for 10^8 tokens).
    `input_ids`, `labels` and `positions` give the rows back as lists of ints."""

    def __init__(self, ids: np.ndarray, targets: np.ndarray, pos: np.ndarray | None, offsets: np.ndarray,
                 seq_len: int, pad_id: int = 0, examples: int = 0, cut: int = 0, dropped: int = 0,
                 untrained: int = 0, source: str = "the examples", parts: "list[ExampleRows] | None" = None,
                 firsts: dict[str, int] | None = None, excess: str = "truncate"):
        self.ids, self.targets = ids, targets  # (tokens,) int32: the rows' ids and labels, one row after another
        self.pos = pos  # (tokens,) int32 positions within each example; None: one example per row (padded layout)
        self.offsets = offsets  # (rows + 1,) int64: where each row starts
        self.seq_len, self.pad_id = seq_len, pad_id
        self.examples = examples  # examples laid out, kept or not
        self.cut = cut  # of them, with a target and longer than seq_len: truncated, or dropped where none was left
        self.dropped = dropped  # of the cut ones, dropped
        self.excess = excess  # what became of the long ones: "truncate" (as said above) or "drop" (every one left out)
        self.untrained = untrained  # examples without any target token (an empty answer, no assistant turn): dropped
        self.source = source  # where they came from (a file), for the log
        self.parts = list(parts or [])  # a mix (`concat`): the sources, for the log
        self.firsts = dict(firsts or {})  # the first example of each kind the log counts (cut, dropped, untrained)
        self.where_of: Callable[[int], str] | None = None  # an example's row (file:line), to name the firsts in the log
        self._trained: np.ndarray | None = None  # each row's labelled tokens (max_trained), once asked

    @classmethod
    def from_lists(cls, input_ids, labels, positions, seq_len: int, pad_id: int = 0) -> "ExampleRows":
        """From rows given as lists (or arrays) of ids, labels and positions (None: one example per row)."""
        return cls(flat_int32(input_ids), flat_int32(labels),
                   None if positions is None else flat_int32(positions),
                   offsets_of([len(row) for row in input_ids]), seq_len, pad_id)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def _rows(self, flat: np.ndarray) -> list[list[int]]:
        bounds = self.offsets.tolist()
        return [flat[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:])]

    @property
    def input_ids(self) -> list[list[int]]:
        return self._rows(self.ids)

    @property
    def labels(self) -> list[list[int]]:
        return self._rows(self.targets)

    @property
    def positions(self) -> list[list[int]] | None:
        return None if self.pos is None else self._rows(self.pos)

    def row_lengths(self) -> list[int]:
        return np.diff(self.offsets).tolist()

    @classmethod
    def concat(cls, parts: "list[ExampleRows]") -> "ExampleRows":
        """The rows of several sources laid out alike (a mix of datasets), trained on as one; the log keeps each
        source's lines."""
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        return cls(np.concatenate([p.ids for p in parts]), np.concatenate([p.targets for p in parts]),
                   None if first.pos is None else np.concatenate([p.pos for p in parts]),
                   offsets_of([int(n) for p in parts for n in np.diff(p.offsets)]), first.seq_len, first.pad_id,
                   *(sum(getattr(p, k) for p in parts) for k in ("examples", "cut", "dropped", "untrained")),
                   " + ".join(p.source for p in parts), parts, excess=first.excess)

    def log_lines(self) -> list[str]:
        """The log's lines on the examples left out or cut (none when all fit), naming their split and file, and
        the first row of each kind where the rows' places are known (`where_of`), so that a user can look."""
        if self.parts:
            return [line for part in self.parts for line in part.log_lines()]

        def first(kind: str, sep: str = " (") -> str:
            close = ")" if sep == " (" else ""
            return "" if self.where_of is None or kind not in self.firsts else \
                f"{sep}first: {self.where_of(self.firsts[kind])}{close}"

        lines = []
        if self.untrained:
            lines.append(f"data: {self.untrained:,} of {counted(self.examples, 'example')} of {self.source} "
                         f"{'has' if self.untrained == 1 else 'have'} no target token "
                         f"(an empty answer, or no assistant turn): left out{first('untrained')}")
        if self.cut and self.excess == "drop":
            lines.append(f"data: {self.cut:,} of {counted(self.examples, 'example')} of {self.source} "
                         f"{'is' if self.cut == 1 else 'are'} longer than sequence_len {self.seq_len}: left out "
                         f"(excess_length_strategy: drop{first('dropped', '; ')}); raise sequence_len to keep them, "
                         "or set excess_length_strategy: truncate to train on their starts")
        elif self.cut:
            kept = self.cut - self.dropped
            lines.append(f"data: {self.cut:,} of {counted(self.examples, 'example')} of {self.source} "
                         f"{'is' if self.cut == 1 else 'are'} longer than "
                         f"sequence_len {self.seq_len}: {kept:,} cut to it{first('cut') if kept else ''}, "
                         f"{self.dropped:,} left out (no target token within it{first('dropped', '; ')}); raise "
                         "sequence_len to keep them whole")
        return lines

    @property
    def packed(self) -> bool:
        return self.pos is not None

    def trained_counts(self) -> np.ndarray:
        """Each row's tokens with a label after the shift by one (a row's first token predicts nothing): the
        rows the LM head must run on."""
        if self._trained is None:
            trained = _counts_before(self.targets != IGNORE_INDEX)
            starts, ends = self.offsets[:-1], self.offsets[1:]
            self._trained = np.where(ends > starts, trained[ends] - trained[np.minimum(starts + 1, ends)], 0)
        return self._trained

    def max_trained(self, batch_size: int, width: int | None = None) -> int:
        """The most tokens with a label that a batch of `batch_size` rows can hold: the sum of the largest rows'
        counts, whatever rows a batch takes; with `width`, among the rows no longer than it (a padded batch that
        wide holds no longer row)."""
        counts = self.trained_counts()
        counts = counts if width is None else counts[np.diff(self.offsets) <= width]
        return int(np.sort(counts)[::-1][:batch_size].sum())

    @property
    def num_tokens(self) -> int:
        """Tokens of the examples (padding not counted)."""
        return int(self.offsets[-1])

    def batch_rows(self, batch_size: int, shuffle: bool = False, seed: int = 0, drop_last: bool = False,
                   group_by_length: bool = False) -> list[torch.Tensor]:
        """Row indices of each batch: `batch_rows`; for padded rows with `group_by_length`, `grouped_batch_rows`
        when shuffled (training), the rows longest first when not (evaluation, whose token-weighted mean does
        not depend on the order). Packed rows all have `seq_len` tokens: nothing to group."""
        if group_by_length and not self.packed:
            lengths = self.row_lengths()
            if shuffle:
                return grouped_batch_rows(lengths, batch_size, seed, drop_last)
            order = torch.tensor(sorted(range(len(lengths)), key=lambda i: -lengths[i]), dtype=torch.long)
            return [order[b] for b in batch_rows(len(order), batch_size, drop_last=drop_last)]
        return list(batch_rows(len(self), batch_size, shuffle, seed, drop_last))

    def epoch_rows(self, batch_size: int, seed: int, drop_last: bool, group_by_length: bool = False) -> np.ndarray:
        """One shuffled epoch's batches, as `batch_rows(..., shuffle=True)` gives them, in one (batches, rows)
        array of row indices; whole batches as one reshape of the order (no tensor a batch)."""
        if (group_by_length and not self.packed) or not drop_last:
            return np.stack([b.numpy() for b in self.batch_rows(batch_size, True, seed, drop_last, group_by_length)])
        whole = len(self) - len(self) % batch_size
        return row_order(len(self), True, seed)[:whole].view(-1, batch_size).numpy()

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, drop_last: bool = False,
                group_by_length: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """Batches as model keyword arguments: packed rows padded to `seq_len` with `position_ids`;
        single examples padded to the batch's longest with `attention_mask` (1 on real tokens)."""
        for rows in self.batch_rows(batch_size, shuffle, seed, drop_last, group_by_length):
            yield self.batch(rows.tolist())

    def widths(self, batch_size: int, seed: int, group_by_length: bool = False) -> list[int]:
        """The width of each shuffled batch of one epoch (seed `seed`, the last short batch left out where there
        is a whole one): what `buckets.choose` picks CUDA graph shapes from."""
        if self.packed:
            return [self.seq_len] * max(1, len(self) // batch_size)
        rows = self.batch_rows(batch_size, True, seed, len(self) >= batch_size, group_by_length)
        return batch_widths(self.row_lengths(), rows)

    def padding_note(self, batch_size: int, seed: int, graphs: bool, group_by_length: bool,
                     runs: float | None = None) -> str | None:
        """The log's line on the padding a padded layout computes over one epoch (None when packed): each batch
        padded to its longest row, and with CUDA `graphs` to the bucket `buckets.choose` picks for it (for a run
        of `runs` epochs, as the trainer chooses them)."""
        if self.packed or not len(self):
            return None
        lengths = self.row_lengths()
        share = {}
        for g in (False, True):
            rows = self.batch_rows(batch_size, True, seed, len(self) >= batch_size, g)
            chosen = buckets.choose(batch_widths(lengths, rows), runs=runs) if graphs else ()
            share[g] = padding_share(lengths, rows, chosen)
        line = (f"data: padded batches of {batch_size}: {share[group_by_length]:.0%} of the tokens computed are "
                "padding (each batch padded to its longest row" + (", then to one of the CUDA graphs' lengths chosen "
                                                                   "from the data)" if graphs else ")"))
        if not group_by_length and share[False] - share[True] >= 0.05:
            line += f"; group_by_length: true would cut that to {share[True]:.0%}"
        return line

    def batch(self, rows: list[int]) -> Batch:
        bounds = [(int(self.offsets[i]), int(self.offsets[i + 1])) for i in rows]
        width = self.seq_len if self.packed else max(b - a for a, b in bounds)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        extra = torch.zeros((len(rows), width), dtype=torch.long)  # position_ids or attention_mask
        for r, (a, b) in enumerate(bounds):
            k = b - a
            ids[r, :k] = torch.from_numpy(self.ids[a:b])
            labels[r, :k] = torch.from_numpy(self.targets[a:b])
            if self.packed:  # the padding is a segment of its own: positions restart at 0
                extra[r, :k] = torch.from_numpy(self.pos[a:b])
                extra[r, k:] = torch.arange(width - k)
            else:
                extra[r, :k] = 1
        out = Batch(input_ids=ids, labels=labels, **{"position_ids" if self.packed else "attention_mask": extra})
        out.num_tokens = sum(b - a for a, b in bounds)
        return out


def _counts_before(mask: np.ndarray) -> np.ndarray:
    """How many of `mask` are set before each index, and in all (len(mask) + 1 int64). Cast first, then summed in
    place: `np.cumsum(mask, dtype=np.int64)` casts bools element by element, ~9x slower (1.4 s for 5 * 10^7 tokens)."""
    counts = np.zeros(len(mask) + 1, np.int64)
    counts[1:] = mask
    np.cumsum(counts[1:], out=counts[1:])
    return counts


def _sort(examples: "list[Example] | FlatExamples", seq_len: int, where: str, excess: str = "truncate",
          where_of: Callable[[int], str] | None = None
          ) -> tuple[FlatExamples, np.ndarray, int, int, int, dict[str, int]]:
    """(the examples stored flat, the indices of those with a target within `seq_len` (a target after an
    example's first token), how many with a target are longer than it, how many of those are left out for it, how
    many have no target at all, the first example of each of these kinds (`cut`: cut and kept)); a DataError naming
    `where` and the reason when none is left. `excess` says what becomes of an example longer than `seq_len`: cut to it
    ("truncate"), left out ("drop"), or a DataError naming the first (`where_of` its row) and how many ("raise")."""
    if excess not in EXCESS_LENGTH_STRATEGIES:
        raise ValueError(f"excess must be one of {', '.join(EXCESS_LENGTH_STRATEGIES)}, got {excess!r}")
    flat = examples if isinstance(examples, FlatExamples) else FlatExamples.of(examples)
    starts, lengths = flat.offsets[:-1], flat.lengths()
    long = lengths > seq_len
    if excess == "raise" and long.any():
        first, count = int(np.argmax(long)), int(long.sum())
        them = "it" if count == 1 else "them"
        many = "" if count == 1 else f" (the first of {count:,} such examples of {where})"
        at = where_of(first) if where_of else f"{where}, example {first + 1:,}"
        raise DataError(f"{at}: {int(lengths[first]):,} tokens, longer than "
                        f"sequence_len {seq_len}{many}; excess_length_strategy: raise stops here: raise sequence_len, "
                        f"shorten {them}, or set excess_length_strategy: truncate (the first sequence_len tokens "
                        "train) or drop (left out)")
    target = flat.labels != IGNORE_INDEX
    target[starts[lengths > 0]] = False  # an example's first token has no predecessor in its own example
    before = _counts_before(target)  # targets before token t
    anywhere = before[flat.offsets[1:]] - before[starts] > 0
    within = before[starts + np.minimum(lengths, seq_len)] - before[starts] > 0
    if excess == "drop":  # Axolotl's default: a long example is left out whole
        within &= ~long
    kept = np.flatnonzero(within)
    kinds = {"cut": long & within, "dropped": long & anywhere & ~within, "untrained": ~anywhere}
    firsts = {kind: int(np.argmax(mask)) for kind, mask in kinds.items() if mask.any()}
    # a long example without any target is counted once, with those that have none
    cut, dropped, untrained = int((long & anywhere).sum()), int(kinds["dropped"].sum()), int(kinds["untrained"].sum())
    if not len(flat):
        raise DataError(f"{where}: no examples")
    if not len(kept):
        if untrained == len(flat):
            raise DataError(f"{where}: none of the {len(flat)} examples has a target token (an empty answer, or a "
                            "conversation without an assistant turn); give them one, or set dataset.train_on_inputs: "
                            "true to train on the prompts")
        none = f"; {untrained} have none at all (an empty answer, or no assistant turn)" if untrained else ""
        if excess == "drop":
            raise DataError(f"{where}: every example with a target token is longer than sequence_len {seq_len}, and "
                            f"excess_length_strategy: drop leaves them out{none}; raise sequence_len, or set "
                            "excess_length_strategy: truncate")
        raise DataError(f"{where}: no example has a target token within sequence_len {seq_len}: {dropped} lose theirs "
                        f"to the cut (a prompt longer than it){none}; raise sequence_len, or set "
                        "dataset.train_on_inputs: true")
    return flat, kept, cut, dropped, untrained, firsts


def _gather(flat: FlatExamples, order: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The examples `order` (indices), each cut to `seq_len`, one after another: (ids, labels, lengths)."""
    lengths = np.minimum(flat.lengths()[order], seq_len)
    starts = offsets_of(lengths)
    index = np.arange(int(starts[-1]), dtype=np.int64) - np.repeat(starts[:-1] - flat.offsets[order], lengths)
    return flat.ids[index], flat.labels[index], lengths


class _FirstFit:
    """Rows of `capacity` tokens filled first fit: `take(n)` is the lowest row with `n` tokens free (rows not yet
    opened are empty), in O(log rows) with a max-tree over the rows' free tokens. Scanning the open rows instead
    was quadratic: minutes for a hundred thousand examples that each nearly fill a row."""

    def __init__(self, rows: int, capacity: int):
        self.size = 1 << max(rows - 1, 1).bit_length()
        self.free = [0] * self.size + [capacity] * rows + [0] * (self.size - rows)  # leaves at size + row
        for i in range(self.size - 1, 0, -1):
            self.free[i] = max(self.free[2 * i], self.free[2 * i + 1])

    def take(self, n: int) -> int:
        free, i = self.free, 1
        while i < self.size:  # down to the leftmost leaf with room for n
            i = 2 * i if free[2 * i] >= n else 2 * i + 1
        free[i] -= n
        row = i - self.size
        i //= 2
        while i:
            free[i] = max(free[2 * i], free[2 * i + 1])
            i //= 2
        return row


def pack_examples(examples: "list[Example] | FlatExamples", seq_len: int, pad_id: int = 0,
                  where: str = "the examples", excess: str = "truncate",
                  where_of: Callable[[int], str] | None = None) -> ExampleRows:
    """Whole examples placed first-fit into rows of at most `seq_len` tokens, in order; an example longer
    than `seq_len` is truncated to it, and dropped if no target is left (a prompt cut before its answer), as is
    one without any target (`excess`: "drop" leaves every long one out, "raise" stops at the first). Each
    example's first label is IGNORE_INDEX (it has no predecessor in its own example). `where` names the examples
    (split and file) in the log and in errors, `where_of` an example's row (file:line)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    flat, kept, cut, dropped, untrained, firsts = _sort(examples, seq_len, where, excess, where_of)
    sizes = np.minimum(flat.lengths()[kept], seq_len).tolist()
    first_fit = _FirstFit(len(kept), seq_len)
    rows: list[list[int]] = []  # the examples of each row
    for j, size in zip(kept.tolist(), sizes):
        target = first_fit.take(size)
        if target == len(rows):
            rows.append([])
        rows[target].append(j)
    ids, labels, lengths = _gather(flat, np.array([j for row in rows for j in row], dtype=np.int64), seq_len)
    starts = offsets_of(lengths)
    labels[starts[:-1]] = IGNORE_INDEX  # an example's first token has no predecessor in its own example
    positions = (np.arange(int(starts[-1]), dtype=np.int64) - np.repeat(starts[:-1], lengths)).astype(np.int32)
    row_sizes = [sum(min(int(flat.offsets[j + 1] - flat.offsets[j]), seq_len) for j in row) for row in rows]
    packed = ExampleRows(ids, labels, positions, offsets_of(row_sizes), seq_len, pad_id, len(flat), cut, dropped,
                         untrained, where, firsts=firsts, excess=excess)
    packed.where_of = where_of
    return packed


def one_per_row(examples: "list[Example] | FlatExamples", seq_len: int, pad_id: int = 0,
                where: str = "the examples", excess: str = "truncate",
                where_of: Callable[[int], str] | None = None) -> ExampleRows:
    """One example per row, truncated to `seq_len` (batches pad to their longest row); the same ones left out
    as by `pack_examples`, and `excess` alike."""
    flat, kept, cut, dropped, untrained, firsts = _sort(examples, seq_len, where, excess, where_of)
    ids, labels, lengths = _gather(flat, kept, seq_len)
    rows = ExampleRows(ids, labels, None, offsets_of(lengths), seq_len, pad_id, len(flat), cut, dropped, untrained,
                       where, firsts=firsts, excess=excess)
    rows.where_of = where_of
    return rows


def tokenize(texts: list[str], tokenizer) -> list[list[int]]:
    """Token ids of each text followed by EOS (no BOS or other special tokens added)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; packing needs one between examples")
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]  # cut to rows: no length warning
    return [ids + [eos] for ids in encoded]


@dataclass
class TokenDataset:
    """Fixed-length rows ready for a causal LM: `labels` equal `input_ids` except masked padding."""

    input_ids: torch.Tensor  # (rows, seq_len) int64
    labels: torch.Tensor  # (rows, seq_len) int64, IGNORE_INDEX where padded
    attention_mask: torch.Tensor | None  # (rows, seq_len) int64, None when packed (no padding)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_tokens(self) -> int:
        """Tokens that count: all of them when packed, the unpadded ones otherwise."""
        return int(self.input_ids.numel() if self.attention_mask is None else self.attention_mask.sum())

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0,
                drop_last: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """Batches as model keyword arguments; `shuffle` draws one permutation from `seed`."""
        for idx in batch_rows(len(self), batch_size, shuffle, seed, drop_last):
            batch = {"input_ids": self.input_ids[idx], "labels": self.labels[idx]}
            if self.attention_mask is not None:
                batch["attention_mask"] = self.attention_mask[idx]
            yield batch


def pack(sequences: list[list[int]], seq_len: int) -> TokenDataset:
    """Concatenate `sequences` and cut the stream into rows of `seq_len`; the short tail is dropped."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    stream = [t for seq in sequences for t in seq]
    rows = len(stream) // seq_len
    if rows == 0:
        raise ValueError(f"the data has {len(stream)} tokens, fewer than one sequence of {seq_len}; "
                         "lower sequence_len or add examples")
    ids = torch.tensor(stream[:rows * seq_len], dtype=torch.long).view(rows, seq_len)
    return TokenDataset(ids, ids.clone(), None)


def pad(sequences: list[list[int]], seq_len: int, pad_id: int) -> TokenDataset:
    """One row per sequence, truncated or right-padded to `seq_len`; padding is masked from the loss."""
    if not sequences:
        raise ValueError("no examples to pad")
    ids = torch.full((len(sequences), seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), seq_len), dtype=torch.long)
    for i, seq in enumerate(sequences):
        seq = seq[:seq_len]
        ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, :len(seq)] = 1
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return TokenDataset(ids, labels, mask)


def split_path(dataset_dir: "str | os.PathLike | None", split: str) -> Path:
    """`<dataset_dir>/<split>.jsonl` (the bundled sample when `dataset_dir` is None)."""
    base = bundled_dataset_dir() if dataset_dir is None else Path(dataset_dir).expanduser()
    return base / f"{split}.jsonl"


def _nonempty(rows: Rows, split: str) -> Rows:
    if not rows.rows:
        raise DataError(f"{rows.source}: no examples in the {split} split (the file is empty); add rows, "
                        "one JSON object per line for .jsonl")
    return rows


def layout(rows: Rows, fmt: str, tokenizer, seq_len: int, packing: bool = True, train_on_inputs: bool = False,
           chat_template: str | None = None, split: str = "split 'train'",
           log: Callable[[str], None] | None = None, cache: bool = False, excess: str = "truncate") -> ExampleRows:
    """Tokenize rows (read text masked unless `train_on_inputs`) and pack them with their boundaries (or lay
    them out one example per row); `split` names them in the log and in errors, with their file. With `cache`,
    the tokenized examples are kept on disk for the next run (`data_cache`). `excess`: what becomes of an
    example longer than `seq_len` (`pack_examples`)."""
    where = f"{rows.source} ({split})"

    def tokenize(note: Callable[[str], None] | None) -> FlatExamples:
        return tokenize_flat(rows, fmt, tokenizer, train_on_inputs, chat_template, note, progress=log)

    tokenized = (cached_examples(rows, fmt, tokenizer, train_on_inputs, chat_template, tokenize, where, log) if cache
                 else tokenize(log))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # one example a row, in order: the log and errors name an example's row
    return (pack_examples if packing else one_per_row)(tokenized, seq_len, pad_id, where, excess, rows.where)


def build_split(dataset_dir: "str | os.PathLike | None", split: str, fmt: str, tokenizer, seq_len: int,
                packing: bool = True, limit: int | None = None, train_on_inputs: bool = False,
                chat_template: str | None = None) -> ExampleRows:
    """Read one split of a dataset path (a file, a folder of `<split>.<ext>` files, a Hugging Face
    dataset; None: the bundled sample), tokenize it and lay it out (see `layout`)."""
    rows = _nonempty(read_split(bundled_dataset_dir() if dataset_dir is None else dataset_dir, split, limit), split)
    return layout(rows, fmt, tokenizer, seq_len, packing, train_on_inputs, resolve_chat_template(chat_template),
                  f"split {split!r}")


def load_rows(ds, seed: int) -> tuple[Rows, Rows | None]:
    """The train rows and the eval rows (None without evaluation) of a `DatasetConfig`: the eval split, or
    `val_set_size` of train held out with `seed`; `max_*_samples` apply after the hold-out."""
    path = bundled_dataset_dir() if ds.path is None else Path(ds.path).expanduser()
    if path.is_file() and ds.eval_split is not None:
        raise DataError(f"dataset.eval_split: dataset.path {ds.path} is one file (the train split); set "
                        "eval_split: null, or dataset.val_set_size to hold out part of it")
    if ds.val_set_size is None:
        train = _nonempty(read_split(path, ds.train_split, ds.max_train_samples), ds.train_split)
        return train, None if ds.eval_split is None else _nonempty(
            read_split(path, ds.eval_split, ds.max_eval_samples), ds.eval_split)
    if ds.eval_split is not None:
        raise DataError(f"dataset.val_set_size: set together with dataset.eval_split ({ds.eval_split!r}); "
                        "use one: set eval_split: null to hold out part of train")
    train, held = hold_out(_nonempty(read_split(path, ds.train_split), ds.train_split), ds.val_set_size, seed)
    return train.head(ds.max_train_samples), held.head(ds.max_eval_samples)


def renamed(rows: Rows, columns: dict[str, str] | None) -> Rows:
    """`rows` with their fields renamed as `dataset.columns` says (your name -> the format's); the rest kept."""
    if not columns:
        return rows
    return Rows(rows.source, [{columns.get(k, k): v for k, v in row.items()} for row in rows.rows], rows.lines,
                rows.numbers)


def load_splits(cfg, tokenizer, log: Callable[[str], None] | None = None) -> tuple[ExampleRows, ExampleRows | None]:
    """The train split and the eval split (None without one) of a `TrainConfig`'s dataset, laid out as
    `cfg.sample_packing` says: the one entry point `surogate train` reads its data through. `auto` is
    resolved on the train rows, and the eval rows are read in the same format. A mix (`dataset` a list)
    reads each source as its own keys say and trains on them together; the eval split gathers those of the
    sources that have one. `log` gets a warning on a chat template whose markers the tokenizer splits
    (`chatml_marker_note`) or that leaves out the reasoning of the train split's assistant turns."""
    from surogate.training.config import dataset_sources

    train, evaluation, notes = [], [], []
    for ds in dataset_sources(cfg):
        train_rows, eval_rows = load_rows(ds, cfg.seed)
        train_rows, eval_rows = renamed(train_rows, ds.columns), eval_rows and renamed(eval_rows, ds.columns)
        form = resolve_format(train_rows, ds.format)
        note = chatml_marker_note(ds.chat_template, tokenizer) if form.pieces is None else None
        if note and log is not None and note not in notes:
            log(note)
            notes.append(note)
        template = resolve_chat_template(ds.chat_template)
        on_inputs = ds.train_on_inputs
        train.append(layout(train_rows, form.name, tokenizer, cfg.sequence_len, cfg.sample_packing, on_inputs,
                            template, f"train split {ds.train_split!r}", log, ds.cache, cfg.excess_length_strategy))
        if eval_rows is not None:
            evaluation.append(layout(
                eval_rows, form.name, tokenizer, cfg.sequence_len, cfg.sample_packing, on_inputs, template,
                "eval split: val_set_size of train" if ds.eval_split is None else f"eval split {ds.eval_split!r}",
                log, ds.cache, cfg.excess_length_strategy))
    return ExampleRows.concat(train), ExampleRows.concat(evaluation) if evaluation else None
