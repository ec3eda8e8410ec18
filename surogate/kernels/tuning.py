"""Launch-config choice for the fused GEMM kernels: tuned once per shape bucket, cached on disk.

Why not `triton.autotune(key=["M", "N", "K"])`: with real fine-tuning data nearly every batch
has another token count M, and Triton's autotuner benchmarks every config again for each new M
(a padded variable-length run was 7.7x slower than HF). Here the key holds `m_bucket(M)` instead
of M, so a handful of buckets per (N, K) are tuned once, and the winners are kept in a JSON file
so the next run (and the other ranks) tune nothing. `docs/kernels.md` ("Config choice per shape
bucket") is the user-facing summary.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import re
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch
import triton
from triton.errors import TritonError
from triton.runtime.errors import OutOfResources

from surogate.kernels.configs import device_arch, get_configs, interpret_config, interpreting

log = logging.getLogger(__name__)

M_FLOOR = 128  # every M up to this shares one bucket: one or two M tiles, the weight read dominates
M_CEIL = 16384  # every M above this shares one bucket: the grid has many waves, the pick settles
_FORMAT = 1  # bump when the file layout changes; older files are then ignored
_BENCH_WARMUP_MS, _BENCH_REP_MS = 5, 20  # per config: tuning a bucket stays well under a second


def m_bucket(m: int) -> int:
    """The M of a tuning key: the next power of two of `m`, clamped to [M_FLOOR, M_CEIL].

    Why powers of two: the winning tile shape changes with the number of M tiles (waves of
    programs over the SMs), which changes slowly, so a config tuned on one M is near-best for M
    up to twice as large, and a training run meets at most log2(M_CEIL / M_FLOOR) + 1 = 8 buckets
    per (N, K). Why a floor and a ceiling: below 128 rows, and above 16384, the pick does not change.
    """
    # Plain Python: triton.next_power_of_2 is a jit-wrapped call (~1 us), and this runs every launch.
    return min(max(1 << (max(int(m), 1) - 1).bit_length(), M_FLOOR), M_CEIL)


def autotune_enabled() -> bool:
    """False when `SUROGATE_AUTOTUNE=0` (or false/off/no): every launch takes its family's first config."""
    return os.environ.get("SUROGATE_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no")


def stream_capturing() -> bool:
    """True while a CUDA graph is being captured: benchmarking then would be recorded into the graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def cache_dir() -> Path:
    """Where tuned configs are kept: `<surogate cache dir>/autotune` ($SUROGATE_CACHE_DIR, else
    $XDG_CACHE_HOME/surogate, else ~/.cache/surogate; one rule with the tokenizer cache)."""
    from surogate.cache import cache_dir as surogate_cache_dir

    return surogate_cache_dir() / "autotune"


def source_hash(kernel: Any) -> str:
    """sha256 of the kernel's source and of the @jit functions it calls (found by name in its
    module), so editing the kernel or a helper re-tunes. Unlike Triton's `cache_key` it leaves out
    line numbers: an edit elsewhere in the file does not throw the tuned configs away."""
    parts, todo, seen = [], [kernel], {id(kernel)}
    while todo:
        fn = todo.pop()
        src = getattr(fn, "src", None)
        if src is None:
            src = inspect.getsource(getattr(fn, "fn", fn))
        parts.append(src)
        for name, obj in sorted(getattr(fn, "__globals__", {}).items()):
            if hasattr(obj, "src") and id(obj) not in seen and re.search(rf"\b{re.escape(name)}\b", src):
                seen.add(id(obj))
                todo.append(obj)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def bench_median(fn: Callable[[], object]) -> float:
    """Median time of `fn` in ms (`triton.testing.do_bench`); it runs `fn` once before timing,
    so compiling a config is not counted."""
    return triton.testing.do_bench(fn, warmup=_BENCH_WARMUP_MS, rep=_BENCH_REP_MS, return_mode="median")


def launch(kernel: Any, grid: Callable[[dict], tuple], config: triton.Config, kwargs: dict[str, Any]) -> None:
    """Run `kernel` with `config`. `all_kwargs()` is the meta-parameters plus num_warps,
    num_stages and those of num_ctas / maxnreg / ir_override that are set (Triton 3.6 and 3.9 agree)."""
    kernel[grid({**kwargs, **config.kwargs})](**kwargs, **config.all_kwargs())


def _describe(config: triton.Config) -> dict[str, Any]:
    """A config as JSON: what identifies it among its family's candidates."""
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages,
            "num_ctas": getattr(config, "num_ctas", 1), "maxnreg": getattr(config, "maxnreg", None)}


class Tuner:
    """Picks a config per (kernel, family, arch, modes, N, K, m_bucket(M), operand dtypes, kernel
    source hash), remembered in memory and in `<directory>/<arch>-triton-<version>.json`.

    `bench(fn) -> ms` times one launch; tests inject a fake one. The file is rewritten whole,
    atomically (temp file + os.replace), merged with what another process wrote since; a
    corrupt or foreign file reads as empty (the bucket re-tunes), and an unwritable directory
    warns once and leaves the tuner in memory only.
    """

    def __init__(self, directory: Path | None = None, bench: Callable[[Callable[[], object]], float] | None = None):
        self._directory = directory
        self.bench = bench or bench_median
        self._memory: dict[tuple, triton.Config] = {}
        self._defaults: dict[tuple, triton.Config] = {}  # untuned launches: the first candidate that fit
        self._sources: dict[int, tuple[Any, str]] = {}
        self._candidates: dict[tuple[str, str], list[triton.Config]] = {}
        self._write_failed = False
        self.counts: Counter[str] = Counter()

    # -- keys and files -------------------------------------------------------------------------

    def path(self, arch: str) -> Path:
        version = re.sub(r"[^A-Za-z0-9._-]", "_", triton.__version__)
        return (self._directory or cache_dir()) / f"{arch}-triton-{version}.json"

    def _source(self, kernel: Any) -> str:
        hit = self._sources.get(id(kernel))
        if hit is None or hit[0] is not kernel:
            hit = self._sources[id(kernel)] = (kernel, source_hash(kernel))
        return hit[1]

    def configs(self, family: str, arch: str) -> list[triton.Config]:
        """The family's candidates on `arch`; the first is the heuristic default."""
        if (family, arch) not in self._candidates:
            self._candidates[family, arch] = get_configs(family, arch)
        return self._candidates[family, arch]

    def _read(self, path: Path) -> dict[str, dict]:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):  # missing, unreadable or corrupt: nothing tuned
            return {}
        if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("entries"), dict):
            return {}
        return data["entries"]

    def _write(self, path: Path, name: str, entry: dict) -> None:
        if self._write_failed:
            return
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            entries = {**self._read(path), name: entry}
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump({"format": _FORMAT, "triton": triton.__version__, "entries": entries}, f,
                          indent=1, sort_keys=True)
            os.replace(tmp, path)
        except OSError as e:
            self._write_failed = True
            warnings.warn(f"surogate: cannot write tuned GEMM configs to {path} ({e}); they are kept in memory "
                          "only and re-tuned in the next run", RuntimeWarning, stacklevel=3)
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)

    # -- the choice -----------------------------------------------------------------------------

    def config(self, kernel: Any, family: str, arch: str, modes: tuple, grid: Callable[[dict], tuple],
               kwargs: dict[str, Any]) -> triton.Config:
        """The config to launch `kernel` with on these arguments (M, N, K and tensors in `kwargs`),
        benchmarking the candidates on these very arguments the first time a bucket is met; the family's
        first config where nothing is tuned (`run` then falls back to the next one that fits)."""
        return self._pick(kernel, family, arch, modes, grid, kwargs) or self.configs(family, arch)[0]

    def run(self, kernel: Any, family: str, arch: str, modes: tuple, grid: Callable[[dict], tuple],
            kwargs: dict[str, Any]) -> None:
        """Launch `kernel` with the tuned config, or untuned (SUROGATE_AUTOTUNE=0, a CUDA-graph capture) with the
        first candidate that fits this launch's shared memory. Why the fallback: the LoRA rank's tile (BLOCK_R)
        adds to the shared memory a config needs, so a family's first config fits at rank 16 and not at 128
        (the persistent kernel's 128x256 tile: 263 KB at BLOCK_R 64, 361 KB at 128, sm_90 has 227; H200 run 58).
        A launch refused for resources has run nothing (Triton checks before loading the kernel)."""
        pick = self._pick(kernel, family, arch, modes, grid, kwargs)
        if pick is not None:
            launch(kernel, grid, pick, kwargs)
            return
        name = getattr(kernel, "__name__", type(kernel).__name__)
        key = (name, family, arch, modes, self._dtypes(kwargs), kwargs.get("BLOCK_R"))
        known = self._defaults.get(key)
        if known is not None:
            launch(kernel, grid, known, kwargs)
            return
        error = None
        for c in self.configs(family, arch):
            try:
                launch(kernel, grid, c, kwargs)
            except OutOfResources as e:
                self.counts["failed_configs"] += 1
                error = e
                continue
            self._defaults[key] = c
            return
        raise RuntimeError(f"no {family} config on {arch} fits {name} at BLOCK_R={kwargs.get('BLOCK_R')}") from error

    @staticmethod
    def _dtypes(kwargs: dict[str, Any]) -> tuple:
        return tuple(v.dtype for v in kwargs.values() if isinstance(v, torch.Tensor))

    def _pick(self, kernel: Any, family: str, arch: str, modes: tuple, grid: Callable[[dict], tuple],
              kwargs: dict[str, Any]) -> "triton.Config | None":
        """The tuned config (memory, disk, or benchmarked now); None where nothing may be tuned: autotuning
        off, or a CUDA-graph capture meeting a bucket it has no pick for."""
        if not autotune_enabled():
            return None
        dtypes = self._dtypes(kwargs)
        name = getattr(kernel, "__name__", type(kernel).__name__)
        # BLOCK_R (the LoRA rank's tile) sizes the LoRA step's shared memory: a pick made at rank 16 may not
        # launch at rank 128, so each gets its own.
        key = (name, family, arch, modes, kwargs["N"], kwargs["K"], m_bucket(kwargs["M"]), dtypes, self._source(kernel),
               kwargs.get("BLOCK_R"))
        hit = self._memory.get(key)
        if hit is not None:
            self.counts["memory_hits"] += 1
            return hit
        cands = self.configs(family, arch)
        path = self.path(arch)
        text = "|".join(map(str, key[:7] + (",".join(str(d).removeprefix("torch.") for d in dtypes), key[8])))
        if key[9] is not None:
            text += f"|r{key[9]}"
        stored = self._read(path).get(text)
        for c in cands:  # a stored pick that is no longer a candidate (config list edited) re-tunes
            if isinstance(stored, dict) and stored.get("config") == _describe(c):
                self.counts["disk_hits"] += 1
                self._memory[key] = c
                return c
        if stream_capturing():
            self.counts["capture_defaults"] += 1
            return None
        best, best_ms, error = None, float("inf"), None
        for c in cands:
            try:
                ms = self.bench(lambda c=c: launch(kernel, grid, c, kwargs))
            except (TritonError, RuntimeError) as e:  # out of shared memory, ptxas, launch failure
                self.counts["failed_configs"] += 1
                error = e
                continue
            self.counts["configs_benchmarked"] += 1
            if ms < best_ms:
                best, best_ms = c, ms
        if best is None:
            raise RuntimeError(f"no {family} config on {arch} runs {name} at {key[4:7]}") from error
        self.counts["tuning_runs"] += 1
        log.debug("tuned %s: %s (%.3f ms)", text, best, best_ms)
        self._memory[key] = best
        self._write(path, text, {"config": _describe(best), "ms": best_ms})
        return best

    def picks(self) -> dict[tuple, triton.Config]:
        """The configs chosen so far in this process, by key (kernel name, family, arch, modes, N, K, M bucket,
        dtypes, source hash): what a GPU test or benchmark names when a kernel's numbers are wrong."""
        return dict(self._memory)

    def clear_memory(self) -> None:
        """Forget the in-memory picks (the file stays): the next launches read the disk."""
        self._memory.clear()
        self._defaults.clear()


_TUNER = Tuner()


def tuner() -> Tuner:
    """The process-wide tuner `runner` uses."""
    return _TUNER


def stats() -> dict[str, int]:
    """Counters of the process-wide tuner: tuning_runs (buckets benchmarked), configs_benchmarked,
    failed_configs, memory_hits, disk_hits, capture_defaults (launches left untuned in a capture)."""
    keys = ("tuning_runs", "configs_benchmarked", "failed_configs", "memory_hits", "disk_hits", "capture_defaults")
    return {k: _TUNER.counts[k] for k in keys}


def reset_stats() -> None:
    """Zero the counters (benchmarks read them around the region they measure)."""
    _TUNER.counts.clear()


def runner(kernel: Any, family: str, device: torch.device, modes: tuple) -> Callable[..., None]:
    """`run(grid, **kwargs)` launching `kernel` with the config tuned for the shape bucket.
    Under the interpreter: one small config (`configs.interpret_config`), no tuning."""
    if interpreting():
        meta = interpret_config(family)
        return lambda grid, **kw: kernel[grid](**kw, **meta)
    arch = device_arch(device.index if device.index is not None else torch.cuda.current_device())
    return lambda grid, **kw: _TUNER.run(kernel, family, arch, modes, grid, kw)
