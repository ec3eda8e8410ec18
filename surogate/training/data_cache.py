"""Tokenized examples kept on disk between runs.

Tokenizing a chat dataset renders each conversation through its template a few times per assistant turn
(`chat_template.chat_pieces`): minutes for a few hundred thousand conversations, on every run and on every
rank. The examples of one split are kept under `cache_dir()/data`, keyed by all they depend on: the rows
themselves (not the file's name or date), the format, the chat template, `train_on_inputs`, the tokenizer,
the versions of the packages that render and tokenize, and surogate's own sources (`cache.source_tag`). A
split of fewer than `MIN_ROWS` rows is not kept: it tokenizes in about a second. A file that cannot be read
or written is skipped: the examples are tokenized as if there were no cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from surogate.cache import cache_dir, source_tag
from surogate.training.data_files import Rows
from surogate.training.data_formats import IGNORE_INDEX, FlatExamples

MIN_ROWS = 1000  # smaller splits tokenize in about a second: not worth a file


def examples_key(rows: Rows, fmt: str, tokenizer, train_on_inputs: bool, chat_template: str | None) -> str:
    """A digest of everything the tokenized examples of `rows` depend on."""
    digest = hashlib.sha256()
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    specials = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    versions = [_version(name) for name in ("transformers", "tokenizers", "jinja2")]  # they render and tokenize
    digest.update(json.dumps([source_tag(), versions, fmt, train_on_inputs, template, specials]).encode())
    digest.update(_tokenizer_fingerprint(tokenizer))
    pickle.Pickler(_Hashing(digest), protocol=5).dump(rows.rows)  # the bytes of pickle.dumps, never all held
    return digest.hexdigest()[:32]


class _Hashing:
    """A file that hashes what is written to it: the rows' pickle goes to the digest as it is made, not first
    into one bytes object as large as the data set (hundreds of MB)."""

    def __init__(self, digest):
        self.write = digest.update


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


_WHERE_KEYS = ("name_or_path", "is_local", "local_files_only", "cache_dir", "_commit_hash")  # where, not what


def _tokenizer_fingerprint(tokenizer) -> bytes:
    """The tokenizer's whole definition (vocabulary, merges, normalizer, post-processor) as bytes. A Python
    (slow) tokenizer has no `backend_tokenizer`: its class and settings (`do_lower_case`, `strip_accents`, ...)
    shape its tokens as much as its vocabulary does, so they are in the digest too, less the keys that say
    where it was loaded from."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.to_str().encode()
    settings = {k: v for k, v in getattr(tokenizer, "init_kwargs", {}).items()
                if k not in _WHERE_KEYS and not k.endswith("_file")}
    return json.dumps([type(tokenizer).__qualname__, sorted(tokenizer.get_vocab().items()), settings],
                      sort_keys=True, default=repr).encode()


def cache_path(key: str) -> Path:
    return cache_dir() / "data" / f"examples-{key}.npz"


def save(path: Path, examples: FlatExamples, notes: list[str]) -> bool:
    """Write `examples` (and the log lines tokenizing them gave) to `path` atomically; False when it cannot."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, ids=examples.ids, trained=examples.labels != IGNORE_INDEX, offsets=examples.offsets,
                     notes=np.array(json.dumps(notes)))
        os.replace(tmp, path)  # another rank writing the same file at once leaves one whole copy
        return True
    except OSError:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        return False


def load(path: Path) -> tuple[FlatExamples, list[str]] | None:
    """The examples and log lines kept in `path`; None when it is missing or unreadable."""
    try:
        with np.load(path) as data:
            ids, trained, offsets = data["ids"], data["trained"], data["offsets"]
            notes = json.loads(str(data["notes"]))
    except (OSError, ValueError, KeyError, EOFError):
        return None
    return FlatExamples(ids, np.where(trained, ids, np.int32(IGNORE_INDEX)), offsets), notes


def cached_examples(rows: Rows, fmt: str, tokenizer, train_on_inputs: bool, chat_template: str | None,
                    tokenize: Callable[[Callable[[str], None]], FlatExamples], what: str,
                    log: Callable[[str], None] | None = None) -> FlatExamples:
    """`tokenize(note)` of `rows`, or the examples a run before kept for the same rows and settings. The log
    lines tokenizing gives (`note`) are kept with them and given to `log` again on a hit; `what` names the
    split and file in the line saying where the examples came from."""
    say = log or (lambda line: None)
    if len(rows) < MIN_ROWS:
        return tokenize(say)
    path = cache_path(examples_key(rows, fmt, tokenizer, train_on_inputs, chat_template))
    kept = load(path) if path.is_file() else None
    if kept is not None:
        examples, notes = kept
        for line in notes:
            say(line)
        say(f"data: {len(examples):,} tokenized examples of {what} read from the cache ({path})")
        return examples
    notes: list[str] = []
    start = time.perf_counter()
    examples = tokenize(lambda line: (notes.append(line), say(line)))
    seconds = time.perf_counter() - start
    if save(path, examples, notes):
        say(f"data: tokenized {len(examples):,} examples of {what} in {seconds:.1f} s; kept for the next run "
            f"in {path}")
    return examples
