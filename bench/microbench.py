"""What bench/'s GPU microbenchmarks share (lora_add, grad_lora_fp8, swiglu, delta_rule, attention_backends,
gemm_ceiling): their command line (--out and one option of their own) and their result files, <stem>_<gpu>.json
and .md in --out; and how one script of bench/ uses another (`load_script`)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent


def load_script(script: str) -> ModuleType:
    """bench/<script>.py as the module `bench_<script>`, loaded once a process (bench/ is no package; the name the
    smoke tests give it too, tests/bench_module.py)."""
    name = f"bench_{script}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / f"{script}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def command_line(doc: str, *option: str, **option_kwargs) -> tuple[argparse.Namespace, dict]:
    """(the parsed arguments, the run record: GPU, versions, commit). `option` and `option_kwargs` are the script's
    own option, as `ArgumentParser.add_argument` takes them."""
    from surogate.training.info import run_record

    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument(*option, **option_kwargs)
    return p.parse_args(), run_record(str(HERE))


def write_results(out: "str | Path", stem: str, env: dict, payload: dict, lines: list[str]) -> Path:
    """`{"env": env, **payload}` as <out>/<stem>_<gpu>.json and `lines` as the .md beside it (the GPU's last word,
    "h200"); returns the .md's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tag = env.get("gpu", "gpu").split()[-1].lower()
    (out / f"{stem}_{tag}.json").write_text(json.dumps({"env": env, **payload}, indent=1))
    md = out / f"{stem}_{tag}.md"
    md.write_text("\n".join(lines) + "\n")
    return md


# A result table's column: its header and its cell, a row's key (written as it is) or a function of the row.
Column = tuple[str, "str | Callable[[dict], str]"]


def formatted(key: str, spec: str) -> Callable[[dict], str]:
    """The cell `format(row[key], spec)`."""
    return lambda row: format(row[key], spec)


MICROSECONDS: Column = ("us", lambda row: f"{row['ms'] * 1e3:.1f}")  # the row's time, kept in ms


def table(columns: Sequence[Column], rows: Iterable[dict]) -> list[str]:
    """The Markdown lines of a table: the header, its rule, a line per row."""
    def cell(row: dict, how) -> str:
        return how(row) if callable(how) else str(row[how])

    return (["| " + " | ".join(header for header, _ in columns) + " |", "|" + "---|" * len(columns)]
            + ["| " + " | ".join(cell(row, how) for _, how in columns) + " |" for row in rows])


def varied_chat_rows(n: int) -> list[dict]:
    """`n` messages rows made from the bundled chat examples, each varied in content and length (a prompt of up to
    five more sentences, an answer of one to seven), so that packed rows hold several examples of unlike lengths."""
    base = [json.loads(line) for line in (HERE.parent / "examples/data/chat.jsonl").read_text().splitlines()]
    rows = []
    for i in range(n):
        row = json.loads(json.dumps(base[i % len(base)]))
        for m in row["messages"]:
            if m["role"] == "user":
                m["content"] += f" (variant {i})" + " Please explain every step." * (i % 5)
            elif m["role"] == "assistant":
                m["content"] += f" Checked {i} times." * (1 + i % 7)
        rows.append(row)
    return rows
