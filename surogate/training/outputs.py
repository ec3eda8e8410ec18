"""What a finished run leaves besides its checkpoints and adapter: the `TrainResult` that `train` returns,
`metrics.json` (every number of the run, with its config and environment) and the loss chart.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from surogate.training.config import TrainConfig


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """`n` and `noun`, plural unless n is 1: "1 row", "13 rows" (the log and the summary read as English)."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


def duration(seconds: float) -> str:
    """A wait as a person reads it: "45s", "3m20s", "2h05m" (the step line's time left)."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


@dataclass
class TrainResult:
    """Where the run wrote its outputs and what it measured."""

    output_dir: Path
    adapter_dir: Path
    metrics_path: Path
    chart_path: Path
    steps: int
    train_tokens: int
    tokens_per_s: float | None  # steady state: after the first step of this process (None: no step after it)
    final_train_loss: float
    final_eval_loss: float | None
    first_eval_loss: float | None
    wall_s: float
    history: list[dict] = field(default_factory=list, repr=False)
    first_step_s: float | None = None  # the first step of this process, compilation included
    resumed_from: Path | None = None
    rank: int = 0  # this process's rank (a job of several: only rank 0 wrote the outputs)
    world_size: int = 1

    def summary(self) -> str:
        ev = "" if self.final_eval_loss is None else (
            f", eval loss {self.first_eval_loss:.4f} -> {self.final_eval_loss:.4f}"
            if self.first_eval_loss is not None else f", eval loss {self.final_eval_loss:.4f}")
        if self.first_step_s is None:
            speed = "no step run (resumed at the last step)"
        elif self.tokens_per_s is None:
            speed = f"first step {self.first_step_s:.1f} s (compile), no steady-state tokens/s from one step"
        else:
            speed = f"first step {self.first_step_s:.1f} s (compile), then {self.tokens_per_s:,.0f} tokens/s"
        final = "n/a" if math.isnan(self.final_train_loss) else f"{self.final_train_loss:.4f}"
        return (f"done: {counted(self.steps, 'step')}, {self.train_tokens:,} tokens in {self.wall_s:.1f}s; {speed}; "
                f"final train loss {final}{ev}\n"
                f"adapter: {self.adapter_dir}\nloss chart: {self.chart_path}\nmetrics: {self.metrics_path}")


def plot_losses(history: list[dict], evals: list[dict], path: "str | os.PathLike", title: str = "") -> Path:
    """A PNG of train loss per step (and eval loss points); Agg canvas, no global pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss", lw=1.5)
    if evals:
        ax.plot([e["step"] for e in evals], [e["loss"] for e in evals], "o--", label="eval loss")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(str(path))
    return Path(path)


def merged_log(history: list[dict], evals: list[dict]) -> list[dict]:
    """Train and eval records in the order metrics.jsonl lists them (a step's eval after its train line)."""
    lines = [(h["step"], 0, h) for h in history] + [(e["step"], 1, {"step": e["step"], "eval_loss": e["loss"]})
                                                    for e in evals]
    return [record for _, _, record in sorted(lines, key=lambda t: (t[0], t[1]))]


def write_metrics(r: TrainResult, cfg: TrainConfig, evals: list[dict], device: torch.device,
                  time_to_first_step: float | None, report=None, counts=None, train_s: float | None = None,
                  spread: str | None = None) -> None:
    """`r.metrics_path` (metrics.json): the run's numbers, its compile report and parameter counts
    (`report`, `counts`: None when unknown), where it ran (`spread`: `distributed.describe`), its config."""
    import surogate

    metrics = {
        "surogate_version": surogate.__version__, "torch_version": torch.__version__,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "world_size": r.world_size, "distributed": spread,
        "recipe": cfg.recipe, "model": cfg.model, "steps": r.steps, "train_tokens": r.train_tokens,
        "tokens_per_s": r.tokens_per_s, "first_step_s": r.first_step_s, "time_to_first_step_s": time_to_first_step,
        "train_s": train_s, "wall_s": r.wall_s, "final_train_loss": r.final_train_loss,
        "final_eval_loss": r.final_eval_loss,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        "parameters": None if counts is None else {
            "trainable": counts.trainable, "frozen": counts.frozen, "frozen_bytes": counts.frozen_bytes},
        "resumed_from": None if r.resumed_from is None else str(r.resumed_from),
        "adapter_dir": str(r.adapter_dir), "chart": str(r.chart_path),
        "compile": None if report is None else {
            "backend": report.backend, "graphs": report.graphs, "rewritten": len(report.rewritten),
            "linears": len(report.linears), "fallbacks": [list(f) for f in report.fallbacks]},
        "train": r.history, "eval": evals, "config": cfg.to_dict(),
    }
    r.metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
