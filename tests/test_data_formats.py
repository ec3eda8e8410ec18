"""Dataset formats and sources of `surogate train`: which tokens are targets for each format (exact label
lists of known examples), auto detection, single files / folders / Parquet / Hugging Face datasets,
the seeded `val_set_size` hold-out, and the one-line errors a user gets instead of a traceback."""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from surogate.training.config import ConfigError, from_dict
from surogate.training.data import load_splits
from surogate.training.data_files import DataError, Rows, hold_out, read_rows
from surogate.training.chat_template import CHATML, chat_pieces
from surogate.training.data_formats import FORMATS, IGNORE_INDEX, check_row, detect, resolve_format, tokenize_examples
from surogate.training.tokenizer import load_tokenizer

X = IGNORE_INDEX
CHATML_IN_TEST = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
ALPACA = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}


pytestmark = pytest.mark.usefixtures("module_cache_dir")


@pytest.fixture()
def tok():
    """A fresh embedded tokenizer (byte-level BPE, EOS <|endoftext|>, no BOS, no chat template)."""
    return load_tokenizer(None)


def enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def expected(tok, pieces: list[tuple[str, bool]], eos: bool = True) -> tuple[list[int], list[int]]:
    """ids and labels from literal (text, trained) pieces, tokenized apart, EOS appended as a target."""
    ids, labels = [], []
    for text, trained in pieces:
        t = enc(tok, text)
        ids += t
        labels += t if trained else [X] * len(t)
    if eos:
        ids, labels = ids + [tok.eos_token_id], labels + [tok.eos_token_id]
    return ids, labels


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cfg_for(path, **dataset):
    """A checked TrainConfig reading `path` (a file or folder)."""
    return from_dict({"dataset": {"path": str(path), **dataset}, "sequence_len": 256})


# --- each format: exact targets of a known example -------------------------------------------------

def test_alpaca_masks_the_prompt_and_trains_the_output(tok):
    prompt = ("Below is an instruction that describes a task, paired with an input that provides further context. "
              "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers.\n\n"
              "### Input:\n2 and 3\n\n### Response:\n")
    ex = tokenize_examples([ALPACA], "alpaca", tok)[0]
    assert (ex.input_ids, ex.labels) == expected(tok, [(prompt, False), ("5", True)])
    assert ex.labels[-2:] == [enc(tok, "5")[0], tok.eos_token_id] and ex.labels.count(X) == len(enc(tok, prompt))
    no_input = tokenize_examples([{"instruction": "Say hi.", "input": "", "output": "hi"}], "alpaca", tok)[0]
    bare = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\nSay hi.\n\n### Response:\n")
    assert (no_input.input_ids, no_input.labels) == expected(tok, [(bare, False), ("hi", True)])


def test_completion_and_text_and_gsm8k(tok):
    ex = tokenize_examples([{"prompt": "Q: 2+2?\nA:", "completion": " 4"}], "completion", tok)[0]
    assert (ex.input_ids, ex.labels) == expected(tok, [("Q: 2+2?\nA:", False), (" 4", True)])
    ex = tokenize_examples([{"text": "plain words"}], "text", tok)[0]
    assert (ex.input_ids, ex.labels) == expected(tok, [("plain words", True)])
    ex = tokenize_examples([{"question": " Q? ", "answer": "A\n#### 4"}], "gsm8k", tok)[0]
    assert (ex.input_ids, ex.labels) == expected(tok, [("Question: Q?\nAnswer:", False), (" A\n#### 4", True)])


def test_train_on_inputs_trains_the_prompt_too(tok):
    ex = tokenize_examples([{"prompt": "Q: 2+2?\nA:", "completion": " 4"}], "completion", tok, train_on_inputs=True)[0]
    assert ex.labels == ex.input_ids and X not in ex.labels


def test_messages_train_only_assistant_turns_exactly(tok):
    tok.chat_template = CHATML_IN_TEST
    ex = tokenize_examples([{"messages": CONVERSATION}], "messages", tok)[0]
    want = expected(tok, [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
        ("Hello!<|im_end|>\n", True),
        ("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", False),
        ("4<|im_end|>\n", True),
    ])
    assert (ex.input_ids, ex.labels) == want
    # the built-in `chatml` renders the same text
    assert tok.apply_chat_template(CONVERSATION, chat_template=CHATML, tokenize=False) == \
        tok.apply_chat_template(CONVERSATION, tokenize=False)
    everything = tokenize_examples([{"messages": CONVERSATION}], "messages", tok, train_on_inputs=True)[0]
    assert everything.input_ids == ex.input_ids and everything.labels == everything.input_ids


def test_a_conversation_ending_on_a_user_turn_gets_no_eos_even_with_train_on_inputs(tok):
    """EOS follows an answer: with train_on_inputs the last user turn is trained, but no EOS is put after it
    (it was, teaching the model to stop after a user's words)."""
    conv = [*CONVERSATION, {"role": "user", "content": "thanks"}]
    for on_inputs in (False, True):
        ex = tokenize_examples([{"messages": conv}], "messages", tok, train_on_inputs=on_inputs,
                               chat_template=CHATML)[0]
        assert tok.eos_token_id not in ex.input_ids
        assert tok.decode(ex.input_ids).endswith("<|im_start|>user\nthanks<|im_end|>\n")
    ex = tokenize_examples([{"messages": CONVERSATION}], "messages", tok, train_on_inputs=True, chat_template=CHATML)[0]
    assert ex.input_ids[-1] == ex.labels[-1] == tok.eos_token_id  # after an assistant turn: trained


def test_the_data_api_takes_a_built_in_template_by_name(tok):
    """tokenize_examples(..., chat_template="chatml") renders the built-in template, as the config key does; it
    rendered the word "chatml" as a template and then failed to find every assistant turn."""
    assert tokenize_examples([{"messages": CONVERSATION}], "messages", tok, chat_template="chatml") == \
        tokenize_examples([{"messages": CONVERSATION}], "messages", tok, chat_template=CHATML)


def test_messages_end_of_turn_eos_is_trained_once(tok):
    """A template that ends each turn with the EOS token: EOS trained after assistant turns, masked after user
    turns, and not appended a second time at the end."""
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    ex = tokenize_examples([{"messages": conv}], "messages", tok, chat_template=template)[0]
    assert (ex.input_ids, ex.labels) == expected(tok, [("[user] Hi<|endoftext|>[assistant] ", False),
                                                       ("Yo<|endoftext|>", True)], eos=False)
    assert ex.input_ids.count(tok.eos_token_id) == 2 and ex.labels.count(tok.eos_token_id) == 1


def test_messages_history_rendered_differently_from_the_last_turn(tok):
    """A Qwen3-like template adds an empty think block to the last assistant turn only: rendering the
    conversation prefix by prefix would not match, the marker method does, and the think block is read."""
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and loop.last %}"
                "<think>\n\n</think>\n\n{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}")
    pieces = chat_pieces(CONVERSATION, tok, template, "x")
    assert pieces == [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
        ("Hello!<|im_end|>\n", True),
        ("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n", False),
        ("4<|im_end|>\n", True),
    ]


def test_messages_last_turn_end_of_turn_reuses_the_marked_rendering(tok, monkeypatch):
    """The end of turn of a conversation's last assistant turn is read from its marked rendering (the same
    messages): no render of its own. CONVERSATION (2 assistant turns, the last one last) renders: the whole, then
    per turn the marked copy and the generation prompt, and the first turn's end of turn: 6, not 7."""
    calls = []
    render = type(tok).apply_chat_template
    monkeypatch.setattr(type(tok), "apply_chat_template",
                        lambda self, *a, **k: (calls.append(1), render(self, *a, **k))[1])
    pieces = chat_pieces(CONVERSATION, tok, CHATML, "x")
    assert len(calls) == 6
    assert [t for t, trained in pieces if trained] == ["Hello!<|im_end|>\n", "4<|im_end|>\n"]


def test_messages_template_that_rewrites_content_is_refused(tok):
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}"
    with pytest.raises(DataError, match=r"^x: cannot locate assistant message 2 .*dataset\.chat_template"):
        chat_pieces(CONVERSATION, tok, template, "x")


def test_messages_without_chat_template_says_how_to_give_one(tmp_path, tok):
    cfg = cfg_for(write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}]))
    with pytest.raises(DataError, match=r"has no chat template; set dataset\.chat_template to chatml") as e:
        load_splits(cfg, tok)
    assert "\n" not in str(e.value)
    train, _ = load_splits(cfg_for(tmp_path / "chat.jsonl", chat_template="chatml"), tok)
    assert len(train) == 1
    sharegpt = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}]
    with pytest.raises(DataError, match=r"^dataset\.format sharegpt: tokenizer .* has no chat template"):
        load_splits(cfg_for(write_jsonl(tmp_path / "sg.jsonl", sharegpt)), tok)


def test_chatml_on_a_tokenizer_without_its_markers_is_logged_once(tmp_path, tok):
    """The embedded tokenizer has no <|im_start|> / <|im_end|>: chatml's markers become several plain tokens,
    said in one log line; a tokenizer that has them as special tokens, or text rows, log nothing."""
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}] * 3)
    lines: list[str] = []
    load_splits(cfg_for(chat, chat_template="chatml"), tok, lines.append)
    start, end = len(enc(tok, "<|im_start|>")), len(enc(tok, "<|im_end|>"))
    assert start > 1 and end > 1
    assert lines == [f"warning: dataset.chat_template chatml: <|im_start|> and <|im_end|> are not single tokens in this "
                     f"tokenizer (<|im_start|> is {start} pieces, <|im_end|> is {end} pieces), so the model learns to "
                     "end a turn with several plain tokens, not one stop token; use the model's own chat template "
                     "(drop dataset.chat_template) or a tokenizer that has these special tokens"]
    lines.clear()
    load_splits(cfg_for(write_jsonl(tmp_path / "text.jsonl", [{"text": "a b"}] * 3), chat_template="chatml"), tok,
                lines.append)
    assert lines == []  # no messages: the template is not used
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    load_splits(cfg_for(chat, chat_template="chatml"), tok, lines.append)
    assert lines == []


def test_chat_template_from_a_file(tmp_path, tok):
    (tmp_path / "t.jinja").write_text(CHATML_IN_TEST)
    cfg = cfg_for(write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}]), chat_template=str(tmp_path / "t.jinja"))
    train, _ = load_splits(cfg, tok)
    tok.chat_template = CHATML_IN_TEST
    ex = tokenize_examples([{"messages": CONVERSATION}], "messages", tok)[0]
    assert train.input_ids[0] == ex.input_ids and train.labels[0] == [X] + ex.labels[1:]  # packed: first not a target
    with pytest.raises(ConfigError, match=r"^dataset\.chat_template: .*missing\.jinja"):
        cfg_for(tmp_path / "chat.jsonl", chat_template=str(tmp_path / "missing.jinja"))


def test_sharegpt_conversations_train_as_the_same_messages(tmp_path, tok):
    """ShareGPT's layout (`conversations` of `from` / `value`: human, gpt, system), as many public chat datasets
    ship, was refused ("row has no 'messages'"): it trains as the OpenAI-style messages it stands for, the same
    ids and targets, found by `auto` too; so do its speaker names under `messages` (any case) and its turns
    written as role / content; a speaker it does not know is named with its line."""
    tok.chat_template = CHATML_IN_TEST
    speaker = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = {"conversations": [{"from": speaker[m["role"]], "value": m["content"]} for m in CONVERSATION]}
    as_messages = tokenize_examples([{"messages": CONVERSATION}], "messages", tok)[0]
    assert tokenize_examples([sharegpt], "sharegpt", tok)[0] == as_messages
    assert detect(sharegpt).name == "sharegpt"
    train, _ = load_splits(cfg_for(write_jsonl(tmp_path / "sg.jsonl", [sharegpt] * 2)), tok)
    assert train.input_ids[0][:len(as_messages.input_ids)] == as_messages.input_ids
    as_role_content = {"conversations": [{"role": t["from"], "content": t["value"]} for t in sharegpt["conversations"]]}
    assert tokenize_examples([as_role_content], "sharegpt", tok)[0] == as_messages  # some exports write these keys
    speakers_in_messages = {"messages": [{"role": t["from"].upper(), "content": t["value"]}
                                         for t in sharegpt["conversations"]]}
    assert tokenize_examples([speakers_in_messages], "messages", tok)[0] == as_messages
    bad = {"conversations": [{"from": "narrator", "value": "x"}]}
    cfg = cfg_for(write_jsonl(tmp_path / "bad.jsonl", [sharegpt, bad]), format="sharegpt")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: conversations\[0\] must be an object with from \(system, "
                                        r"human, "):
        load_splits(cfg, tok)
    cfg = cfg_for(write_jsonl(tmp_path / "under_messages.jsonl", [sharegpt]), format="messages")
    with pytest.raises(DataError, match=r"look like format sharegpt: set dataset\.format: sharegpt"):
        load_splits(cfg, tok)


def test_content_as_a_list_of_text_parts_is_joined_and_other_parts_are_refused(tmp_path, tok):
    """Newer chat datasets write a turn's content as parts (`[{"type": "text", "text": ...}]`): text parts
    train as their joined string (they were refused); an image part is refused in one line with its line."""
    tok.chat_template = CHATML_IN_TEST
    parts = [{**m, "content": [{"type": "text", "text": m["content"][:1]}, {"type": "text", "text": m["content"][1:]}]}
             for m in CONVERSATION]
    assert tokenize_examples([{"messages": parts}], "messages", tok) == \
        tokenize_examples([{"messages": CONVERSATION}], "messages", tok)
    assert parts[0]["content"][0]["type"] == "text"  # the user's row is left as it was
    image = [CONVERSATION[1], {"role": "assistant", "content": [{"type": "image", "url": "x.png"}]}]
    cfg = cfg_for(write_jsonl(tmp_path / "img.jsonl", [{"messages": CONVERSATION}, {"messages": image}]))
    with pytest.raises(DataError, match=r"img\.jsonl:2: messages\[1\] has a content part of type 'image'; surogate "
                                        r"trains on text"):
        load_splits(cfg, tok)


def test_bad_messages_named_with_their_line(tmp_path, tok):
    rows = [{"messages": CONVERSATION}, {"messages": [{"role": "assistent", "content": "x"}]}]
    cfg = cfg_for(write_jsonl(tmp_path / "chat.jsonl", rows), chat_template="chatml")
    with pytest.raises(DataError, match=r"chat\.jsonl:2: messages\[0\] must be an object with a role"):
        load_splits(cfg, tok)


# --- tool calls and reasoning ------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}}}}}
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "21 degrees."},
]
# Written for these tests in the layout of Qwen3's template: tool results inside a user turn, the tool calls after
# the content (a newline between them only when there is content), the reasoning in a think block that the turns
# after the last user message keep (and the last turn always, empty when it has none).
QWEN3_LIKE = (
    "{%- if tools %}<|im_start|>system\n{% for t in tools %}{{ t | tojson }}{% endfor %}<|im_end|>\n{% endif %}"
    "{%- set ns = namespace(last_user=0) %}{% for m in messages %}{% if m.role == 'user' %}"
    "{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "{%- for m in messages %}{% if m.role == 'assistant' %}"
    "{%- set content = m.content %}{% set reasoning = m.reasoning_content or '' %}"
    "{%- if '</think>' in content %}{% set reasoning = content.split('</think>')[0].split('<think>')[-1] %}"
    "{% set content = content.split('</think>')[-1].lstrip() %}{% endif %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if loop.index0 > ns.last_user and (loop.last or reasoning) %}"
    "{{- '<think>\\n' + reasoning.strip() + '\\n</think>\\n\\n' }}{% endif %}{{- content }}"
    "{%- for c in m.tool_calls or [] %}{% if content or not loop.first %}{{ '\\n' }}{% endif %}"
    "{{- '<tool_call>\\n' + c.function | tojson + '\\n</tool_call>' }}{% endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif m.role == 'tool' %}{{ '<|im_start|>user\\n<tool_response>\\n' + m.content + "
    "'\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# In the layout of Llama 3.1's: a message with the key tool_calls is written as its call alone, content ignored.
LLAMA31_LIKE = (
    "{%- for m in messages %}{% if 'tool_calls' in m %}"
    "{{- '<|header|>assistant\\n' + m.tool_calls[0].function | tojson + '<|eot|>' }}"
    "{%- else %}{{ '<|header|>' + m.role + '\\n' + m.content + '<|eot|>' }}{% endif %}{% endfor %}"
    "{%- if add_generation_prompt %}{{ '<|header|>assistant\\n' }}{% endif %}")

# In the layout of Mistral v3's: it checks that the turns other than tool calls and tool results alternate, so a
# copy of the conversation with a tool-call turn made plain is refused.
MISTRAL_LIKE = (
    "{%- for m in messages | rejectattr('role', 'equalto', 'tool') | selectattr('tool_calls', 'undefined') %}"
    "{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('roles must alternate') }}{% endif %}"
    "{% endfor %}"
    "{%- for m in messages %}{% if m.role == 'user' %}{{ '[INST] ' + m.content + '[/INST]' }}"
    "{%- elif m.tool_calls is defined %}{{ '[TOOL_CALLS] ' + m.tool_calls | map(attribute='function') | list | tojson"
    " + eos_token }}"
    "{%- elif m.role == 'assistant' %}{{ ' ' + m.content + eos_token }}"
    "{%- else %}{{ '[TOOL_RESULTS] ' + m.content + '[/TOOL_RESULTS]' }}{% endif %}{% endfor %}")


def _trained(pieces) -> list[str]:
    return [text for text, trained in pieces if trained]


def test_tool_call_turns_train_their_calls_and_read_the_results(tok):
    """An assistant turn that only calls a tool (content null) was refused: it trains as the text the template
    writes for the call, with its end of turn; the tool's result and the row's tools are read. Each template
    writes calls its own way (after the content, or alone with the content dropped)."""
    row = check_row({"messages": TOOL_CONVERSATION, "tools": json.dumps([WEATHER])}, FORMATS["messages"], "x")
    assert row["tools"] == [WEATHER] and row["messages"][1]["content"] == ""  # JSON text parsed; a call, no text
    assert TOOL_CONVERSATION[1]["content"] is None  # the user's row is left as it was
    call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    pieces = chat_pieces(row["messages"], tok, QWEN3_LIKE, "x", row["tools"])
    assert pieces == [
        (f"<|im_start|>system\n{json.dumps(WEATHER)}<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n"
         "<|im_start|>assistant\n", False),
        (f"<tool_call>\n{call}\n</tool_call><|im_end|>\n", True),
        ('<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response><|im_end|>\n<|im_start|>assistant\n'
         "<think>\n\n</think>\n\n", False),
        ("21 degrees.<|im_end|>\n", True),
    ]
    as_object = [*TOOL_CONVERSATION[:2], {"role": "tool", "content": {"temp": 21}}, TOOL_CONVERSATION[3]]
    assert check_row({"messages": as_object}, FORMATS["messages"], "x")["messages"] == row["messages"]  # JSON text
    assert _trained(chat_pieces(row["messages"], tok, LLAMA31_LIKE, "x")) == [f"{call}<|eot|>", "21 degrees.<|eot|>"]
    assert _trained(chat_pieces(row["messages"], tok, CHATML, "x", row["tools"])) == [
        f"<tool_call>\n{call}\n</tool_call><|im_end|>\n", "21 degrees.<|im_end|>\n"]
    # a template that refuses the marked copy (roles must alternate once the call is taken out): the turn is
    # found from the end of the generation prompt to where the conversation cut after it stops matching
    assert _trained(chat_pieces(row["messages"], tok, MISTRAL_LIKE, "x")) == [
        f"[TOOL_CALLS] [{call}]<|endoftext|>", " 21 degrees.<|endoftext|>"]
    # text before the call and two calls in one turn: all of it trained, as one span
    both = [{**TOOL_CONVERSATION[1], "content": "Checking.", "tool_calls": TOOL_CONVERSATION[1]["tool_calls"] * 2}]
    row = check_row({"messages": [TOOL_CONVERSATION[0], *both]}, FORMATS["messages"], "x")
    assert _trained(chat_pieces(row["messages"], tok, QWEN3_LIKE, "x")) == [
        f"Checking.\n<tool_call>\n{call}\n</tool_call>\n<tool_call>\n{call}\n</tool_call><|im_end|>\n"]


def test_a_space_the_template_writes_before_the_answer_is_trained_with_it(tok):
    """Llama 2's and Mistral's templates write ' ' + content after '[/INST]', the end of the generation prompt: the
    space was read and tokenized apart ('Ġ', 'He'), a sequence the whole text never gives and the model never
    writes after '[/INST]'; it is the model's to write, so it trains with the answer, as the whole text's 'ĠHe'."""
    template = ("{% for m in messages %}{% if m.role == 'user' %}{{ '[INST] ' + m.content + '[/INST]' }}"
                "{% else %}{{ ' ' + m.content | trim + eos_token }}{% endif %}{% endfor %}")
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
            {"role": "user", "content": "And?"}, {"role": "assistant", "content": "Bye"}]
    assert _trained(chat_pieces(conv, tok, template, "x")) == [" Hello there<|endoftext|>", " Bye<|endoftext|>"]
    ex = tokenize_examples([{"messages": conv}], "messages", tok, chat_template=template)[0]
    assert ex.input_ids == enc(tok, tok.apply_chat_template(conv, chat_template=template, tokenize=False))
    # ChatML's generation prompt ends where the content starts: nothing moves
    assert _trained(chat_pieces(conv, tok, CHATML_IN_TEST, "x")) == ["Hello there<|im_end|>\n", "Bye<|im_end|>\n"]


def test_tool_call_arguments_as_json_text_render_as_their_object(tok):
    """OpenAI's API writes a call's arguments as JSON text: Llama 3.1's `tojson` quoted that text again (a string
    holding JSON, not the object the model writes at inference, where vLLM decodes it first). The text is decoded
    to its object, so every template writes the same call as for the object; empty arguments are {}; text that
    is no JSON object stays as it is."""
    def calls(arguments):
        turn = {**TOOL_CONVERSATION[1], "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                                                        "arguments": arguments}}]}
        return check_row({"messages": [TOOL_CONVERSATION[0], turn]}, FORMATS["messages"], "x")["messages"]

    for template in (LLAMA31_LIKE, QWEN3_LIKE, CHATML):
        assert chat_pieces(calls('{"city":"Paris"}'), tok, template, "x") == \
            chat_pieces(calls({"city": "Paris"}), tok, template, "x")
    assert calls("")[1]["tool_calls"][0]["function"]["arguments"] == {} == \
        calls(None)[1]["tool_calls"][0]["function"]["arguments"]
    assert calls("Paris")[1]["tool_calls"][0]["function"]["arguments"] == "Paris"
    assert calls("[1, 2]")[1]["tool_calls"][0]["function"]["arguments"] == "[1, 2]"
    assert TOOL_CONVERSATION[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}  # rows left as given


def test_tool_conversations_train_through_load_splits(tmp_path, tok):
    """The example config's data: every assistant turn trained, calls included, and nothing else."""
    examples = Path(__file__).parents[1] / "examples"
    raw = yaml.safe_load((examples / "configs" / "chat-tools.yaml").read_text())
    raw["dataset"].update(path=str(examples / "data" / "chat-tools.jsonl"), val_set_size=0)
    train, _ = load_splits(from_dict(raw), tok)
    assert len(train) == 8 and all(X not in labels[-1:] for labels in train.labels)  # whole: each ends trained
    text = [tok.decode([t for t, label in zip(ids, labels) if label != X]) for ids, labels in
            zip(train.input_ids, train.labels)]
    assert all(t.count("<tool_call>") == t.count("</tool_call>") >= 1 for t in text)
    assert all("get_weather" in t or "convert_currency" in t for t in text)
    assert not any("<tool_response>" in t or "temperature_c" in t or "# Tools" in t for t in text)


def test_reasoning_is_trained_with_its_turn(tok):
    """A turn's reasoning (reasoning_content, or a think block opening its content) that the template writes
    before the content was read, not trained (or refused, written inline): the turn is now cut where the
    generation prompt ends, so the think block is trained; a turn without reasoning keeps its empty think
    block read, as before."""
    conv = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "add"}]
    inline = [conv[0], {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"}]
    for messages in (conv, inline):
        assert chat_pieces(messages, tok, QWEN3_LIKE, "x") == [
            ("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", False),
            ("<think>\nadd\n</think>\n\n4<|im_end|>\n", True)]
    for key in ("reasoning_content", "reasoning", "thinking"):  # the keys datasets use; chatml writes each
        as_key = [conv[0], {"role": "assistant", "content": "4", key: "add"}]
        assert _trained(chat_pieces(as_key, tok, CHATML, "x")) == ["<think>\nadd\n</think>\n\n4<|im_end|>\n"]
    plain = [conv[0], {"role": "assistant", "content": "4"}]
    assert _trained(chat_pieces(plain, tok, QWEN3_LIKE, "x")) == ["4<|im_end|>\n"]


def test_reasoning_a_template_leaves_out_is_logged_once(tmp_path, tok):
    """A template that does not write a turn's reasoning (Llama 3's writes content only; Qwen3's drops it from
    the turns before the last user message) trains the turn without it: one warning line with the count."""
    turn = {"role": "assistant", "content": "4", "reasoning_content": "add"}
    rows = [{"messages": [{"role": "user", "content": "2+2?"}, turn]}] * 3
    lines: list[str] = []
    load_splits(cfg_for(write_jsonl(tmp_path / "r.jsonl", rows), chat_template=LLAMA31_LIKE), tok, lines.append)
    assert lines == ["warning: the chat template leaves out the reasoning of 3 of 3 assistant turns that have one "
                     f"(first: {tmp_path / 'r.jsonl'}:1); they train without it (Qwen3's template keeps it only "
                     "after the last user turn); to train it, set dataset.chat_template to one that writes it "
                     "(chatml does)"]
    two_turns = [{"messages": [{"role": "user", "content": "2+2?"}, turn, {"role": "user", "content": "3+3?"},
                               {**turn, "content": "6"}]}]  # the same reasoning twice: each turn is checked apart
    lines.clear()
    load_splits(cfg_for(write_jsonl(tmp_path / "q.jsonl", two_turns), chat_template=QWEN3_LIKE), tok, lines.append)
    assert len(lines) == 1 and "reasoning of 1 of 2 assistant turns" in lines[0]
    lines.clear()
    load_splits(cfg_for(write_jsonl(tmp_path / "c.jsonl", two_turns), chat_template="chatml"), tok, lines.append)
    assert not any("reasoning" in line for line in lines)


def test_null_keys_as_parquet_gives_them_are_absent_keys(tmp_path, tok):
    """Parquet (and Hugging Face datasets) give each message every key some message has, null where absent:
    Llama 3's template asks `'tool_calls' in message`, so a plain turn with tool_calls: null failed. Null keys
    are now absent keys: the Parquet file trains as its JSON lines twin."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": TOOL_CONVERSATION}, {"messages": CONVERSATION}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    read = read_rows(tmp_path / "train.parquet").rows
    assert read[1]["messages"][0]["tool_calls"] is None  # what the user's file holds
    for template in (LLAMA31_LIKE, QWEN3_LIKE):
        assert tokenize_examples(read, "messages", tok, chat_template=template) == \
            tokenize_examples(rows, "messages", tok, chat_template=template)


def test_sharegpt_function_call_and_observation_turns(tok):
    """LLaMA-Factory's ShareGPT layout for tools: a `function_call` turn (the JSON text of {name, arguments})
    is the assistant's tool call, an `observation` turn the tool's result, `tools` JSON text, `system` a column:
    the same example as the messages it stands for."""
    call = TOOL_CONVERSATION[1]["tool_calls"][0]["function"]
    sharegpt = {"tools": json.dumps([WEATHER]), "conversations": [
        {"from": "human", "value": "Weather in Paris?"}, {"from": "function_call", "value": json.dumps(call)},
        {"from": "observation", "value": '{"temp": 21}'}, {"from": "gpt", "value": "21 degrees."}]}
    assert tokenize_examples([sharegpt], "sharegpt", tok, chat_template=CHATML) == \
        tokenize_examples([{"messages": TOOL_CONVERSATION, "tools": [WEATHER]}], "messages", tok,
                          chat_template=CHATML)
    # its `system` column is the system turn (unless the conversation opens with one)
    system = {"role": "system", "content": "Use the tools."}
    assert tokenize_examples([{**sharegpt, "system": system["content"]}], "sharegpt", tok, chat_template=CHATML) == \
        tokenize_examples([{"messages": [system, *TOOL_CONVERSATION], "tools": [WEATHER]}], "messages", tok,
                          chat_template=CHATML)


def test_tools_and_calls_a_template_does_not_write_are_refused(tok):
    """A template without tools (plain ChatML of old) would train a tool-call turn as its end of turn alone and
    never show the tools: one line saying which, where the old behaviour was a silent loss."""
    row = check_row({"messages": TOOL_CONVERSATION}, FORMATS["messages"], "f.jsonl:3")
    with pytest.raises(DataError, match=r"^f\.jsonl:3: the chat template does not write assistant message 1's "
                                        r"tool call 'get_weather'; set dataset\.chat_template to one that writes"):
        chat_pieces(row["messages"], tok, CHATML_IN_TEST, "f.jsonl:3")
    with pytest.raises(DataError, match=r"^x: the chat template does not write the row's tools \(no 'get_weather' "
                                        r"in its output\)"):
        chat_pieces(CONVERSATION, tok, CHATML_IN_TEST, "x", [WEATHER])
    only_chat = "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tool role') }}{% endif %}" + \
        CHATML_IN_TEST[len("{% for m in messages %}"):]
    with pytest.raises(DataError, match=r"^x: the chat template failed on this conversation: no tool role; it has "
                                        r"tool turns: set dataset\.chat_template to one that writes them"):
        chat_pieces(row["messages"], tok, only_chat, "x")


def test_conversational_prompt_completion_trains_the_completion_only(tmp_path, tok):
    """TRL's conversational prompt-completion (`prompt` and `completion` as lists of messages) was refused
    ("field 'prompt' is a list"): it is one conversation whose completion's assistant turns train, the
    prompt's (a few-shot history) read; `auto` finds it; a row mixing a string and a list is one line."""
    prompt, completion = CONVERSATION[:4], CONVERSATION[4:]
    row = {"prompt": prompt, "completion": completion}
    pieces = chat_pieces(CONVERSATION, tok, CHATML_IN_TEST, "x", first_trained=4)
    assert _trained(pieces) == ["4<|im_end|>\n"] and "".join(t for t, _ in pieces) == \
        tok.apply_chat_template(CONVERSATION, chat_template=CHATML_IN_TEST, tokenize=False)
    whole = tokenize_examples([{"messages": CONVERSATION}], "messages", tok, chat_template=CHATML_IN_TEST)[0]
    ex = tokenize_examples([row], "completion", tok, chat_template=CHATML_IN_TEST)[0]
    assert ex.input_ids == whole.input_ids
    history = len(enc(tok, "".join(t for t, _ in pieces[:-1])))  # everything before the completion's turn
    assert set(ex.labels[:history]) == {X} and ex.labels[history:] == whole.labels[history:] != [X] * 3
    train, _ = load_splits(cfg_for(write_jsonl(tmp_path / "pc.jsonl", [row, row]), chat_template=CHATML_IN_TEST),
                           tok)
    assert train.input_ids[0][:len(ex.input_ids)] == ex.input_ids
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [row, {"prompt": "2+2?", "completion": completion}])
    with pytest.raises(DataError, match=r"mixed\.jsonl:2: format completion: 'prompt' and 'completion' must both be "
                                        r"strings, or both lists of messages \(a conversation\), got a str and a list"):
        load_splits(cfg_for(mixed, chat_template="chatml"), tok)


def test_a_turn_marked_weight_0_or_train_false_is_read(tmp_path, tok):
    """Axolotl's per-turn `weight` (0 / 1), or `train` / `training` (false / true): a turn marked 0 is read, not
    trained (it trained: the key was ignored, and under ShareGPT all were); another value is one line with the
    row's line."""
    for key, off in (("weight", 0), ("train", False), ("training", False)):  # training: Axolotl's docs' key
        conv = [*CONVERSATION[:2], {**CONVERSATION[2], key: off}, *CONVERSATION[3:]]
        assert _trained(chat_pieces(check_row({"messages": conv}, FORMATS["messages"], "x")["messages"], tok,
                                    CHATML_IN_TEST, "x")) == ["4<|im_end|>\n"]
        on = [*CONVERSATION[:2], {**CONVERSATION[2], key: 1 if key == "weight" else True}, *CONVERSATION[3:]]
        assert tokenize_examples([{"messages": on}], "messages", tok, chat_template=CHATML_IN_TEST) == \
            tokenize_examples([{"messages": CONVERSATION}], "messages", tok, chat_template=CHATML_IN_TEST)
    speaker = {"system": "system", "user": "human", "assistant": "gpt"}  # ShareGPT's turns keep it too (they trained)
    for key, off in (("weight", 0), ("train", False), ("training", False)):
        turns = [{"from": speaker[m["role"]], "value": m["content"], **({key: off} if n == 2 else {})}
                 for n, m in enumerate(CONVERSATION)]
        assert _trained(chat_pieces(check_row({"conversations": turns}, FORMATS["sharegpt"], "x")["messages"], tok,
                                    CHATML_IN_TEST, "x")) == ["4<|im_end|>\n"]
    bad = [*CONVERSATION[:2], {**CONVERSATION[2], "weight": 0.5}]
    cfg = cfg_for(write_jsonl(tmp_path / "w.jsonl", [{"messages": CONVERSATION}, {"messages": bad}]),
                  chat_template="chatml")
    with pytest.raises(DataError, match=r"w\.jsonl:2: messages\[2\]: weight must be 0 or 1 \(whether the turn is "
                                        r"trained\), got 0\.5"):
        load_splits(cfg, tok)


def test_a_number_as_a_turns_content_is_its_text_as_in_the_other_formats(tok):
    """`"content": 4` (a math answer written as a JSON number) was refused, where prompt / completion / alpaca
    fields take numbers as text; a boolean is still no content."""
    numeric = [*CONVERSATION[:4], {"role": "assistant", "content": 4}]
    assert tokenize_examples([{"messages": numeric}], "messages", tok, chat_template=CHATML_IN_TEST) == \
        tokenize_examples([{"messages": CONVERSATION}], "messages", tok, chat_template=CHATML_IN_TEST)
    with pytest.raises(DataError, match=r"x: messages\[4\] must be an object with a role"):
        check_row({"messages": [*CONVERSATION[:4], {"role": "assistant", "content": True}]}, FORMATS["messages"], "x")


@pytest.mark.parametrize("row, expect", [
    ({"messages": [{"role": "assistant", "content": None}]},
     r": messages\[0\] must be an object with a role .* string content; a turn that only calls tools gives them as "
     r"tool_calls"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}]},
     r": messages\[0\]: tool_calls\[0\] must be an object with a function \{name, arguments\}"),
    ({"messages": [{"role": "assistant", "tool_calls": "get_weather"}]}, r": messages\[0\]: tool_calls must be a list"),
    ({"messages": CONVERSATION, "tools": "[{"}, r": 'tools' is not JSON text of a list of function schemas"),
    ({"messages": CONVERSATION, "tools": {"name": "f"}}, r": 'tools' must be a list of function schemas"),
    ({"conversations": [{"from": "function_call", "value": "get_weather(Paris)"}]},
     r": conversations\[0\]: a function_call's value must be the JSON text of \{name, arguments\}"),
])
def test_bad_tool_data_named_with_its_line(tmp_path, tok, row, expect):
    good = {"conversations": [{"from": "human", "value": "Hi"}]} if "conversations" in row else \
        {"messages": CONVERSATION}
    cfg = cfg_for(write_jsonl(tmp_path / "t.jsonl", [good, row]), chat_template="chatml")
    with pytest.raises(DataError, match=r"t\.jsonl:2" + expect):
        load_splits(cfg, tok)


# --- BOS and EOS as the tokenizer defines them -------------------------------------------------------

def _with_bos(tok):
    from tokenizers import processors

    tok.add_special_tokens({"bos_token": "<s>"})
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    assert tok("ab")["input_ids"][0] == tok.bos_token_id  # the tokenizer adds it: so do the examples
    return tok


def test_bos_added_once_and_never_a_target(tok):
    tok = _with_bos(tok)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    ex = tokenize_examples([{"prompt": "Q:", "completion": " A"}], "completion", tok)[0]
    assert ex.input_ids == [bos] + enc(tok, "Q:") + enc(tok, " A") + [eos]
    assert ex.labels == [X] + [X] * len(enc(tok, "Q:")) + enc(tok, " A") + [eos]
    text = tokenize_examples([{"text": "<s>ab"}], "text", tok)[0]  # already starts with it: not twice
    assert text.input_ids == [bos] + enc(tok, "ab") + [eos] and text.labels[0] == X
    template = "{{ bos_token }}" + CHATML_IN_TEST  # a template that writes its own BOS
    chat = tokenize_examples([{"messages": CONVERSATION}], "messages", tok, chat_template=template)[0]
    assert chat.input_ids.count(bos) == 1 and chat.input_ids[0] == bos and chat.labels[0] == X


def _sentencepiece_like():
    """A tokenizer as Llama 2's, Mistral's, TinyLlama's and Phi-3's: Metaspace (spaces as '▁', one '▁' put before a
    text's start), no merge across a line break (SentencePiece's byte fallback), BOS <s>, EOS </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [json.loads(line)["question"] + "\n" + json.loads(line)["answer"]
             for line in (Path(__file__).parents[1] / "surogate/data/gsm8k/train.jsonl").read_text().splitlines()[:300]]
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.Metaspace()])
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"],
                                                      initial_alphabet=list("<>|#:\n")))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    tk.decoder = decoders.Metaspace(prepend_scheme="first")
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", unk_token="<unk>")


def test_sentencepiece_pieces_are_the_whole_texts_tokens_without_a_space_before_each():
    """Tokenized apart, every piece got the '▁' a SentencePiece tokenizer puts before a text: Alpaca's output and
    each answer after '<|assistant|>\\n' trained as ' The ...' (a space the data does not have, learned at the
    start of every answer) and a '▁' read before each later turn. The pieces are now the whole text's tokens cut
    where they meet; where a token spans the meeting point they stay apart, as before."""
    tok = _sentencepiece_like()
    zephyr = ("{% for m in messages %}{{ '<|' + m.role + '|>\\n' + m.content + eos_token + '\\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "The sum is 5"},
            {"role": "user", "content": "And?"}, {"role": "assistant", "content": "Then 6"}]
    ex = tokenize_examples([{"messages": conv}], "messages", tok, chat_template=zephyr)[0]
    text = tok.apply_chat_template(conv, chat_template=zephyr, tokenize=False)
    assert ex.input_ids == enc(tok, text) and tok.decode(ex.input_ids) == text
    trained = [i for i, label in zip(ex.input_ids, ex.labels) if label != X]
    assert tok.decode(trained) == "The sum is 5</s>\nThen 6</s>\n"
    row = {"instruction": "Add two and three", "input": "", "output": "The sum is 5"}
    ex = tokenize_examples([row], "alpaca", tok)[0]
    assert ex.input_ids[:-1] == enc(tok, "".join(t for t, _ in FORMATS["alpaca"].pieces(row)))
    assert not tok.convert_ids_to_tokens([i for i in ex.labels if i != X])[0].startswith("▁")  # 'T', not '▁T'


def test_no_bos_when_the_tokenizer_adds_none(tok):
    assert tok.bos_token_id is None
    ex = tokenize_examples([{"text": "ab"}], "text", tok)[0]
    assert ex.input_ids == enc(tok, "ab") + [tok.eos_token_id]


# --- auto detection ---------------------------------------------------------------------------------

@pytest.mark.parametrize("row, name", [
    ({"messages": []}, "messages"), (ALPACA, "alpaca"), ({"instruction": "i", "output": "o"}, "alpaca"),
    ({"prompt": "p", "completion": "c"}, "completion"), ({"question": "q", "answer": "a"}, "gsm8k"),
    ({"text": "t"}, "text"), ({"text": "t", "messages": []}, "messages"),
])
def test_detect(row, name):
    assert detect(row).name == name


@pytest.mark.parametrize("row, mapping", [
    ({"instruction": "Add.", "context": "2 and 3", "response": "5", "category": "math"},  # Dolly
     {"response": "output", "context": "input"}),
    ({"system_prompt": "", "question": "Add 2 and 3.", "response": "5"},  # OpenOrca
     {"question": "instruction", "response": "output"}),
    ({"prompt": "2+3=", "response": " 5"}, {"response": "completion"}),
])
def test_columns_map_a_datasets_field_names_and_the_error_says_which(tmp_path, tok, row, mapping):
    """Rows whose fields name the prompt and the answer otherwise (Dolly, OpenOrca, prompt / response) were
    "cannot tell the format": the error now gives the `dataset.columns` that maps them, and with it they train
    as the format's own rows."""
    path = write_jsonl(tmp_path / "d.jsonl", [row, row])
    with pytest.raises(DataError, match=r"cannot tell the format .*; or map its fields to \w+'s with "
                                        r"dataset\.columns: \{" + re.escape(", ".join(f"{k}: {v}" for k, v in
                                                                                      mapping.items())) + r"\}$"):
        load_splits(cfg_for(path), tok)
    train, _ = load_splits(cfg_for(path, columns=mapping), tok)
    as_format = {mapping.get(k, k): v for k, v in row.items()}
    fmt = "completion" if "completion" in as_format else "alpaca"
    assert train.input_ids[0][:len(ex := tokenize_examples([as_format], fmt, tok)[0].input_ids)] == ex
    with pytest.raises(ConfigError, match=r"^dataset\.columns: expected a mapping of your rows' field names"):
        cfg_for(path, columns=["response"])


def test_preference_pairs_are_named_as_such(tmp_path, tok):
    """DPO data (prompt / chosen / rejected, or chosen and rejected conversations) got "cannot tell the format";
    it is named for what it is, with what to write instead."""
    for row in ({"prompt": "2+2?", "chosen": "4", "rejected": "5"},
                {"chosen": CONVERSATION, "rejected": CONVERSATION}):
        with pytest.raises(DataError, match=r"dpo\.jsonl:1: rows with 'chosen' and 'rejected' are preference pairs "
                                            r"\(for DPO\); surogate train fine-tunes on one answer per row: write"):
            load_splits(cfg_for(write_jsonl(tmp_path / "dpo.jsonl", [row])), tok)


def test_auto_reads_each_format_and_refuses_unknown_rows_in_one_line(tmp_path, tok):
    cfg = cfg_for(write_jsonl(tmp_path / "a.jsonl", [ALPACA]))
    assert cfg.dataset.format == "auto" and cfg.dataset.eval_split is None
    train, _ = load_splits(cfg, tok)
    assert train.input_ids[0] == tokenize_examples([ALPACA], "alpaca", tok)[0].input_ids
    cfg = cfg_for(write_jsonl(tmp_path / "odd.jsonl", [{"foo": 1, "bar": 2}]))
    with pytest.raises(DataError, match=r"odd\.jsonl:1: cannot tell the format of a row with keys \['bar', 'foo'\]; "
                                        r"set dataset\.format, one of messages \(messages\); sharegpt "
                                        r"\(conversations\); alpaca") as e:
        load_splits(cfg, tok)
    assert "\n" not in str(e.value)


# --- files, folders, Parquet, Hugging Face datasets --------------------------------------------------

def test_json_array_file_reports_the_line_of_a_bad_row(tmp_path, tok):
    p = tmp_path / "rows.json"
    p.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "c",\n   "completion": "d"},\n'
                 '  {"prompt": "e"}\n]\n')
    rows = read_rows(p)
    assert rows.lines == [2, 3, 5] and rows.rows[1] == {"prompt": "c", "completion": "d"}
    with pytest.raises(DataError, match=r"rows\.json:5: row has no 'completion' \(format completion needs prompt, "
                                        r"completion\)"):
        load_splits(cfg_for(p), tok)
    jl = tmp_path / "lines.json"  # JSON lines under a .json name, as datasets' json loader takes them
    jl.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert read_rows(jl).rows == [{"text": "a"}, {"text": "b"}]


def test_a_json_file_is_one_array_with_commas_between_its_objects(tmp_path):
    """Two arrays one after the other (`cat a.json b.json`), a missing comma, an unclosed array: each a DataError
    at its line, not rows read up to the first `]` (the second array was dropped without a word)."""
    one = json.dumps([{"text": "a"}, {"text": "b"}], indent=1)
    cases = {"two.json": (one + "\n" + one + "\n", r"two\.json:9: not valid JSON \(more data after the array\)"),
             "comma.json": ('[\n{"text": "a"}\n{"text": "b"}\n]\n', r"comma\.json:3: .*expected ',' or ']'"),
             "open.json": ('[\n{"text": "a"},\n{"text": "b"}\n', r"open\.json:4: .*the array is not closed")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=message):
            read_rows(tmp_path / name)
    (tmp_path / "ok.json").write_text('[ {"text": "a"} ,\n {"text": "b"} ]\n\n')
    assert read_rows(tmp_path / "ok.json").rows == [{"text": "a"}, {"text": "b"}]
    (tmp_path / "empty.json").write_text("[]")
    assert read_rows(tmp_path / "empty.json").rows == []


def test_malformed_json_names_the_column(tmp_path):
    """json's "Invalid control character at" keeps the position apart: the line says the column (it read cut off)."""
    (tmp_path / "tab.jsonl").write_text('{"text": "a"}\n{"text": "b\tc"}\n')
    with pytest.raises(DataError, match=r"tab\.jsonl:2: not valid JSON \(Invalid control character at column 12\); "
                                        r"expected one object per line$"):
        read_rows(tmp_path / "tab.jsonl")
    (tmp_path / "cut.json").write_text('[\n{"text": "a"},\n{"text": }\n]\n')
    with pytest.raises(DataError, match=r"cut\.json:3: not valid JSON \(Expecting value at column 10\)"):
        read_rows(tmp_path / "cut.json")


def test_non_utf8_bytes_are_a_data_error_at_their_line_and_a_bom_is_read(tmp_path):
    """A Latin-1 byte on line 3: one line naming file and line (was a UnicodeDecodeError traceback), in JSON
    lines and in a .json array; a UTF-8 byte-order mark (what Windows editors write) is skipped."""
    rows = ['{"text": "a"}', '{"text": "b"}', '{"text": "caf\xe9"}']
    (tmp_path / "latin.jsonl").write_bytes("\n".join(rows).encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.jsonl:3: not UTF-8 text \(byte 0xe9\); save the file as UTF-8"):
        read_rows(tmp_path / "latin.jsonl")
    (tmp_path / "latin.json").write_bytes(("[\n" + ",\n".join(rows) + "\n]").encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.json:4: not UTF-8 text"):
        read_rows(tmp_path / "latin.json")
    for name in ("bom.jsonl", "bom.json"):
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + '{"text": "a"}\n{"text": "b"}\n'.encode())
        assert read_rows(tmp_path / name).rows == [{"text": "a"}, {"text": "b"}]


def test_folder_with_splits_in_different_file_types(tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "one"}, {"text": "two"}])
    (tmp_path / "test.json").write_text(json.dumps([{"text": "three"}]))
    train, evaluation = load_splits(cfg_for(tmp_path), tok)
    assert sum(p.count(0) for p in train.positions) == 2 and sum(p.count(0) for p in evaluation.positions) == 1
    assert evaluation.input_ids[0] == enc(tok, "three") + [tok.eos_token_id]


def test_unsupported_file_suffix_refused_at_config(tmp_path):
    (tmp_path / "rows.xlsx").write_text("text\nhi\n")
    with pytest.raises(ConfigError, match=r"^dataset\.path: .*rows\.xlsx' is not a \.jsonl, \.json, \.parquet, "
                                          r"\.csv, \.tsv file"):
        cfg_for(tmp_path / "rows.xlsx")


def test_csv_and_tsv_rows_train_as_their_jsonl_twins_and_name_their_line(tmp_path, tok):
    """A CSV with a header (Alpaca's columns; a quoted cell holding the separator, a quote and a line break) and
    its TSV twin read as the same rows as JSON lines: the same ids and targets (CSV was refused before). A bad
    record is named by the line it starts on; an empty cell is "" (Alpaca's optional input), a short record's
    missing cell a missing field."""
    rows = [ALPACA, {"instruction": 'Say "hi", twice', "input": "", "output": "hi\nhi"}, {**ALPACA, "output": "7"}]
    (tmp_path / "rows.csv").write_text('instruction,input,output\nAdd the numbers.,2 and 3,5\n'
                                       '"Say ""hi"", twice",,"hi\nhi"\nAdd the numbers.,2 and 3,7\n')
    with open(tmp_path / "rows.tsv", "w", newline="") as f:  # as a spreadsheet exports it
        writer = csv.DictWriter(f, ["instruction", "input", "output"], delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    want = tokenize_examples(rows, "alpaca", tok)
    for name in ("rows.csv", "rows.tsv"):
        read = read_rows(tmp_path / name)
        assert read.rows == rows and read.lines == [2, 3, 5], name
        train, _ = load_splits(cfg_for(tmp_path / name, val_set_size=0), tok)
        assert sum(p.count(0) for p in train.positions) == 3
        assert tokenize_examples(read, "auto", tok) == want
    (tmp_path / "short.csv").write_text("instruction,input,output\nAdd.,1,2\nAdd.\n")
    with pytest.raises(DataError, match=r"short\.csv:3: row's 'output' is null \(format alpaca"):
        load_splits(cfg_for(tmp_path / "short.csv"), tok)
    (tmp_path / "wide.csv").write_text("text\nfine\ntwo,cells\n")
    with pytest.raises(DataError, match=r"wide\.csv:3: 2 cells under a header of 1 \(text\); quote cells"):
        read_rows(tmp_path / "wide.csv")


def test_a_quoted_csv_cell_left_open_is_an_error_at_its_line_not_rows_swallowed(tmp_path):
    """csv's lenient default read an unclosed quote's cell on through the next records (one row fewer, another's
    text in this one's instruction) or to the file's end, silently: it is an error naming the record's line."""
    (tmp_path / "open.csv").write_text('instruction,output\n"Add 2 and 3",5\n"Say hi,hi\n"Count",3\n')
    with pytest.raises(DataError, match=r"open\.csv:3: not valid CSV \(.*\); a quoted cell must end with a quote"):
        read_rows(tmp_path / "open.csv")
    (tmp_path / "end.csv").write_text('text\ngood\n"never closed\nx\n')
    with pytest.raises(DataError, match=r"end\.csv:3: not valid CSV \(unexpected end of data\)"):
        read_rows(tmp_path / "end.csv")


def test_a_jsonl_error_at_the_end_of_its_line_names_that_column(tmp_path):
    """json read the line with its line break and placed an error at the line's end at column 1 (of the next line)."""
    (tmp_path / "cut.jsonl").write_text('{"text": "a"}\n{"text": "bad", \r\n')
    with pytest.raises(DataError, match=r"cut\.jsonl:2: not valid JSON \(.* at column 17\)"):
        read_rows(tmp_path / "cut.jsonl")


def test_single_file_has_no_eval_split(tmp_path):
    p = write_jsonl(tmp_path / "rows.jsonl", [{"text": "a"}])
    with pytest.raises(ConfigError, match=r"^dataset\.eval_split: dataset\.path is one file .*val_set_size"):
        cfg_for(p, eval_split="test")
    with pytest.raises(ConfigError, match=r"^dataset\.train_split: dataset\.path is one file"):
        cfg_for(p, train_split="dev")


def test_parquet_file(tmp_path, tok):
    import pyarrow as pa  # an optional reader for users, part of the test extra; its absence is tested below
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"prompt": "Q:", "completion": " A"}, {"prompt": "R:", "completion": " B"}]),
                   tmp_path / "rows.parquet")
    rows = read_rows(tmp_path / "rows.parquet")
    assert rows.rows[1] == {"prompt": "R:", "completion": " B"} and rows.where(1).endswith("rows.parquet row 2")
    train, evaluation = load_splits(cfg_for(tmp_path / "rows.parquet", val_set_size=1), tok)
    assert len(train) == 1 and len(evaluation) == 1


def test_a_bad_parquet_row_is_named_by_its_row_in_the_file_after_the_hold_out(tmp_path, tok):
    """Files without line numbers name rows by position: after `val_set_size` took rows out, the position in the
    train part named the wrong row (row 2 for the file's row 3)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "Q:", "completion": " A"}, {"prompt": "R:", "completion": " B"},
            {"prompt": "S:", "completion": None}, {"prompt": "T:", "completion": " D"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    for seed in range(4):  # the held-out row differs with the seed; the bad row is row 3 in every split
        cfg = cfg_for(tmp_path / "rows.parquet", val_set_size=1)
        cfg.seed = seed
        with pytest.raises(DataError, match=r"rows\.parquet row 3\b"):
            load_splits(cfg, tok)
    train, held = hold_out(read_rows(tmp_path / "rows.parquet"), 2, seed=0)
    assert sorted([train.where(0), train.where(1), held.where(0), held.where(1)]) == [
        f"{tmp_path / 'rows.parquet'} row {i}" for i in (1, 2, 3, 4)]


def test_a_hold_out_larger_than_the_data_says_what_to_set(tmp_path):
    rows = Rows("rows.jsonl", [{"text": "a"}] * 4, [1, 2, 3, 4])
    with pytest.raises(DataError, match=r"^dataset\.val_set_size: 10 of 4 rows: 10 rows held out, 0 left to train on; "
                                        r"both need at least one: set val_set_size between 1 and 3"):
        hold_out(rows, 10, seed=0)
    with pytest.raises(DataError, match=r"one row cannot be split"):
        hold_out(Rows("one.jsonl", [{"text": "a"}], [1]), 0.5, seed=0)


def test_parquet_without_pyarrow_is_one_line_saying_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "rows.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ConfigError, match=r"^dataset\.path: reading .*rows\.parquet needs the `pyarrow` package: "
                                          r"pip install pyarrow"):
        cfg_for(tmp_path / "rows.parquet")
    with pytest.raises(DataError, match=r"rows\.parquet needs the `pyarrow` package: pip install pyarrow"):
        read_rows(tmp_path / "rows.parquet")


def test_a_compressed_data_file_says_to_decompress_it(tmp_path):
    """A .jsonl.gz (Axolotl and datasets read it) was answered 'is not a .jsonl, .json, ... file'."""
    import gzip

    path = tmp_path / "rows.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write('{"text": "a"}\n')
    with pytest.raises(ConfigError, match=r"^dataset\.path: '.*rows\.jsonl\.gz' is compressed; decompress it "
                                          r"\(gunzip -k .*\) and point dataset\.path at the \.jsonl file$"):
        cfg_for(path)
    (tmp_path / "rows.jsonl.bak").write_text("")  # not compressed: the suffixes read
    with pytest.raises(ConfigError, match=r"^dataset\.path: '.*rows\.jsonl\.bak' is not a \.jsonl, \.json"):
        cfg_for(tmp_path / "rows.jsonl.bak")


def test_a_json_object_holding_the_rows_says_where_they_are(tmp_path):
    """{"data": [rows]} pretty-printed (what datasets reads with field=) was 'not valid JSON ... at column 2'."""
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"version": 1, "data": [ALPACA]}, indent=2))
    with pytest.raises(DataError, match=r"rows\.json: one JSON object \(keys 'version', 'data'\), not an array of rows "
                                        r"nor one object a line; its rows look to be under 'data': write that list "
                                        r"alone \(jq '\.data' .*rows\.json > rows\.json\)$"):
        read_rows(path)
    path.write_text('{"a": 1}\n{"b": ')  # JSON lines, the second one broken: still its line
    with pytest.raises(DataError, match=r"rows\.json:2: not valid JSON"):
        read_rows(path)
    # the same object on one line reads as one JSON line: it said "cannot tell the format of a row with keys"
    path.write_text(json.dumps({"version": 1, "data": [ALPACA, ALPACA]}) + "\n")
    with pytest.raises(DataError, match=r"rows\.json:1: one JSON object holding rows under 'data', not a row; write "
                                        r"that list alone \(jq '\.data' .*rows\.json > rows\.json\), or one object"):
        resolve_format(read_rows(path), "auto")
    one_chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    path.write_text(json.dumps(one_chat) + "\n")  # a one-row chat file: its list holds turns, not rows
    assert resolve_format(read_rows(path), "auto").name == "messages"


def test_hf_datasets_missing_is_one_line_saying_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    with pytest.raises(ConfigError, match=r"^dataset\.path: .*save_to_disk.*pip install datasets"):
        cfg_for(saved)
    with pytest.raises(ConfigError, match=r"^dataset\.path: 'someone/some-set' is not a file or folder here; .*"
                                          r"pip install datasets"):
        from_dict({"dataset": {"path": "someone/some-set"}})
    with pytest.raises(ConfigError, match=r"^dataset\.train_split: .*train\.jsonl does not exist"):
        cfg_for(tmp_path)  # an empty folder: no <split> files, and no datasets to try load_dataset
    from surogate.training.data_files import read_hf_split

    with pytest.raises(DataError, match=r"needs the `datasets` package: pip install datasets"):
        read_hf_split(str(saved), "train")


def test_hf_save_to_disk_and_load_dataset_folder(tmp_path, tok):
    import datasets  # an optional reader for users, part of the test extra; its absence is tested above
    d = datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "a b"}, {"text": "c d"}]),
                              "validation": datasets.Dataset.from_list([{"text": "e f"}])})
    d.save_to_disk(str(tmp_path / "saved"))
    train, evaluation = load_splits(cfg_for(tmp_path / "saved", eval_split="validation"), tok)
    assert sum(p.count(0) for p in train.positions) == 2 and evaluation.input_ids[0] == enc(tok, "e f") + [tok.eos_token_id]
    assert cfg_for(tmp_path / "saved").dataset.eval_split == "validation"  # the default "test" is absent
    with pytest.raises(ConfigError, match=r"^dataset\.eval_split: .*has no split 'test'; its splits: train, validation"):
        cfg_for(tmp_path / "saved", eval_split="test")
    raw = tmp_path / "raw"  # no <split>.<ext> files: load_dataset infers the split from the file name
    raw.mkdir()
    write_jsonl(raw / "my_train_part.jsonl", [{"prompt": "Q:", "completion": " A"}])
    train, evaluation = load_splits(cfg_for(raw, eval_split=None), tok)
    assert evaluation is None and train.input_ids[0] == enc(tok, "Q:") + enc(tok, " A") + [tok.eos_token_id]


# --- val_set_size -----------------------------------------------------------------------------------

def test_hold_out_is_seeded_disjoint_and_keeps_file_order():
    rows = Rows("f", [{"i": i} for i in range(10)], list(range(1, 11)))
    train, held = hold_out(rows, 0.25, seed=3)
    assert len(held) == 3 and len(train) == 7  # ceil(0.25 * 10), as datasets' train_test_split
    ids = [r["i"] for r in train.rows], [r["i"] for r in held.rows]
    assert sorted(ids[0] + ids[1]) == list(range(10)) and ids[0] == sorted(ids[0]) and ids[1] == sorted(ids[1])
    assert held.lines == [i + 1 for i in ids[1]]
    again = hold_out(rows, 0.25, seed=3)[1]
    assert [r["i"] for r in again.rows] == ids[1]
    others = {tuple(r["i"] for r in hold_out(rows, 0.25, seed=s)[1].rows) for s in range(8)}
    assert len(others) > 1  # the seed matters
    assert len(hold_out(rows, 4, seed=0)[1]) == 4
    with pytest.raises(DataError, match=r"^dataset\.val_set_size: 10 of 10 rows"):
        hold_out(rows, 10, seed=0)


def test_val_set_size_through_load_splits_uses_the_run_seed(tmp_path, tok):
    p = write_jsonl(tmp_path / "rows.jsonl", [{"text": f"row {i}"} for i in range(20)])
    cfg = from_dict({"dataset": {"path": str(p), "val_set_size": 0.2}, "seed": 5, "sample_packing": False})
    train, evaluation = load_splits(cfg, tok)
    assert len(train) == 16 and len(evaluation) == 4
    assert load_splits(cfg, tok)[1].input_ids == evaluation.input_ids
    held = {tok.decode(r[:-1]) for r in evaluation.input_ids}
    assert held == {r["text"] for r in hold_out(read_rows(p), 0.2, seed=5)[1].rows}
    assert held.isdisjoint(tok.decode(r[:-1]) for r in train.input_ids)


@pytest.mark.parametrize("value", [1.0, 1.5, -1, True, "ten"])
def test_val_set_size_must_be_a_fraction_or_a_count(value):
    with pytest.raises(ConfigError, match=r"^dataset\.val_set_size: expected a fraction in \(0, 1\) or a count"):
        from_dict({"dataset": {"val_set_size": value, "eval_split": None}})


@pytest.mark.parametrize("value", [0, 0.0])
def test_val_set_size_zero_holds_nothing_out(value):
    """Axolotl's default and its way to say "no eval from train": accepted as no hold-out (it was refused with a
    message that named no way to turn the hold-out off), leaving eval_split as it was set."""
    assert from_dict({"dataset": {"val_set_size": value}}).dataset.val_set_size is None
    assert from_dict({"dataset": {"val_set_size": value, "eval_split": None}}).dataset.eval_split is None


def test_val_set_size_and_eval_split_are_exclusive():
    with pytest.raises(ConfigError, match=r"^dataset\.val_set_size: set together with dataset\.eval_split \('test'\)"):
        from_dict({"dataset": {"val_set_size": 0.1, "eval_split": "test"}})
    assert from_dict({"dataset": {"val_set_size": 0.1}}).dataset.eval_split is None


# --- errors: one line, where to look, what to do -------------------------------------------------------

def test_a_mix_of_sources_trains_on_each_as_its_keys_say(tmp_path, tok):
    """`dataset` as a list: each source read in its own format, template and train_on_inputs, laid out apart
    (its log lines name its file), then trained on together; the eval rows are those of the sources that have
    an eval split."""
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [ALPACA] * 4 + [{**ALPACA, "output": "long " * 300}])
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}] * 3)
    sources = [{"path": str(alpaca), "val_set_size": 1},
               {"path": str(chat), "chat_template": CHATML_IN_TEST, "train_on_inputs": True}]
    cfg = from_dict({"dataset": sources, "sequence_len": 256})
    lines: list[str] = []
    train, evaluation = load_splits(cfg, tok, lines.append)
    alone = [load_splits(from_dict({"dataset": s, "sequence_len": 256}), tok) for s in sources]
    assert train.input_ids == alone[0][0].input_ids + alone[1][0].input_ids
    assert train.labels == alone[0][0].labels + alone[1][0].labels  # chat: everything trained (train_on_inputs)
    assert sum(row.count(X) for row in alone[1][0].labels) == 3  # only each packed example's first token
    assert sum(row.count(X) for row in alone[0][0].labels) > 4 * len(enc(tok, "### Instruction:"))  # prompts
    assert evaluation.input_ids == alone[0][1].input_ids and alone[1][1] is None
    assert train.examples == 4 + 3 and train.packed
    assert lines == []  # no chatml note: the template is given as Jinja
    assert train.log_lines() == alone[0][0].log_lines() and len(train.log_lines()) == 1  # the long one, cut
    assert "alpaca.jsonl (train split" in train.log_lines()[0]


def test_empty_train_file(tmp_path, tok):
    (tmp_path / "train.jsonl").write_text("\n")
    (tmp_path / "test.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(DataError, match=r"train\.jsonl: no examples in the train split \(the file is empty\)") as e:
        load_splits(cfg_for(tmp_path), tok)
    assert "\n" not in str(e.value)


def test_empty_train_file_from_the_cli_is_one_line_and_status_2(tmp_path, capsys):
    from surogate.training.cli import main

    (tmp_path / "train.jsonl").write_text("")
    (tmp_path / "test.jsonl").write_text('{"text": "x"}\n')
    assert main(["train", "--set", f"dataset.path={tmp_path}", "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("surogate: error: ") and "train.jsonl: no examples" in err and "\n" not in err


def test_row_without_its_field_names_file_and_line(tmp_path, tok):
    rows = [ALPACA, ALPACA, {"instruction": "x", "input": ""}]
    with pytest.raises(DataError, match=r"rows\.jsonl:3: row has no 'output' \(format alpaca needs instruction, "
                                        r"output\)"):
        load_splits(cfg_for(write_jsonl(tmp_path / "rows.jsonl", rows)), tok)
    # present but null: said so (was "row has no 'output' ...; it has ['input', 'instruction', 'output']")
    rows[2] = {"instruction": "x", "input": "", "output": None}
    with pytest.raises(DataError, match=r"rows2\.jsonl:3: row's 'output' is null \(format alpaca needs instruction, "
                                        r"output\)"):
        load_splits(cfg_for(write_jsonl(tmp_path / "rows2.jsonl", rows)), tok)


def test_alpaca_rows_under_gsm8k_say_which_format_they_look_like(tmp_path, tok):
    p = tmp_path / "rows.jsonl"
    p.write_text("\n" + json.dumps(ALPACA) + "\n")  # a blank first line: the row is on line 2
    with pytest.raises(DataError, match=r"rows\.jsonl:2: row has no 'question' \(format gsm8k needs question, answer\); "
                                        r"its keys \['input', 'instruction', 'output'\] look like format alpaca: set "
                                        r"dataset\.format: alpaca \(or auto\)"):
        load_splits(cfg_for(p, format="gsm8k"), tok)


def test_non_string_field_refused(tmp_path, tok):
    p = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": ["a"], "completion": "b"}])
    with pytest.raises(DataError, match=r"rows\.jsonl:1: field 'prompt' is a list; format completion needs a string"):
        load_splits(cfg_for(p), tok)


def test_dataset_keys_checked_at_config_time(tmp_path):
    with pytest.raises(ConfigError, match=r"^dataset\.format: 'chatml' is not one of auto, messages, sharegpt, alpaca"):
        from_dict({"dataset": {"format": "chatml"}})
    with pytest.raises(ConfigError, match=r"^dataset\.train_on_inputs: expected true or false"):
        from_dict({"dataset": {"train_on_inputs": "yes"}})
    with pytest.raises(ConfigError, match=r"^dataset\.path: .*nope\.jsonl' does not exist; give a"):
        from_dict({"dataset": {"path": str(tmp_path / "nope.jsonl")}})
    # a relative file name that is missing is said to be missing, not taken for a hub id (tried ~40 s offline)
    # (relative paths are read from the current directory, which the message names)
    for missing in ("data/train.csv", "train.CSV", "corpus.txt"):
        with pytest.raises(ConfigError, match=rf"^dataset\.path: '{re.escape(missing)}' does not exist in the current "
                                              rf"directory \({re.escape(str(Path.cwd()))}\); give a"):
            from_dict({"dataset": {"path": missing}})


def test_bundled_default_is_unchanged(tok):
    """format auto on the bundled sample is gsm8k: the default run trains on what it trained on before."""
    cfg = from_dict({"dataset": {"max_train_samples": 5, "eval_split": None}})
    train, evaluation = load_splits(cfg, tok)
    from surogate.training.data import build_split

    assert evaluation is None and train.input_ids == build_split(None, "train", "gsm8k", tok, 256, limit=5).input_ids


def test_default_config_takes_one_file_from_the_command_line(tmp_path):
    from surogate.training.config import load_config

    p = write_jsonl(tmp_path / "rows.jsonl", [ALPACA])
    cfg = load_config(None, [f"dataset.path={p}"])
    assert cfg.dataset.format == "auto" and cfg.dataset.eval_split is None
    cfg = load_config(None, [f"dataset.path={p}", "dataset.val_set_size=0.5"])
    assert cfg.dataset.val_set_size == 0.5 and cfg.dataset.eval_split is None
