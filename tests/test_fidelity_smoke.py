"""bench/fidelity.py end to end on a CPU: tiny base, two recipes, each phase as its own call.

It proves that the study's pipeline runs and writes its outputs, not that any recipe is accurate
(a ~0.5M-parameter base after a few steps says nothing about that). About 45 s on 2 cores.
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
    """Greedy decoding on the plain HF base (no compile: fast); the scoring parses '#### N'."""
    from transformers import AutoModelForCausalLM

    from surogate.training.tokenizer import load_tokenizer

    fidelity, args, _ = study
    base = fidelity.base_dir(args)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16).eval()
    result = fidelity.exact_match(model, load_tokenizer(str(base)), args.data, 3, 4, torch.device("cpu"))
    assert result["k"] == 3 and 0 <= result["correct"] <= 3 and len(result["samples"]) == 3
    assert fidelity.final_answer("so 3 + 4 = 7\n#### 1,234") == "1234"
    assert fidelity.final_answer("no answer") is None
    assert fidelity._same_number("18", "18.0") and not fidelity._same_number("18", None)
