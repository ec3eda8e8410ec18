"""How much of a young LoRA update survives bf16 rounding: once (the fused kernels) against twice (cuBLAS + addmm).

    python bench/lora_rounding.py            # CPU, about 10 s

Why: on the H200 (bench/NOTES.md runs 56-57) Qwen3-8B bf16 reached a loss of 12.156 after 7 steps on the
persistent kernel and 12.253 on cuBLAS, while the kernel computes `_lora_gemm_kernel`'s sums to the bit. The
routes differ in rounding: the fused kernels round `x W^T + s (x A^T) B^T` once; cuBLAS (and PEFT) round
`x W^T` to bf16 and then add the LoRA term in a second rounding, which drops whatever of it is under half an
ulp of the output. Early in training B is small, so most of the term is dropped.

Two measurements, both on the CPU with the 8B layer's statistics (K = 4096, W std 0.02, r 16, scale 2):
1. one layer: the share of the LoRA term that survives each rounding, for B of the size a few AdamW steps
   at lr 1e-4 give it;
2. a 2-block MLP language model from random weights (the shape of bench/tps.py's runs: LoRA from B = 0, one
   repeated batch, AdamW lr 1e-4): the loss of each step under each rounding.
Writes bench/results/lora_rounding.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

RESULTS = Path(__file__).resolve().parent / "results"
SCALE = 2.0  # lora_alpha / r of bench/tps.py


def kept_share(m: int, k: int, n: int, r: int, b_size: float, seed: int = 0) -> dict[str, float]:
    """The share of the LoRA term d that the output keeps (projection of the change onto d), per rounding."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) * 0.02).bfloat16()
    a = ((torch.rand(r, k, generator=g) * 2 - 1) / math.sqrt(k)).bfloat16()
    b = (torch.randn(n, r, generator=g) * b_size).bfloat16()
    y = x.float() @ w.float().t()
    d = SCALE * ((x.float() @ a.float().t()).bfloat16().float() @ b.float().t())
    base = y.bfloat16().float()
    once = (y + d).bfloat16().float()
    twice = (base + d.bfloat16().float()).bfloat16().float()

    def share(out: torch.Tensor) -> float:
        return float(((out - base) * d).sum() / (d * d).sum())

    return {"b_size": b_size, "lora_rms": float(d.pow(2).mean().sqrt()), "output_rms": float(y.pow(2).mean().sqrt()),
            "kept_one_rounding": share(once), "kept_two_roundings": share(twice)}


class _OneRounding(torch.autograd.Function):
    """x W^T + d rounded once; the backward as the fused kernels' (dx = g W, dd = g)."""

    @staticmethod
    def forward(ctx, x, w, d):
        ctx.save_for_backward(w)
        return (x.float() @ w.float().t() + d).bfloat16()

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        return grad @ w, None, grad.float()


class _LoRALinear(torch.nn.Module):
    def __init__(self, k: int, n: int, r: int, one_rounding: bool, g: torch.Generator):
        super().__init__()
        self.w = torch.nn.Parameter((torch.randn(n, k, generator=g) * 0.02).bfloat16(), requires_grad=False)
        self.a = torch.nn.Parameter((torch.rand(r, k, generator=g) * 2 - 1) / math.sqrt(k))
        self.b = torch.nn.Parameter(torch.zeros(n, r))  # PEFT's init: the LoRA term starts at 0
        self.one_rounding = one_rounding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = SCALE * ((x @ self.a.bfloat16().t()).float() @ self.b.t())
        if self.one_rounding:
            return _OneRounding.apply(x, self.w, d)
        return x @ self.w.t() + d.bfloat16()


def _rms_norm(x: torch.Tensor) -> torch.Tensor:
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()


def train_losses(one_rounding: bool, steps: int, width: int, layers: int, vocab: int, tokens: int,
                 r: int) -> list[float]:
    """Per-step loss of a random-init MLP language model whose linears carry LoRA (B = 0 at the start)."""
    g = torch.Generator().manual_seed(0)
    emb = (torch.randn(vocab, width, generator=g) * 0.02).bfloat16()
    blocks = torch.nn.ModuleList(torch.nn.ModuleList([_LoRALinear(width, width, r, one_rounding, g),
                                                      _LoRALinear(width, width, r, one_rounding, g)])
                                 for _ in range(layers))
    head = (torch.randn(vocab, width, generator=g) * 0.02).bfloat16()
    ids = torch.randint(0, vocab, (tokens + 1,), generator=g)
    opt = torch.optim.AdamW([p for p in blocks.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        x = emb[ids[:-1]]
        for up, down in blocks:
            x = x + down(torch.nn.functional.silu(up(_rms_norm(x))))
        loss = torch.nn.functional.cross_entropy((_rms_norm(x) @ head.t()).float(), ids[1:])
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    return losses


def markdown(meta: dict, layer: list[dict], losses: dict[str, list[float]]) -> str:
    lines = ["# How much of a young LoRA update survives bf16 rounding", "",
             f"CPU, torch {meta['torch']}, commit {meta['commit']}. One rounding: the fused kernels (persistent, "
             "`_lora_gemm_kernel`); two roundings: cuBLAS + LoRA `addmm_`, and PEFT.", "",
             "One 8B-shaped layer (K = N = 4096, W std 0.02, r 16, scale 2, 512 rows): the share of the LoRA term "
             "the bf16 output keeps.", "",
             "| B entries ~ | LoRA term rms | output rms | one rounding | two roundings |", "|---|---|---|---|---|"]
    for row in layer:
        lines.append(f"| {row['b_size']:g} | {row['lora_rms']:.2e} | {row['output_rms']:.2f} | "
                     f"{row['kept_one_rounding']:.2f} | {row['kept_two_roundings']:.2f} |")
    lines += ["", f"A {meta['layers']}-block MLP language model (width {meta['width']}, vocabulary {meta['vocab']}, "
              f"{meta['tokens']} tokens, LoRA r {meta['r']} from B = 0, one repeated batch, AdamW lr 1e-4): loss per "
              "step.", "", "| rounding | " + " | ".join(f"step {i}" for i in range(len(losses["one"]))) + " | drop |",
              "|---|" + "---|" * (len(losses["one"]) + 1)]
    for name, label in (("one", "one (fused)"), ("two", "two (cuBLAS, PEFT)")):
        row = losses[name]
        lines.append(f"| {label} | " + " | ".join(f"{v:.4f}" for v in row) + f" | {row[0] - row[-1]:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=7, help="optimizer steps (bench/tps.py's runs: 7)")
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    from surogate.training.info import git_commit

    layer = [kept_share(512, args.width, args.width, 16, b) for b in (1e-4, 7e-4, 3e-3)]
    losses = {name: train_losses(name == "one", args.steps, args.width, args.layers, args.vocab, args.tokens, 16)
              for name in ("one", "two")}
    meta = {"torch": torch.__version__, "commit": git_commit(), "width": args.width, "layers": args.layers,
            "vocab": args.vocab, "tokens": args.tokens, "r": 16}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lora_rounding.json").write_text(json.dumps({"meta": meta, "layer": layer, "losses": losses}, indent=1))
    md = markdown(meta, layer, losses)
    (args.out / "lora_rounding.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
