"""bench/fidelity.py on a CPU: the report and the answer scoring from made-up records (fast); a diverged
fine-tune and the --persistent ablation on a tiny base of 2 pretraining steps (a few seconds each); and
end to end (`slow`: about 60 s on 2 cores): tiny base, two recipes, each phase as its own call.

The end-to-end run proves that the study's pipeline runs and writes its outputs, not that any recipe
is accurate (a ~0.5M-parameter base after a few steps says nothing about that).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "surogate" / "data" / "gsm8k"  # the bundled 800/200 GSM8K sample


def _fidelity():
    spec = importlib.util.spec_from_file_location("bench_fidelity", REPO / "bench" / "fidelity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def _write_record(fidelity, args, name: str, loss: float | None, **fields) -> None:
    """A record as the finetune phase writes it (loss None: a diverged run, as in `finetune`), made up."""
    runs = fidelity.runs_dir(args)
    runs.mkdir(parents=True, exist_ok=True)
    env = {"gpu": "cpu", "torch": "2.13", "triton": "3.6", "transformers": "5.0", "commit": "abc1234"}
    (runs / f"{name}.json").write_text(json.dumps({
        "recipe": name.split("-seed")[0].split("+")[0], "support": "reference", "eval_loss": loss,
        "eval_loss_base": None if loss is None else 2.5, "exact_match": None, "steps": 4, "seed": 42,
        "final_train_loss": 1.9, "train_loss": [2.2, 2.1, 2.0, 1.9], "tokens_per_s": 1.0,
        "settings": fidelity.finetune_settings(args), "eval_examples": 16, "eval_tokens": 900, **env, **fields}))


def _report_args(fidelity, tmp_path):
    """The report phase's arguments over a work dir holding a (fake) tiny base's record, as pretrain leaves it."""
    args = fidelity.parse_args(["--phase", "report", "--base", "tiny", "--steps", "4", "--data", str(SAMPLE),
                                "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    base = tmp_path / "work" / fidelity.finetune_settings(args)["base"]
    base.mkdir(parents=True)
    (base / "base.json").write_text(json.dumps({"params": 500_000, "heldout_loss": 3.2, "pretrain_s": 9.0}))
    return args


def test_report_compares_each_recipe_with_bf16_and_writes_its_files(tmp_path, monkeypatch):
    """The report phase on records as the finetune phase writes them: ratios, targets, verdicts, files."""
    fidelity = _fidelity()
    args = _report_args(fidelity, tmp_path)
    runs = fidelity.runs_dir(args)
    for recipe, loss in (("bf16", 2.0), ("qfp8", 2.01), ("qnf4", 2.1)):
        _write_record(fidelity, args, recipe, loss)
    # the recipes this machine runs by default, fixed: each without a record is listed under the table
    monkeypatch.setattr(fidelity, "runnable_recipes", lambda: dict.fromkeys(("bf16", "fp8", "qfp8", "qnf4", "fp4"),
                                                                            "reference"))
    rows = {r["recipe"]: r for r in fidelity.report(args)}
    assert rows["bf16"]["ratio_to_bf16"] == 1.0 and rows["bf16"]["target_met"] is None
    assert rows["qfp8"]["ratio_to_bf16"] == pytest.approx(1.005) and rows["qfp8"]["target_met"] is True
    assert rows["qnf4"]["ratio_to_bf16"] == pytest.approx(1.05) and rows["qnf4"]["target_ratio"] == 1.02
    assert rows["qnf4"]["target_met"] is False
    md = (tmp_path / "out" / "fidelity.md").read_text()
    assert "| qfp8 | reference | 2.0100 | 1.0050 | <= +1% | met |" in md
    assert "| qnf4 | reference | 2.1000 | 1.0500 | <= +2% | MISSED |" in md
    saved = json.loads((tmp_path / "out" / "fidelity.json").read_text())
    assert [r["recipe"] for r in saved["recipes"]] == ["bf16", "qfp8", "qnf4"] and saved["study"]["steps"] == 4
    assert (tmp_path / "out" / "fidelity_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "bf16 ran at one seed only" in md and saved["bf16_noise"] is None
    assert "\nNo record: fp8, fp4.\n" in md and saved["no_record"] == ["fp8", "fp4"]

    # bf16 again at two more fine-tuning seeds on the same base: the report's noise floor. A third one
    # diverged: a row of its own, not part of the floor.
    for seed, loss in ((43, 2.02), (44, 1.99)):
        (runs / f"bf16-seed{seed}.json").write_text(json.dumps({
            **json.loads((runs / "bf16.json").read_text()), "seed": seed, "eval_loss": loss}))
    _write_record(fidelity, args, "bf16-seed45", None, seed=45, diverged="step 3: the loss is nan", diverged_step=3)
    rows = {r["recipe"]: r for r in fidelity.report(args)}
    assert rows["bf16"]["ratio_to_bf16"] == 1.0  # the reference stays the main seed's run
    assert rows["bf16 (seed 43)"]["ratio_to_bf16"] == pytest.approx(1.01)
    saved = json.loads((tmp_path / "out" / "fidelity.json").read_text())
    assert saved["bf16_noise"]["seeds"] == [42, 43, 44]
    assert saved["bf16_noise"]["max_ratio_spread"] == pytest.approx(0.015)
    md = (tmp_path / "out" / "fidelity.md").read_text()
    assert "| bf16 (seed 44) | reference | 1.9900 | 0.9950 | - | noise floor |" in md
    assert "a spread of 1.50% of bf16's" in md
    assert "| bf16 (seed 45) | reference | - | - | - | DIVERGED (step 3) | - | - |" in md


def test_report_shows_a_diverged_recipe_and_the_ablation_labels(tmp_path, monkeypatch):
    """A diverged record is a row (never dropped, target missed); a --persistent record is labelled and sorted
    after its recipe's default run, a -seed one after that."""
    fidelity = _fidelity()
    args = _report_args(fidelity, tmp_path)
    monkeypatch.setattr(fidelity, "runnable_recipes", lambda: {"bf16": "reference", "fp8": "reference"})
    _write_record(fidelity, args, "fp8", None, diverged="step 5: the loss is nan; lower learning_rate",
                  diverged_step=5, persistent=None, train_loss=[2.2, 2.1, 2.0, 1.9])
    _write_record(fidelity, args, "fp8+nopersistent", 2.01, persistent="off")
    _write_record(fidelity, args, "fp8+persistent-seed43", 2.3, persistent="on", seed=43)
    _write_record(fidelity, args, "bf16", 2.0)
    rows = fidelity.report(args)
    assert [r["recipe"] for r in rows] == ["bf16", "fp8", "fp8 (+nopersistent)", "fp8 (+persistent, seed 43)"]
    assert rows[1]["target_met"] is False and rows[1]["diverged_step"] == 5 and rows[2]["target_met"] is True
    md = (tmp_path / "out" / "fidelity.md").read_text()
    assert "| fp8 | reference | - | - | <= +1% | DIVERGED (step 5) | - | - |" in md
    assert "| fp8 (+nopersistent) | reference | 2.0100 | 1.0050 | <= +1% | met |" in md
    assert "| fp8 (+persistent, seed 43) | reference | 2.3000 | 1.1500 | <= +1% | MISSED |" in md
    assert "No record" not in md
    saved = json.loads((tmp_path / "out" / "fidelity.json").read_text())
    assert saved["recipes"][1]["diverged"].startswith("step 5: the loss is nan")


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A real tiny base after 2 pretraining steps (seconds): enough for the trainer to run on."""
    fidelity = _fidelity()
    work = tmp_path_factory.mktemp("fidelity-base")
    common = ["--base", "tiny", "--corpus-bytes", "20000", "--pretrain-steps", "2", "--steps", "2",
              "--eval-samples", "2", "--data", str(SAMPLE)]
    base = fidelity.pretrain(fidelity.parse_args([*common, "--work", str(work)]))
    return common, base


def _on_tiny_base(tiny_base, tmp_path) -> list[str]:
    """The tiny base's arguments with a work dir of this test's own (the base copied in: no shared records)."""
    common, base = tiny_base
    shutil.copytree(base, tmp_path / "work" / base.name)
    return [*common, "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]


def test_a_diverged_finetune_writes_its_record_and_exits_nonzero(tiny_base, tmp_path, monkeypatch):
    """The loss made NaN from step 2 on (the trainer then raises FloatingPointError): a record anyway, a
    non-zero exit, and a DIVERGED row beside the others in the report."""
    from surogate.training import steps

    fidelity = _fidelity()
    argv = _on_tiny_base(tiny_base, tmp_path)
    args = fidelity.parse_args(argv)
    accumulation = fidelity.finetune_settings(args)["grad_accum"]
    micro_step = steps.MicroStep.__call__

    def nan_from_step_2(self, batch, items=None):
        self.calls = getattr(self, "calls", 0) + 1
        loss = micro_step(self, batch, items)
        return loss * float("nan") if self.calls > accumulation else loss

    monkeypatch.setattr(steps.MicroStep, "__call__", nan_from_step_2)
    with pytest.raises(SystemExit) as stop:
        fidelity.main(["--phase", "finetune", "--recipes", "fp8", *argv])
    message = str(stop.value.code)
    assert message.startswith("fidelity: diverged (recorded): fp8 (step 2: the loss is nan") and "\n" not in message
    record = json.loads((fidelity.runs_dir(args) / "fp8.json").read_text())
    assert record["diverged"].startswith("step 2: the loss is nan (learning rate") and record["diverged_step"] == 2
    assert record["eval_loss"] is None and record["eval_loss_base"] is None and record["exact_match"] is None
    assert len(record["train_loss"]) == 1 and math.isfinite(record["train_loss"][0]) and record["steps"] == 1
    assert record["seed"] == 42 and record["persistent"] is None and record["settings"]["steps"] == 2
    assert {"gpu", "torch", "commit"} <= set(record)

    _write_record(fidelity, args, "bf16", 2.0)  # the other recipe, made up: the report shows both
    fidelity.main(["--phase", "report", *argv])
    md = (tmp_path / "out" / "fidelity.md").read_text()
    assert "| bf16 | reference | 2.0000 | 1.0000 | - | reference |" in md
    assert "| fp8 | reference | - | - | <= +1% | DIVERGED (step 2) | - | - |" in md
    missing = [n for n in fidelity.runnable_recipes() if n not in ("bf16", "fp8")]
    assert f"No record: {', '.join(missing)}." in md
    rows = json.loads((tmp_path / "out" / "fidelity.json").read_text())["recipes"]
    assert [(r["recipe"], r["target_met"]) for r in rows] == [("bf16", None), ("fp8", False)]


def test_persistent_off_runs_without_the_route_and_keeps_its_own_record(tiny_base, tmp_path, monkeypatch):
    """--persistent off: PERSISTENT_SM90 False while the trainer runs, the library's value again after,
    the record <recipe>+nopersistent.json (the default run's name left alone), labelled in the report."""
    from surogate.kernels import variants

    fidelity = _fidelity()
    argv = _on_tiny_base(tiny_base, tmp_path)
    monkeypatch.setattr(variants, "PERSISTENT_SM90", variants.PERSISTENT_SM90)  # restored after the test
    default = variants.PERSISTENT_SM90
    trainer = importlib.import_module("surogate.training.train")
    train, seen = trainer.train, []

    def train_and_note(cfg, **kwargs):
        seen.append(variants.PERSISTENT_SM90)
        return train(cfg, **kwargs)

    monkeypatch.setattr(trainer, "train", train_and_note)
    fidelity.main(["--phase", "finetune", "--recipes", "bf16", "--persistent", "off", *argv])
    assert seen == [False] and variants.PERSISTENT_SM90 is default
    runs = fidelity.runs_dir(fidelity.parse_args(argv))
    assert sorted(p.name for p in runs.glob("*.json")) == ["bf16+nopersistent.json"]
    record = json.loads((runs / "bf16+nopersistent.json").read_text())
    assert record["persistent"] == "off" and record["diverged"] is None and math.isfinite(record["eval_loss"])
    fidelity.main(["--phase", "report", *argv])
    assert "| bf16 (+nopersistent) | reference |" in (tmp_path / "out" / "fidelity.md").read_text()


def test_final_answer_is_the_number_after_the_hashes():
    fidelity = _fidelity()
    assert fidelity.final_answer("so 3 + 4 = 7\n#### 1,234") == "1234"
    assert fidelity.final_answer("no answer") is None
    assert fidelity._same_number("18", "18.0") and not fidelity._same_number("18", None)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    fidelity = _fidelity()
    tmp = tmp_path_factory.mktemp("fidelity")
    common = ["--base", "tiny", "--corpus-bytes", "150000", "--pretrain-steps", "30", "--steps", "4",
              "--data", str(SAMPLE), "--work", str(tmp / "work"), "--out", str(tmp / "out")]
    fidelity.main(["--phase", "pretrain", *common])
    fidelity.main(["--phase", "finetune", "--recipes", "bf16,qfp8", *common])
    fidelity.main(["--phase", "report", *common])
    return fidelity, fidelity.parse_args(common), tmp / "out"


@pytest.mark.slow
def test_fidelity_writes_a_report_for_both_recipes(study):
    _, _, out = study
    report = json.loads((out / "fidelity.json").read_text())
    rows = {r["recipe"]: r for r in report["recipes"]}
    assert set(rows) == {"bf16", "qfp8"}
    for r in rows.values():
        assert math.isfinite(r["eval_loss"]) and math.isfinite(r["eval_loss_base"])
        assert r["steps"] == 4 and r["seed"] == 42 and r["gpu"] == "cpu" and r["support"] == "reference"
        assert {"torch", "triton", "commit", "exact_match"} <= set(r)
    assert rows["bf16"]["ratio_to_bf16"] == 1.0
    assert math.isfinite(rows["qfp8"]["ratio_to_bf16"]) and rows["qfp8"]["target_ratio"] == 1.01
    assert rows["qfp8"]["target_met"] == (rows["qfp8"]["ratio_to_bf16"] <= rows["qfp8"]["target_ratio"])
    md = (out / "fidelity.md").read_text()
    assert "| bf16 | reference |" in md and "| qfp8 | reference |" in md
    assert (out / "fidelity_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_fidelity_reuses_the_cached_base_and_records(study, capsys):
    fidelity, args, _ = study
    assert (fidelity.base_dir(args) / "base.json").is_file()
    assert fidelity.pretrain(args) == fidelity.base_dir(args)  # cached: returns at once
    assert fidelity.finetune(args, "qfp8", "reference")["recipe"] == "qfp8"  # the record, not a new run
    assert "cached" in capsys.readouterr().err


@pytest.mark.slow
def test_exact_match_decodes_and_scores(study):
    """Greedy decoding on the plain HF base (no compile: fast), scored."""
    from transformers import AutoModelForCausalLM

    from surogate.training.tokenizer import load_tokenizer

    fidelity, args, _ = study
    base = fidelity.base_dir(args)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16).eval()
    result = fidelity.exact_match(model, load_tokenizer(str(base)), args.data, 3, 4, torch.device("cpu"))
    assert result["k"] == 3 and 0 <= result["correct"] <= 3 and len(result["samples"]) == 3
