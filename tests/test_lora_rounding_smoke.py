"""bench/lora_rounding.py on the CPU at small widths: it runs, writes its files, and one bf16 rounding keeps the
whole LoRA term while two roundings drop part of a small one (the claim bench/NOTES.md run 57 rests on)."""

from __future__ import annotations

import json

from bench_module import load_bench

rounding = load_bench("lora_rounding")


def test_one_rounding_keeps_the_lora_term_and_two_drop_part_of_a_small_one():
    small, large = rounding.kept_share(64, 1024, 256, 16, 1e-4), rounding.kept_share(64, 1024, 256, 16, 3e-2)
    assert small["kept_one_rounding"] > 0.98 and large["kept_one_rounding"] > 0.98
    assert small["kept_two_roundings"] < 0.6 < 0.98 < large["kept_two_roundings"]


def test_the_benchmark_writes_its_tables(tmp_path):
    assert rounding.main(["--width", "64", "--vocab", "64", "--tokens", "16", "--layers", "1", "--steps", "2",
                          "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "lora_rounding.json").read_text())
    assert len(data["losses"]["one"]) == len(data["losses"]["two"]) == 2 and len(data["layer"]) == 3
    assert "| one (fused) |" in (tmp_path / "lora_rounding.md").read_text()
