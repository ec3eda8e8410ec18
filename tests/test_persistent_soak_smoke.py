"""bench/persistent_soak.py on CPU: the Triton interpreter, one tiny shape (M 37, N 64, K 128), 3 launches a row.

What it checks is that the H200 run needs no edit and that the soak catches what it hunts: every (family,
direction, shape, config) row of the default families runs (all their configs, warp-specialized included: a
few seconds under the interpreter, so no config list is cut) with its launches, none mismatching or NaN, the
first output above 40 dB against the reference, the other direction launched between a row's launches
(--interleave), the json and md written with the verdict; --graph is skipped without CUDA, with a note. A
launcher whose 2nd output holds a NaN (and, in another row, one changed element) must show as mismatching /
NaN launches, named in the verdict; a spent time limit leaves the rows listed.
"""

from __future__ import annotations

import json
from types import ModuleType

import pytest
import torch
from bench_module import load_bench

ARGS = ["--shapes", "tiny=64x128", "--m", "37", "--iters", "3"]


@pytest.fixture
def soak(monkeypatch) -> ModuleType:
    module = load_bench("persistent_soak")
    monkeypatch.setattr(module.kb, "DEVICE", "cpu")  # main() sets it; restored after the test
    return module


def _run(soak: ModuleType, tmp_path, *extra: str) -> tuple[dict, str]:
    soak.main([*ARGS, "--out", str(tmp_path), *extra])
    return (json.loads((tmp_path / "persistent_soak.json").read_text()),
            (tmp_path / "persistent_soak.md").read_text())


def test_every_config_row_runs_clean_and_is_written(soak, tmp_path, monkeypatch) -> None:
    real_launch, launches = soak.launch, []
    monkeypatch.setattr(soak, "launch", lambda call, config: (launches.append(call), real_launch(call, config))[1])
    data, md = _run(soak, tmp_path)
    expected = {(recipe, d, "tiny", soak.config_text(c)) for recipe, family in
                (("bf16", "persistent_bf16"), ("fp8", "persistent_fp8")) for d in soak.DIRECTIONS
                for c in soak.family_configs(family)}
    rows = data["rows"]
    assert {(r["recipe"], r["direction"], r["linear"], r["config"]) for r in rows} == expected
    assert len(rows) == len(expected) and any("ws=1" in r["config"] for r in rows)
    assert {r["mode"] for r in rows} == {"eager"} and "--graph skipped" in " ".join(data["notes"])
    assert rows[0]["recipe"] == "fp8" and "ws=1" in rows[0]["config"]  # the most suspect first
    for r in rows:
        key = (r["recipe"], r["direction"], r["config"])
        assert r["launches"] == 3 and r["mismatches"] == 0 and r["nonfinite"] == 0, key
        assert r["sqnr_db"] > 40 and r["error"] is None and not r["cut_short"], key
    assert data["verdict"].startswith(f"Verdict: none in {3 * len(rows)} launches")
    assert len(launches) == len(rows) * (3 + 2)  # each row's 3 launches and the 2 of the other direction between
    assert data["meta"]["commit"] and data["meta"]["triton"] and data["meta"]["gpu"] == "cpu"
    assert md.count("\n| fp8 |") + md.count("\n| bf16 |") == len(rows) and data["verdict"] in md


def test_a_bad_launch_is_counted_and_named(soak, tmp_path, monkeypatch) -> None:
    """One config of fp8: forward launches 1-3, dgrad 4-6. Launch 2 gets a NaN, launch 5 one element + 1."""
    real_launch, real_configs = soak.launch, soak.family_configs
    count = [0]

    def launch(call: dict, config) -> torch.Tensor:
        out, count[0] = real_launch(call, config), count[0] + 1
        if count[0] in (2, 5):
            out = out.clone()
            out[5, 7] = float("nan") if count[0] == 2 else out[5, 7] + 1
        return out

    monkeypatch.setattr(soak, "launch", launch)
    monkeypatch.setattr(soak, "family_configs", lambda family: real_configs(family)[:1])
    data, md = _run(soak, tmp_path, "--families", "fp8", "--no-interleave")
    fwd, dgrad = data["rows"]
    assert (fwd["direction"], fwd["launches"], fwd["mismatches"], fwd["nonfinite"]) == ("forward", 3, 1, 1)
    assert fwd["first_bad"] == dict(launch=2, elements=1, first=[5, 7], tiles=[[0, 0]], second_half_share=0.0)
    assert (dgrad["direction"], dgrad["launches"], dgrad["mismatches"], dgrad["nonfinite"]) == ("dgrad", 3, 1, 0)
    assert 0.9 < dgrad["max_abs_diff"] < 1.1
    for r in (fwd, dgrad):
        assert f"fp8 {r['direction']} tiny {r['config']} (eager: 1 of 3 launches mismatching" in data["verdict"]
    assert data["verdict"].startswith("Verdict: 2 of 2 rows") and data["verdict"] in md


def test_a_spent_time_limit_lists_what_did_not_run(soak, tmp_path) -> None:
    data, md = _run(soak, tmp_path, "--families", "bf16", "--time-limit", "0")
    assert data["rows"] == [] and len(data["not_run"]) == 2 * len(soak.family_configs("persistent_bf16"))
    assert "Time limit (0 s) spent" in md and "Not run (time limit)" in data["verdict"]


def test_scratch_ring_hands_out_n_buffers_in_turn_and_main_installs_it(soak, tmp_path, monkeypatch) -> None:
    """--scratch-ring N: no two of N consecutive requests of a size share an address, the (N+1)th reuses the
    first; main() gives it to Triton as the descriptor allocator and records N."""
    ring = soak.ScratchRing(3, "cpu")
    got = [ring(256, 128, None).data_ptr() for _ in range(7)]
    assert len(set(got[:3])) == 3 and got[3:6] == got[:3] and got[6] == got[0]
    assert ring(512, 128, None).data_ptr() not in got  # each size its own ring
    installed = []
    monkeypatch.setattr(soak.triton, "set_allocator", installed.append)
    data, _ = _run(soak, tmp_path, "--families", "fp8", "--scratch-ring", "4", "--iters", "1", "--no-interleave")
    assert [type(a).__name__ for a in installed] == ["ScratchRing"] and installed[0].n == 4
    assert data["meta"]["scratch_ring"] == 4
