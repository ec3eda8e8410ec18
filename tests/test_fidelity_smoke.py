"""bench/fidelity.py on a CPU: the report and the answer scoring from made-up records (fast), and
end to end (`slow`: about 60 s on 2 cores): tiny base, two recipes, each phase as its own call.

The end-to-end run proves that the study's pipeline runs and writes its outputs, not that any recipe
is accurate (a ~0.5M-parameter base after a few steps says nothing about that).
"""

from __future__ import annotations

import importlib.util
import json
import math
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


def test_report_compares_each_recipe_with_bf16_and_writes_its_files(tmp_path):
    """The report phase on records as the finetune phase writes them: ratios, targets, verdicts, files."""
    fidelity = _fidelity()
    args = fidelity.parse_args(["--phase", "report", "--base", "tiny", "--steps", "4", "--data", str(SAMPLE),
                                "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    settings = fidelity.finetune_settings(args)
    base = tmp_path / "work" / settings["base"]
    base.mkdir(parents=True)
    (base / "base.json").write_text(json.dumps({"params": 500_000, "heldout_loss": 3.2, "pretrain_s": 9.0}))
    runs = fidelity.runs_dir(args)
    runs.mkdir(parents=True)
    env = {"gpu": "cpu", "torch": "2.13", "triton": "3.6", "transformers": "5.0", "commit": "abc1234"}
    for recipe, loss in (("bf16", 2.0), ("qfp8", 2.01), ("qnf4", 2.1)):
        (runs / f"{recipe}.json").write_text(json.dumps({
            "recipe": recipe, "support": "reference", "eval_loss": loss, "eval_loss_base": 2.5, "exact_match": None,
            "steps": 4, "seed": 42, "final_train_loss": 1.9, "train_loss": [2.2, 2.1, 2.0, 1.9], "tokens_per_s": 1.0,
            "settings": settings, "eval_examples": 16, "eval_tokens": 900, **env}))
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

    # bf16 again at two more fine-tuning seeds on the same base: the report's noise floor.
    for seed, loss in ((43, 2.02), (44, 1.99)):
        (runs / f"bf16-seed{seed}.json").write_text(json.dumps({
            **json.loads((runs / "bf16.json").read_text()), "seed": seed, "eval_loss": loss}))
    rows = {r["recipe"]: r for r in fidelity.report(args)}
    assert rows["bf16"]["ratio_to_bf16"] == 1.0  # the reference stays the main seed's run
    assert rows["bf16 (seed 43)"]["ratio_to_bf16"] == pytest.approx(1.01)
    saved = json.loads((tmp_path / "out" / "fidelity.json").read_text())
    assert saved["bf16_noise"]["seeds"] == [42, 43, 44]
    assert saved["bf16_noise"]["max_ratio_spread"] == pytest.approx(0.015)
    md = (tmp_path / "out" / "fidelity.md").read_text()
    assert "| bf16 (seed 44) | reference | 1.9900 | 0.9950 | - | noise floor |" in md
    assert "a spread of 1.50% of bf16's" in md


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
