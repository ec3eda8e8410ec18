"""Gradient accumulation weighted by target tokens (Hugging Face's Trainer since 4.46), on the CPU reference backend.

A step's loss and gradient are the sum of its token losses over the step's target tokens, so `bs 2 x ga 1` and
`bs 1 x ga 2` over the same rows take the same step however unequal the rows' target counts; before, each
micro-batch's own token mean weighed the same, and a row of 2 targets counted as much as one of 100. Each
comparison below also runs the old weighting (MicroStep called without `items`) to show that it fails the
same assertion by far. The rows are prompt-masked completions of very different lengths, one per row (padded).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_checkpoint import cache, model_dir  # noqa: F401, F811  (test_checkpoint's fixtures)
from test_distributed import _env, _run
from tiny_models import tiny_raw_config, write_config
from tiny_qwen3 import cpu_lora_qwen3

import surogate
from surogate.training import steps
from surogate.training.config import TrainConfig, from_dict
from surogate.training.graphed_step import EagerCapture, GraphedStep
from surogate.training.outputs import TrainResult
from surogate.training.train import train

PROMPT = "Natalia sold clips to forty eight of her friends in April, and then half as many clips in May."
WORDS = ["so", "she", "sold", "forty", "eight", "and", "twenty", "four", "clips", "which", "makes", "seventy", "two",
         "clips", "in", "all"]
# One example per row, targets counted by the model (labels shifted): the few and the many differ ~40-fold.
STEP = {"max_steps": 1, "lr_scheduler_type": "constant", "warmup_steps": 0, "sample_packing": False,
        "learning_rate": 1e-2}
GRAD_RTOL = 1e-5  # bs 2 x ga 1 against bs 1 x ga 2: measured 8e-8 (the old weighting: 1.5)


def _completion(words: int, prompt_copies: int) -> dict:
    """A completion row: the prompt (masked) `prompt_copies` times, then `words` trained words."""
    return {"prompt": " ".join([PROMPT] * prompt_copies),
            "completion": " " + " ".join((WORDS * (1 + words // len(WORDS)))[:words])}


def _data(folder: Path, rows: list[dict]) -> Path:
    """`folder` with the same rows as its train and test splits: the eval at step 0 sees the rows step 1 trains."""
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row) + "\n" for row in rows)
    for split in ("train", "test"):
        (folder / f"{split}.jsonl").write_text(text)
    return folder


def _quiet(line: str) -> None:
    pass


def _without_items(monkeypatch: pytest.MonkeyPatch) -> None:
    """The old weighting: every micro-batch divided by its own target count (MicroStep without `items`)."""
    call = steps.MicroStep.__call__
    monkeypatch.setattr(steps.MicroStep, "__call__", lambda self, batch, items=None: call(self, batch, None))


def _step_one(model_dir: Path, out: Path, data: Path, batch: int, accumulation: int,
              monkeypatch: pytest.MonkeyPatch, old: bool = False, **extra) -> tuple[TrainResult, list[torch.Tensor]]:
    """One optimizer step over the first `batch` x `accumulation` rows (`extra`: more config keys); the run and the
    gradients it stepped with (taken where the trainer clips them, before the update). Shared with the GPU test."""
    grads: list[torch.Tensor] = []
    clip = torch.nn.utils.clip_grad_norm_

    def record(params: list[torch.nn.Parameter], max_norm: float, *args, **kwargs) -> torch.Tensor:
        params = list(params)
        grads.extend(p.grad.detach().clone() for p in params)
        return clip(params, max_norm, *args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(torch.nn.utils, "clip_grad_norm_", record)
        if old:
            _without_items(mp)
        dataset = {"path": str(data), "format": "completion", "max_train_samples": None, "max_eval_samples": None}
        raw = tiny_raw_config(model_dir, out, **STEP, per_device_train_batch_size=batch,
                              gradient_accumulation_steps=accumulation, per_device_eval_batch_size=batch,
                              eval_steps=None, dataset=dataset, **extra)
        result = train(from_dict(raw), log=_quiet)
    return result, grads


def _relative_gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """The largest ||a - b|| / ||b|| over the tensors whose reference `b` is not zero (LoRA A's first gradient
    is: B starts at zero)."""
    assert len(a) == len(b) and a
    gaps = [float((x - y).norm() / y.norm()) for x, y in zip(a, b) if y.norm() > 0]
    assert gaps, "no gradient to compare"
    return max(gaps)


def _targets(data: Path, model_dir: Path, out: Path) -> list[int]:
    """Each row's target count, as the trainer lays the rows out."""
    from surogate.training.data import load_splits
    from surogate.training.setup import load_tokenizer_for

    cfg = from_dict(tiny_raw_config(model_dir, out, **STEP, dataset={"path": str(data), "format": "completion"}))
    rows, _ = load_splits(cfg, load_tokenizer_for(cfg, _quiet))
    return [steps.predicted_tokens(b) for b in rows.batches(1)]


def test_step_items_is_the_step_targets_over_accumulation_and_world():
    labels = torch.full((2, 6), -100)
    labels[0, 1:4] = 7  # 3 targets, the first label never counts (shifted)
    few = {"labels": labels}
    many = {"labels": torch.ones(2, 6, dtype=torch.long)}  # 10 targets
    items = steps.step_items([few, many], 4, torch.device("cpu"))
    assert items.shape == () and items.dtype == torch.float32 and float(items) == 13 / 4
    none = {"labels": torch.full((2, 6), -100)}
    assert float(steps.step_items([none, none], 2, torch.device("cpu"))) == 0.5  # 1 / shares: loss 0, not 0 / 0


def test_bs2_ga1_and_bs1_ga2_take_the_same_step_when_rows_have_unequal_targets(model_dir, tmp_path, monkeypatch):
    """Two rows, ~2 and ~90 targets: the step's gradients, its logged loss and the adapter after it agree for
    one micro-batch of 2 and two of 1; the old weighting's gradients are ~1/2 off (the short row's weight goes
    from ~1/90 to 1/2); the logged loss is the step's token mean: the eval of the same rows before step 1."""
    data = _data(tmp_path / "data", [_completion(1, 3), _completion(90, 1)])
    counts = _targets(data, model_dir, tmp_path / "count")
    assert min(counts) * 20 < max(counts), counts  # a large imbalance, or the test shows nothing

    one, g_one = _step_one(model_dir, tmp_path / "bs2", data, 2, 1, monkeypatch)
    two, g_two = _step_one(model_dir, tmp_path / "bs1", data, 1, 2, monkeypatch)
    old, g_old = _step_one(model_dir, tmp_path / "old", data, 1, 2, monkeypatch, old=True)

    assert _relative_gap(g_two, g_one) < GRAD_RTOL
    assert _relative_gap(g_old, g_one) > 0.1  # what this test would have caught: far past GRAD_RTOL

    loss_one, loss_two, loss_old = (r.history[0]["loss"] for r in (one, two, old))
    assert loss_two == pytest.approx(loss_one, rel=1e-5)
    # measured 7.751168 both, the old weighting 7.381355 (a random model's rows lose alike: ~ln 2048 a token)
    assert abs(loss_old - loss_one) > 0.1
    # The eval (step 0, the same rows, batch 2 or 1) is a token mean whatever the batch, and it is step 1's loss.
    assert one.history[0]["tokens"] == two.history[0]["tokens"]
    eval_one, eval_two = (json.loads(r.metrics_path.read_text())["eval"][0] for r in (one, two))
    assert eval_one["step"] == eval_two["step"] == 0
    assert eval_two["loss"] == pytest.approx(eval_one["loss"], rel=1e-5)
    assert loss_two == pytest.approx(eval_two["loss"], rel=1e-4)

    a = load_file(one.adapter_dir / "adapter_model.safetensors")
    b = load_file(two.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)



def test_replayed_micro_steps_read_the_step_items_of_each_step():
    """MicroStep's graph mode (GraphedStep, EagerCapture standing in for the CUDA graph: the GPU test replays real
    ones) with `step_items`: the items are a static input refilled at each replay, so 3 steps of 2 micro-batches of
    very unequal target counts (one without any) give eager's gradients and those of one micro-batch of all 4 rows;
    without items (the old weighting) they are far off."""
    cpu = torch.device("cpu")
    peft_model = cpu_lora_qwen3()
    twins = [copy.deepcopy(peft_model) for _ in range(3)]
    graphed, eager, whole, old = (surogate.compile(m, recipe="bf16") for m in [peft_model, *twins])
    plain = TrainConfig(cuda_graphs="false", gradient_accumulation_steps=2)
    g_step = steps.MicroStep(graphed, plain, cpu)
    g_step.graphed = GraphedStep(graphed, loss_scale=g_step.loss_scale, capture=EagerCapture, pad_to=1)
    e_step, o_step = steps.MicroStep(eager, plain, cpu), steps.MicroStep(old, plain, cpu)
    w_step = steps.MicroStep(whole, TrainConfig(cuda_graphs="false", gradient_accumulation_steps=1), cpu)

    def run(model: torch.nn.Module, micro: steps.MicroStep, batches: list[dict],
            items: torch.Tensor | None) -> tuple[float, list[torch.Tensor]]:
        loss = float(torch.stack([micro(b, items).clone() for b in batches]).mean())
        grads = [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]
        for p in model.parameters():
            p.grad = None
        return loss, grads

    g = torch.Generator().manual_seed(1)
    for n, counts in enumerate([(2, 60), (60, 2), (20, 0)]):
        batches = [_masked_batch(g, c) for c in counts]
        items = steps.step_items(batches, 2, cpu)
        loss_g, grads_g = run(graphed, g_step, batches, items)
        loss_e, grads_e = run(eager, e_step, batches, items)
        loss_w, grads_w = run(whole, w_step, [{k: torch.cat([b[k] for b in batches]) for k in batches[0]}], None)
        # measured: graphed == eager exactly, one micro-batch of 4 rows within 1.1e-7; the old weighting 3.4-4.2 off
        assert _relative_gap(grads_g, grads_e) < 1e-6 and loss_g == pytest.approx(loss_e, rel=1e-6), n
        assert _relative_gap(grads_g, grads_w) < 1e-5 and loss_g == pytest.approx(loss_w, rel=1e-5), n
        if n < 2:
            _, grads_o = run(old, o_step, batches, None)
            assert _relative_gap(grads_o, grads_w) > 1.0, n
    assert g_step.graphed.replays == 6 and g_step.graphed.eager_calls == 0 and len(g_step.graphed.graphs) == 1
    assert "num_items_in_batch" in next(iter(g_step.graphed.graphs.values())).inputs


def _masked_batch(g: torch.Generator, targets: int, rows: int = 2, length: int = 32,
                  vocab: int = 128) -> dict[str, torch.Tensor]:
    """`rows` rows of random tokens whose labels keep `targets` predicted tokens (position 0 never is), the rest
    -100: micro-batches of one shape and any target count."""
    ids = torch.randint(0, vocab, (rows, length), generator=g)
    labels = torch.full_like(ids, -100)
    keep = torch.randperm(rows * (length - 1), generator=g)[:targets]
    r, c = keep // (length - 1), keep % (length - 1) + 1
    labels[r, c] = ids[r, c]
    batch = {"input_ids": ids, "labels": labels}
    assert steps.predicted_tokens(batch) == targets
    return batch

# --- several ranks ----------------------------------------------------------------------------------------

LAUNCH = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "surogate", "train"]


def test_two_ranks_of_ga2_equal_one_process_of_one_micro_batch(model_dir, tmp_path, monkeypatch):
    """2 gloo ranks x 1 row x ga 2 (global micro-batches of 2 rows) against one process of 4 rows x ga 1, over
    4 rows of ~2 to ~120 targets, 2 steps (the second in a reshuffled epoch): the same losses and adapter. The
    old weighting (each global micro-batch its own token mean: as one process of 2 rows x ga 2 without items)
    is far off: the 4 counts pair into unequal global micro-batches whichever way they are shuffled."""
    data = _data(tmp_path / "data", [_completion(1, 3), _completion(10, 2), _completion(40, 1), _completion(120, 1)])
    counts = sorted(_targets(data, model_dir, tmp_path / "count"))
    assert counts[0] * 20 < counts[-1] and len(set(counts)) == 4, counts
    run = {**STEP, "max_steps": 2, "eval_steps": None, "logging_steps": 1,
           "dataset": {"path": str(data), "format": "completion", "eval_split": None, "max_train_samples": None}}
    cache = str(tmp_path.parent / "surogate-cache")
    env = {**_env(), "SUROGATE_CACHE_DIR": cache}
    monkeypatch.setenv("SUROGATE_CACHE_DIR", cache)

    out = tmp_path / "ranks"
    config = write_config(tmp_path / "ranks.yaml", tiny_raw_config(
        model_dir, out, **run, per_device_train_batch_size=1, gradient_accumulation_steps=2))
    code, text = _run([sys.executable, *LAUNCH, config], 240, env)
    assert code == 0, f"torchrun surogate train failed:\n{text[-6000:]}"
    ranks = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    one = train(from_dict(tiny_raw_config(model_dir, tmp_path / "one", **run, per_device_train_batch_size=4,
                                          gradient_accumulation_steps=1)), log=_quiet)
    with monkeypatch.context() as mp:
        _without_items(mp)
        old = train(from_dict(tiny_raw_config(model_dir, tmp_path / "old", **run, per_device_train_batch_size=2,
                                              gradient_accumulation_steps=2)), log=_quiet)

    assert [r["step"] for r in ranks] == [h["step"] for h in one.history] == [1, 2]
    for a, b in zip(ranks, one.history):
        assert abs(a["loss"] - b["loss"]) <= 1e-4, (a, b)
        assert a["tokens"] == b["tokens"]
    # A random model's rows lose alike (~ln 2048 a token): the old step-1 loss is off by 3.5e-2; measured 1.6e-5.
    assert abs(old.history[0]["loss"] - one.history[0]["loss"]) > 1e-2
    ours = load_file(out / "adapter" / "adapter_model.safetensors")
    theirs = load_file(one.adapter_dir / "adapter_model.safetensors")
    before = load_file(old.adapter_dir / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() == before.keys()
    # Measured within 4.2e-5 (a few of lora_B's elements: Adam's second step magnifies the bf16 rounding of
    # batches padded to other widths); the old weighting's adapter is 4e-2 off.
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=2e-4, msg=name)
    old_gap = max(float((before[k] - theirs[k]).abs().max()) for k in theirs)
    assert old_gap > 1e-2, old_gap
