"""The per-bucket config tuner (surogate/kernels/tuning.py), on CPU with a fake kernel and a fake
benchmark: which config wins, when a bucket is benchmarked, what the memory and disk caches
keep, and the rules that turn tuning off (SUROGATE_AUTOTUNE=0, CUDA-graph capture)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from triton.runtime.errors import OutOfResources

from surogate.kernels import configs, tuning

ARCH, FAMILY, MODES = "sm_90", "bf16", (0, 0, False, True, False)
CANDS = configs.get_configs(FAMILY, ARCH)
FASTEST = 3  # an index other than 0, so "always the default" fails the tests


def _ident(kw: dict) -> tuple:
    return (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["num_warps"], kw["num_stages"])


def _ident_cfg(c) -> tuple:
    return _ident({**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages})


def _is(config, index: int) -> bool:
    """`config` is candidate `index` (the tuner builds its own Config objects)."""
    return _ident_cfg(config) == _ident_cfg(CANDS[index])


class FakeKernel:
    """Stands in for a @triton.jit kernel: `kernel[grid](**kw)` records the launch; configs whose
    ident is in `fail` raise as an out-of-shared-memory compile would."""

    def __init__(self, src: str = "def k(): pass", fail: tuple = ()):
        self.__name__, self.src, self.fail = "_fake_kernel", src, fail
        self.launches: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid: tuple):
        def launch(**kw):
            if "num_warps" in kw and _ident(kw) in self.fail:
                raise OutOfResources(300_000, 232_448, "shared memory")
            self.launches.append((grid, kw))
        return launch


class FakeBench:
    """`bench(fn) -> ms`: runs `fn` once and returns a made-up time per config; FASTEST is quickest."""

    def __init__(self, kernel: FakeKernel):
        self.kernel, self.calls = kernel, 0
        self.times = {_ident_cfg(c): 2.0 + i for i, c in enumerate(CANDS)}
        self.times[_ident_cfg(CANDS[FASTEST])] = 0.5

    def __call__(self, fn) -> float:
        self.calls += 1
        before = len(self.kernel.launches)
        fn()
        assert len(self.kernel.launches) == before + 1
        return self.times[_ident(self.kernel.launches[-1][1])]


def _kwargs(m: int, n: int = 4096, k: int = 4096) -> dict:
    return dict(a_ptr=torch.empty(1, dtype=torch.bfloat16), out_ptr=torch.empty(1, dtype=torch.bfloat16),
                M=m, N=n, K=k, HAS_LORA=True)


def _grid(kw: dict):
    return lambda meta: (-(-kw["M"] // meta["BLOCK_M"]) * -(-kw["N"] // meta["BLOCK_N"]),)


def _pick(tuner: tuning.Tuner, kernel: FakeKernel, m: int, **kw):
    args = _kwargs(m, **kw)
    return tuner.config(kernel, FAMILY, ARCH, MODES, _grid(args), args)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path) -> None:
    """Tuning on, not capturing, the default cache dir in tmp (never the user's)."""
    monkeypatch.delenv("SUROGATE_AUTOTUNE", raising=False)
    monkeypatch.setenv("SUROGATE_CACHE_DIR", str(tmp_path / "default-cache"))
    monkeypatch.setattr(tuning, "stream_capturing", lambda: False)


def _tuner(tmp_path: Path, kernel: FakeKernel) -> tuple[tuning.Tuner, FakeBench]:
    bench = FakeBench(kernel)
    return tuning.Tuner(tmp_path / "tune", bench=bench), bench


# ------------------------------------------------------------------------------- bucket rule

def test_bucket_values_floor_and_ceiling() -> None:
    assert [tuning.m_bucket(m) for m in (0, 1, 5, 128)] == [128] * 4
    assert [tuning.m_bucket(m) for m in (129, 256, 257, 1000, 4096, 4097)] == [256, 256, 512, 1024, 4096, 8192]
    assert [tuning.m_bucket(m) for m in (16384, 16385, 10**6)] == [16384] * 3


def test_bucket_is_monotonic_and_covers_m() -> None:
    buckets = [tuning.m_bucket(m) for m in range(1, 40000, 7)]
    assert buckets == sorted(buckets)
    assert all(tuning.m_bucket(m) >= m for m in range(1, tuning.M_CEIL + 1, 13))
    assert len(set(buckets)) == 8  # 128 .. 16384


# ---------------------------------------------------------------------------- the choice

def test_picks_the_fastest_config_and_launches_it(tmp_path: Path) -> None:
    kernel = FakeKernel()
    tuner, bench = _tuner(tmp_path, kernel)
    best = _pick(tuner, kernel, 1000)
    assert _is(best, FASTEST)
    assert bench.calls == len(CANDS) and tuner.counts["tuning_runs"] == 1
    # The launch carries the meta-parameters and num_warps / num_stages; the grid reads the tiles.
    args = _kwargs(1000)
    tuning.launch(kernel, _grid(args), best, args)
    grid, kw = kernel.launches[-1]
    assert _ident(kw) == _ident_cfg(best) and kw["M"] == 1000
    assert grid == (-(-1000 // best.kwargs["BLOCK_M"]) * -(-4096 // best.kwargs["BLOCK_N"]),)


def test_same_bucket_hits_memory_other_bucket_or_shape_tunes(tmp_path: Path) -> None:
    kernel = FakeKernel()
    tuner, bench = _tuner(tmp_path, kernel)
    _pick(tuner, kernel, 1000)
    assert _is(_pick(tuner, kernel, 600), FASTEST)  # 600 and 1000 share bucket 1024
    assert bench.calls == len(CANDS) and tuner.counts["memory_hits"] == 1 and tuner.counts["tuning_runs"] == 1
    _pick(tuner, kernel, 1025)  # bucket 2048
    _pick(tuner, kernel, 1000, n=1024)  # another N
    assert tuner.counts["tuning_runs"] == 3 and bench.calls == 3 * len(CANDS)


def test_each_lora_rank_tile_tunes_apart(tmp_path: Path) -> None:
    """BLOCK_R sizes the LoRA step's shared memory, so a pick at one rank's tile is not reused at another's
    (it may not even launch there); the same tile hits the pick, in memory and on disk."""
    kernel = FakeKernel()
    tuner, bench = _tuner(tmp_path, kernel)
    for block_r in (16, 64, 16):
        args = dict(_kwargs(4096), BLOCK_R=block_r)
        tuner.config(kernel, FAMILY, ARCH, MODES, _grid(args), args)
    assert tuner.counts["tuning_runs"] == 2 and tuner.counts["memory_hits"] == 1 and bench.calls == 2 * len(CANDS)
    assert sorted(k.rsplit("|", 1)[1] for k in json.loads(tuner.path(ARCH).read_text())["entries"]) == ["r16", "r64"]


def test_failing_config_is_skipped(tmp_path: Path) -> None:
    kernel = FakeKernel(fail=(_ident_cfg(CANDS[FASTEST]),))
    tuner, _ = _tuner(tmp_path, kernel)
    best = _pick(tuner, kernel, 1000)
    assert _is(best, 0)  # the next fastest under FakeBench's times
    assert tuner.counts["failed_configs"] == 1 and tuner.counts["configs_benchmarked"] == len(CANDS) - 1


def test_all_configs_failing_raises(tmp_path: Path) -> None:
    kernel = FakeKernel(fail=tuple(_ident_cfg(c) for c in CANDS))
    tuner, _ = _tuner(tmp_path, kernel)
    with pytest.raises(RuntimeError, match="no bf16 config"):
        _pick(tuner, kernel, 1000)


# ------------------------------------------------------------------------------ disk cache

def test_disk_cache_is_read_by_a_new_tuner_and_after_clearing_memory(tmp_path: Path) -> None:
    kernel = FakeKernel()
    tuner, _ = _tuner(tmp_path, kernel)
    _pick(tuner, kernel, 1000)
    data = json.loads(tuner.path(ARCH).read_text())
    assert len(data["entries"]) == 1
    tuner.clear_memory()
    assert _is(_pick(tuner, kernel, 900), FASTEST) and tuner.counts["disk_hits"] == 1
    fresh, bench = _tuner(tmp_path, kernel)
    assert _is(_pick(fresh, kernel, 700), FASTEST)
    assert bench.calls == 0 and fresh.counts["disk_hits"] == 1 and fresh.counts["tuning_runs"] == 0
    assert _is(_pick(fresh, kernel, 800), FASTEST) and fresh.counts["memory_hits"] == 1


def test_changed_kernel_source_retunes(tmp_path: Path) -> None:
    old = FakeKernel()
    tuner, _ = _tuner(tmp_path, old)
    _pick(tuner, old, 1000)
    edited = FakeKernel(src="def k(): return 1")
    fresh, bench = _tuner(tmp_path, edited)
    _pick(fresh, edited, 1000)
    assert bench.calls == len(CANDS) and fresh.counts["disk_hits"] == 0
    assert len(json.loads(fresh.path(ARCH).read_text())["entries"]) == 2  # the old entry is kept


def test_source_hash_follows_jit_callees() -> None:
    from surogate.kernels import lora_linear as ll

    h = tuning.source_hash(ll._lora_gemm_kernel)
    assert h == tuning.source_hash(ll._lora_gemm_kernel) and h != tuning.source_hash(ll._lora_gemm_nvfp4_kernel)


@pytest.mark.parametrize("text", ["{not json", "[]", '{"format": 1, "entries": []}'])
def test_corrupt_file_is_ignored_and_rewritten(tmp_path: Path, text: str) -> None:
    kernel = FakeKernel()
    tuner, bench = _tuner(tmp_path, kernel)
    tuner.path(ARCH).parent.mkdir(parents=True)
    tuner.path(ARCH).write_text(text)
    assert _is(_pick(tuner, kernel, 1000), FASTEST) and bench.calls == len(CANDS)
    fresh, bench = _tuner(tmp_path, kernel)
    _pick(fresh, kernel, 1000)
    assert bench.calls == 0 and fresh.counts["disk_hits"] == 1


def test_stored_config_no_longer_a_candidate_retunes(tmp_path: Path) -> None:
    kernel = FakeKernel()
    tuner, _ = _tuner(tmp_path, kernel)
    _pick(tuner, kernel, 1000)
    path = tuner.path(ARCH)
    data = json.loads(path.read_text())
    for entry in data["entries"].values():
        entry["config"]["num_warps"] = 3
    path.write_text(json.dumps(data))
    fresh, bench = _tuner(tmp_path, kernel)
    _pick(fresh, kernel, 1000)
    assert bench.calls == len(CANDS) and fresh.counts["disk_hits"] == 0


def test_unwritable_cache_dir_warns_once_and_keeps_memory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache dir should be")
    kernel = FakeKernel()
    tuner = tuning.Tuner(blocker / "tune", bench=FakeBench(kernel))
    with pytest.warns(RuntimeWarning, match="cannot write tuned GEMM configs"):
        assert _is(_pick(tuner, kernel, 1000), FASTEST)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _pick(tuner, kernel, 5000)  # another bucket: tuned, no second warning
    assert not [w for w in record if "cannot write" in str(w.message)]
    assert _is(_pick(tuner, kernel, 1000), FASTEST) and tuner.counts["memory_hits"] == 1


def test_default_directory_follows_surogate_cache_dir(tmp_path: Path) -> None:
    assert tuning.Tuner().path(ARCH).parent == tmp_path / "default-cache" / "autotune"


# ---------------------------------------------------------------------------- tuning off

def test_autotune_off_takes_the_default(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SUROGATE_AUTOTUNE", "0")
    kernel = FakeKernel()
    tuner, bench = _tuner(tmp_path, kernel)
    assert _is(_pick(tuner, kernel, 1000), 0)
    assert bench.calls == 0 and not tuner.path(ARCH).exists()


def test_capture_takes_the_default_without_recording(tmp_path: Path, monkeypatch) -> None:
    kernel = FakeKernel()
    tuner, bench = _tuner(tmp_path, kernel)
    _pick(tuner, kernel, 1000)  # tuned before the capture
    monkeypatch.setattr(tuning, "stream_capturing", lambda: True)
    assert _is(_pick(tuner, kernel, 1000), FASTEST)  # a tuned bucket is still used
    assert _is(_pick(tuner, kernel, 3000), 0)  # an untuned one is not benchmarked
    assert bench.calls == len(CANDS) and tuner.counts["capture_defaults"] == 1
    monkeypatch.setattr(tuning, "stream_capturing", lambda: False)
    assert _is(_pick(tuner, kernel, 3000), FASTEST)  # the default was not recorded as tuned
    assert tuner.counts["tuning_runs"] == 2


@pytest.mark.parametrize("untuned", ["autotune off", "capture"])
def test_untuned_launch_takes_the_first_config_that_fits(tmp_path: Path, monkeypatch, untuned: str) -> None:
    """Untuned, a first config refused for shared memory (the persistent kernel's 128x256 tile at LoRA rank
    64/128 on the H200, run 58) gives way to the next one, remembered per LoRA rank tile; one launch runs."""
    if untuned == "autotune off":
        monkeypatch.setenv("SUROGATE_AUTOTUNE", "0")
    else:
        monkeypatch.setattr(tuning, "stream_capturing", lambda: True)
    kernel = FakeKernel(fail=(_ident_cfg(CANDS[0]), _ident_cfg(CANDS[1])))
    tuner, bench = _tuner(tmp_path, kernel)
    args = {**_kwargs(1000), "BLOCK_R": 64}
    tuner.run(kernel, FAMILY, ARCH, MODES, _grid(args), args)
    assert len(kernel.launches) == 1 and _ident(kernel.launches[0][1]) == _ident_cfg(CANDS[2])
    assert tuner.counts["failed_configs"] == 2 and bench.calls == 0
    tuner.run(kernel, FAMILY, ARCH, MODES, _grid(args), args)  # remembered: no second refusal
    assert len(kernel.launches) == 2 and tuner.counts["failed_configs"] == 2
    kernel.fail = ()  # another rank tile (which here would fit the first config) is its own key
    args16 = {**_kwargs(1000), "BLOCK_R": 16}
    tuner.run(kernel, FAMILY, ARCH, MODES, _grid(args16), args16)
    assert _ident(kernel.launches[-1][1]) == _ident_cfg(CANDS[0])


def test_untuned_launch_with_no_config_that_fits_raises(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SUROGATE_AUTOTUNE", "0")
    kernel = FakeKernel(fail=tuple(_ident_cfg(c) for c in CANDS))
    tuner, _ = _tuner(tmp_path, kernel)
    args = {**_kwargs(1000), "BLOCK_R": 128}
    with pytest.raises(RuntimeError, match="no bf16 config on sm_90 fits _fake_kernel at BLOCK_R=128"):
        tuner.run(kernel, FAMILY, ARCH, MODES, _grid(args), args)
    assert kernel.launches == []


def test_module_stats_reset() -> None:
    tuning.reset_stats()
    tuning.tuner().counts["tuning_runs"] += 2
    assert tuning.stats()["tuning_runs"] == 2 and set(tuning.stats()) >= {"tuning_runs", "disk_hits", "memory_hits"}
    tuning.reset_stats()
    assert tuning.stats()["tuning_runs"] == 0


def test_interpreter_runner_uses_the_small_config(monkeypatch) -> None:
    monkeypatch.setattr(tuning, "interpreting", lambda: True)  # as under TRITON_INTERPRET=1, on any machine
    kernel = FakeKernel()
    run = tuning.runner(kernel, FAMILY, torch.device("cpu"), MODES)
    run((1,), M=5, N=64, K=64)
    assert kernel.launches[-1][1]["BLOCK_M"] == configs.interpret_config(FAMILY)["BLOCK_M"]
    assert tuning.stats()["tuning_runs"] == 0
