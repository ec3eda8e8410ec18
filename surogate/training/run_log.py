"""Where `surogate train` writes its numbers as they happen, not only at the end.

`output_dir/metrics.jsonl`: one JSON object a line, flushed as it is written, so that a run cut off
at any point keeps every step it finished (`tail -f` follows it). Train lines carry `step`, `epoch`,
`loss`, `lr`, `tokens`, `elapsed_s`; eval lines carry `step` and `eval_loss`. With
`report_to: tensorboard`, the same scalars go to TensorBoard event files in a folder of the run's own,
`output_dir/runs/<start time>/` (`train/loss`, `train/learning_rate`, `train/tokens`, `eval/loss`), so
that the curves of two runs in one output_dir stay apart; a resumed run goes on in its checkpoint's
folder. A resumed run rewrites metrics.jsonl from the checkpoint's log, so steps after the checkpoint
(which it repeats) are not listed twice.
In a job of several processes rank 0 alone writes them (the others get a `NullRunLog`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

METRICS_LOG = "metrics.jsonl"
TENSORBOARD_DIR = "runs"


def tensorboard_writer(log_dir: Path, purge_step: int | None = None):
    """A `torch.utils.tensorboard.SummaryWriter` (needs the `tensorboard` package, checked by the config)."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def new_tensorboard_dir(output_dir: Path) -> str:
    """A fresh run's TensorBoard folder under `output_dir/runs/`, named by its start time (`_2`... when taken),
    relative to `output_dir` (what a checkpoint records for a resume)."""
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    name, n = stamp, 1
    while (Path(output_dir) / TENSORBOARD_DIR / name).exists():
        n += 1
        name = f"{stamp}_{n}"
    return f"{TENSORBOARD_DIR}/{name}"


class RunLog:
    """metrics.jsonl (always) and TensorBoard (when `report_to` names it) for one run."""

    def __init__(self, output_dir: Path, report_to: list[str], earlier: list[dict] | None = None,
                 resume_step: int | None = None, tensorboard_dir: str | None = None) -> None:
        self.path = Path(output_dir) / METRICS_LOG
        self._file = self.path.open("w", encoding="utf-8")
        for record in earlier or []:
            self._write(record)
        self.writer = None
        if "tensorboard" in report_to:
            # purge_step: events past the checkpoint, written before an interrupt, are dropped on resume
            self.writer = tensorboard_writer(Path(output_dir) / (tensorboard_dir or new_tensorboard_dir(output_dir)),
                                             None if resume_step is None else resume_step + 1)

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def train(self, record: dict) -> None:
        self._write(record)
        if self.writer is not None:
            step = record["step"]
            self.writer.add_scalar("train/loss", record["loss"], step)
            self.writer.add_scalar("train/learning_rate", record["lr"], step)
            self.writer.add_scalar("train/tokens", record["tokens"], step)

    def eval(self, record: dict) -> None:
        self._write(record)
        if self.writer is not None:
            self.writer.add_scalar("eval/loss", record["eval_loss"], record["step"])

    def close(self) -> None:
        self._file.close()
        if self.writer is not None:
            self.writer.close()


class NullRunLog:
    """What ranks other than 0 log to in a job of several processes: nothing (rank 0 writes the files)."""

    def train(self, record: dict) -> None:
        pass

    def eval(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass
