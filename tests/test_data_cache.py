"""The tokenized-examples cache (`surogate/training/data_cache.py`): a second run on the same rows and settings
reads the examples back, identical, without tokenizing; any change that alters them (a row, the template,
train_on_inputs, the tokenizer) misses; a broken or unwritable cache only costs the tokenizing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from surogate.training import data, data_cache
from surogate.training.config import from_dict
from surogate.training.data import load_splits
from surogate.training.tokenizer import load_tokenizer

CHATML = "chatml"
TURN = {"role": "assistant", "content": "4", "reasoning_content": "add"}
PLAIN = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SUROGATE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(data_cache, "MIN_ROWS", 4)
    return tmp_path / "cache" / "data"


@pytest.fixture()
def tok():
    return load_tokenizer(None)


def _rows(tmp_path: Path, n: int = 6, name: str = "chat.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{k} + {k}?"}, {**TURN, "content":
                                                      str(2 * k)}]}) + "\n" for k in range(n)))
    return path


def _cfg(path: Path, **dataset):
    return from_dict({"dataset": {"path": str(path), "chat_template": PLAIN, **dataset}, "sequence_len": 64})


def test_a_second_run_reads_the_examples_back_without_tokenizing(tmp_path, cache, tok, monkeypatch):
    lines: list[str] = []
    first, _ = load_splits(_cfg(_rows(tmp_path)), tok, lines.append)
    assert len(list(cache.glob("examples-*.npz"))) == 1
    assert lines[0].startswith("warning: the chat template leaves out the reasoning of 6 of 6")  # PLAIN drops it
    assert lines[1].startswith("data: tokenized 6 examples of ") and "kept for the next run in" in lines[1]

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(data, "tokenize_examples", no_tokenizing)
    again: list[str] = []
    second, _ = load_splits(_cfg(_rows(tmp_path)), tok, again.append)
    assert (second.input_ids, second.labels, second.positions) == (first.input_ids, first.labels, first.positions)
    assert again[0] == lines[0]  # the warning tokenizing gave, given again
    assert again[1].startswith("data: 6 tokenized examples of ") and "read from the cache" in again[1]


@pytest.mark.parametrize("change", ["row", "template", "train_on_inputs", "tokenizer"])
def test_what_changes_the_examples_misses_the_cache(tmp_path, cache, tok, change):
    load_splits(_cfg(_rows(tmp_path)), tok)
    path, dataset = _rows(tmp_path), {}
    if change == "row":
        path.write_text(path.read_text().replace('"0 + 0?"', '"0 + 0 ?"'))
    elif change == "template":
        dataset["chat_template"] = CHATML
    elif change == "train_on_inputs":
        dataset["train_on_inputs"] = True
    else:
        tok.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    lines: list[str] = []
    load_splits(_cfg(path, **dataset), tok, lines.append)
    assert any(line.startswith("data: tokenized 6 examples") for line in lines)
    assert len(list(cache.glob("examples-*.npz"))) == 2


def test_a_slow_tokenizer_s_settings_are_part_of_the_key(tmp_path, cache):
    """A Python (slow) tokenizer has no backend JSON: its settings (here `do_lower_case`) change its tokens as much
    as its vocabulary, so the examples a run kept with the other setting must not be read back."""
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "</s>", "say", "hi", "ok", "?"]) + "\n")
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"prompt": "Say HI?", "completion": " ok"}) + "\n" for _ in range(6)))
    cfg = from_dict({"dataset": {"path": str(path)}, "sequence_len": 64})
    lower, _ = load_splits(cfg, BertTokenizerLegacy(str(vocab), do_lower_case=True, eos_token="</s>"))
    lines: list[str] = []
    cased, _ = load_splits(cfg, BertTokenizerLegacy(str(vocab), do_lower_case=False, eos_token="</s>"), lines.append)
    assert any(line.startswith("data: tokenized 6 examples") for line in lines)
    assert cased.input_ids != lower.input_ids  # [UNK] for 'Say' and 'HI', not 'say' and 'hi'


def test_small_splits_and_cache_false_keep_nothing(tmp_path, cache, tok):
    load_splits(_cfg(_rows(tmp_path, n=3)), tok)  # under MIN_ROWS
    load_splits(_cfg(_rows(tmp_path, name="other.jsonl"), cache=False), tok)
    assert not cache.exists() or not list(cache.iterdir())


def test_a_broken_or_unwritable_cache_only_costs_the_tokenizing(tmp_path, cache, tok, monkeypatch):
    first, _ = load_splits(_cfg(_rows(tmp_path)), tok)
    (kept,) = cache.glob("examples-*.npz")
    kept.write_bytes(b"not a zip file")
    lines: list[str] = []
    again, _ = load_splits(_cfg(_rows(tmp_path)), tok, lines.append)
    assert again.input_ids == first.input_ids and any("data: tokenized 6 examples" in line for line in lines)
    assert data_cache.load(kept) is not None  # written whole again
    monkeypatch.setenv("SUROGATE_CACHE_DIR", str(kept))  # a file where the folder should be: cannot write
    lines.clear()
    assert load_splits(_cfg(_rows(tmp_path)), tok, lines.append)[0].input_ids == first.input_ids
    assert not any("kept for the next run" in line for line in lines)


# --- tokenizing in several processes -------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
def test_many_rows_say_they_are_tokenizing_and_how_far_and_the_cache_keeps_no_progress(tmp_path, cache, tok,
                                                                                        monkeypatch, workers):
    """A large split printed nothing while it tokenized (minutes for 100k chat rows on a few cores): a line as it
    starts and one every PROGRESS_S; they are not the notes the cache keeps and says again on a hit."""
    from surogate.training import data_formats

    monkeypatch.setattr(data_formats, "PARALLEL_MIN_ROWS", 10)
    monkeypatch.setattr(data_formats, "CHUNK_ROWS", 8)
    monkeypatch.setattr(data_formats, "PROGRESS_S", 0.0)
    monkeypatch.setattr(data_formats, "tokenizing_workers", lambda n: workers)
    path = _rows(tmp_path, n=40)
    lines: list[str] = []
    first, _ = load_splits(_cfg(path), tok, lines.append)
    lines = [line for line in lines if not line.startswith("warning: ")]  # PLAIN leaves the reasoning out
    start = f"data: tokenizing 40 rows of {path}" + (" in 2 processes" if workers > 1 else "")
    progress = [line for line in lines if " rows tokenized (" in line]
    assert lines[0] == start and progress and progress[0].startswith(
        "data: 8 of 40 rows tokenized (20%, " if workers == 1 else "data: 5 of 40 rows tokenized (12%, ")  # chunks
    counts = [int(line.split()[1]) for line in progress]
    assert counts == sorted(counts) and counts[-1] < 40  # the last chunk's line is the "tokenized ... kept" one
    again: list[str] = []
    second, _ = load_splits(_cfg(path), tok, again.append)
    assert second.input_ids == first.input_ids
    assert not [line for line in again if "tokenizing" in line or " rows tokenized (" in line]


def test_several_processes_give_the_examples_of_one_in_order(tmp_path, tok, monkeypatch):
    """Many rows are tokenized in forked processes (chunks in row order): the same examples as one process, one
    warning with the counts of all chunks, and a bad row's error is the first one in row order."""
    from surogate.training import data_formats
    from surogate.training.data_files import read_rows
    from surogate.training.data_formats import DataError, tokenize_examples

    rows = read_rows(_rows(tmp_path, n=40))
    lines: list[str] = []
    one = tokenize_examples(rows, "messages", tok, chat_template=PLAIN, log=lines.append)
    monkeypatch.setattr(data_formats, "tokenizing_workers", lambda n: 3)
    forked: list[str] = []
    assert tokenize_examples(rows, "messages", tok, chat_template=PLAIN, log=forked.append) == one
    assert forked == lines and "reasoning of 40 of 40 assistant turns" in lines[0]
    bad = tmp_path / "bad.jsonl"
    text = _rows(tmp_path, n=40).read_text().splitlines()
    text[25] = text[33] = json.dumps({"messages": [{"role": "narrator", "content": "x"}]})
    bad.write_text("\n".join(text) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:26: messages\[0\] must be an object with a role"):
        tokenize_examples(read_rows(bad), "messages", tok, chat_template=PLAIN)
    assert data_formats._JOB is None  # nothing left behind for the next call


def test_ctrl_c_stops_the_tokenizing_workers_where_they_are(tmp_path, tok, monkeypatch):
    """Ctrl-C while rows are tokenized in processes kills the workers at once: before, each went on with the chunks
    already handed to it (~30 s on 60,000 chat rows, 2 CPUs) before the run stopped."""
    import multiprocessing
    import signal
    import time

    from surogate.training import data_formats
    from surogate.training.data_files import read_rows

    finished = tmp_path / "finished"
    finished.mkdir()

    def slow_chunk(job, lo: int, hi: int):
        time.sleep(2)
        (finished / str(lo)).touch()  # a chunk that ran to its end

    def ctrl_c(signum, frame):
        raise KeyboardInterrupt

    monkeypatch.setattr(data_formats, "_tokenize_rows", slow_chunk)
    monkeypatch.setattr(data_formats, "tokenizing_workers", lambda n: 2)
    rows = read_rows(_rows(tmp_path, n=40))
    previous = signal.signal(signal.SIGALRM, ctrl_c)
    signal.setitimer(signal.ITIMER_REAL, 0.5)  # Ctrl-C comes while both workers are in their first chunk
    try:
        with pytest.raises(KeyboardInterrupt):
            data_formats.tokenize_examples(rows, "messages", tok, chat_template=PLAIN)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert not multiprocessing.active_children()
    time.sleep(2.5)  # a worker left running would finish its chunk by now
    assert not list(finished.iterdir()) and data_formats._JOB is None


def test_workers_share_the_cpus_with_the_other_ranks(monkeypatch):
    from surogate.training import data_formats

    monkeypatch.setattr(data_formats.os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert data_formats.tokenizing_workers(3999) == 1  # below PARALLEL_MIN_ROWS
    assert data_formats.tokenizing_workers(6000) == 3  # one per 2,000 rows
    assert data_formats.tokenizing_workers(10**6) == data_formats.MAX_WORKERS
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert data_formats.tokenizing_workers(10**6) == 4  # 32 CPUs among 8 ranks
