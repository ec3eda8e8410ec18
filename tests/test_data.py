"""Data: GSM8K formatting, packing into fixed-length rows, padding masks; the local tokenizer."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from surogate.training import data
from surogate.training.data import (IGNORE_INDEX, DataError, Example, build_split, format_example, pack, pack_examples,
                                    pad, read_jsonl, split_path, tokenize_examples)
from surogate.training.tokenizer import DEFAULT_VOCAB_SIZE, EOS_TOKEN, default_tokenizer_path, load_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    import os

    old = os.environ.get("SUROGATE_CACHE_DIR")
    os.environ["SUROGATE_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    try:
        yield load_tokenizer(None)
    finally:
        if old is None:
            os.environ.pop("SUROGATE_CACHE_DIR")
        else:
            os.environ["SUROGATE_CACHE_DIR"] = old


def test_bundled_sample_and_license_ship():
    d = data.bundled_dataset_dir()
    assert len(read_jsonl(d / "train.jsonl")) == 800
    assert len(read_jsonl(d / "test.jsonl")) == 200
    assert "MIT License" in (d / "LICENSE").read_text()


def test_import_gets_the_module_not_the_data_directory():
    assert Path(data.__file__).name == "data.py"


def test_format_gsm8k():
    text = format_example({"question": " Q? ", "answer": "A\n#### 4"}, "gsm8k")
    assert text == "Question: Q?\nAnswer: A\n#### 4"
    with pytest.raises(ValueError, match=r"row has no 'question' \(format gsm8k needs question, answer\).*"
                                         "look like format text"):
        format_example({"text": "x"}, "gsm8k")
    with pytest.raises(ValueError, match="no single prompt and completion"):
        format_example({"messages": []}, "messages")


def test_read_jsonl_reports_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n\n{oops\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3"):
        read_jsonl(p)
    assert len(read_jsonl(p, limit=1)) == 1


def test_pack_is_the_concatenated_stream_cut_into_rows():
    seqs = [[1, 2, 3, 0], [4, 5, 0], [6, 7, 8, 9, 0]]  # 12 tokens
    ds = pack(seqs, 5)
    assert ds.input_ids.tolist() == [[1, 2, 3, 0, 4], [5, 0, 6, 7, 8]]  # tail of 2 dropped
    assert torch.equal(ds.labels, ds.input_ids) and ds.attention_mask is None
    assert ds.num_tokens == 10 and ds.seq_len == 5
    with pytest.raises(ValueError, match="fewer than one sequence"):
        pack([[1, 2]], 5)


def test_pad_masks_padding_from_loss():
    ds = pad([[1, 2, 3], [4, 5, 6, 7, 8, 9]], 4, pad_id=0)
    assert ds.input_ids.tolist() == [[1, 2, 3, 0], [4, 5, 6, 7]]
    assert ds.attention_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert ds.labels.tolist() == [[1, 2, 3, IGNORE_INDEX], [4, 5, 6, 7]]
    assert ds.num_tokens == 7


def test_batches_shuffle_is_seeded_and_covers_every_row():
    ds = pack([list(range(100))], 4)  # 25 rows
    a = [b["input_ids"] for b in ds.batches(4, shuffle=True, seed=3)]
    b = [b["input_ids"] for b in ds.batches(4, shuffle=True, seed=3)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    rows = torch.cat(a)
    assert sorted(rows[:, 0].tolist()) == list(range(0, 100, 4))
    assert len(list(ds.batches(4, drop_last=True))) == 6


def test_tokenizer_round_trips_text_and_has_eos(tok):
    assert len(tok) == DEFAULT_VOCAB_SIZE
    assert tok.eos_token == EOS_TOKEN and tok.pad_token_id == tok.eos_token_id
    text = "Question: Natalia sold 48/2 = <<48/2=24>>24 clips. Ünïcödé ✓\n#### 72"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # byte-level: nothing is unknown
    assert len(ids) < len(text.encode())  # merges were learned


def test_tokenizer_is_deterministic_across_processes(tmp_path):
    """Two fresh processes with empty caches train byte-identical tokenizers."""
    code = ("import sys; sys.path.insert(0, %r); from surogate.training.tokenizer import train_default_tokenizer_json as t;"
            "import hashlib; print(hashlib.sha256(t().encode()).hexdigest())" % str(Path(__file__).parents[1]))
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
               for _ in range(2)}
    assert len(digests) == 1


def test_tokenizer_cache_is_reused(tok, tmp_path):
    path = default_tokenizer_path()
    assert path.is_file()
    mtime = path.stat().st_mtime_ns
    assert default_tokenizer_path() == path and path.stat().st_mtime_ns == mtime
    assert json.loads(path.read_text())["model"]["type"] == "BPE"


def test_local_tokenizer_path(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    local = load_tokenizer(tmp_path)
    text = "Answer: 3 + 4 = 7"
    assert local(text)["input_ids"] == tok(text)["input_ids"]


def test_build_split_packs_whole_gsm8k_examples_with_the_prompt_masked(tok):
    ds = build_split(None, "test", "gsm8k", tok, 256, packing=True, limit=20)
    assert ds.packed and all(len(r) <= 256 for r in ds.input_ids)
    assert sum(pos.count(0) for pos in ds.positions) == 20  # every example starts at position 0, none is cut
    examples = read_jsonl(split_path(None, "test"), 20)
    first = tokenize_examples(examples[:1], "gsm8k", tok)[0]
    prompt = tok(f"Question: {examples[0]['question'].strip()}\nAnswer:", add_special_tokens=False)["input_ids"]
    assert first.labels[:len(prompt)] == [IGNORE_INDEX] * len(prompt)  # the question is not a target
    assert first.labels[len(prompt):] == first.input_ids[len(prompt):] and first.input_ids[-1] == tok.eos_token_id
    batch = next(ds.batches(2))
    assert batch["input_ids"].shape == (2, 256) and "attention_mask" not in batch
    assert batch.num_tokens == len(ds.input_ids[0]) + len(ds.input_ids[1])
    padded = build_split(None, "test", "gsm8k", tok, 256, packing=False, limit=20)
    batch = next(padded.batches(4))
    assert len(padded) == 20 and batch["input_ids"].shape[1] == max(len(r) for r in padded.input_ids[:4])
    assert int(batch["attention_mask"].sum()) == batch.num_tokens


def test_pack_examples_keeps_boundaries_first_fit():
    ex = [Example([1, 2, 3], [IGNORE_INDEX, 2, 3]), Example([4, 5], [4, 5]), Example(list(range(10, 17)), list(range(10, 17))),
          Example(list(range(20, 31)), list(range(20, 31)))]
    rows = pack_examples(ex, 8)
    assert rows.input_ids == [[1, 2, 3, 4, 5], list(range(10, 17)), list(range(20, 28))]  # [4, 5] fills row 0
    assert rows.positions == [[0, 1, 2, 0, 1], list(range(7)), list(range(8))]  # the long one is truncated
    assert rows.labels[0] == [IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5]  # no target across the boundary
    batch = rows.batch([0])
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]  # the padding is a segment of its own
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5] + [IGNORE_INDEX] * 3]
    with pytest.raises(ValueError, match="^the examples: no examples$"):
        pack_examples([], 8)


def test_rows_are_stored_flat_at_12_bytes_a_token():
    """Packed rows keep ids, labels and positions as int32 arrays (12 bytes a token), not lists of Python ints
    (~86 bytes a token); the lists come back unchanged, and so do the batches."""
    ex = [Example([1, 2, 3], [IGNORE_INDEX, 2, 3]), Example([4, 5], [4, 5]),
          Example(list(range(10, 17)), list(range(10, 17)))]
    rows = pack_examples(ex, 8)
    assert rows.ids.dtype == rows.targets.dtype == rows.pos.dtype == np.int32
    assert rows.ids.nbytes + rows.targets.nbytes + rows.pos.nbytes == 12 * rows.num_tokens == 12 * 12
    flat = data.FlatExamples.of(ex)  # what tokenizing gives in bulk: 8 bytes a token, and the same rows packed
    assert flat.ids.nbytes + flat.labels.nbytes == 8 * 12 and flat.to_list() == ex
    assert pack_examples(flat, 8).input_ids == rows.input_ids and pack_examples(flat, 8).labels == rows.labels
    again = data.ExampleRows.from_lists(rows.input_ids, rows.labels, rows.positions, 8)  # from the lists: the same rows
    assert all(torch.equal(again.batch([0, 1])[k], rows.batch([0, 1])[k]) for k in ("input_ids", "labels",
                                                                                   "position_ids"))


def test_max_trained_bounds_the_labelled_tokens_of_any_batch():
    """`ExampleRows.max_trained(b)`, the bound the LM head's rows are cut to, is the most labelled tokens (after
    the shift: a row's first token predicts nothing) that any b rows hold: checked against every batch of b
    rows, packed and padded (and for padded batches of a width, among the rows no longer), and it is reached."""
    import itertools

    g = torch.Generator().manual_seed(0)
    examples = []
    for n in torch.randint(2, 9, (14,), generator=g).tolist():
        prompt = int(torch.randint(0, n, (), generator=g))
        examples.append(Example(list(range(1, n + 1)), [IGNORE_INDEX] * prompt + list(range(prompt + 1, n + 1))))
    for rows in (pack_examples(examples, 12), data.one_per_row(examples, 12)):
        batches = [rows.batch(list(c)) for b in (1, 2, 3) for c in itertools.combinations(range(len(rows)), b)]
        for b in (1, 2, 3):
            counts = [int((x["labels"][:, 1:] != IGNORE_INDEX).sum()) for x in batches if len(x["labels"]) == b]
            assert rows.max_trained(b) == max(counts)
        if not rows.packed:  # a padded batch w wide holds rows no longer than w: the bound of those
            for width in (4, 6, 8):
                counts = [int((x["labels"][:, 1:] != IGNORE_INDEX).sum()) for x in batches
                          if len(x["labels"]) == 2 and x["labels"].shape[1] <= width]
                assert rows.max_trained(2, width) == max(counts)
            assert rows.max_trained(2, 4) < rows.max_trained(2)  # tighter for the narrow batches


def test_labelled_bound_is_the_most_of_the_runs_own_batches(monkeypatch):
    """`MicroBatches.labelled_bound(n)`: the most labelled tokens one rank's share of a micro-batch holds over the
    epochs of the run's n micro-batches (reshuffled each), checked against the batches the run takes (each rank's
    shard, as `distributed.shard` splits them): packed, padded, grouped by length, 1 and 2 ranks. It is reached,
    holds for every batch (padded: at its width), and is below the bound of any rows (`max_trained`) here."""
    from surogate.training import distributed, steps
    from surogate.training.config import from_dict

    g = torch.Generator().manual_seed(1)
    examples = []
    for n in torch.randint(3, 30, (90,), generator=g).tolist():
        prompt = int(torch.randint(1, n, (), generator=g))
        examples.append(Example(list(range(1, n + 1)), [IGNORE_INDEX] * prompt + list(range(prompt + 1, n + 1))))
    for rows in (pack_examples(examples, 48), data.one_per_row(examples, 48)):
        for world, grouped in ((1, False), (2, False), (2, True)):
            cfg = from_dict({"sample_packing": rows.packed, "group_by_length": grouped and not rows.packed,
                             "per_device_train_batch_size": 3, "seed": 5})
            micro = steps.MicroBatches(rows, cfg, world=world)
            runs = 3 * micro.per_epoch  # three epochs, each its own order (a run into an epoch takes it whole)
            bound = micro.labelled_bound(runs)
            at = bound if callable(bound) else (lambda width: bound)
            seen = {}
            for _ in range(runs):
                batch = next(micro)
                width = batch["labels"].shape[1]
                for rank in range(world):
                    count = int((distributed.shard(batch, rank, world)["labels"][:, 1:] != IGNORE_INDEX).sum())
                    assert count <= at(width)
                    seen[width] = max(seen.get(width, 0), count)
            if rows.packed:
                assert bound == max(seen.values()) < rows.max_trained(3)
            else:  # per width: the most of the batches no wider
                for width in seen:
                    assert at(width) == max(c for w, c in seen.items() if w <= width)
                assert at(48) < rows.max_trained(3)
    # a run too long to go through (more rows read than the budget): the bound of any rows
    monkeypatch.setattr(steps, "_BOUND_ROWS_READ", 10)
    packed = pack_examples(examples, 48)
    assert steps.MicroBatches(packed, from_dict({"per_device_train_batch_size": 3})).labelled_bound(9) == \
        packed.max_trained(3)


def test_a_split_smaller_than_the_global_batch_splits_evenly_over_the_ranks():
    """3 packed rows on 2 ranks of 2 (the bundled chat config under torchrun): the one short batch of 3 rows did
    not split over 2 ranks and both ranks died at step 1 with a traceback. The short batch is now a whole number
    per rank (2 rows; 1 left out of each epoch, reshuffled, as drop_last leaves rows out of larger splits); one
    row for 2 ranks is refused in one line, before the model loads."""
    from surogate.training import distributed, steps
    from surogate.training.config import ConfigError, from_dict

    rows = pack_examples([Example(list(range(1, 9)), list(range(1, 9))) for _ in range(3)], 8)
    cfg = from_dict({"per_device_train_batch_size": 2})
    micro = steps.MicroBatches(rows, cfg, world=2)
    assert (micro.batch_size, micro.per_epoch, micro.left_out) == (2, 1, 1)
    for _ in range(4):
        batch = next(micro)
        assert [len(distributed.shard(batch, rank, 2)["input_ids"]) for rank in (0, 1)] == [1, 1]
    alone = steps.MicroBatches(rows, from_dict({"per_device_train_batch_size": 4}), world=1)
    assert len(next(alone)["input_ids"]) == 3 and alone.left_out == 0  # one process takes the 3 rows, as before
    assert len(next(steps.MicroBatches(rows, cfg, world=3))["input_ids"]) == 3  # 3 rows split over 3 ranks
    with pytest.raises(ConfigError, match=r"^the train split has 1 row for 2 ranks, and every rank needs one"):
        steps.MicroBatches(pack_examples([Example([1, 2, 3], [1, 2, 3])], 8), cfg, world=2)


def test_first_fit_picks_the_lowest_row_with_room_as_a_scan_of_the_rows_does():
    """The packer's max-tree (`_FirstFit`, logarithmic) places every example where the plain first-fit scan
    of the open rows puts it (it was that scan: quadratic, minutes for 10^5 examples that nearly fill a row)."""
    def scan(lengths: list[int], capacity: int) -> list[int]:
        room: list[int] = []
        placed = []
        for n in lengths:
            row = next((r for r, free in enumerate(room) if free >= n), len(room))
            if row == len(room):
                room.append(capacity)
            room[row] -= n
            placed.append(row)
        return placed

    gen = torch.Generator().manual_seed(0)
    for capacity in (2, 7, 64, 300):
        for count in (1, 2, 3, 37, 200):
            lengths = torch.randint(1, capacity + 1, (count,), generator=gen).tolist()
            fit = data._FirstFit(count, capacity)
            assert [fit.take(n) for n in lengths] == scan(lengths, capacity), (capacity, lengths)


def test_examples_longer_than_seq_len_are_counted_cut_and_left_out():
    """Both layouts count the examples longer than seq_len: cut to it, or left out where the cut leaves no target
    (a prompt longer than seq_len); `log_lines` is the log's line on them (none when nothing was cut)."""
    ex = [Example([1, 2, 3], [IGNORE_INDEX, 2, 3]),  # fits
          Example(list(range(10, 22)), list(range(10, 22))),  # 12 tokens: cut to 8, targets left
          Example(list(range(30, 42)), [IGNORE_INDEX] * 10 + [40, 41])]  # its targets past 8: left out
    where = "a.jsonl (train split)"
    for rows in (pack_examples(ex, 8, where=where), data.one_per_row(ex, 8, where=where)):
        assert (rows.examples, rows.cut, rows.dropped, len(rows)) == (3, 2, 1, 2)
        assert rows.log_lines() == ["data: 2 of 3 examples of a.jsonl (train split) are longer than sequence_len 8: "
                                    "1 cut to it, 1 left out (no target token within it); raise sequence_len to keep "
                                    "them whole"]
    assert pack_examples(ex[:1], 8).log_lines() == []
    untrained_long = pack_examples([ex[0], Example(list(range(50, 62)), [IGNORE_INDEX] * 12)], 8, where=where)
    assert untrained_long.log_lines() == [  # counted once, as untrained: it was also "1 cut to it"
        "data: 1 of 2 examples of a.jsonl (train split) has no target token (an empty answer, or no assistant turn): "
        "left out"]
    one = pack_examples(ex[:2], 8, where=where)  # one example cut: "1 of 2 examples ... is"
    assert one.log_lines() == ["data: 1 of 2 examples of a.jsonl (train split) is longer than sequence_len 8: 1 cut to "
                               "it, 0 left out (no target token within it); raise sequence_len to keep them whole"]


def test_excess_length_strategy_drop_leaves_every_long_example_out_and_raise_stops_at_the_first():
    """Axolotl's default (`drop`) leaves out an example longer than seq_len whole, where truncate (TRL's, the
    default) trains its start; `raise` stops before any layout, naming the first long example and how many there
    are; the log line says what became of them. Both layouts alike."""
    ex = [Example([1, 2, 3], [IGNORE_INDEX, 2, 3]),  # fits
          Example(list(range(10, 22)), list(range(10, 22))),  # 12 tokens, targets within 8: truncate keeps it
          Example([4, 5, 6, 7], [IGNORE_INDEX, 5, 6, 7]),  # fits
          Example(list(range(30, 42)), [IGNORE_INDEX] * 10 + [40, 41])]  # its targets past 8: left out by both
    where, where_of = "a.jsonl (train split)", lambda i: f"a.jsonl:{i + 1}"
    for lay_out in (pack_examples, data.one_per_row):
        truncated = lay_out(ex, 8, where=where, where_of=where_of)
        assert sum(len(row) for row in truncated.input_ids) == 3 + 8 + 4  # the long one's first 8 tokens kept
        dropped = lay_out(ex, 8, where=where, excess="drop", where_of=where_of)
        assert sum(len(row) for row in dropped.input_ids) == 3 + 4  # the two short examples alone
        assert not any(t >= 10 for row in dropped.input_ids for t in row)
        assert (dropped.examples, dropped.cut, dropped.excess) == (4, 2, "drop")
        assert dropped.log_lines() == [
            "data: 2 of 4 examples of a.jsonl (train split) are longer than sequence_len 8: left out "
            "(excess_length_strategy: drop; first: a.jsonl:2); raise sequence_len to keep them, or set "
            "excess_length_strategy: truncate to train on their starts"]
        with pytest.raises(DataError, match=r"^a\.jsonl:2: 12 tokens, longer than sequence_len 8 \(the first of 2 "
                                            r"such examples of a\.jsonl \(train split\)\); excess_length_strategy: "
                                            r"raise stops here: raise sequence_len, shorten them, or set "
                                            r"excess_length_strategy: truncate .* or drop \(left out\)$"):
            lay_out(ex, 8, where=where, excess="raise", where_of=where_of)
        fits = lay_out([ex[0], ex[2]], 8, where=where, excess="raise")  # nothing long: laid out as truncate does
        assert fits.input_ids == lay_out([ex[0], ex[2]], 8, where=where).input_ids and fits.log_lines() == []
        with pytest.raises(DataError, match=r"^a\.jsonl \(train split\), example 1: 12 tokens, .* shorten it,"):
            lay_out(ex[1:2], 8, where=where, excess="raise")
        with pytest.raises(DataError, match=r"^a\.jsonl \(train split\): every example with a target token is longer "
                                            r"than sequence_len 8, and excess_length_strategy: drop leaves them out; "
                                            r"raise sequence_len, or set excess_length_strategy: truncate$"):
            lay_out([ex[1], ex[3]], 8, where=where, excess="drop")
        with pytest.raises(ValueError, match="excess must be one of truncate, drop, raise, got 'keep_end'"):
            lay_out(ex, 8, excess="keep_end")


def test_the_log_lines_on_cut_and_untargeted_examples_write_thousands_as_the_totals_do():
    """Every count of the line has its thousands separated, as the total of examples beside it: "1,200 of 1,201
    examples", not "1200 of 1,201 examples"."""
    ex = ([Example(list(range(10, 22)), list(range(10, 22)))] * 1100 +  # cut to 8, targets left
          [Example(list(range(30, 42)), [IGNORE_INDEX] * 10 + [40, 41])] * 1050 +  # targets past 8: left out
          [Example([1, 2, 3], [IGNORE_INDEX] * 3)] * 1001)  # no target at all
    rows = pack_examples(ex, 8, where="a.jsonl (train split)")
    assert rows.log_lines() == [
        "data: 1,001 of 3,151 examples of a.jsonl (train split) have no target token (an empty answer, or no assistant "
        "turn): left out",
        "data: 2,150 of 3,151 examples of a.jsonl (train split) are longer than sequence_len 8: 1,100 cut to it, 1,050 "
        "left out (no target token within it); raise sequence_len to keep them whole"]


def test_train_on_inputs_keeps_the_prompt_as_targets(tok):
    examples = read_jsonl(split_path(None, "test"), 2)
    trained = tokenize_examples(examples, "gsm8k", tok, train_on_inputs=True)
    assert all(e.labels == e.input_ids for e in trained)
    text = tokenize_examples([{"text": "plain words"}], "text", tok)[0]
    assert text.labels == text.input_ids


def test_examples_without_a_target_are_counted_and_named_with_split_and_file(tok, tmp_path):
    """An empty alpaca output or a conversation without an assistant turn teaches nothing: left out, as before,
    but the log counts them per split and file (they went without a word), and when none is left the error
    says so, naming the split and the file (it blamed sequence_len)."""
    rows = [{"instruction": f"Add {i} and {i}", "input": "", "output": "" if i % 3 == 0 else str(2 * i)}
            for i in range(6)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for packing in (True, False):
        split = build_split(tmp_path, "train", "alpaca", tok, 256, packing=packing)
        assert (split.examples, split.untrained, split.cut) == (6, 2, 0)
        assert split.log_lines() == [f"data: 2 of 6 examples of {tmp_path / 'train.jsonl'} (split 'train') have no "
                                     "target token (an empty answer, or no assistant turn): left out (first: "
                                     f"{tmp_path / 'train.jsonl'}:1)"]
    convs = [{"messages": [{"role": "user", "content": f"q{i}"}]} for i in range(3)]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in convs))
    test_file = re.escape(str(tmp_path / "test.jsonl"))
    with pytest.raises(data.DataError, match=rf"^{test_file} \(split 'test'\): none of the 3 examples has a target "
                                             r"token \(an empty answer, or a conversation without an assistant "
                                             r"turn\); give them one, or set dataset\.train_on_inputs: true"):
        build_split(tmp_path, "test", "messages", tok, 256, chat_template="chatml")
