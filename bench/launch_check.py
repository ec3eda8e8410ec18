"""Train with every LoRA-linear launch checked against the plain-torch reference: where does a NaN (or a wrong
GEMM) first come from?

Why: a NaN loss says nothing about where it started, and a fault of one kernel config under CUDA-graph replay
(bench/NOTES.md runs 63-70: Triton 3.6's warp-specialized persistent builds) never shows in a kernel test, a soak
or an eager run. This check found that one: every launch of a real fine-tune compared with the reference, in the
captured graphs too.

What: `surogate.kernels.launch.lora_linear_with_casts_cuda` (the op's forward, which `lora_linear_cuda` calls too)
and `lora_linear_backward_cuda` (every route: the persistent kernel, `_lora_gemm_kernel`, cuBLAS + LoRA) are
wrapped. After each call, as device tensors (no host sync, so a CUDA-graph capture records them and every replay
updates them): the non-finite count of the call's inputs, that of its outputs, and its error: the largest
|output - reference| over the reference's largest |value|, where the reference is
`surogate.kernels.reference_linear`'s same op on the same tensors (the same quantization, in torch), for the
output (forward) or for the input and LoRA gradients (backward). They are read after each optimizer step. A launch
whose inputs are all finite is bad when its outputs have NaN/Inf or its error is above --tolerance (default 0.05;
the kernels differ from the reference by rounding, ~1e-2 at most); one with non-finite inputs only counts as
downstream of an earlier fault (or of the data). The MoE expert ops (grouped_lora_linear) are not wrapped.

Output: the first bad launches (step, forward / backward, shapes, format, the routes it ran, captured or eager),
launch counts, bench/results/launch_check.{json,md} (--out); exit 1 when a launch was bad. The check costs a
reference op per launch: run it on a small config or for few steps.

    python bench/launch_check.py                      # the embedded default config (`surogate train`'s)
    python bench/launch_check.py my.yaml --set max_steps=50 --set cuda_graphs=false
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from surogate.kernels import launch, variants  # noqa: E402
from surogate.kernels import reference_linear as ref  # noqa: E402
from surogate.recipes.recipe import Compute  # noqa: E402
from surogate.training.info import run_record  # noqa: E402

TOLERANCE = 0.05


@dataclasses.dataclass
class Launch:
    """One checked call: what it was, and its device-side metrics (non-finite in, non-finite out, error)."""

    index: int
    direction: str  # "forward" / "backward"
    shapes: str
    weight_format: str
    compute: str
    routes: list[str]
    captured: bool
    metrics: torch.Tensor


def _nonfinite(tensors: Sequence[torch.Tensor | None], device: torch.device) -> torch.Tensor:
    counts = [(~torch.isfinite(t.float())).sum().float() for t in tensors if t is not None and t.is_floating_point()]
    return torch.stack(counts).sum() if counts else torch.zeros((), device=device)


def _error(got: Sequence[torch.Tensor | None], want: Sequence[torch.Tensor | None],
           device: torch.device) -> torch.Tensor:
    """The largest relative error over the pairs: max |got - want| / max |want| (NaN counted as huge). Every
    tensor is made on `device`: a host-to-device copy would break a CUDA-graph capture."""
    errors = []
    for g, w in zip(got, want):
        if g is None or w is None or g.numel() == 0:
            continue
        diff = (g.float() - w.float()).abs().nan_to_num(nan=1e30, posinf=1e30).amax()
        errors.append(diff / w.float().abs().nan_to_num(nan=0.0, posinf=0.0).amax().clamp_min(1e-30))
    return torch.stack(errors).amax() if errors else torch.zeros((), device=device)


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


class LaunchCheck:
    """Wraps the launcher's two entry points while active (a context manager); `scan(step)` reads the metrics."""

    def __init__(self, tolerance: float = TOLERANCE) -> None:
        self.tolerance = tolerance
        self.captured: list[Launch] = []  # live for the graphs' life: every replay updates their metrics
        self.eager: list[Launch] = []  # read and dropped at each scan
        self.bad: list[dict] = []
        self.downstream = 0  # launch readings with non-finite inputs
        self.launches = 0
        self.inner: dict[str, Callable] = {}  # what the wrappers call (the launcher's functions)
        self._restore: dict[str, Callable] = {}

    def __enter__(self) -> "LaunchCheck":
        self._restore = {"lora_linear_with_casts_cuda": launch.lora_linear_with_casts_cuda,
                         "lora_linear_backward_cuda": launch.lora_linear_backward_cuda}
        self.inner = dict(self._restore)
        launch.lora_linear_with_casts_cuda = self._forward
        launch.lora_linear_backward_cuda = self._backward
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._restore.items():
            setattr(launch, name, fn)

    def _keep(self, direction: str, inputs: Sequence, outputs: Sequence, want: Sequence, shapes: str,
              fmt, compute, routes: list) -> None:
        device = outputs[0].device
        metrics = torch.stack([_nonfinite(inputs, device), _nonfinite(outputs, device), _error(outputs, want, device)])
        self.launches += 1
        captured = _capturing(outputs[0])
        entry = Launch(self.launches, direction, shapes, getattr(fmt, "value", str(fmt)),
                       getattr(compute, "value", str(compute)),
                       [f"{r.engine.value}:{r.variant.kernel}" for r in routes], captured, metrics)
        (self.captured if captured else self.eager).append(entry)

    def _forward(self, input, weight, weight_format, lora_a, lora_b, lora_input, bias, lora_scale, forward,
                 grad_input_precision, input_q=None):
        with variants.trace() as routes:
            out, hidden, *casts = self.inner["lora_linear_with_casts_cuda"](
                input, weight, weight_format, lora_a, lora_b, lora_input, bias, lora_scale, forward,
                grad_input_precision, input_q)
        want, _ = ref.lora_linear_ref(input, weight, weight_format, lora_a, lora_b, lora_input, bias, lora_scale,
                                      Compute(forward), Compute(grad_input_precision), input_q)
        shapes = f"x {tuple(input.shape)} -> {tuple(out.shape)}"
        self._keep("forward", [input, lora_a, lora_b], [out], [want], shapes, weight_format, forward, routes)
        return out, hidden, *casts

    def _backward(self, grad_output, input, weight, weight_format, lora_a, lora_b, lora_input, lora_hidden,
                  lora_scale, grad_input_precision, grad_output_q=None, lora_a_cast=None, lora_b_cast=None,
                  input_q=None):
        with variants.trace() as routes:
            grads = self.inner["lora_linear_backward_cuda"](
                grad_output, input, weight, weight_format, lora_a, lora_b, lora_input, lora_hidden, lora_scale,
                grad_input_precision, grad_output_q, lora_a_cast, lora_b_cast, input_q)
        want = ref.lora_linear_backward_ref(grad_output, input, weight, weight_format, lora_a, lora_b, lora_input,
                                            lora_hidden, lora_scale, Compute(grad_input_precision), grad_output_q)
        shapes = f"dy {tuple(grad_output.shape)} -> dx {tuple(grads[0].shape)}"
        self._keep("backward", [grad_output, input, lora_hidden], list(grads[:3]), list(want[:3]), shapes,
                   weight_format, grad_input_precision, routes)
        return grads

    def scan(self, step: int) -> list[dict]:
        """Read every live metric (one host sync); returns the bad launches found now (also kept in `bad`)."""
        found = []
        for entry in [*self.captured, *self.eager]:
            bad_in, bad_out, error = entry.metrics.tolist()
            if bad_in > 0:
                self.downstream += 1
            elif bad_out > 0 or error > self.tolerance:
                found.append({"step": step, "launch": entry.index, "direction": entry.direction,
                              "shapes": entry.shapes, "weight_format": entry.weight_format,
                              "compute": entry.compute, "routes": entry.routes, "captured": entry.captured,
                              "nonfinite_inputs": int(bad_in), "nonfinite_outputs": int(bad_out), "error": error})
        self.eager.clear()
        self.bad += found
        return found


def write_report(check: LaunchCheck, outcome: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    record = {**run_record(), "outcome": outcome, "launches": check.launches, "captured": len(check.captured),
              "downstream": check.downstream, "tolerance": check.tolerance, "bad": check.bad[:200]}
    (out / "launch_check.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    lines = ["# Launch check", "", f"{record.get('gpu', 'CPU')}, commit {record.get('commit')}: {outcome}", "",
             f"{check.launches} launches checked ({len(check.captured)} in CUDA graphs, updated at each replay); "
             f"tolerance {check.tolerance} (error = max |kernel - reference| / max |reference|); "
             f"{check.downstream} readings of launches with non-finite inputs (downstream, not counted as bad).", ""]
    if check.bad:
        lines += ["| step | launch | direction | shapes | format | routes | captured | non-finite in | "
                  "non-finite out | error |", "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {b['step']} | {b['launch']} | {b['direction']} | {b['shapes']} | {b['weight_format']} "
                  f"| {', '.join(b['routes'])} | {b['captured']} | {b['nonfinite_inputs']} | "
                  f"{b['nonfinite_outputs']} | {b['error']:.3g} |" for b in check.bad[:50]]
    (out / "launch_check.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    from surogate.training.config import ConfigError, load_config
    from surogate.training.train import train

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", default=None, help="a `surogate train` YAML (default: the embedded one)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, as `surogate train --set`")
    p.add_argument("--tolerance", type=float, default=TOLERANCE)
    p.add_argument("--stop", type=int, default=20, help="stop the run after this many bad launches (0: never)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"launch_check: error: {error}", file=sys.stderr)
        return 2
    check = LaunchCheck(args.tolerance)
    step = 0

    def on_step(record: dict) -> None:
        nonlocal step
        step += 1
        for bad in check.scan(step):
            print(f"launch_check: step {step}: BAD {bad['direction']} {bad['shapes']} {bad['weight_format']} "
                  f"via {', '.join(bad['routes'])} ({'captured' if bad['captured'] else 'eager'}): "
                  f"non-finite in {bad['nonfinite_inputs']}, out {bad['nonfinite_outputs']}, "
                  f"error {bad['error']:.3g}", flush=True)
        if args.stop and len(check.bad) >= args.stop:
            raise KeyboardInterrupt  # the trainer saves a checkpoint and returns

    outcome = "finished"
    with check:
        try:
            train(cfg, log=lambda line: print(line, flush=True), on_step=on_step)
        except FloatingPointError as error:  # the trainer's non-finite loss, raised before the update
            outcome = f"stopped: {error}"
        except KeyboardInterrupt:
            outcome = f"stopped after {len(check.bad)} bad launches"
    check.scan(step + 1)  # what ran after the last finished step
    write_report(check, outcome, args.out)
    print(f"launch_check: {check.launches} launches ({len(check.captured)} captured), {len(check.bad)} bad; "
          f"{outcome} -> {args.out / 'launch_check.md'}", flush=True)
    return 1 if check.bad else 0


if __name__ == "__main__":
    sys.exit(main())
