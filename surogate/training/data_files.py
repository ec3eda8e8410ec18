"""Where training rows come from: a `.jsonl`/`.json`/`.parquet`/`.csv`/`.tsv` file, a folder of `<split>.<ext>`
files, or a Hugging Face `datasets` dataset; and the seeded hold-out of part of train (`val_set_size`).

Every row keeps where it came from (`file:line` for JSON lines, JSON arrays and CSV, `file row N` otherwise),
so that a bad row is reported where the user can find it. A user-fixable problem raises `DataError`, a
`ConfigError`: `surogate train` prints it as one line and exits with status 2. The optional readers
(`pyarrow` for Parquet, `datasets` for Hugging Face datasets) are imported only when a path needs them, and
their absence is one line saying what to install.
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from surogate.training.config import HUB_ID, ConfigError

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv")
HF_DISK_MARKERS = ("dataset_dict.json", "state.json")  # written by Dataset(Dict).save_to_disk
_INSTALL = {"pyarrow": "pip install pyarrow", "datasets": "pip install datasets"}


class DataError(ConfigError):
    """The data cannot be read as configured: an empty file, a row without its field, a missing reader."""


def require(module: str, why: str):
    """Import an optional reader, or fail with one line saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise DataError(f"{why} needs the `{package}` package: {_INSTALL[package]} "
                        "(or pip install 'surogate[data]')") from None


@dataclass
class Rows:
    """Rows of one split and where each came from: `lines`, the 1-based line in `source` (text files); else
    `numbers`, the 1-based row in `source` (None: the rows in order, as read), kept through a hold-out's `take`."""

    source: str
    rows: list[dict]
    lines: list[int] | None = None
    numbers: list[int] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def where(self, i: int) -> str:
        if self.lines is not None:
            return f"{self.source}:{self.lines[i]}"
        return f"{self.source} row {i + 1 if self.numbers is None else self.numbers[i]}"

    def take(self, index: list[int]) -> "Rows":
        if self.lines is not None:
            return Rows(self.source, [self.rows[i] for i in index], [self.lines[i] for i in index])
        numbers = self.numbers or range(1, len(self.rows) + 1)
        return Rows(self.source, [self.rows[i] for i in index], None, [numbers[i] for i in index])

    def head(self, limit: int | None) -> "Rows":
        return self if limit is None or limit >= len(self) else self.take(list(range(limit)))


# --- readers -----------------------------------------------------------------------------------------

def _object(path, lineno: int, row) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object ({{...}}), got {_json_kind(row)}")
    return row


def _json_kind(value) -> str:
    """What a JSON value that is no object is, in JSON's words (not Python's NoneType), with the fix where it is
    plain: an array of objects on one line is several rows."""
    if value is None:
        return "null; drop the line"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        rows = value and all(isinstance(v, dict) for v in value)
        return "an array" + ("; write each of its objects on a line of its own" if rows else "")
    return "a string" if isinstance(value, str) else "a number"


def _not_utf8(path, lineno: int, e: UnicodeDecodeError) -> DataError:
    return DataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); save the file as UTF-8")


def _text(path: "str | os.PathLike") -> str:
    """The whole file as text (UTF-8, a byte-order mark allowed); a non-UTF-8 byte is a DataError at its line."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, data.count(b"\n", 0, e.start) + 1, e) from None


def _json_error(e: json.JSONDecodeError) -> str:
    """json's message with its column: some end on "at" ("Invalid control character at"), the position
    being kept apart in the exception, so alone they read cut off."""
    return f"{e.msg}{'' if e.msg.endswith(' at') else ' at'} column {e.colno}"


def read_jsonl_rows(path: "str | os.PathLike", limit: int | None = None) -> Rows:
    """The first `limit` (all when None) JSON objects of a JSON-lines file, with their line numbers."""
    rows, lines = [], []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if limit is not None and len(rows) >= limit:
                break
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, lineno, e) from None
            if not line.strip():
                continue
            try:  # without its line break: an error at the line's end is at its column, not at column 1 of the next
                row = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({_json_error(e)}); expected one object per line") from None
            rows.append(_object(path, lineno, row))
            lines.append(lineno)
    return Rows(str(path), rows, lines)


def read_json_rows(path: "str | os.PathLike", limit: int | None = None) -> Rows:
    """A `.json` file: one array of objects (each with the line it starts on), or JSON lines."""
    text = _text(path)
    start = len(text) - len(text.lstrip())
    if not text[start:start + 1] == "[":
        try:
            return read_jsonl_rows(path, limit)
        except DataError:
            _one_object(path, text)  # a whole-file object ({"data": [rows]}), valid JSON: said so, not "not valid"
            raise
    decoder = json.JSONDecoder()
    rows, lines = [], []

    def skip_space(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def bad(i: int, what: str) -> DataError:
        return DataError(f"{path}:{text.count(chr(10), 0, i) + 1}: not valid JSON ({what}); expected one array of "
                         "objects")

    i = skip_space(start + 1)
    lineno, counted = 1, 0  # the line of position `counted`, advanced row by row (not recounted from 0)
    if text[i:i + 1] != "]":
        while limit is None or len(rows) < limit:
            lineno, counted = lineno + text.count("\n", counted, i), i
            try:
                row, i = decoder.raw_decode(text, i)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: not valid JSON ({_json_error(e)}); expected an array of objects") from None
            rows.append(_object(path, lineno, row))
            lines.append(lineno)
            i = skip_space(i)
            if text[i:i + 1] == "]":
                break
            if text[i:i + 1] != ",":
                raise bad(i, "expected ',' or ']' after an element" if i < len(text) else "the array is not closed")
            i = skip_space(i + 1)
        else:
            return Rows(str(path), rows, lines)
    end = skip_space(i + 1)
    if end < len(text):
        raise bad(end, "more data after the array")
    return Rows(str(path), rows, lines)


def _one_object(path, text: str) -> None:
    """Raise a DataError when `text` is one JSON object spread over several lines (rows held under a key, as
    {"data": [...]}, which `datasets` reads with field=): neither an array of rows nor JSON lines."""
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        return
    if isinstance(whole, dict):
        lists = [k for k, v in whole.items() if isinstance(v, list)]
        fix = (f"its rows look to be under {lists[0]!r}: write that list alone (jq '.{lists[0]}' {path} > rows.json)"
               if lists else "write the rows as an array of objects or one object a line")
        raise DataError(f"{path}: one JSON object (keys {', '.join(map(repr, list(whole)[:5]))}), not an array of rows "
                        f"nor one object a line; {fix}")


def read_parquet_rows(path: "str | os.PathLike", limit: int | None = None) -> Rows:
    """A Parquet file's rows as dicts (needs `pyarrow`)."""
    pq = require("pyarrow.parquet", f"reading {path}")
    table = pq.read_table(str(path))
    if limit is not None:
        table = table.slice(0, limit)
    return Rows(str(path), table.to_pylist())


def read_csv_rows(path: "str | os.PathLike", limit: int | None = None) -> Rows:
    """A `.csv` (`.tsv`: tab-separated) file with a header row: each record as a dict of its cells (strings; an
    empty cell is ""), with the line it starts on (a quoted cell may span lines). A record with more cells than
    the header has names is an error at its line; one with fewer has None in the rest (a missing field). Read
    strictly: a quoted cell left open swallowed the records after it into its text, silently (one row fewer)."""
    separator = "\t" if Path(path).suffix == ".tsv" else ","
    reader = csv.DictReader(io.StringIO(_text(path), newline=""), delimiter=separator, strict=True)
    rows, lines = [], []
    start = 1
    try:
        if reader.fieldnames is None:
            return Rows(str(path), [], [])
        while limit is None or len(rows) < limit:
            start = reader.line_num + 1
            row = next(reader, None)
            if row is None:
                break
            if None in row:
                raise DataError(f"{path}:{start}: {len(row[None]) + len(reader.fieldnames)} cells under a header of "
                                f"{len(reader.fieldnames)} ({', '.join(reader.fieldnames)}); quote cells that hold "
                                "the separator")
            rows.append(row)
            lines.append(start)
    except csv.Error as e:
        raise DataError(f"{path}:{start}: not valid CSV ({e}); a quoted cell must end with a quote followed by the "
                        'separator or the line\'s end; write a quote inside it as ""') from None
    return Rows(str(path), rows, lines)


_READERS = {".jsonl": read_jsonl_rows, ".json": read_json_rows, ".parquet": read_parquet_rows,
            ".csv": read_csv_rows, ".tsv": read_csv_rows}


def read_rows(path: "str | os.PathLike", limit: int | None = None) -> Rows:
    """The rows of one data file, by its suffix."""
    p = Path(path)
    if p.suffix not in _READERS:
        raise DataError(f"{p}: not a data file surogate reads; use {', '.join(FILE_SUFFIXES)}")
    return _READERS[p.suffix](p, limit)


# --- what a dataset.path is ---------------------------------------------------------------------------

def package_data_dir() -> Path:
    """`surogate/data/`: the bundled files (the package's, one floor above this module)."""
    return Path(__file__).resolve().parents[1] / "data"


def bundled_dataset_dir() -> Path:
    """The bundled GSM8K sample (800 train, 200 test examples; MIT license, see its LICENSE)."""
    return package_data_dir() / "gsm8k"


def split_file(folder: "str | os.PathLike", split: str) -> Path | None:
    """`<folder>/<split>.jsonl` (or .json, .parquet), the first that exists; None when none does."""
    return next((Path(folder) / f"{split}{s}" for s in FILE_SUFFIXES if (Path(folder) / f"{split}{s}").is_file()),
                None)


def is_hf_disk_dataset(folder: Path) -> bool:
    """A folder written by `datasets`' `save_to_disk` (read with `load_from_disk`)."""
    return any((folder / m).is_file() for m in HF_DISK_MARKERS)


def hf_disk_splits(folder: Path) -> list[str] | None:
    """The split names of a saved DatasetDict (None: a single saved Dataset, which is the train split)."""
    info = folder / "dataset_dict.json"
    return list(json.loads(info.read_text(encoding="utf-8")).get("splits", [])) if info.is_file() else None


# File suffixes that make a path a file name, not a hub id (the readable ones and others a user may try).
_FILE_LIKE = (*FILE_SUFFIXES, ".csv", ".tsv", ".txt", ".arrow", ".gz", ".zip", ".xlsx", ".yaml", ".yml")


def looks_like_hub_id(path: str) -> bool:
    """`name` or `owner/name`, not a relative path nor a file name (a missing `data/train.csv` is then said
    to be missing at once, not looked up on the hub)."""
    return (bool(HUB_ID.match(path)) and not path.startswith((".", "/", "~"))
            and Path(path).suffix.lower() not in _FILE_LIKE)


def has_module(name: str) -> bool:
    """Whether an optional reader imports (without saying anything when it does not)."""
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


# --- Hugging Face datasets ----------------------------------------------------------------------------

def _hf_call(what: str, fn, *args):
    """`fn(*args)`, its failure (no network, no such dataset, files it cannot read) as one line."""
    try:
        return fn(*args)
    except Exception as e:  # datasets raises its own types too (DatasetNotFoundError, ...)
        if not isinstance(e, (OSError, ValueError, KeyError, ConnectionError)) and not type(e).__module__.startswith(
                ("datasets", "huggingface_hub", "fsspec", "pyarrow")):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"dataset.path: {what} failed: {type(e).__name__}: {first}") from None


def read_hf_split(path: str, split: str, limit: int | None = None) -> Rows:
    """One split of a Hugging Face dataset: a `save_to_disk` folder (`load_from_disk`), or anything
    `load_dataset` reads (a local data folder, or a hub id where there is a network)."""
    datasets = require("datasets", f"dataset.path {path!r} (a Hugging Face dataset)")
    local = Path(path).expanduser()
    if local.is_dir() and is_hf_disk_dataset(local):
        what = f"load_from_disk({path!r})"
        loaded = _hf_call(what, datasets.load_from_disk, str(local))
    else:
        what = f"load_dataset({path!r})"
        loaded = _hf_call(what, datasets.load_dataset, str(local) if local.exists() else path)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{what} has no split {split!r}; its splits: {', '.join(loaded)} "
                            "(set dataset.train_split / dataset.eval_split)")
        loaded = loaded[split]
    elif split != "train":
        raise DataError(f"{what} is a single dataset (used as the train split); it has no split {split!r}: "
                        "set dataset.eval_split: null, or dataset.val_set_size to hold out part of it")
    if limit is not None:
        loaded = loaded.select(range(min(limit, len(loaded))))
    return Rows(f"{path}[{split}]", loaded.to_list())


def read_split(path: "str | os.PathLike", split: str, limit: int | None = None) -> Rows:
    """The rows of `split` of `path`: a file (its only split), a folder of `<split>.<ext>` files, or a
    Hugging Face dataset."""
    p = Path(path).expanduser()
    if p.is_file():
        return read_rows(p, limit)
    if p.is_dir():
        f = split_file(p, split)
        if f is not None:
            return read_rows(f, limit)
    return read_hf_split(str(path), split, limit)


def hold_out(rows: Rows, size: float | int, seed: int) -> tuple[Rows, Rows]:
    """(train, eval): `size` rows (an int) or that fraction of them (a float in (0, 1), rounded up, as
    `datasets`' `train_test_split`) drawn with `seed`; each part keeps the file order."""
    import torch

    n = len(rows)
    n_eval = math.ceil(size * n) if isinstance(size, float) else size
    if not 0 < n_eval < n:
        held = f"{n_eval} rows held out" if n_eval else "no row held out"
        raise DataError(f"dataset.val_set_size: {size} of {n} rows: {held}, {max(n - n_eval, 0)} left to train on; "
                        f"both need at least one: set val_set_size between 1 and {n - 1} (or a fraction)"
                        if n > 1 else f"dataset.val_set_size: {size} of {n} row: one row cannot be split into a train "
                        "and an eval part; add rows or set val_set_size: null")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return rows.take(sorted(order[n_eval:])), rows.take(sorted(order[:n_eval]))


# --- config checks (before the model loads) -----------------------------------------------------------

# The eval split's other common names, taken in this order when `eval_split` is left at its default ("test")
# and the dataset has no test split: a folder of train/validation files evaluates on validation, as a user means.
EVAL_SPLIT_ALIASES = ("validation", "val")


def _default_eval_split(eval_split: str | None, eval_given: bool, has: Callable[[str], bool]) -> str | None:
    """`eval_split`, or for the default "test" that the dataset lacks, the first alias it has."""
    if eval_given or eval_split != "test" or has("test"):
        return eval_split
    return next((s for s in EVAL_SPLIT_ALIASES if has(s)), eval_split)


_DECOMPRESS = {".gz": "gunzip -k", ".bz2": "bunzip2 -k", ".xz": "xz -dk", ".zst": "unzstd", ".zip": "unzip"}


def check_path(path: str | None, train_split: str, eval_split: str | None, eval_given: bool,
               source_key: str = "dataset") -> str | None:
    """Check `dataset.path` and its splits as far as can be known without reading the data; returns the
    eval split (None for a single file, which is the train split alone). Raises ConfigError naming the key
    (under `source_key`: `dataset`, or `dataset[1]` in a mix)."""
    p = bundled_dataset_dir() if path is None else Path(path).expanduser()
    if p.is_file():
        if p.suffix in _DECOMPRESS and Path(p.stem).suffix in FILE_SUFFIXES:  # data.jsonl.gz: say what to do
            tool = _DECOMPRESS[p.suffix]
            raise ConfigError(f"{source_key}.path: {path!r} is compressed; decompress it ({tool} {path}) and point "
                              f"{source_key}.path at the {Path(p.stem).suffix} file")
        if p.suffix not in FILE_SUFFIXES:
            raise ConfigError(f"{source_key}.path: {path!r} is not a {', '.join(FILE_SUFFIXES)} file")
        if train_split != "train" or (eval_given and eval_split is not None):
            name = f"{source_key}.train_split" if train_split != "train" else f"{source_key}.eval_split"
            raise ConfigError(f"{name}: {source_key}.path is one file (the train split), it has no splits; drop the "
                              f"key, set {source_key}.val_set_size to hold out part of it, or point path at a folder")
        eval_split = None
        files = [p]
    elif p.is_dir() and is_hf_disk_dataset(p):
        if not has_module("datasets"):
            raise ConfigError(f"{source_key}.path: {path!r} is a Hugging Face dataset (save_to_disk); reading it needs "
                              "the `datasets` package: pip install datasets (or pip install 'surogate[data]')")
        splits = hf_disk_splits(p)
        if splits is None:  # one saved Dataset: the train split alone, as a single file
            splits, eval_split = ["train"], eval_split if eval_given else None
        eval_split = _default_eval_split(eval_split, eval_given, splits.__contains__)
        for name, split in ((f"{source_key}.train_split", train_split), (f"{source_key}.eval_split", eval_split)):
            if split is not None and split not in splits:
                raise ConfigError(f"{name}: {path!r} has no split {split!r}; its splits: {', '.join(splits)}")
        files = []
    elif p.is_dir():
        eval_split = _default_eval_split(eval_split, eval_given, lambda s: split_file(p, s) is not None)
        files = [split_file(p, s) for s in (train_split, eval_split) if s is not None]
        found = sorted({f.stem for f in p.iterdir() if f.is_file() and f.suffix in FILE_SUFFIXES})
        layout = any(split_file(p, s) for s in ("train", "test", *EVAL_SPLIT_ALIASES))  # <split>.<ext> files
        if files[0] is None and has_module("datasets") and not layout:
            files = []  # not <split>.<ext> files: datasets' load_dataset reads the folder
        names = (f"{source_key}.train_split", f"{source_key}.eval_split")
        for name, split, f in zip(names, (train_split, eval_split), files):
            if f is None:
                aliases = "" if eval_given or name.endswith("train_split") else \
                    f", nor a {' or '.join(EVAL_SPLIT_ALIASES)} split"
                raise ConfigError(f"{name}: {p / (split + '.jsonl')} does not exist (nor {split}.json, "
                                  f"{split}.parquet, {split}.csv, {split}.tsv{aliases})"
                                  + (f"; the folder's splits: {', '.join(found)}" if found else "")
                                  + (f"; set eval_split: null, or {source_key}.val_set_size to hold out part of train"
                                     if name.endswith("eval_split") else ""))
    elif looks_like_hub_id(path):
        if not has_module("datasets"):
            raise ConfigError(f"{source_key}.path: {path!r} is not a file or folder here; as a Hugging Face hub "
                              "dataset it needs the `datasets` package: pip install datasets (or pip install "
                              "'surogate[data]')")
        files = []
    else:
        where = "" if Path(path).expanduser().is_absolute() else f" in the current directory ({Path.cwd()})"
        raise ConfigError(f"{source_key}.path: {path!r} does not exist{where}; give a {'/'.join(FILE_SUFFIXES)} "
                          "file, a folder of <split>.jsonl files, or a Hugging Face dataset (omit it for the bundled "
                          "GSM8K sample)")
    if any(f.suffix == ".parquet" for f in files) and not has_module("pyarrow"):
        raise ConfigError(f"{source_key}.path: reading {[f for f in files if f.suffix == '.parquet'][0]} needs the "
                          "`pyarrow` package: pip install pyarrow (or pip install 'surogate[data]')")
    return eval_split
