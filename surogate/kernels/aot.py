"""Ahead-of-time builds of Triton kernels for every target arch, on a machine without a GPU.

Triton ships ptxas and cuobjdump, so a `@triton.jit` kernel can be lowered to a cubin for
sm_89, sm_90a, sm_100a and sm_120a anywhere, and its SASS read back. That is how we check
that each kernel uses the tensor-core instruction class its recipe is sold on (a kernel
that silently falls back to a slower MMA on some arch fails a test), and how
`surogate info` shows what runs where.

A kernel module imported under `TRITON_INTERPRET=1` (the CPU test suite) holds interpreter
wrappers, not compilable `JITFunction`s; such builds run in a fresh worker process
(`python -m surogate.kernels.aot`) that imports the kernel without the interpreter.
Nothing here compiles or spawns anything at import time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import importlib
import importlib.util
import inspect
import io
import json
import os
import pickle
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

from surogate.recipes import ARCHS, normalize_arch


@dataclass(frozen=True)
class BuildRequest:
    """One kernel specialization to build for one arch (what `triton.compile` needs)."""

    name: str
    fn: Any  # a @triton.jit function (or an autotune/heuristics/interpreter wrapper around one)
    signature: dict[str, str]  # arg name -> Triton type ("*bf16", "i32", "fp32"); constexprs may be left out
    constexprs: dict[str, Any]
    arch: str  # "sm_90"
    num_warps: int = 4
    num_stages: int = 3
    options: dict[str, Any] = field(default_factory=dict)  # further CUDAOptions, e.g. maxnreg
    # Args assumed 16-divisible (pointers 16-byte aligned, strides/sizes multiples of 16), as the
    # launcher specializes them for LLM shapes. None: every pointer and integer argument.
    divisible: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Build:
    """What one AOT build produced: plain data, so it crosses process boundaries."""

    name: str
    arch: str
    target: str  # "sm_90a"
    error: str | None = None
    opcodes: dict[str, int] = field(default_factory=dict, repr=False)  # base SASS opcode -> count
    mma: dict[str, int] = field(default_factory=dict)  # full MMA mnemonic -> count
    registers: int = 0
    stack_bytes: int = 0  # per-thread stack frame; > 0 usually means register spills
    local_memory_ops: int = 0  # STL + LDL instructions: spills (or local arrays)
    shared_bytes: int = 0
    sass: str = field(default="", repr=False)  # the disassembly, to look into a failure
    ttgir: str = field(default="", repr=False)  # Triton's GPU IR (warp-specialized partitions: tests read it)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def mma_classes(self) -> tuple[str, ...]:
        """MMA instruction classes found, e.g. ("HGMMA",) or ("OMMA",); empty for a non-MMA kernel."""
        return tuple(sorted({mma_class(op) for op in self.mma}))

    @property
    def spills(self) -> bool:
        return self.stack_bytes > 0 or self.local_memory_ops > 0

    def summary(self) -> str:
        if not self.ok:
            return f"{self.name} on {self.arch}: FAILED: {self.error}"
        mma = ", ".join(f"{op} x{n}" for op, n in sorted(self.mma.items())) or "no MMA"
        return (f"{self.name} on {self.target}: {mma}; {self.registers} regs, stack {self.stack_bytes} B, "
                f"{self.local_memory_ops} local ld/st, {self.shared_bytes} B shared")


def target_of(arch: str) -> tuple[int, str]:
    """(compute capability, ptxas target) for a surogate arch name: "sm_90" -> (90, "sm_90a")."""
    info = ARCHS[normalize_arch(arch)]
    return info.capability, info.ptx_target


# ---------------------------------------------------------------------------------------------
# Triton version differences (3.6 - 3.9) live in this block only.
# ---------------------------------------------------------------------------------------------

def _jit_function(fn: Any) -> Any:
    """The `JITFunction` under autotune/heuristics wrappers, or None when `fn` is interpreted.

    Root cause: under TRITON_INTERPRET=1, `@triton.jit` returns an `InterpretedFunction`
    (no AST source for the compiler, and its callees are interpreted too), so it cannot be
    compiled in this process; the caller then builds in a worker without the interpreter.
    """
    from triton.runtime.jit import JITFunction

    seen = 0
    while not isinstance(fn, JITFunction) and hasattr(fn, "fn") and seen < 8:
        fn, seen = fn.fn, seen + 1
    return fn if isinstance(fn, JITFunction) else None


def _triton_compile(fn: Any, signature: dict[str, str], constexprs: dict[str, Any],
                    attrs: dict[tuple[int, ...], list], capability: int, options: dict[str, Any]) -> Any:
    """`triton.compile` for a CUDA target without a GPU; the one place that knows Triton's API.

    Triton 3.6-3.9 agree on `ASTSource(fn, signature, constexprs, attrs)` with name-keyed
    signatures that list constexprs as "constexpr", and on `GPUTarget("cuda", cc, 32)`.
    Difference handled: 3.9 warns when `enable_fp_fusion` is left unset (its default flips to
    False in 3.10), so we pass the launcher's default (`knobs.language.default_fp_fusion`,
    True in 3.6-3.9) explicitly: the cubin is the one a launch would build. Blackwell targets
    need the `ptxas-blackwell` both versions ship and pick themselves (3.6: cc >= 100; 3.9: cc >= 90).
    """
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    opts = {"enable_fp_fusion": bool(getattr(knobs.language, "default_fp_fusion", True)), **options}
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options=opts)


def _cuobjdump() -> str:
    """Path of the cuobjdump that Triton ships (TRITON_CUOBJDUMP_PATH overrides, as in Triton)."""
    from triton import knobs

    return knobs.nvidia.cuobjdump.path


# ---------------------------------------------------------------------------------------------

_MMA_OPCODE = re.compile(r"^[A-Z]*MMA$")
_SASS_LINE = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)")
_SASS_TARGET = re.compile(r"^\s*code for (sm_\w+)", re.MULTILINE)
_RES_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def mma_class(opcode: str) -> str:
    """The instruction class of a full SASS MMA mnemonic: "HGMMA.64x128x16.F32.BF16" -> "HGMMA"."""
    return opcode.split(".", 1)[0]


def parse_sass(sass: str) -> tuple[Counter, Counter]:
    """(base opcode counts, full MMA mnemonic counts) of a cuobjdump -sass listing."""
    opcodes: Counter = Counter()
    mma: Counter = Counter()
    for line in sass.splitlines():
        m = _SASS_LINE.match(line)
        if not m:
            continue
        full = m.group(1)
        base = full.split(".", 1)[0]
        opcodes[base] += 1
        if _MMA_OPCODE.match(base):
            mma[full] += 1
    return opcodes, mma


def disassemble(cubin: bytes) -> tuple[str, dict[str, int]]:
    """(SASS text, resource usage {REG, STACK, SHARED, LOCAL}) of a cubin, via Triton's cuobjdump.

    cuobjdump costs about a second per cubin, so results are kept next to Triton's own
    cache (`<TRITON_CACHE_DIR>/surogate-sass/<sha256 of the cubin>.json.gz`).
    """
    path = _sass_cache_path(cubin)
    if path is not None and os.path.exists(path):
        try:
            with gzip.open(path, "rt") as f:
                cached = json.load(f)
            return cached["sass"], cached["usage"]
        except (OSError, ValueError, KeyError):
            pass  # a torn or stale entry: disassemble again
    tool = _cuobjdump()
    with tempfile.TemporaryDirectory(prefix="surogate-aot-") as tmp:
        cubin_path = os.path.join(tmp, "kernel.cubin")
        with open(cubin_path, "wb") as f:
            f.write(cubin)
        sass = subprocess.run([tool, "-sass", cubin_path], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([tool, "-res-usage", cubin_path], capture_output=True, text=True, check=True).stdout
    m = _RES_USAGE.search(res)
    usage = dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, m.groups()))) if m else {}
    if path is not None:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp_path = f"{path}.{os.getpid()}.tmp"
            with gzip.open(tmp_path, "wt") as f:
                json.dump({"sass": sass, "usage": usage}, f)
            os.replace(tmp_path, path)  # atomic: parallel workers never read half a file
        except OSError:
            pass  # a read-only cache only costs time
    return sass, usage


def _sass_cache_path(cubin: bytes) -> str | None:
    try:
        from triton import knobs

        root = knobs.cache.dir
    except Exception:
        return None
    return os.path.join(root, "surogate-sass", hashlib.sha256(cubin).hexdigest() + ".json.gz") if root else None


def _full_signature(fn: Any, request: BuildRequest) -> tuple[dict[str, str], dict[str, Any]]:
    """Signature in argument order with constexprs marked, defaults of constexpr args filled in."""
    raw = fn.fn
    params = inspect.signature(raw).parameters
    constexprs = dict(request.constexprs)
    for pname, p in params.items():
        if pname not in constexprs and pname not in request.signature and p.default is not inspect.Parameter.empty:
            constexprs[pname] = p.default
    unknown = sorted((set(request.signature) | set(constexprs)) - set(params))
    if unknown:
        raise ValueError(f"kernel {request.name!r}: {unknown} are not arguments of {raw.__name__}; "
                         f"its arguments are {list(params)}")
    signature: dict[str, str] = {}
    for pname in params:
        if pname in constexprs:
            signature[pname] = "constexpr"
        elif pname in request.signature:
            signature[pname] = request.signature[pname]
        else:
            raise ValueError(f"kernel {request.name!r}: argument {pname!r} of {raw.__name__} has no type; add it "
                             "to the signature (e.g. '*bf16', '*fp8e4nv', 'i32', 'fp32') or give a constexpr value")
    return signature, constexprs


def _attrs(signature: dict[str, str], divisible: tuple[str, ...] | None) -> dict[tuple[int, ...], list]:
    names = divisible if divisible is not None else [
        n for n, t in signature.items() if t.startswith("*") or t in ("i32", "i64", "u32", "u64")]
    return {(i,): [["tt.divisibility", 16]] for i, n in enumerate(signature) if n in names}


def build_in_process(request: BuildRequest) -> Build:
    """Compile `request` here (its fn must be a real JITFunction) and read its SASS."""
    capability, target = target_of(request.arch)
    arch = normalize_arch(request.arch)
    fn = _jit_function(request.fn)
    if fn is None:
        raise TypeError(f"kernel {request.name!r}: {request.fn!r} is not a @triton.jit function "
                        "(under TRITON_INTERPRET=1 use build(), which compiles in a worker process)")
    try:
        signature, constexprs = _full_signature(fn, request)
        options = {"num_warps": request.num_warps, "num_stages": request.num_stages, **request.options}
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            # Triton prints the whole PTX as a "reproducer" when ptxas fails; the error says enough.
            compiled = _triton_compile(fn, signature, constexprs, _attrs(signature, request.divisible), capability,
                                       options)
        sass, usage = disassemble(compiled.asm["cubin"])
    except Exception as e:  # a kernel that does not build is a result to report, not a crash
        return Build(request.name, arch, target, error=_short_error(e))
    opcodes, mma = parse_sass(sass)
    found = _SASS_TARGET.search(sass)
    return Build(
        request.name, arch, found.group(1) if found else target,
        opcodes=dict(opcodes), mma=dict(mma),
        registers=usage.get("REG", 0), stack_bytes=usage.get("STACK", 0),
        local_memory_ops=opcodes.get("STL", 0) + opcodes.get("LDL", 0),
        shared_bytes=int(getattr(compiled.metadata, "shared", 0) or 0), sass=sass,
        ttgir=compiled.asm.get("ttgir", ""),
    )


def _short_error(e: BaseException, limit: int = 1500) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= limit else text[:limit] + " ..."


# ---------------------------------------------------------------------------------------------
# Worker processes: builds of interpreted kernels, and parallel batches.
# ---------------------------------------------------------------------------------------------

def _fn_ref(fn: Any) -> tuple[str, str, str]:
    """(module, source file, qualname) of the Python function under any Triton wrapper."""
    raw = fn
    for _ in range(8):
        if inspect.isfunction(raw):
            break
        raw = getattr(raw, "fn", raw)
    if not inspect.isfunction(raw):
        raise TypeError(f"cannot find the Python function behind {fn!r}")
    return raw.__module__, inspect.getsourcefile(raw) or "", raw.__qualname__


def _resolve_fn(ref: tuple[str, str, str]) -> Any:
    module_name, path, qualname = ref
    module = sys.modules.get(module_name)
    if module is None:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            spec = importlib.util.spec_from_file_location(module_name, path)
            if spec is None or spec.loader is None:
                raise
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(importlib.import_module("surogate").__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    return env


def _run_workers(requests: Sequence[BuildRequest], workers: int) -> list[Build]:
    """Split `requests` over `workers` processes; each reads its jobs from a file and writes its Builds to one."""
    results: list[Build | None] = [None] * len(requests)
    with tempfile.TemporaryDirectory(prefix="surogate-aot-") as tmp:
        procs = []
        for w in range(workers):
            idx = list(range(w, len(requests), workers))
            jobs, done = os.path.join(tmp, f"jobs{w}.pkl"), os.path.join(tmp, f"builds{w}.pkl")
            with open(jobs, "wb") as f:
                pickle.dump([(dataclasses.replace(requests[i], fn=None), _fn_ref(requests[i].fn)) for i in idx], f)
            # Triton prints reproducers on stdout/stderr when ptxas fails: keep them out of the way.
            log = open(os.path.join(tmp, f"log{w}.txt"), "w+b")
            proc = subprocess.Popen([sys.executable, "-m", "surogate.kernels.aot", jobs, done],
                                    stdout=log, stderr=subprocess.STDOUT, env=_worker_env())
            procs.append((idx, proc, done, log))
        for idx, proc, done, log in procs:
            proc.wait()
            if proc.returncode == 0 and os.path.exists(done):
                with open(done, "rb") as f:
                    for i, b in zip(idx, pickle.load(f)):
                        results[i] = b
            else:
                log.seek(0)
                tail = log.read().decode(errors="replace")[-1500:]
                for i in idx:
                    r = requests[i]
                    results[i] = Build(r.name, normalize_arch(r.arch), target_of(r.arch)[1],
                                       error=f"AOT worker failed (exit {proc.returncode}): {tail}")
            log.close()
    return [b for b in results if b is not None]


def _worker_main(jobs_path: str, builds_path: str) -> None:
    """Build the pickled (request, fn ref) pairs in `jobs_path`; pickle the Builds to `builds_path`."""
    with open(jobs_path, "rb") as f:
        payload = pickle.load(f)
    builds = []
    for request, ref in payload:
        try:
            fn = _resolve_fn(ref)
        except Exception as e:
            builds.append(Build(request.name, normalize_arch(request.arch), target_of(request.arch)[1],
                                error=f"cannot import {ref[0]}.{ref[2]}: {_short_error(e)}"))
            continue
        builds.append(build_in_process(dataclasses.replace(request, fn=fn)))
    with open(builds_path, "wb") as f:
        pickle.dump(builds, f)


def build_many(requests: Sequence[BuildRequest], workers: int | None = None) -> list[Build]:
    """Build every request (in order). Interpreted kernels, or `workers > 1`, build in worker processes.

    `workers=None` uses one worker per CPU core (at most one per request) when a worker is
    needed anyway, else builds in this process.
    """
    requests = list(requests)
    if not requests:
        return []
    for r in requests:
        normalize_arch(r.arch)  # fail early, with the list of archs, on a typo
    interpreted = any(_jit_function(r.fn) is None for r in requests)
    if workers is None:
        workers = max(1, min(os.cpu_count() or 1, len(requests))) if interpreted else 1
    if workers <= 1 and not interpreted:
        return [build_in_process(r) for r in requests]
    return _run_workers(requests, max(1, min(workers, len(requests))))


def build(request: BuildRequest) -> Build:
    """Build one request (in a worker process when its kernel is interpreted)."""
    return build_many([request], workers=1 if _jit_function(request.fn) is not None else None)[0]


if __name__ == "__main__":
    # Run the worker from the importable module, so that the Builds it pickles name
    # `surogate.kernels.aot.Build` rather than `__main__.Build`.
    from surogate.kernels import aot as _aot

    _aot._worker_main(*sys.argv[1:3])
