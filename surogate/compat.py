"""Every workaround for a torch / Triton version difference lives here, with its root cause.

Supported: torch 2.11-2.13, Triton 3.6 and newer (GPU runs: torch 2.11, Triton 3.6; the CPU suite also passes on
torch 2.15 with Triton 3.9).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.util
import logging
import os
import sys
import warnings
from typing import Any


def triton_interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1).

    Root cause of the special cases keyed on this: the interpreter's bf16 `tl.dot` returns
    garbage and its fp32->fp8 casts round ties up (Triton 3.9), so kernels upcast / round explicitly.
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def block_scaled_mm():
    """`(scaled_mm, ScalingType)` when torch exposes DeepSeek-style (1x128, 128x128) FP8 scaling, else None.

    Root cause: `torch.nn.functional.scaled_mm` with `ScalingType.BlockWise1x128` arrived with
    cuBLASLt 12.9 support (torch 2.10+); older builds have only `torch._scaled_mm` row/tensor scaling.
    Whether the running cuBLASLt takes it is only known by calling it (kernels/cublas.py).
    """
    try:
        from torch.nn.functional import ScalingType, scaled_mm
    except ImportError:
        return None
    if not hasattr(ScalingType, "BlockWise1x128") or not hasattr(ScalingType, "BlockWise128x128"):
        return None
    return scaled_mm, ScalingType


# Triton (major, minor) versions whose warp-specialized sm_90 builds of the persistent kernel were run and
# found right on a GPU, in training as well as alone. None: Triton 3.6's passed the kernel tests and a soak of
# 160,000 launches (run 65) yet gave NaN in training under CUDA graphs (runs 63-70, see below).
WARP_SPECIALIZE_CHECKED_TRITON: tuple[tuple[int, int], ...] = ()


@functools.cache
def warp_specialize_checked() -> bool:
    """Whether this Triton's warp-specialized Hopper builds were checked right on a GPU.

    Root cause: Triton's automatic warp specialization on sm_90 is young. With 3.6 the specialized 128x128
    tile built cleanly (wgmma, TMA, setmaxnreg) yet computed wrong sums on the H200 (run 55). The remaining
    specialized tiles (128x256 and 256x128, 4 warps, 2 stages) passed every kernel test and
    bench/persistent_soak.py (2,000 launches per config and shape, eager and CUDA graphs, run 65), yet in
    bench/fidelity.py's fp8 fine-tune under CUDA graphs they made NaN outputs from finite inputs at a random
    replay (loss NaN at steps 2-41 in 7 of 7 runs, forward-only routing too), never eagerly (114,660 launches
    checked against a plain-torch reference, run 66); with only the unspecialized configs the same fine-tune
    trained all 300 steps to the eval loss of the non-persistent route (run 70). Upstream, triton-lang/triton#8311
    reports wrong results from warp_specialize=True with device-side descriptors. So a clean build and a clean
    soak prove nothing: a Triton not listed gets the unspecialized configs only (kernels/configs.py), which
    at the 8B shapes are the ones the tuner picked anyway (run 56; 8B fp8 21,368 tokens/s with them, run 71).
    Triton 3.9 on the H200 (run 155, beside torch 2.11): every specialized config passes the kernel tests,
    the 128x128 ones that 3.6 built wrong included; not listed until a fine-tune under CUDA graphs runs on it.
    """
    import triton

    major, minor = (int(part) for part in triton.__version__.split(".")[:2])
    return (major, minor) in WARP_SPECIALIZE_CHECKED_TRITON


def ensure_tma_allocator() -> None:
    """Give Triton an allocator for the global scratch of device-side TMA descriptors, where none is set.

    Root cause: a kernel that builds its descriptors on the GPU (`tl.make_tensor_descriptor`, Triton 3.4+;
    kernels/persistent.py) writes them to a global scratch buffer that the launcher allocates through
    `triton.set_allocator`; the default allocator raises. The allocator lives in a ContextVar
    (`triton.runtime._allocation._allocator`, the same in 3.6 and 3.9), so a thread that never set one
    (autograd's backward threads) has none: this sets it for the calling context when missing, and leaves
    a user's own allocator alone. Host-side `TensorDescriptor`s need no scratch, but on sm_90 they break
    the warp-specialized build (see kernels/persistent.py).
    """
    import triton
    from triton.runtime import _allocation

    if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        return

    def alloc(size: int, alignment: int, stream):
        import torch

        return torch.empty(size, device="cuda", dtype=torch.int8)

    triton.set_allocator(alloc)


def compiling() -> bool:
    """True while torch.compile traces or compiles a graph, also in code its backend runs that Dynamo does not
    trace: AOTAutograd's make_fx running a custom op's autograd formula (`register_autograd`) while it
    traces the joint forward + backward graph. False when a graph runs, and eagerly.

    Root cause: `torch.compiler.is_compiling()` reads a flag that torch 2.13 holds True for the whole
    compile session (pytorch#184614); on 2.11 and 2.12 only Dynamo's trace of user code sees True (Dynamo
    folds the call), while code AOTAutograd runs inside the backend reads the flag as False (only
    torch.export set it). There the `TracingContext` that Dynamo (and `compile_fx`) installs for the
    compile says it: it is set while a frame is traced and compiled, not while a compiled graph runs
    (Inductor's lazy backward compile enters it again, but runs no autograd formula).
    """
    import torch

    if torch.compiler.is_compiling():
        return True
    from torch._guards import TracingContext

    return TracingContext.try_get() is not None


def register_concat_lowering(op) -> bool:
    """Have Inductor lower `op` (a `cat` of the same signature, `surogate::concat`) as its ConcatKernel: each
    input computed into its slice of the output. False where this Inductor has no such API (the op then stays
    unused: passes/concat.py rewrites nothing).

    Root cause: Inductor's `cat` lowering picks between ConcatKernel and a masked pointwise kernel by its
    own heuristic, with no per-node switch; `register_lowering`, `ir.ConcatKernel.create` and `ir.TensorBox`
    are Inductor internals (the same in torch 2.11-2.13).
    """
    try:
        from torch._inductor import ir
        from torch._inductor.lowering import register_lowering
    except ImportError:
        return False
    if not hasattr(ir, "ConcatKernel") or not hasattr(ir, "TensorBox"):
        return False

    @register_lowering(op, type_promotion_kind=None)
    def _concat(tensors, dim):
        return ir.TensorBox(ir.ConcatKernel.create(list(tensors), dim))

    return True


@contextlib.contextmanager
def quiet_peft_deprecations():
    """PEFT calls made without transformers' deprecation notice about them.

    Root cause: PEFT (0.17-0.21) reads `model.is_gradient_checkpointing` when it wraps a model
    (`get_peft_model`, `PeftModel.from_pretrained`); transformers 5 deprecated that property in favour of
    `is_activation_checkpointing`, so every wrap warned (FutureWarning) about a call that is not ours.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


@contextlib.contextmanager
def masks_as_under_capture():
    """transformers' attention-mask builders deciding as they will while a CUDA graph records: for the warm-up
    runs before a capture, so that both hand the compiled layers the same mask.

    Root cause: `transformers.masking_utils` reads `is_tracing()`, true while a CUDA stream captures (5.x), as
    "read no tensor's values": there SDPA's causal skip is refused (5.17 to 5.2x, also without a padding mask)
    and a row of one example gets a packed-sequence mask (5.17-5.25); eagerly the same batch gets no mask. A
    model whose decoder builds its mask with them (StableLM, GPT-Neo, Nemotron, Falcon) handed its compiled
    layers None in the warm-up and a dense mask in the capture; Dynamo compiled again inside the capture and
    the capture failed (H200 run 157), so the trainer trained it without CUDA graphs. The trace-safe branch
    builds the same mask eagerly (from the tensors, on the device), at the price of SDPA without its causal
    skip; models that take surogate attention build no transformers mask.
    """
    masking = sys.modules.get("transformers.masking_utils")
    original = getattr(masking, "is_tracing", None)
    if not callable(original):
        yield
        return
    masking.is_tracing = lambda *args, **kwargs: True
    try:
        yield
    finally:
        masking.is_tracing = original


@contextlib.contextmanager
def capturable_eager_masks():
    """transformers' masks for eager attention built without a copy from the host, for CUDA-graph warm-up and
    capture alike (the same function in both, so that nothing compiled sees another).

    Root cause: transformers 5.17's `masking_utils.eager_mask` makes its 0 with `torch.tensor(0.0, device=...)`,
    a copy from pageable host memory, which a capture refuses ("Cannot copy between CPU and CUDA tensors during
    CUDA graph capture"): GPT-Neo (eager attention only) trained without CUDA graphs (H100 run B, session 37).
    5.25 fills that 0 on the device (`torch.zeros(())`); this is the same, where the installed one copies."""
    import torch

    masking = sys.modules.get("transformers.masking_utils")
    functions = getattr(getattr(masking, "ALL_MASK_ATTENTION_FUNCTIONS", None), "_global_mapping", None)
    original = functions.get("eager") if isinstance(functions, dict) else None
    if original is None or "tensor" not in getattr(getattr(original, "__code__", None), "co_names", ()):
        yield
        return

    def eager_mask(*args, dtype=torch.float32, **kwargs):
        kwargs.pop("allow_is_causal_skip", None)
        mask = masking.sdpa_mask(*args, allow_is_causal_skip=False, **kwargs)
        if mask is not None:  # 0 where attended, the dtype's lowest elsewhere, as transformers' own
            mask = torch.where(mask, torch.zeros((), device=mask.device, dtype=dtype), torch.finfo(dtype).min)
        return mask

    functions["eager"] = eager_mask
    try:
        yield
    finally:
        functions["eager"] = original


class DependencyError(ImportError):
    """An installed dependency outside the versions surogate requires (its message says what to install)."""


@functools.cache
def check_dependencies() -> None:
    """Refuse in one line a torch / Triton / transformers / PEFT outside surogate's requirements, as installed.

    Root cause: pip enforces the requirements, but an environment made otherwise (`pip install --no-deps`, conda, a
    pinned image) can hold transformers 4.x, where MoE and newer models failed deep inside (no
    `transformers.integrations.moe`, no Qwen3.5; 75 tests of the suite with transformers 4.57 and PEFT 0.17).
    The versions are read from surogate's own installed metadata (pyproject.toml): nothing to check when surogate
    runs from a source tree without being installed. A build is judged by its release: a nightly (2.16.0.dev...) or
    a container's torch (NGC's 2.11.0a0+git...) passes where 2.16.0 / 2.11.0 would.
    """
    from importlib import metadata

    try:
        requirements = metadata.requires("surogate") or []
    except metadata.PackageNotFoundError:
        return
    from packaging.requirements import Requirement
    from packaging.version import InvalidVersion, Version

    for line in requirements:
        requirement = Requirement(line)
        if not requirement.specifier or (requirement.marker is not None and
                                         not requirement.marker.evaluate({"extra": ""})):
            continue
        try:
            found = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:  # missing altogether: its import says so
            continue
        try:
            release = Version(found).base_version
        except InvalidVersion:  # not a version pip could compare either: nothing to say
            continue
        if not requirement.specifier.contains(release):
            wanted = f"{requirement.name}{requirement.specifier}"
            raise DependencyError(f"surogate needs {wanted}, found {requirement.name} {found}: "
                                  f"pip install -U '{wanted}'")


def import_bitsandbytes_offline() -> None:
    """Import bitsandbytes (where installed) without the network call it makes on import.

    Root cause: bitsandbytes 0.50 on a CPU with AVX512-BF16 asks the Hugging Face Hub for a CPU 4-bit GEMM
    (`kernels.get_kernel("kernels-community/quantization-bitsandbytes")`) while it is imported, and PEFT imports
    it: a run-time download attempt from every process that imports PEFT (tests, `surogate train`), and offline a
    logged "Failed to load CPU gemm_4bit_forward". surogate never runs that kernel; bitsandbytes' own CPU code is
    what it falls back to. So the import runs with `get_kernel` refusing, that one warning dropped.
    """
    if "bitsandbytes" in sys.modules or importlib.util.find_spec("bitsandbytes") is None:
        return
    with _hub_kernels_refused():
        import bitsandbytes  # noqa: F401


def bitsandbytes_imports_offline() -> None:
    """Make bitsandbytes' first import, whoever makes it, run as `import_bitsandbytes_offline` does: `import
    surogate` installs this (an import hook: no import of torch or bitsandbytes now). The usual script imports
    surogate, then calls PEFT's `get_peft_model`, which imports bitsandbytes before `surogate.compile` runs."""
    if "bitsandbytes" in sys.modules or any(isinstance(f, _OfflineBitsandbytes) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _OfflineBitsandbytes())


class _OfflineBitsandbytes(importlib.abc.MetaPathFinder):
    """Finds bitsandbytes as the other finders do, and runs its module under `_hub_kernels_refused` (the
    submodules it imports while it runs included). It removes itself at that first import."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "bitsandbytes":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            with _hub_kernels_refused():
                run(module)

        spec.loader.exec_module = exec_module
        return spec


@contextlib.contextmanager
def _hub_kernels_refused():
    """`kernels.get_kernel` raising, and bitsandbytes' "gemm_4bit_forward" warning dropped, while it lasts."""
    try:
        import kernels
    except ImportError:  # bitsandbytes then warns that `kernels` is missing: the same warning, dropped below
        kernels = None

    def refuse(repo_id: str, *args, **kwargs):
        raise RuntimeError(f"surogate fetches no Hub kernel ({repo_id}) while bitsandbytes is imported")

    def keep(record: logging.LogRecord) -> bool:
        return "gemm_4bit_forward" not in record.getMessage()

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    fetch = getattr(kernels, "get_kernel", None)
    if fetch is not None:
        kernels.get_kernel = refuse
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)
        if fetch is not None:
            kernels.get_kernel = fetch


@contextlib.contextmanager
def compile_options_cache_tag(tag: str):
    """Add `tag` to torch.compile's cache keys while a graph compiles (`torch.compiler.config.cache_key_tag`).

    Root cause: AOTAutograd's cache hashes a graph's code but strips `node.meta`, and surogate's passes
    steer the partition through node.meta (pass 5 tags nodes MUST_RECOMPUTE). Without the options in the
    key, a compile with `recompute_producers=False` was served the partition compiled with it on, from the
    on-disk cache of an earlier process (bench/NOTES.md run 51). A no-op where this torch has no such key.
    """
    import torch

    config = getattr(torch.compiler, "config", None)
    if config is None or not hasattr(config, "cache_key_tag") or not tag:
        yield
        return
    before = config.cache_key_tag
    config.cache_key_tag = f"{before}+{tag}" if before else tag
    try:
        yield
    finally:
        config.cache_key_tag = before


def tag_compile_cache(tag: str) -> bool:
    """Add `tag` to torch.compile's cache keys (`torch.compiler.config.cache_key_tag`, kept with the user's
    own tag). Inductor's FX-graph cache does not hash a custom op's fake implementation or its Triton
    kernels, so without it a persistent cache serves code compiled against an older surogate (seen: stride
    asserts from a changed fake, bench/NOTES.md run 42). False where this torch has no such key."""
    import torch

    config = getattr(torch.compiler, "config", None)
    if config is None or not hasattr(config, "cache_key_tag"):
        return False
    current = config.cache_key_tag or ""
    if tag not in current.split("+"):
        config.cache_key_tag = f"{current}+{tag}" if current else tag
    return True


@functools.cache
def fp32_out_addmm() -> bool:
    """Whether `torch.addmm(..., out_dtype=torch.float32)` exists: a bf16 x bf16 GEMM written in FP32 with
    `alpha` applied to the FP32 product, in one cuBLAS call (kernels/grad_lora.py).

    Root cause: `aten::addmm.dtype` is a CUDA-only kernel (its CPU dispatch raises, torch 2.13); where it is
    missing the LoRA gradients take the bf16 product and scale it in a second kernel.
    """
    import torch

    return hasattr(torch.ops.aten.addmm, "dtype")


def autograd_inside_op() -> contextlib.AbstractContextManager:
    """Autograd on inside a custom op's implementation, which the dispatcher runs with the autograd keys excluded
    (`_AutoDispatchBelowAutograd`): `surogate::gated_delta_rule_backward` differentiates transformers' rule by
    running it again. Private dispatcher API (torch 2.11-2.13 have it): the keys excluded now, less autograd's."""
    import torch

    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in ("AutogradFunctionality", "ADInplaceOrView", "AutogradOther"):
        exclude = exclude.remove(getattr(torch._C.DispatchKey, key))
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)
