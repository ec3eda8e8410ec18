"""Messy rows and the lengths of real data: text the tokenizer cannot encode, missing values written as NaN, lines
that are no object (each one line naming the row's `file:line`, never a traceback nor a silent training on the
wrong text); examples longer than sequence_len or without a target (counted, the first named); a tokenizer whose
maximum length is below the rows'; a chat template with generation markers, against HF's assistant mask."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from surogate.training.config import from_dict
from surogate.training.data import load_splits
from surogate.training.data_files import DataError, read_rows
from surogate.training.tokenizer import load_tokenizer


pytestmark = pytest.mark.usefixtures("module_cache_dir")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def load(path: Path, tok, **dataset):
    return load_splits(from_dict({"dataset": {"path": str(path), "cache": False, **dataset}, "sequence_len": 64}), tok)


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


GOOD = '{"prompt": "Q: 1+1?", "completion": " 2"}'


def test_a_lone_surrogate_is_one_line_at_its_row_and_a_whole_pair_trains(tmp_path, tok):
    # JSON may write half of an emoji's UTF-16 pair; Python reads it, the tokenizers library raised a TypeError
    rows = [GOOD, r'{"prompt": "a whole pair \ud83d\ude00", "completion": " ok"}',
            r'{"prompt": "cut \ud83d", "completion": " x"}']
    lone = r"bad\.jsonl:3: the text holds a lone UTF-16 surrogate \(\\ud83d after 'cut '\)"
    with pytest.raises(DataError, match=lone):
        load(write(tmp_path / "bad.jsonl", rows), tok)
    chat = r'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\udc00"}]}'
    with pytest.raises(DataError, match=r"chat\.jsonl:2: the text holds a lone UTF-16 surrogate \(\\udc00"):
        load(write(tmp_path / "chat.jsonl", [chat.replace(r"\udc00", "fine"), chat]), tok, chat_template="chatml")
    train, _ = load(write(tmp_path / "pair.jsonl", rows[:2]), tok)
    assert "\U0001F600" in tok.decode(train.input_ids[0])


@pytest.mark.parametrize("row, field", [
    ('{"prompt": "Q", "completion": NaN}', "'completion' is nan"),
    ('{"instruction": "Q", "input": Infinity, "output": "A"}', "'input' is inf"),
])
def test_nan_where_text_belongs_is_a_missing_value_not_the_text_nan(tmp_path, tok, row, field):
    # json.dumps writes a float NaN (a pandas missing value) as NaN; it was trained as the text "nan"
    with pytest.raises(DataError, match=rf"nan\.jsonl:2: field {field} \(JSON's NaN / Infinity: a missing value"):
        load(write(tmp_path / "nan.jsonl", [row.replace("NaN", '"x"').replace("Infinity", '"y"'), row]), tok)
    chat = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": NaN}]}'
    with pytest.raises(DataError, match=r"chat\.jsonl:1: messages\[1\] must be an object with a role"):
        load(write(tmp_path / "chat.jsonl", [chat]), tok, chat_template="chatml")
    train, _ = load(write(tmp_path / "num.jsonl", ['{"prompt": "Q", "completion": 42}']), tok)
    assert tok.decode(train.input_ids[0]) == "Q42<|endoftext|>"  # a finite number is still its text


@pytest.mark.parametrize("line, said", [
    ("null", "got null; drop the line"),
    ("[1, 2]", "got an array$"),
    (f"[{GOOD}, {GOOD}]", "got an array; write each of its objects on a line of its own"),
    ('"text"', "got a string"),
    ("true", "got true"),
])
def test_a_line_that_is_no_object_says_what_it_is_in_json_words(tmp_path, line, said):
    with pytest.raises(DataError, match=rf"rows\.jsonl:2: expected a JSON object \(\{{\.\.\.\}}\), {said}"):
        read_rows(write(tmp_path / "rows.jsonl", [GOOD, line]))


def test_the_log_names_the_first_row_cut_left_out_or_without_a_target(tmp_path, tok):
    """The log counted the examples cut by sequence_len, left out by it, or without any target; a user with
    thousands of rows could not tell which: it names the first of each kind, as the rows' `file:line`, through a
    hold-out too."""
    long = " ".join(str(i) for i in range(80))
    rows = [GOOD, f'{{"prompt": "Q", "completion": " {long}"}}', '{"prompt": "Q: empty", "completion": ""}',
            f'{{"prompt": "{long}", "completion": " late"}}', '{"prompt": "Q", "completion": ""}',
            f'{{"prompt": "Q", "completion": " {long}"}}']
    path = write(tmp_path / "rows.jsonl", rows)
    for packing in (True, False):
        train, _ = load_splits(from_dict({"dataset": {"path": str(path), "cache": False}, "sequence_len": 64,
                                          "sample_packing": packing}), tok)
        assert train.log_lines() == [
            f"data: 2 of 6 examples of {path} (train split 'train') have no target token (an empty answer, or no "
            f"assistant turn): left out (first: {path}:3)",
            f"data: 3 of 6 examples of {path} (train split 'train') are longer than sequence_len 64: 2 cut to it "
            f"(first: {path}:2), 1 left out (no target token within it; first: {path}:4); raise sequence_len to keep "
            "them whole"]
    _, held = load(path, tok, val_set_size=3)  # lines 1, 3 and 4 with seed 42: the hold-out keeps their lines
    assert held.log_lines()[0].endswith(f"left out (first: {path}:3)")


def test_excess_length_strategy_from_the_config_reaches_both_splits_and_names_the_row(tmp_path, tok):
    """`excess_length_strategy` (Axolotl's key) decides the long examples: `drop` leaves them out (the log names
    the first row), `raise` stops at the first one's file:line before any training; truncate, the default, keeps
    their first sequence_len tokens. A hold-out whose examples are all long says so, naming its split."""
    long = " ".join(str(i) for i in range(80))
    rows = [GOOD, GOOD, f'{{"prompt": "Q", "completion": " {long}"}}', GOOD, f'{{"prompt": "Q", "completion": " {long}"}}']
    path = write(tmp_path / "rows.jsonl", rows)

    def splits(strategy: str, packing: bool, **dataset):
        return load_splits(from_dict({"dataset": {"path": str(path), "cache": False, **dataset}, "sequence_len": 64,
                                      "sample_packing": packing, "excess_length_strategy": strategy}), tok)

    for packing in (True, False):
        (train, _), (kept, _) = splits("drop", packing), splits("truncate", packing)
        assert (train.examples, train.cut, kept.cut) == (5, 2, 2)
        assert max(map(len, kept.input_ids)) == 64  # truncate: a long one fills its row
        short = len(enc(tok, "Q: 1+1?")) + len(enc(tok, " 2")) + 1  # + EOS
        assert sum(map(len, train.input_ids)) == 3 * short  # drop: the three short ones alone
        assert train.log_lines() == [
            f"data: 2 of 5 examples of {path} (train split 'train') are longer than sequence_len 64: left out "
            f"(excess_length_strategy: drop; first: {path}:3); raise sequence_len to keep them, or set "
            "excess_length_strategy: truncate to train on their starts"]
        with pytest.raises(DataError, match=rf"^{path}:3: \d+ tokens, longer than sequence_len 64 \(the first of 2 "
                                            "such examples .*excess_length_strategy: raise stops here"):
            splits("raise", packing)
        with pytest.raises(DataError, match=r"\(eval split: val_set_size of train\): every example with a target "
                                            "token is longer than sequence_len 64, and excess_length_strategy: drop"):
            splits("drop", packing, val_set_size=2)  # seed 42 holds out the two long ones


def test_an_example_longer_than_the_tokenizers_maximum_gets_no_indexing_errors_warning(tmp_path, capfd):
    """transformers warned "Token indices sequence length is longer than the specified maximum sequence length for
    this model ... will result in indexing errors" on a long row (a tokenizer of model_max_length 2048, as
    TinyLlama's and Phi-2's): not so here, where the example is cut to sequence_len, which the config checks
    against the model's positions."""
    small = load_tokenizer(None)
    small.model_max_length = 8
    long = " ".join(str(i) for i in range(80))
    train, _ = load(write(tmp_path / "long.jsonl", [f'{{"prompt": "Q", "completion": " {long}"}}']), small)
    assert train.cut == 1 and len(train.input_ids[0]) == 64
    load(write(tmp_path / "text.jsonl", [f'{{"text": "{long}"}}']), small)  # one piece a row: the other call
    assert "indexing errors" not in capfd.readouterr().err


GENERATION = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}{% if m['role'] == 'assistant' %}"
              "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
              "{% else %}{{ m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_generation_markers_are_not_needed_and_the_turns_match_hf_s_assistant_mask_but_the_newline(tmp_path, tok):
    """What docs/cli.md says of `{% generation %}`: the ids are the template's, and the trained tokens are those
    of HF's assistant mask (TRL's assistant_only_loss) plus the newline the template writes after each
    <|im_end|>, outside the markers, and the EOS after the conversation."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "more"}, {"role": "assistant", "content": "sure thing"}]
    marked = load_tokenizer(None)
    marked.chat_template = GENERATION
    path = write(tmp_path / "chat.jsonl", [json.dumps({"messages": messages})])
    train, _ = load_splits(from_dict({"dataset": {"path": str(path), "cache": False}, "sequence_len": 256,
                                      "sample_packing": False}), marked)
    ids, labels = train.input_ids[0], train.labels[0]
    hf = marked.apply_chat_template(messages, return_assistant_tokens_mask=True, return_dict=True)
    assert ids == hf["input_ids"] + [marked.eos_token_id]
    newline = enc(marked, "\n")
    assert len(newline) == 1
    ours = [i for i, label in zip(ids, labels) if label != -100]
    theirs = [i for i, m in zip(hf["input_ids"], hf["assistant_masks"]) if m]
    end = enc(marked, "<|im_end|>")
    assert marked.decode(theirs) == "hello<|im_end|>sure thing<|im_end|>"
    assert ours == enc(marked, "hello") + end + newline + enc(marked, "sure thing") + end + newline + \
        [marked.eos_token_id]

