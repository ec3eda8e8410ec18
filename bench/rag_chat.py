"""A chat set shaped like retrieval-augmented instruction data (a long user turn of context, a short answer: about
a quarter of the tokens labelled), built from the bundled GSM8K sample: the data bench/gpu_pending.sh trains the
LM head on the labelled rows with and without the bound.
    python bench/rag_chat.py OUT.jsonl [examples]"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GSM8K = Path(__file__).resolve().parent.parent / "surogate" / "data" / "gsm8k" / "train.jsonl"


def rag_rows(examples: int) -> list[dict]:
    """`examples` conversations: a system turn, a user turn of 3-6 other problems as context and one question, and
    the question's worked answer as the assistant turn."""
    problems = [json.loads(line) for line in GSM8K.read_text().splitlines()]
    rows = []
    for i in range(examples):
        target = problems[i % len(problems)]
        context = [problems[(i * 7 + k) % len(problems)]["question"] for k in range(1, 4 + i % 4)]
        user = "Context:\n" + "\n\n".join(context) + f"\n\nUsing the context where it helps: {target['question']}"
        rows.append({"messages": [{"role": "system", "content": "You are a careful math tutor."},
                                  {"role": "user", "content": user},
                                  {"role": "assistant", "content": target["answer"]}]})
    return rows


if __name__ == "__main__":
    out, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 8000
    with open(out, "w") as f:
        for row in rag_rows(n):
            f.write(json.dumps(row) + "\n")
    print(f"{n} conversations -> {out}")
