"""Tokenizers without downloads: a local path, a hub id, or the embedded default.

The embedded default is a byte-level BPE trained with `tokenizers` on the GSM8K sample that
ships in `surogate/data/`. Training takes about a second; the result is cached in the user
cache dir under a key that hashes the training text and the settings, so it is built once per
machine. Training is deterministic (same text, same settings, same `tokenizers` version ->
the same `tokenizer.json`), which the tests check across processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from surogate.cache import cache_dir

DEFAULT_VOCAB_SIZE = 2048
EOS_TOKEN = "<|endoftext|>"
_FORMAT_VERSION = "1"  # bump when the way the default is built changes


def _training_texts() -> list[str]:
    """The bundled GSM8K train sample, formatted exactly as the training data is."""
    from surogate.training.data import bundled_dataset_dir, format_example, read_jsonl

    return [format_example(e, "gsm8k") for e in read_jsonl(bundled_dataset_dir() / "train.jsonl")]


def train_default_tokenizer_json(vocab_size: int = DEFAULT_VOCAB_SIZE, texts: list[str] | None = None) -> str:
    """Train the byte-level BPE and return its `tokenizer.json` text (no caching)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 300:
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE; use at least 300")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknown tokens
        show_progress=False,
    )
    tok.train_from_iterator(texts if texts is not None else _training_texts(), trainer=trainer)
    return tok.to_str()


def _default_cache_key(vocab_size: int, texts: list[str]) -> str:
    import tokenizers

    h = hashlib.sha256()
    h.update(json.dumps([_FORMAT_VERSION, vocab_size, tokenizers.__version__]).encode())
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def default_tokenizer_path(vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
    """The cached `tokenizer.json` of the embedded default, trained on first use (OSError: the cache dir
    cannot be written)."""
    texts = _training_texts()
    path = cache_dir() / "tokenizers" / f"gsm8k-bpe-{vocab_size}-{_default_cache_key(vocab_size, texts)}.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        text = train_default_tokenizer_json(vocab_size, texts)
        # Write then rename, so that two processes building at once never leave a torn file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache may be shared
            os.replace(tmp, path)
        except OSError:  # a full disk: leave no partial file behind
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


def default_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE):
    """The embedded default as a `transformers` fast tokenizer (EOS doubles as padding)."""
    from transformers import PreTrainedTokenizerFast

    try:
        source = {"tokenizer_file": str(default_tokenizer_path(vocab_size))}
    except OSError:  # no writable cache dir (a read-only home): trained in memory, about a second each run
        from tokenizers import Tokenizer

        source = {"tokenizer_object": Tokenizer.from_str(train_default_tokenizer_json(vocab_size))}
    return PreTrainedTokenizerFast(
        **source,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=1 << 20,
    )


def is_default(name: "str | os.PathLike | None") -> bool:
    return name is None or str(name) == "default"


def load_tokenizer(name: "str | os.PathLike | None" = None, trust_remote_code: bool = False):
    """A tokenizer from a local directory, a hub id, or (None / "default") the embedded default.

    A tokenizer without a pad token gets its EOS token as pad, since packing and padding need one.
    `trust_remote_code` is passed explicitly: transformers prompts on a terminal when it is None.
    """
    if is_default(name):
        return default_tokenizer()
    from transformers import AutoTokenizer

    path = Path(str(name)).expanduser()
    if path.exists():
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    else:  # a hub id (may download)
        tok = AutoTokenizer.from_pretrained(str(name), trust_remote_code=trust_remote_code)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {name!s} has no EOS token; surogate needs one to separate packed examples")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def has_tokenizer_files(directory: "str | os.PathLike") -> bool:
    """True when `directory` holds a tokenizer that `AutoTokenizer` can load."""
    d = Path(directory)
    return any((d / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json"))
