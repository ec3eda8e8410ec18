"""Training data: JSONL examples -> token sequences of a fixed length, packed or padded.

Fixed-length batches keep every step the same shape, so a compiled graph is captured once and
tokens/s is comparable between steps. Packing concatenates the examples (each followed by EOS)
and cuts the stream into `seq_len` rows, as Hugging Face's `run_clm` does: no padding is
wasted, and attention runs across example boundaries (EOS marks them). Without packing each
example is truncated or padded to `seq_len` and the padding is masked out of the loss.

The package directory `surogate/data/` (no `__init__.py`) holds the bundled GSM8K sample, the
default config and the embedded model config; this module is what `import surogate.data` gets.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

FORMATS = ("gsm8k", "text")
IGNORE_INDEX = -100  # label value Hugging Face losses skip


def package_data_dir() -> Path:
    """`surogate/data/`: the bundled files."""
    return Path(__file__).resolve().parent / "data"


def bundled_dataset_dir() -> Path:
    """The bundled GSM8K sample (800 train, 200 test examples; MIT license, see its LICENSE)."""
    return package_data_dir() / "gsm8k"


def read_jsonl(path: "str | os.PathLike", limit: int | None = None) -> list[dict]:
    """The first `limit` (all when None) JSON objects of a JSON-lines file; blank lines skipped."""
    rows: list[dict] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}); expected one object per line") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def format_example(example: dict, fmt: str) -> str:
    """One training text. gsm8k: "Question: ...\\nAnswer: ..." (answer kept whole, "#### N" included)."""
    if fmt == "gsm8k":
        missing = [k for k in ("question", "answer") if k not in example]
        if missing:
            raise ValueError(f"gsm8k example lacks {missing}; it needs 'question' and 'answer' (or use format: text)")
        return f"Question: {example['question'].strip()}\nAnswer: {example['answer'].strip()}"
    if fmt == "text":
        if "text" not in example:
            raise ValueError("text-format example lacks the 'text' field")
        return str(example["text"])
    raise ValueError(f"unknown dataset format {fmt!r}; use one of {', '.join(FORMATS)}")


def tokenize(texts: list[str], tokenizer) -> list[list[int]]:
    """Token ids of each text followed by EOS (no BOS or other special tokens added)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; packing needs one between examples")
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
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
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(self)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            idx = order[start:start + batch_size]
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


def build_split(dataset_dir: "str | os.PathLike | None", split: str, fmt: str, tokenizer, seq_len: int,
                packing: bool = True, limit: int | None = None) -> TokenDataset:
    """Read, format, tokenize and pack (or pad) one split."""
    examples = read_jsonl(split_path(dataset_dir, split), limit)
    if not examples:
        raise ValueError(f"split {split!r} of {dataset_dir or 'the bundled sample'} has no examples")
    seqs = tokenize([format_example(e, fmt) for e in examples], tokenizer)
    return pack(seqs, seq_len) if packing else pad(seqs, seq_len, tokenizer.pad_token_id)
