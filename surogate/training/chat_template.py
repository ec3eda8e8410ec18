"""Chat templates: how a conversation becomes text, cut into read text and trained assistant turns.

The span of assistant turn i is found by rendering the whole conversation again with that turn replaced by
a marker (`_marked_span`): the text before the marker and after it must equal the real rendering's start
and end, so whatever lies between is the turn, whatever the template does around it (a system prompt, a
think block, a BOS). What else the turn holds besides its content (its tool calls, its reasoning:
`GENERATED_KEYS`) is left out of the marked copy, so the span covers it too; where the template writes some
of it before the content (Qwen3's think block), the span starts where the generation prompt ends: the model
writes all of it at inference. So it does where the template writes only a space or newline between the two
(Llama 2's and Mistral's ' ' + content): that is tokenized with the answer (' Hello', as in the whole text). A
template that refuses the marked copy (it checks that a tool result follows a call: Mistral v3, gpt-oss) gets
`_prefix_span`. The turn's end-of-turn text (ChatML's
"<|im_end|>\\n", Llama 3's "<|eot_id|>") is what the template writes after the content of a conversation's
last turn; it is trained with the turn, so the model learns to stop.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from surogate.training.data_files import DataError

Pieces = list[tuple[str, bool]]  # (text, trained)

# What an assistant turn holds that the model writes besides its content: trained with the turn (see chat_pieces).
GENERATED_KEYS = ("tool_calls", "reasoning_content", "reasoning", "thinking")
# ChatML; a row's tools go in a system turn as JSON schemas, an assistant's tool calls after its content in
# <tool_call> tags (Hermes's and Qwen's layout), its reasoning (reasoning_content, reasoning or thinking) in a
# think block before it.
CHATML = (
    "{%- if tools %}<|im_start|>system\n{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n"
    "{% endif %}# Tools\n\nTo call a function, write <tool_call>\n{\"name\": <name>, \"arguments\": <arguments>}\n"
    "</tool_call>. The functions:\n<tools>{% for tool in tools %}{{ '\\n' + tool | tojson }}{% endfor %}"
    "{{ '\\n</tools><|im_end|>\\n' }}{% endif %}"
    "{%- for message in messages %}{% if not (tools and loop.first and message['role'] == 'system') %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- set reasoning = message['reasoning_content'] or message['reasoning'] or message['thinking'] %}"
    "{%- if reasoning %}{{ '<think>\n' + reasoning + '\n</think>\n\n' }}{% endif %}{{ message['content'] }}"
    "{%- for call in message['tool_calls'] or [] %}{% set f = call['function'] or call %}"
    "{% if message['content'] or not loop.first %}{{ '\n' }}{% endif %}"
    "{{ '<tool_call>\n{\"name\": \"' + f['name'] + '\", \"arguments\": ' }}"
    "{{ f['arguments'] if f['arguments'] is string else f['arguments'] | tojson }}{{ '}\n</tool_call>' }}"
    "{%- endfor %}{{ '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
BUILTIN_TEMPLATES = {"chatml": CHATML}
# Axolotl's names of model families' templates: the model's own tokenizer carries that template already.
_FAMILY_TEMPLATES = {"alpaca", "cohere", "command_a", "deepseek_v2", "deepseek_v3", "exaone", "falcon_h1", "gemma",
                     "gemma3", "gemma3n", "jamba", "llama2", "llama3", "llama3_2_vision", "llama4", "llava",
                     "metharme", "mistral_v1", "mistral_v2v3", "mistral_v3_tekken", "mistral_v7_tekken", "phi_3",
                     "phi_35", "phi_4", "pixtral", "qwen2_vl", "qwen3", "qwen_25", "vicuna", "zephyr"}
_MARKER = "@@surogate-assistant-content@@"


def resolve_chat_template(value: "str | os.PathLike | None") -> str | None:
    """`dataset.chat_template`: None, a built-in name (chatml), a Jinja string, or a path to a Jinja file."""
    if value is None:
        return None
    value = str(value)
    if value in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[value]
    if "{{" in value or "{%" in value:
        return value
    if value == "tokenizer_default":  # Axolotl's name for the tokenizer's own template
        raise DataError("dataset.chat_template: tokenizer_default is Axolotl's name for the tokenizer's own template; "
                        "drop the key (null: the tokenizer's)")
    if value == "jinja":  # Axolotl's "the template is in chat_template_jinja"
        raise DataError("dataset.chat_template: jinja is Axolotl's pointer to chat_template_jinja; write the Jinja "
                        "string itself, or a path to a .jinja file, as dataset.chat_template")
    if value in _FAMILY_TEMPLATES:
        raise DataError(f"dataset.chat_template: {value!r} is Axolotl's name for a model family's template; the "
                        "model's tokenizer carries its own: drop the key (null: the tokenizer's), or write chatml, a "
                        "Jinja string or a .jinja file")
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


def chat_template_for(tokenizer, configured: str | None, fmt: str = "messages") -> str | None:
    """The template messages are rendered with: `dataset.chat_template` when set (a built-in name or a path
    resolved here too, so that a caller of the data API passing "chatml" gets the template, not that word
    rendered), else None for the tokenizer's own (which `apply_chat_template` picks); an error when there is
    neither (naming `fmt`, the rows' format: sharegpt rows were said to be messages)."""
    if configured is None and not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "the embedded default"
        raise DataError(f"dataset.format {fmt}: tokenizer {name!r} has no chat template; set "
                        "dataset.chat_template to chatml (built in), a Jinja string, or a path to a .jinja file")
    return resolve_chat_template(configured)


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
    elif start and full[start - 1].isspace():
        # a space or newline between the generation prompt and the content (Llama 2's and Mistral's ' ' + content)
        # is the model's to write: trained with the answer and tokenized with it (' Hello', not ' ' and 'Hello')
        prompt = render(messages[:i], generation_prompt=True)
        if full.startswith(prompt) and len(prompt) < start and not full[len(prompt):start].strip():
            start = len(prompt)
    if end < start:
        return None
    # the end of turn as the template writes it after a conversation's last turn: the marked rendering itself when
    # this turn is the last (a conversation's usual end), one render fewer
    last = marked if i == len(messages) - 1 else render([*messages[:i], stand_in])
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
