"""Row formats: how one row of a dataset becomes token ids and labels.

A row becomes a list of text pieces, each read (masked from the loss, label IGNORE_INDEX) or trained:

| format | fields | read | trained |
|---|---|---|---|
| `messages` | messages (OpenAI-style), optional tools | everything else | each assistant turn, end of turn included |
| `sharegpt` | conversations (ShareGPT: `from` human / gpt / system, `value`) | as messages | as messages |
| `alpaca` | instruction, input (optional), output | the Stanford Alpaca prompt | output |
| `completion` | prompt, completion (strings, or lists of messages) | prompt | completion (TRL's prompt-completion) |
| `gsm8k` | question, answer | "Question: <question>\\nAnswer:" | " <answer>" |
| `text` | text | nothing | text |

`auto` takes the first format, in the order of the table (`FORMATS`), whose fields the first row has. A
ShareGPT conversation becomes OpenAI-style messages (`SHAREGPT_ROLES`; a `function_call` turn becomes an
assistant turn's tool call, a row's `system` the system turn); a turn's content may also be a list of text
parts (`[{"type": "text", "text": ...}]`, joined), as in newer chat datasets. An assistant turn may call tools
(`tool_calls`, content null) and carry its reasoning (`reasoning_content`); a row's `tools` (a list, or its
JSON text) go to the template.
The pieces are the whole text's tokens cut where they meet (`_whole_text_pieces`); where a token spans a meeting
point they are tokenized apart, so a boundary between read and trained text is exact, then joined. The
tokenizer's start tokens (its BOS, when `add_special_tokens=True` puts one first, as Llama's and Mistral's
do; Qwen's and GPT-2's add none) come first unless the text already starts with them (a chat template that
writes its BOS); EOS comes last (see `tokenize_examples`).

Messages go through the tokenizer's chat template (or `dataset.chat_template`), cut into read text and
trained assistant turns by `chat_template.chat_pieces`.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from surogate.training.chat_template import Pieces, chat_pieces, chat_template_for, reasoning_of
from surogate.training.data_files import DataError, Rows

IGNORE_INDEX = -100  # label value Hugging Face losses skip
ROLES = ("system", "user", "assistant", "tool")

ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further "
                 "context. Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")

@dataclass(frozen=True)
class Example:
    """One tokenized example: `labels` equal `input_ids` where the model learns, IGNORE_INDEX elsewhere."""

    input_ids: list[int]
    labels: list[int]


def flat_int32(rows) -> np.ndarray:
    """Rows (lists or arrays of ints) one after another, as int32."""
    return np.concatenate([np.asarray(row, dtype=np.int32) for row in rows]) if len(rows) else np.zeros(0, np.int32)


def offsets_of(lengths) -> np.ndarray:
    """Where each of the sequences of `lengths` starts when they are stored one after another, and the end."""
    return np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths, dtype=np.int64)])


class FlatExamples:
    """Examples stored flat: their ids and labels one after another (int32), with each example's offset: 8 bytes
    a token, where `Example` lists of Python ints take ~50-100 (gigabytes per rank for 10^8 tokens). What
    tokenizing gives in bulk (`tokenize_flat`), the cache keeps and the layouts read."""

    def __init__(self, ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray):
        self.ids, self.labels, self.offsets = ids, labels, offsets

    @classmethod
    def of(cls, examples: "list[Example]") -> "FlatExamples":
        return cls(flat_int32([ex.input_ids for ex in examples]), flat_int32([ex.labels for ex in examples]),
                   offsets_of([len(ex.input_ids) for ex in examples]))

    @classmethod
    def concat(cls, parts: "list[FlatExamples]") -> "FlatExamples":
        return cls(np.concatenate([p.ids for p in parts]) if parts else np.zeros(0, np.int32),
                   np.concatenate([p.labels for p in parts]) if parts else np.zeros(0, np.int32),
                   offsets_of(np.concatenate([p.lengths() for p in parts]) if parts else []))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def to_list(self) -> "list[Example]":
        bounds, ids, labels = self.offsets.tolist(), self.ids.tolist(), self.labels.tolist()
        return [Example(ids[a:b], labels[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


@dataclass(frozen=True)
class RowFormat:
    """A format: the fields a row must have and how its text splits into read and trained pieces
    (`pieces` None: the row is a conversation rendered by a chat template, whose checked OpenAI-style
    messages `messages(row, where)` gives; its assistant turns from `first_trained(row)` on are trained)."""

    name: str
    fields: tuple[str, ...]
    pieces: Callable[[dict], Pieces] | None
    messages: Callable[[dict, str], list[dict]] | None = None
    first_trained: Callable[[dict], int] = lambda row: 0


def _gsm8k(row: dict) -> Pieces:
    return [(f"Question: {row['question'].strip()}\nAnswer:", False), (f" {row['answer'].strip()}", True)]


def _alpaca(row: dict) -> Pieces:
    extra = row.get("input") or ""
    prompt = (ALPACA_PROMPT.format(instruction=row["instruction"], input=extra) if extra.strip()
              else ALPACA_PROMPT_NO_INPUT.format(instruction=row["instruction"]))
    return [(prompt, False), (row["output"], True)]


# ShareGPT's speakers (`from`) as OpenAI roles: the names datasets in that layout use (lower-cased).
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "chatgpt": "assistant", "tool": "tool", "function": "tool",
                  "observation": "tool", "function_call": "assistant"}


# A turn's keys that say whether it trains: Axolotl reads the one its message_field_training names (train, training
# in its docs' examples, weight in its older ShareGPT rows).
TRAIN_KEYS = ("train", "training", "weight")


def _sharegpt(row: dict, where: str) -> list[dict]:
    turns = row["conversations"]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of {{from, value}} objects")
    messages = []
    for n, turn in enumerate(turns):  # from / value, or role / content as some ShareGPT exports write them
        speaker = turn.get("from", turn.get("role")) if isinstance(turn, dict) else None
        role = SHAREGPT_ROLES.get(speaker.lower()) if isinstance(speaker, str) else None
        text = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
        if role is None or text is None:
            raise DataError(f"{where}: conversations[{n}] must be an object with from ({', '.join(SHAREGPT_ROLES)}) "
                            f"and value, got {turn!r:.80}")
        if speaker.lower() == "function_call":  # LLaMA-Factory's tool call: value is the JSON of {name, arguments}
            calls = _function_call(text, f"{where}: conversations[{n}]")
            messages.append({"role": role, "content": "", "tool_calls": calls})
        else:
            messages.append({"role": role, "content": text})
        # Axolotl's weight 0 / train false on a turn (read, not trained), as under messages: it was dropped here
        messages[-1].update({k: turn[k] for k in TRAIN_KEYS if turn.get(k) is not None})
    system = row.get("system")  # LLaMA-Factory's layout keeps the system prompt in a column of its own
    if isinstance(system, str) and system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return _check_messages(messages, where, "conversations")


def _function_call(value, where: str) -> list[dict]:
    """A ShareGPT `function_call` turn's value (JSON text of one {name, arguments} object or a list of them) as
    OpenAI-style tool calls."""
    try:
        calls = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: a function_call's value must be the JSON text of {{name, arguments}}: {e}") from None
    return [{"type": "function", "function": c} for c in (calls if isinstance(calls, list) else [calls])]


def _conversational_completion(row: dict, where: str) -> list[dict]:
    """TRL's conversational prompt-completion: `prompt` and `completion` lists of messages, one conversation."""
    prompt, completion = row["prompt"], row["completion"]
    if not isinstance(prompt, list) or not isinstance(completion, list):
        raise DataError(f"{where}: format completion: 'prompt' and 'completion' must both be strings, or both lists "
                        f"of messages (a conversation), got a {type(prompt).__name__} and a "
                        f"{type(completion).__name__}")
    return _check_messages(prompt, where, "prompt") + _check_messages(completion, where, "completion")


# `completion` whose first row holds lists of messages: only the completion's assistant turns train.
CONVERSATIONAL_COMPLETION = RowFormat("completion", ("prompt", "completion"), None, _conversational_completion,
                                      lambda row: len(row["prompt"]))

# The table every user reads; its order is the order `auto` tries.
FORMATS: dict[str, RowFormat] = {f.name: f for f in (
    RowFormat("messages", ("messages",), None, lambda row, where: _check_messages(row["messages"], where)),
    RowFormat("sharegpt", ("conversations",), None, _sharegpt),
    RowFormat("alpaca", ("instruction", "output"), _alpaca),
    RowFormat("completion", ("prompt", "completion"), lambda r: [(r["prompt"], False), (r["completion"], True)]),
    RowFormat("gsm8k", ("question", "answer"), _gsm8k),
    RowFormat("text", ("text",), lambda r: [(r["text"], True)]),
)}
FORMAT_NAMES = ("auto", *FORMATS)


def _fields_help() -> str:
    return "; ".join(f"{f.name} ({', '.join(f.fields)})" for f in FORMATS.values())


def _columns_hint(row: dict) -> str:
    """How `dataset.columns` would map a row whose fields name a prompt and an answer otherwise than the formats do
    (Dolly's instruction / context / response, OpenOrca's question / response, prompt / response); '' when its
    fields name no answer."""
    answer = next((k for k in ("response", "answer", "output", "chosen") if k in row), None)
    if answer is None:
        return ""
    if "prompt" in row:
        return f"; or map its fields to completion's with dataset.columns: {{{answer}: completion}}"
    question = next((k for k in ("instruction", "question", "query") if k in row), None)
    if question is None:
        return ""
    mapping = {question: "instruction", answer: "output", **({"context": "input"} if "context" in row else {})}
    pairs = ", ".join(f"{k}: {v}" for k, v in mapping.items() if k != v)
    return f"; or map its fields to alpaca's with dataset.columns: {{{pairs}}}"


def detect(row: dict) -> RowFormat | None:
    """The first format (in table order) whose fields `row` has; None when none fits."""
    return next((f for f in FORMATS.values() if all(k in row for k in f.fields)), None)


def resolve_format(rows: Rows, name: str) -> RowFormat:
    """The format `name`, or for `auto` the one the first row looks like; `completion` whose first prompt is a
    list of messages (and its completion too) is `CONVERSATIONAL_COMPLETION`."""
    if name != "auto":
        if name not in FORMATS:
            raise DataError(f"dataset.format: {name!r} is not one of {', '.join(FORMAT_NAMES)}")
        found = FORMATS[name]
    else:
        found = detect(rows.rows[0])
    if found is None and {"chosen", "rejected"} <= rows.rows[0].keys():
        raise DataError(f"{rows.where(0)}: rows with 'chosen' and 'rejected' are preference pairs (for DPO); "
                        "surogate train fine-tunes on one answer per row: write the chosen one as completion (with "
                        "prompt) or as the last assistant turn of messages")
    held = [k for k, v in rows.rows[0].items() if isinstance(v, list) and v and all(
        isinstance(r, dict) and detect(r) for r in v)] if found is None and len(rows) == 1 else []
    if held:  # a whole file's object written on one line: {"data": [rows]}
        raise DataError(f"{rows.where(0)}: one JSON object holding rows under {held[0]!r}, not a row; write that "
                        f"list alone (jq '.{held[0]}' {rows.source} > rows.json), or one object a line")
    if found is None:
        raise DataError(f"{rows.where(0)}: cannot tell the format of a row with keys {sorted(rows.rows[0])}; "
                        f"set dataset.format, one of {_fields_help()}{_columns_hint(rows.rows[0])}")
    if found.name == "completion" and all(isinstance(rows.rows[0].get(k), list) for k in found.fields):
        return CONVERSATIONAL_COMPLETION
    return found


def check_row(row: dict, fmt: RowFormat, where: str) -> dict:
    """`row` with its fields checked (strings; numbers taken as text) or a one-line error at `where`
    naming the missing field and, when the row fits another format, that format."""
    missing = [k for k in fmt.fields if row.get(k) is None]
    if missing:
        other = detect(row)
        hint = (f"; its keys {sorted(row)} look like format {other.name}: set dataset.format: {other.name} (or auto)"
                if other is not None and other.name != fmt.name else f"; it has {sorted(row)}")
        what = f"row's {missing[0]!r} is null" if missing[0] in row else f"row has no {missing[0]!r}"
        raise DataError(f"{where}: {what} (format {fmt.name} needs {', '.join(fmt.fields)}){hint}")
    if fmt.pieces is None:
        return {**row, "messages": fmt.messages(row, where), "tools": _check_tools(row.get("tools"), where),
                "first_trained": fmt.first_trained(row)}
    out = dict(row)
    for k in (*fmt.fields, "input"):
        v = row.get(k)
        if isinstance(v, float) and not math.isfinite(v):  # json.dumps writes a missing value (pandas' NaN) so
            raise DataError(f"{where}: field {k!r} is {v} (JSON's NaN / Infinity: a missing value, not text); format "
                            f"{fmt.name} needs a string: fill it in or drop the row")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = str(v)
        elif v is not None and not isinstance(v, str):
            also = " (or prompt and completion both lists of messages)" if fmt.name == "completion" else ""
            raise DataError(f"{where}: field {k!r} is a {type(v).__name__}; format {fmt.name} needs a string{also}")
    return out


def _check_messages(messages, where: str, field: str = "messages") -> list[dict]:
    """`messages` checked, each content as one string (a list of text parts joined); the user's rows untouched.
    A null key is dropped (Parquet and Hugging Face datasets give every message each key any message has, null
    where absent: a template asks `'tool_calls' in message`); a turn that only calls tools gets content ""."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for n, m in enumerate(messages):
        at = f"{where}: {field}[{n}]"
        m = {k: v for k, v in m.items() if v is not None and v != []} if isinstance(m, dict) else {}
        role = m.get("role")
        role = SHAREGPT_ROLES.get(role.lower(), role) if isinstance(role, str) else role  # human, gpt: user, assistant
        if any(k in m for k in TRAIN_KEYS):  # Axolotl's weight 0 / 1 (or train false / true): whether the turn trains
            m["train"] = _train_flag(m, at)
        if role == "assistant" and "tool_calls" in m:
            m["tool_calls"] = _check_tool_calls(m["tool_calls"], at)
            m.setdefault("content", "")
        elif role == "tool" and isinstance(m.get("content"), dict):  # a tool's result as a JSON object
            m["content"] = json.dumps(m["content"], ensure_ascii=False)
        content = _text(m.get("content"), at)
        if role not in ROLES or content is None:
            hint = "; a turn that only calls tools gives them as tool_calls" if role == "assistant" else ""
            raise DataError(f"{at} must be an object with a role ({', '.join(ROLES)}) and a string content{hint}, "
                            f"got {messages[n]!r:.80}")
        out.append({**m, "role": role, "content": content})
    return out


def _train_flag(message: dict, where: str) -> bool:
    """A turn's `train` / `training` (true / false) or `weight` (1 / 0, as Axolotl writes it) as one flag."""
    key = next(k for k in TRAIN_KEYS if k in message)
    flag = message[key]
    if flag not in (True, False):  # 1 and 0 are among them
        raise DataError(f"{where}: {key} must be {'0 or 1' if key == 'weight' else 'true or false'} (whether the "
                        f"turn is trained), got {flag!r}")
    return bool(flag)


def _check_tool_calls(calls, where: str) -> list:
    """OpenAI-style tool calls: each `{"function": {"name", "arguments"}}` (or the function object itself, as
    some exports write it). Arguments given as JSON text (OpenAI's API writes them so) go to the template as the
    object they encode, as vLLM hands them to it at inference (`tojson` in Llama 3.1's template wrote the text
    again, quoted; ChatML-style templates write text as is, objects as JSON: both now write the object); empty
    or null arguments are {}; text that is no JSON object stays text."""
    if not isinstance(calls, list):
        raise DataError(f"{where}: tool_calls must be a list of {{function: {{name, arguments}}}} objects, "
                        f"got {calls!r:.80}")
    checked = []
    for k, call in enumerate(calls):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise DataError(f"{where}: tool_calls[{k}] must be an object with a function {{name, arguments}}, "
                            f"got {call!r:.80}")
        function = {**function, "arguments": _arguments_object(function.get("arguments"))}
        checked.append({**call, "function": function} if "function" in call else function)
    return checked


def _arguments_object(arguments):
    """A tool call's arguments as an object where its JSON text encodes one (see _check_tool_calls)."""
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        return {}
    if isinstance(arguments, str):
        try:
            decoded = json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
        return decoded if isinstance(decoded, dict) else arguments
    return arguments


def _check_tools(tools, where: str) -> list[dict] | None:
    """A row's `tools` (the JSON schemas of the functions the conversation may call) as a list of objects:
    given as one, or as its JSON text (as datasets with a string column store it); None without."""
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: 'tools' is not JSON text of a list of function schemas: {e}") from None
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(f"{where}: 'tools' must be a list of function schemas (objects), got {tools!r:.80}")
    return tools


def _text(content, where: str) -> str | None:
    """A turn's content as one string: a string, or a list of text parts (`{"type": "text", "text": ...}`,
    joined as chat templates join them), a finite number as its text (as the other formats take it: a math answer);
    None for anything else. A part of another type (an image) is an error that says so: these are text models."""
    if isinstance(content, str):
        return content
    if isinstance(content, (int, float)) and not isinstance(content, bool):
        return str(content) if math.isfinite(content) else None  # NaN: a missing value, not the text "nan"
    if not isinstance(content, list) or not content or not all(isinstance(p, dict) for p in content):
        return None
    other = next((p.get("type") for p in content if p.get("type") != "text"), None)
    if other is not None:
        raise DataError(f"{where} has a content part of type {other!r}; surogate trains on text: keep the "
                        "text parts only")
    texts = [p.get("text") for p in content]
    return "".join(texts) if all(isinstance(t, str) for t in texts) else None


# --- tokenization ----------------------------------------------------------------------------------

def start_tokens(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (its BOS for Llama or Mistral; none for Qwen)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    return next((full[:k] for k in range(len(full) - len(plain) + 1) if full[k:k + len(plain)] == plain), [])


def tokenize_examples(examples: "list[dict] | Rows", fmt: str, tokenizer, train_on_inputs: bool = False,
                      chat_template: str | None = None, log: Callable[[str], None] | None = None) -> list[Example]:
    """Rows -> examples. Read pieces get IGNORE_INDEX labels unless `train_on_inputs`; start tokens (BOS)
    are prepended unless present and never trained; EOS is appended (trained) after an example that ends on
    its answer (a trained piece of the format: not a user turn, even with `train_on_inputs`), unless
    the example already ends with it, or, for messages, the last assistant turn already holds it (a template
    whose end-of-turn token is the EOS, as Llama 3's <|eot_id|> or Qwen3's <|im_end|>). `log` gets a warning
    when the chat template leaves out the reasoning of assistant turns that have one."""
    return tokenize_flat(examples, fmt, tokenizer, train_on_inputs, chat_template, log).to_list()


def tokenize_flat(examples: "list[dict] | Rows", fmt: str, tokenizer, train_on_inputs: bool = False,
                  chat_template: str | None = None, log: Callable[[str], None] | None = None,
                  progress: Callable[[str], None] | None = None) -> FlatExamples:
    """`tokenize_examples` stored flat: chunk by chunk, so that the lists of one chunk at a time exist; many rows
    are tokenized in several processes (`tokenizing_workers`), in order. `progress` gets a line as many rows start
    and every PROGRESS_S while they tokenize (not `log`'s notes, which the cache keeps and says again)."""
    rows = examples if isinstance(examples, Rows) else Rows("example", list(examples))
    if not rows.rows:
        return FlatExamples.concat([])
    form = resolve_format(rows, fmt)
    template = chat_template_for(tokenizer, chat_template, form.name) if form.pieces is None else None
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; examples need one at their end")
    job = _Job(rows, form, tokenizer, template, train_on_inputs)
    workers = tokenizing_workers(len(rows))
    done = _Progress(len(rows), workers, rows.source, progress if len(rows) >= PARALLEL_MIN_ROWS else None)
    parts = [done.add(part) for part in (_in_processes(job, workers) if workers > 1 else
             (_tokenize_rows(job, lo, min(lo + CHUNK_ROWS, len(rows))) for lo in range(0, len(rows), CHUNK_ROWS)))]
    left_out = [where for part in parts for where in part.reasoning_left_out]
    if left_out and log is not None:
        log(f"warning: the chat template leaves out the reasoning of {len(left_out)} of "
            f"{sum(part.reasoning_turns for part in parts)} assistant turns that have one (first: {left_out[0]}); "
            "they train without it (Qwen3's template keeps it only after the last user turn); to train it, set "
            "dataset.chat_template to one that writes it (chatml does)")
    return FlatExamples.concat([part.examples for part in parts])


@dataclass(frozen=True)
class _Job:
    """What tokenizing rows needs: the worker processes inherit it (fork), so that only row bounds travel."""

    rows: Rows
    form: RowFormat
    tokenizer: object
    template: str | None
    train_on_inputs: bool


@dataclass
class _Tokenized:
    examples: FlatExamples
    reasoning_left_out: list[str]  # where an assistant turn's reasoning is not in its trained text
    reasoning_turns: int


def _tokenize_rows(job: _Job, lo: int, hi: int) -> _Tokenized:
    """`tokenize_examples` of rows lo..hi of the job."""
    rows, form, tokenizer = job.rows, job.form, job.tokenizer
    chat = form.pieces is None
    eos = tokenizer.eos_token_id
    per_row: list[Pieces] = []
    ends_answered: list[bool] = []  # the example ends on its answer (trained by the format, not by train_on_inputs)
    done = _Tokenized(FlatExamples.concat([]), [], 0)
    examples: list[Example] = []
    for i in range(lo, hi):
        row = check_row(rows.rows[i], form, rows.where(i))
        pieces = (chat_pieces(row["messages"], tokenizer, job.template, rows.where(i), row["tools"],
                              row["first_trained"]) if chat else form.pieces(row))
        if chat:  # one trained piece per trained assistant turn, in order
            turns = zip([m for m in row["messages"][row["first_trained"]:] if m["role"] == "assistant"
                         and m.get("train", True)], [t for t, trained in pieces if trained])
            reasonings = [(r, text) for m, text in turns if (r := reasoning_of(m))]
            done.reasoning_turns += len(reasonings)
            done.reasoning_left_out += [rows.where(i) for r, text in reasonings if r not in text]
        pieces = [(t, trained) for t, trained in pieces if t]
        ends_answered.append(bool(pieces) and pieces[-1][1])
        per_row.append([(t, trained or job.train_on_inputs) for t, trained in pieces])
    try:
        wholes = _whole_text_pieces(tokenizer, per_row)
        flat = [t for pieces, whole in zip(per_row, wholes) if whole is None for t, _ in pieces]  # the rest: apart
        encoded = iter(tokenizer(flat, add_special_tokens=False, verbose=False)["input_ids"] if flat else [])
    except TypeError:  # the tokenizers library's answer to a text it cannot encode: say which row
        _check_encodable(rows, lo, per_row)
        raise
    start = start_tokens(tokenizer)
    for pieces, answered, whole in zip(per_row, ends_answered, wholes):
        ids: list[int] = []
        labels: list[int] = []
        last: list[int] = []
        for piece_ids, (_, trained) in zip(whole if whole is not None else [next(encoded) for _ in pieces],
                                           pieces):
            last = piece_ids
            ids += last
            labels += last if trained else [IGNORE_INDEX] * len(last)
        if start:  # the start tokens once, never a target
            if ids[:len(start)] != start:
                ids = start + ids
                labels = [IGNORE_INDEX] * len(start) + labels
            labels[:len(start)] = [IGNORE_INDEX] * len(start)
        has_eos = (eos in last) if chat else (ids[-1:] == [eos])
        if answered and not has_eos:
            ids, labels = ids + [eos], labels + [eos]
        examples.append(Example(ids, labels))
    done.examples = FlatExamples.of(examples)
    return done


def _check_encodable(rows: Rows, lo: int, per_row: list[Pieces]) -> None:
    """A DataError at the first of the rows from `lo` whose text is no UTF-8: a lone UTF-16 surrogate, which JSON
    can write (`"\\ud83d"`, half of an emoji's pair, as text cut by UTF-16 length leaves it) and Python reads,
    but the tokenizers library refuses with a TypeError that names no row."""
    for k, pieces in enumerate(per_row):
        for text, _ in pieces:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                before = text[max(e.start - 20, 0):e.start]
                raise DataError(f"{rows.where(lo + k)}: the text holds a lone UTF-16 surrogate "
                                f"(\\u{ord(text[e.start]):04x} after {before!r}), half of a character pair, which is "
                                "no character and cannot be tokenized; fix or drop the row (an emoji cut in two?)"
                                ) from None


def _whole_text_pieces(tokenizer, per_row: list[Pieces]) -> list[list[list[int]] | None]:
    """Each row's pieces as the tokens of its whole text, cut where the pieces meet; None for a row where a token
    spans a meeting point (ChatML's '\\n' + 'Hello' merged by a tokenizer), whose pieces are then tokenized apart, so
    that the boundary stays exact. Apart alone, a SentencePiece tokenizer (Llama 2, Mistral, TinyLlama, Phi-3)
    begins every piece with its '▁': 'Hello' after '<|assistant|>\\n' trained as '▁Hello', a space the text does
    not have, and a '▁' read before each later turn. Slow tokenizers (no offsets) keep the pieces apart."""
    several = [i for i, pieces in enumerate(per_row) if len(pieces) > 1]
    out: list[list[list[int]] | None] = [None] * len(per_row)
    if not several or not getattr(tokenizer, "is_fast", False):
        return out
    texts = ["".join(t for t, _ in per_row[i]) for i in several]
    # verbose=False: transformers' "longer than the specified maximum sequence length ... indexing errors" is not
    # for these texts, which the layouts cut to sequence_len (the model's positions, checked with the config)
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    for i, ids, offsets in zip(several, enc["input_ids"], enc["offset_mapping"]):
        starts = [a for a, _ in offsets]
        cuts, at = [0], 0
        for text, _ in per_row[i][:-1]:
            at += len(text)
            j = bisect.bisect_left(starts, at)  # the first token that starts at or after the meeting point
            if j <= cuts[-1] or j == len(ids) or starts[j] != at or offsets[j - 1][1] != at:
                break  # a token spans it, or a piece has no token of its own
            cuts.append(j)
        else:
            cuts.append(len(ids))
            out[i] = [ids[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    return out


# --- several processes ---------------------------------------------------------------------------------

PARALLEL_MIN_ROWS = 4000  # fewer rows tokenize in a few seconds: not worth starting processes (nor a progress line)
PROGRESS_S = 15.0  # seconds between the progress lines of a long tokenizing
CHUNK_ROWS = 2000  # rows tokenized at a time in one process: their lists, then stored flat
MAX_WORKERS = 8
_JOB: _Job | None = None  # the job the forked workers read


def tokenizing_workers(rows: int) -> int:
    """How many processes tokenize `rows` rows: one below PARALLEL_MIN_ROWS or without fork (not Linux), else
    this process's CPUs shared among the GPUs' processes on this machine (LOCAL_WORLD_SIZE, which torchrun
    sets), at most MAX_WORKERS and one per 2,000 rows."""
    import multiprocessing

    if rows < PARALLEL_MIN_ROWS or "fork" not in multiprocessing.get_all_start_methods():
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(MAX_WORKERS, cpus // local, rows // 2000))


class _Progress:
    """The progress lines of tokenizing many rows: one as it starts, then one every PROGRESS_S as chunks finish
    (a split of 100k chat rows takes minutes on a few cores: the run said nothing meanwhile)."""

    def __init__(self, total: int, workers: int, source: str, say: Callable[[str], None] | None) -> None:
        self.total, self.rows, self.say = total, 0, say
        self.start = self.last = time.perf_counter()
        if say is not None:
            say(f"data: tokenizing {total:,} rows of {source}" +
                (f" in {workers} processes" if workers > 1 else ""))

    def add(self, part: "_Tokenized") -> "_Tokenized":
        self.rows += len(part.examples)
        now = time.perf_counter()
        if self.say is not None and now - self.last >= PROGRESS_S and self.rows < self.total:
            self.last = now
            self.say(f"data: {self.rows:,} of {self.total:,} rows tokenized ({self.rows / self.total:.0%}, "
                     f"{now - self.start:.0f} s)")
        return part


def _run_chunk(bounds: tuple[int, int]) -> _Tokenized:
    assert _JOB is not None
    return _tokenize_rows(_JOB, *bounds)


def _ignore_interrupts() -> None:
    """A tokenizing worker's start: Ctrl-C is the parent's to handle (it stops the workers), not each worker's
    traceback."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _in_processes(job: _Job, workers: int) -> Iterator[_Tokenized]:
    """The job's rows in chunks over `workers` forked processes, the results in row order as they come; a row's
    error is the first one in order. Forked, the workers inherit the rows and the tokenizer (nothing of them is
    pickled); they use neither torch nor CUDA. They ignore Ctrl-C; on an error or Ctrl-C here they are killed at once
    (left alone, ProcessPoolExecutor's workers go on with the chunks already handed to them: Ctrl-C took ~30 s).
    A worker killed from outside (out of memory) is an error here (BrokenProcessPool), not a hang."""
    global _JOB
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    n = len(job.rows)
    size = -(-n // (workers * 4))  # four chunks a worker: a slow chunk does not hold the others up
    bounds = [(lo, min(lo + size, n)) for lo in range(0, n, size)]
    parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # set before the fork: the tokenizers library's warning stays quiet
    _JOB = job
    before = set(multiprocessing.active_children())
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=_ignore_interrupts)
    try:
        with warnings.catch_warnings():  # Python >= 3.12 warns on any fork of a process with threads (torch's)
            warnings.filterwarnings("ignore", r".*use of fork\(\) may lead to deadlocks", DeprecationWarning)
            yield from pool.map(_run_chunk, bounds)
    except BaseException:
        for worker in set(multiprocessing.active_children()) - before:
            worker.kill()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        _JOB = None
        if parallelism is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = parallelism
