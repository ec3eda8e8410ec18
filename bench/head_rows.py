"""The chunked LM head + cross-entropy on the labelled rows only (`max_trained`, ops/loss.py `trained_rows`)
against every row: chat and instruction data mask the prompt, yet the head's GEMMs ran on every token.

    python bench/head_rows.py [--out bench/results]

Qwen3 heads (vocabulary 151,936; hidden 1,024 / 4,096), a micro-batch of 2 x 4,096 tokens whose labelled share
is 25-100% (an answer after a masked prompt in each example); the training call (loss and both gradients in
the forward, then the backward), timed by triton.testing.do_bench; the bound given is the labelled count, as
the trainer's is at most. Also checked: the loss equals the every-row head's. Writes head_rows_<gpu>.json/.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: microbench
from microbench import command_line, formatted, table, write_results  # noqa: E402

HEADS = {"Qwen3-0.6B": 1024, "Qwen3-8B": 4096}
VOCAB, ROWS, SEQ = 151_936, 2, 4096
SHARES = (0.25, 0.5, 0.75, 1.0)


def _labels(share: float, gen: torch.Generator) -> torch.Tensor:
    """Rows of 512-token examples, each a masked prompt then an answer of `share` of its tokens."""
    labels = torch.full((ROWS, SEQ), -100, device="cuda")
    answer = int(512 * share)
    for start in range(0, SEQ, 512):
        labels[:, start + 512 - answer:start + 512] = torch.randint(0, VOCAB, (ROWS, answer), device="cuda",
                                                                    generator=gen)
    return labels


def main() -> None:
    from triton.testing import do_bench

    from surogate.ops.loss import compacted_rows, lm_head_cross_entropy

    args, env = command_line(__doc__, "--rep", type=int, default=50, help="do_bench's rep (ms)")
    rows = []
    for name, hidden_size in HEADS.items():
        gen = torch.Generator(device="cuda").manual_seed(0)
        hidden = torch.randn(ROWS, SEQ, hidden_size, device="cuda", generator=gen).bfloat16().requires_grad_()
        weight = (torch.randn(VOCAB, hidden_size, device="cuda", generator=gen) * 0.02).bfloat16()
        for share in SHARES:
            labels = _labels(share, gen)
            bound = int((labels[:, 1:] != -100).sum())
            times, losses = {}, {}
            for system, max_trained in (("every row", None), ("labelled rows", bound)):
                def step():
                    hidden.grad = None
                    loss = lm_head_cross_entropy(hidden, weight, labels, max_trained=max_trained)
                    loss.backward()
                    return loss

                losses[system] = step().item()
                times[system] = do_bench(step, warmup=5, rep=args.rep)
            row = {"model": name, "labelled": share, "head_rows": compacted_rows(ROWS * SEQ, bound) or ROWS * SEQ,
                   "every_ms": times["every row"], "labelled_ms": times["labelled rows"],
                   "speedup": times["every row"] / times["labelled rows"],
                   "loss_diff": abs(losses["every row"] - losses["labelled rows"])}
            rows.append(row)
            print(f"{name:<11} labelled {share:4.0%}  rows {row['head_rows']:>5}  every {row['every_ms']:7.3f} ms  "
                  f"labelled {row['labelled_ms']:7.3f} ms  x{row['speedup']:.2f}  |dloss| {row['loss_diff']:.1e}",
                  flush=True)
    lines = [f"# LM head + cross-entropy on the labelled rows only ({env.get('gpu')}, commit {env.get('commit')})",
             "", f"{ROWS} x {SEQ} tokens, vocabulary {VOCAB:,}; training call (forward with gradients + backward).",
             ""] + table([("model", "model"), ("labelled", formatted("labelled", ".0%")), ("head rows", "head_rows"),
                          ("every row (ms)", formatted("every_ms", ".3f")),
                          ("labelled rows (ms)", formatted("labelled_ms", ".3f")),
                          ("speed-up", formatted("speedup", ".2f")), ("abs loss diff", formatted("loss_diff", ".1e"))],
                         rows)
    print(write_results(args.out, "head_rows", env, {"rows": rows}, lines))


if __name__ == "__main__":
    main()
