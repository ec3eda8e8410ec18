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
assistant turn's tool call); a turn's content may also be a list of text parts (`[{"type": "text", "text": ...}]`,
joined), as in newer chat datasets. An assistant turn may call tools (`tool_calls`, content null) and carry its
reasoning (`reasoning_content`); a row's `tools` (a list, or its JSON text) go to the template.
The pieces are tokenized apart, so a boundary between read and trained text is exact, then joined. The
tokenizer's start tokens (its BOS, when `add_special_tokens=True` puts one first, as Llama's and Mistral's
do; Qwen's and GPT-2's add none) come first unless the text already starts with them (a chat template that
writes its BOS); EOS comes last (see `tokenize_examples`).

Messages go through the tokenizer's chat template (or `dataset.chat_template`). The span of assistant turn
i is found by rendering the whole conversation again with that turn's content replaced by a marker: the
text before the marker and after it must equal the real rendering's start and end, so whatever lies
between is the rendered content, whatever the template does around it (a system prompt, a think block,
a BOS). What else the turn holds (its tool calls, its reasoning: `GENERATED_KEYS`) is left out of the marked
copy, so the span covers it too, and where the template writes some of it before the content (Qwen3's think
block), the span starts where the generation prompt ends: the model writes all of it at inference. A
template that refuses the marked copy (it checks that a tool result follows a call) gets `_prefix_span`. The
turn's end-of-turn text (ChatML's "<|im_end|>\\n", Llama 3's "<|eot_id|>") is what the template writes after
the content of a conversation's last turn; it is trained with the turn, so the model learns to stop.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from surogate.training.data_files import DataError, Rows

IGNORE_INDEX = -100  # label value Hugging Face losses skip
ROLES = ("system", "user", "assistant", "tool")
# What an assistant turn holds that the model writes besides its content: trained with the turn (see chat_pieces).
GENERATED_KEYS = ("tool_calls", "reasoning_content", "reasoning", "thinking")
# ChatML; a row's tools go in a system turn as JSON schemas, an assistant's tool calls after its content in
# <tool_call> tags (Hermes's and Qwen's layout), its reasoning_content in a think block before it.
CHATML = (
    "{%- if tools %}<|im_start|>system\n{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n"
    "{% endif %}# Tools\n\nTo call a function, write <tool_call>\n{\"name\": <name>, \"arguments\": <arguments>}\n"
    "</tool_call>. The functions:\n<tools>{% for tool in tools %}{{ '\\n' + tool | tojson }}{% endfor %}"
    "{{ '\\n</tools><|im_end|>\\n' }}{% endif %}"
    "{%- for message in messages %}{% if not (tools and loop.first and message['role'] == 'system') %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['reasoning_content'] %}{{ '<think>\n' + message['reasoning_content'] + '\n</think>\n\n' }}"
    "{% endif %}{{ message['content'] }}"
    "{%- for call in message['tool_calls'] or [] %}{% set f = call['function'] or call %}"
    "{% if message['content'] or not loop.first %}{{ '\n' }}{% endif %}"
    "{{ '<tool_call>\n{\"name\": \"' + f['name'] + '\", \"arguments\": ' }}"
    "{{ f['arguments'] if f['arguments'] is string else f['arguments'] | tojson }}{{ '}\n</tool_call>' }}"
    "{%- endfor %}{{ '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
BUILTIN_TEMPLATES = {"chatml": CHATML}
_MARKER = "@@surogate-assistant-content@@"

ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further "
                 "context. Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")

Pieces = list[tuple[str, bool]]  # (text, trained)


@dataclass(frozen=True)
class Example:
    """One tokenized example: `labels` equal `input_ids` where the model learns, IGNORE_INDEX elsewhere."""

    input_ids: list[int]
    labels: list[int]


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
    if found is None:
        raise DataError(f"{rows.where(0)}: cannot tell the format of a row with keys {sorted(rows.rows[0])}; "
                        f"set dataset.format, one of {_fields_help()}")
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
        if "weight" in m or "train" in m:  # Axolotl's weight 0 / 1 (or train false / true): whether the turn trains
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
    """A turn's `train` (true / false) or `weight` (1 / 0, as Axolotl writes it) as one flag."""
    flag = message.get("train", message.get("weight"))
    if flag not in (True, False):  # 1 and 0 are among them
        key = "train" if "train" in message else "weight"
        raise DataError(f"{where}: {key} must be {'true or false' if key == 'train' else '0 or 1'} (whether the "
                        f"turn is trained), got {flag!r}")
    return bool(flag)


def _check_tool_calls(calls, where: str) -> list:
    """OpenAI-style tool calls: each `{"function": {"name", "arguments"}}` (or the function object itself, as
    some exports write it); the arguments go to the template as given."""
    if not isinstance(calls, list):
        raise DataError(f"{where}: tool_calls must be a list of {{function: {{name, arguments}}}} objects, "
                        f"got {calls!r:.80}")
    for k, call in enumerate(calls):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise DataError(f"{where}: tool_calls[{k}] must be an object with a function {{name, arguments}}, "
                            f"got {call!r:.80}")
    return calls


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
    joined as chat templates join them); None for anything else. A part of another type (an image) is an
    error that says so: these are text models."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content or not all(isinstance(p, dict) for p in content):
        return None
    other = next((p.get("type") for p in content if p.get("type") != "text"), None)
    if other is not None:
        raise DataError(f"{where} has a content part of type {other!r}; surogate trains on text: keep the "
                        "text parts only")
    texts = [p.get("text") for p in content]
    return "".join(texts) if all(isinstance(t, str) for t in texts) else None


# --- chat templates ------------------------------------------------------------------------------

def resolve_chat_template(value: "str | os.PathLike | None") -> str | None:
    """`dataset.chat_template`: None, a built-in name (chatml), a Jinja string, or a path to a Jinja file."""
    if value is None:
        return None
    value = str(value)
    if value in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[value]
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise DataError(f"dataset.chat_template: {value!r} is not a built-in template ({', '.join(BUILTIN_TEMPLATES)}),"
                        " a Jinja string, or an existing .jinja file")
    return path.read_text(encoding="utf-8")


def chatml_marker_note(template_name: "str | os.PathLike | None", tokenizer) -> str | None:
    """A log line when `dataset.chat_template: chatml` meets a tokenizer without <|im_start|> / <|im_end|> as
    special tokens: they are then split into ordinary pieces, so the model learns its end of turn as several
    plain tokens and a chat frontend's stop token never comes. None when they are single tokens (or no chatml)."""
    if template_name != "chatml":
        return None
    counts = {m: len(tokenizer(m, add_special_tokens=False)["input_ids"]) for m in ("<|im_start|>", "<|im_end|>")}
    split = {m: n for m, n in counts.items() if n != 1}
    if not split:
        return None
    pieces = ", ".join(f"{m} is {n} pieces" for m, n in split.items())
    return (f"warning: dataset.chat_template chatml: {' and '.join(split)} "
            f"{'is not a single token' if len(split) == 1 else 'are not single tokens'} in this tokenizer ({pieces}), "
            "so the model learns to end a turn with several plain tokens, not one stop token; use the model's own chat template (drop "
            "dataset.chat_template) or a tokenizer that has these special tokens")


def chat_template_for(tokenizer, configured: str | None) -> str | None:
    """The template messages are rendered with: `dataset.chat_template` when set, else None for the
    tokenizer's own (which `apply_chat_template` picks); an error when there is neither."""
    if configured is None and not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "the embedded default"
        raise DataError(f"dataset.format messages: tokenizer {name!r} has no chat template; set "
                        "dataset.chat_template to chatml (built in), a Jinja string, or a path to a .jinja file")
    return configured


def chat_pieces(messages: list[dict], tokenizer, template: str | None, where: str,
                tools: list[dict] | None = None, first_trained: int = 0) -> Pieces:
    """The rendered conversation cut into read text and trained assistant turns, those from message
    `first_trained` on (see the module docstring)."""
    import jinja2

    def render(msgs: list[dict], generation_prompt: bool = False) -> str:
        try:
            return tokenizer.apply_chat_template(msgs, chat_template=template, tools=tools, tokenize=False,
                                                 add_generation_prompt=generation_prompt)
        except (jinja2.TemplateError, TypeError) as e:  # TypeError: the template's own code on this data
            tooled = any(m["role"] == "tool" or "tool_calls" in m for m in msgs)
            hint = "; it has tool turns: set dataset.chat_template to one that writes them (chatml does)" \
                if tooled else ""
            raise DataError(f"{where}: the chat template failed on this conversation: {' '.join(str(e).split())}"
                            f"{hint}") from None

    full = render(messages)
    unwritten = [name for name in _function_names(tools or ()) if name not in full]
    if unwritten:
        raise DataError(f"{where}: the chat template does not write the row's tools (no {unwritten[0]!r} in its "
                        "output); set dataset.chat_template to one that takes tools (chatml does)")
    pieces: Pieces = []
    done = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < first_trained or not m.get("train", True):
            continue
        span = _marked_span(render, messages, i, full)
        if span is None or span[0] < done:
            raise DataError(f"{where}: cannot locate assistant message {i} in the chat template's output (the "
                            "template rewrites it); set dataset.chat_template to one that writes content as given")
        start, end = span
        unwritten = [name for name in _function_names(m.get("tool_calls", ())) if name not in full[start:end]]
        if unwritten:
            raise DataError(f"{where}: the chat template does not write assistant message {i}'s tool call "
                            f"{unwritten[0]!r}; set dataset.chat_template to one that writes tool_calls (chatml does)")
        pieces += [(full[done:start], False), (full[start:end], True)]
        done = end
    if done < len(full):
        pieces.append((full[done:], False))
    return pieces


def _marked_span(render: Callable[..., str], messages: list[dict], i: int, full: str) -> tuple[int, int] | None:
    """Where assistant message i lies in the rendered conversation `full`, end-of-turn text included, found by
    rendering it again with the turn replaced by a marker (see the module docstring); None when not found."""
    m = messages[i]
    stand_in = {**{k: v for k, v in m.items() if k not in GENERATED_KEYS}, "content": _MARKER}
    try:
        marked = render([*messages[:i], stand_in, *messages[i + 1:]])
    except DataError:  # the template checks the conversation's shape (a tool result must follow a call)
        return _prefix_span(render, messages, i, full)
    start = marked.find(_MARKER)
    after = marked[start + len(_MARKER):]
    end = len(full) - len(after)
    if marked.count(_MARKER) != 1 or not full.endswith(after):
        return None
    if not full.startswith(marked[:start]):
        # the template writes part of the turn before its content (a think block): the turn is what the model
        # writes after the generation prompt
        prompt = render(messages[:i], generation_prompt=True)
        if not full.startswith(prompt):
            return None
        start = len(prompt)
    if end < start:
        return None
    last = render([*messages[:i], stand_in])
    end_of_turn = last[last.index(_MARKER) + len(_MARKER):]
    return start, end + len(os.path.commonprefix([full[end:], end_of_turn]))


def _prefix_span(render: Callable[..., str], messages: list[dict], i: int, full: str) -> tuple[int, int] | None:
    """Assistant message i's span for a template that refuses the marked copy: from the end of the generation
    prompt to where the conversation cut after the turn stops matching `full`; None unless the turn's text (its
    answer after any think block) lies within."""
    try:
        prompt = render(messages[:i], generation_prompt=True)
        cut = render(messages[:i + 1])
    except DataError:
        return None
    end = len(os.path.commonprefix([full, cut]))
    answer = messages[i]["content"].split("</think>")[-1].strip()
    if not full.startswith(prompt) or end <= len(prompt) or answer not in full[len(prompt):end]:
        return None
    return len(prompt), end


def _function_names(calls_or_tools) -> list[str]:
    """The function names of tool calls or tool schemas (`{"function": {"name"}}` or `{"name"}`)."""
    return [n for c in calls_or_tools if isinstance(n := (c.get("function") or c).get("name"), str)]


def reasoning_of(message: dict) -> str | None:
    """An assistant turn's reasoning: its reasoning_content (or reasoning, thinking), or the think block its
    content opens with; None without."""
    text = next((message[k] for k in GENERATED_KEYS[1:] if isinstance(message.get(k), str)), None)
    if text is None and "</think>" in message["content"]:
        text = message["content"].split("</think>")[0].split("<think>")[-1]
    return text.strip() or None if text is not None else None


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
    when the chat template leaves out the reasoning of assistant turns that have one. Many rows are
    tokenized in several processes (`tokenizing_workers`), in order."""
    rows = examples if isinstance(examples, Rows) else Rows("example", list(examples))
    if not rows.rows:
        return []
    form = resolve_format(rows, fmt)
    template = chat_template_for(tokenizer, chat_template) if form.pieces is None else None
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; examples need one at their end")
    job = _Job(rows, form, tokenizer, template, train_on_inputs)
    workers = tokenizing_workers(len(rows))
    parts = _in_processes(job, workers) if workers > 1 else [_tokenize_rows(job, 0, len(rows))]
    left_out = [where for part in parts for where in part.reasoning_left_out]
    if left_out and log is not None:
        log(f"warning: the chat template leaves out the reasoning of {len(left_out)} of "
            f"{sum(part.reasoning_turns for part in parts)} assistant turns that have one (first: {left_out[0]}); "
            "they train without it (Qwen3's template keeps it only after the last user turn); to train it, set "
            "dataset.chat_template to one that writes it (chatml does)")
    return [example for part in parts for example in part.examples]


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
    examples: list[Example]
    reasoning_left_out: list[str]  # where an assistant turn's reasoning is not in its trained text
    reasoning_turns: int


def _tokenize_rows(job: _Job, lo: int, hi: int) -> _Tokenized:
    """`tokenize_examples` of rows lo..hi of the job."""
    rows, form, tokenizer = job.rows, job.form, job.tokenizer
    chat = form.pieces is None
    eos = tokenizer.eos_token_id
    per_row: list[Pieces] = []
    ends_answered: list[bool] = []  # the example ends on its answer (trained by the format, not by train_on_inputs)
    done = _Tokenized([], [], 0)
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
    flat = [t for pieces in per_row for t, _ in pieces]
    encoded = iter(tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else [])
    start = start_tokens(tokenizer)
    for pieces, answered in zip(per_row, ends_answered):
        ids: list[int] = []
        labels: list[int] = []
        last: list[int] = []
        for _, trained in pieces:
            last = next(encoded)
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
        done.examples.append(Example(ids, labels))
    return done


# --- several processes ---------------------------------------------------------------------------------

PARALLEL_MIN_ROWS = 4000  # fewer rows tokenize in a few seconds: not worth starting processes
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


def _run_chunk(bounds: tuple[int, int]) -> _Tokenized:
    assert _JOB is not None
    return _tokenize_rows(_JOB, *bounds)


def _in_processes(job: _Job, workers: int) -> list[_Tokenized]:
    """The job's rows in chunks over `workers` forked processes, the results in row order; a row's error is the
    first one in order. Forked, the workers inherit the rows and the tokenizer (nothing of them is pickled);
    they use neither torch nor CUDA."""
    global _JOB
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    n = len(job.rows)
    size = -(-n // (workers * 4))  # four chunks a worker: a slow chunk does not hold the others up
    bounds = [(lo, min(lo + size, n)) for lo in range(0, n, size)]
    parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # set before the fork: the tokenizers library's warning stays quiet
    _JOB = job
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    try:
        with warnings.catch_warnings():  # Python >= 3.12 warns on any fork of a process with threads (torch's)
            warnings.filterwarnings("ignore", r".*use of fork\(\) may lead to deadlocks", DeprecationWarning)
            return list(pool.map(_run_chunk, bounds))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        _JOB = None
        if parallelism is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = parallelism
