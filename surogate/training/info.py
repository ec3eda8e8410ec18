"""What surogate runs where: the function behind `surogate info [--arch sm_XX]`.

`render()` prints the environment, every recipe's support on the arch (native, emulated or
refused, from `surogate.kernels.plan.plan`) and every Triton kernel with the MMA instruction class
it should use next to the one found in its SASS, built ahead of time for that arch (no GPU
needed: Triton ships ptxas and cuobjdump). Importing this module touches no GPU and compiles
nothing.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

from surogate.kernels.plan import Support, plan
from surogate.recipes import ARCHS, current_arch, names, normalize_arch


@dataclass(frozen=True)
class KernelRow:
    """One line of the kernel table."""

    kernel: str
    recipes: tuple[str, ...]
    precision: str  # MMA operand precision ("bf16", "fp8", "nvfp4"), or "-" for a non-MMA kernel
    expected_mma: str  # e.g. "HGMMA"; "none" for a quantizer
    found_mma: str  # classes found in the SASS; "-" when not checked; "build failed"
    ok: bool | None  # None: SASS not checked
    note: str = ""  # what is wrong, spills, or what runs instead of a Triton kernel


@dataclass(frozen=True)
class RecipeRow:
    recipe: str
    support: str  # native / emulated / refused / reference
    output: str  # "kernel (precision, MMA)" of each GEMM
    grad_input: str
    grad_lora: str
    note: str


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict[str, str]:
    """GPU, arch and the versions that decide what compiles: torch, CUDA, Triton (and its ptxas), HF."""
    import torch

    env = {"surogate": _package_version()}
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        env["gpu"] = torch.cuda.get_device_name()
        env["arch"] = f"sm_{major}{minor}"
    else:
        env["gpu"] = "none (CPU only: the plain-torch reference runs)"
        env["arch"] = "cpu"
    env["torch"] = torch.__version__
    env["cuda"] = torch.version.cuda or "none (CPU build of torch)"
    env["triton"] = _version("triton")
    env["ptxas"] = _ptxas_versions()
    env["transformers"] = _version("transformers")
    env["peft"] = _version("peft")
    return env



def distributed_line() -> str:
    """One line on several processes: this one's place when torchrun launched it (its env vars), the
    torch.distributed backends this build has, and how `surogate train` spreads over them."""
    import os

    import torch
    import torch.distributed as dist

    if not dist.is_available():
        return "torch.distributed is not in this build of torch: one process only"
    world = os.environ.get("WORLD_SIZE")
    where = (f"launched: rank {os.environ.get('RANK', '?')} of {world} (local rank {os.environ.get('LOCAL_RANK', '?')})"
             if world else "not launched by torchrun (one process)")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    nccl = "NCCL " + ("yes" if dist.is_nccl_available() else "no")
    gloo = "gloo " + ("yes" if dist.is_gloo_available() else "no")
    return (f"{where}; backends: {nccl}, {gloo}; {gpus} GPU(s); several: torchrun --nproc-per-node N "
            "-m surogate train cfg.yaml (parallelism: ddp | fsdp)")


def git_commit(repo: "str | None" = None) -> str:
    """The commit a result was measured at: $GIT_COMMIT when set, else `git rev-parse --short HEAD` in `repo`
    with "+modified" when tracked files differ from it, else "unknown".

    "+modified" flags uncommitted work and a copy of the tree whose .git is behind its files (the GPU
    machine's copy kept an old .git: session 10's results first read 05e4a1c for three later commits).
    """
    import os
    import subprocess

    commit = os.environ.get("GIT_COMMIT")
    if commit:
        return commit
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10).stdout.strip()

        commit = git("rev-parse", "--short", "HEAD")
        if commit and git("status", "--porcelain", "--untracked-files=no"):
            commit += "+modified"
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return commit or "unknown"


def run_record(repo: "str | None" = None) -> dict[str, str]:
    """`environment()` plus the Python version and the git commit (`git_commit`): what every benchmark
    result records."""
    import platform

    record = {**environment(), "python": platform.python_version(), "commit": git_commit(repo)}
    if record["arch"] == "cpu":
        record["gpu"] = "cpu"  # a field for tables, not the sentence `surogate info` prints
    return record


def _package_version() -> str:
    import surogate

    return surogate.__version__


def _ptxas_versions() -> str:
    """The CUDA release of the ptxas builds Triton ships (they decide which SASS is possible)."""
    try:
        from triton import knobs

        tools = (("ptxas", knobs.nvidia.ptxas), ("ptxas-blackwell", knobs.nvidia.ptxas_blackwell))
        return ", ".join(f"{name} {tool.version}" for name, tool in tools if tool is not None)
    except Exception as e:  # Triton missing (not Linux) or a layout we do not know
        return f"unknown ({type(e).__name__})"


def _gemm_text(g) -> str:
    return f"{g.kernel} ({g.precision.value}, {g.mma or '-'})"


def recipe_table(arch: str | None = None) -> list[RecipeRow]:
    """Every recipe (no aliases) on `arch` (None: this machine): native, emulated, refused or reference."""
    arch = current_arch() if arch is None else normalize_arch(arch)
    rows = []
    for name in names(include_aliases=False):
        p = plan(name, arch)
        note = "" if p.support in (Support.NATIVE, Support.REFERENCE) else "; ".join(
            g.note for g in p.gemms if g.support in (Support.REFUSED, Support.EMULATED))
        rows.append(RecipeRow(name, p.support.value, _gemm_text(p.gemm("output")),
                              _gemm_text(p.gemm("grad_input")), _gemm_text(p.gemm("grad_lora")), note))
    return rows


def route_table(arch: str) -> list[tuple[str, str]]:
    """(kernel, shape rule) for every output / grad_input variant a recipe runs on `arch`."""
    rows: dict[str, str] = {}
    for name in names(include_aliases=False):
        p = plan(name, arch)
        for g in p.gemms:
            if g.variant is not None and p.support is not Support.REFUSED:
                rows.setdefault(g.kernel, g.rule)
    return list(rows.items())


def kernel_table(arch: str, check_sass: bool = True, workers: int | None = None) -> list[KernelRow]:
    """Every kernel that runs on `arch`: its recipes, precision, expected and found MMA class.

    With `check_sass` each kernel is compiled for `arch` ahead of time (a minute or two on a
    laptop; Triton's cache makes reruns fast) and its SASS is read back.
    """
    from surogate.kernels import catalog
    from surogate.kernels.aot import build_many
    from surogate.kernels.catalog import recipe_usage

    arch = normalize_arch(arch)
    if arch not in ARCHS:
        raise ValueError(f"kernel_table needs a GPU architecture ({', '.join(ARCHS)}), got {arch!r}")
    specs = [s for s in catalog.specs() if arch in s.archs]
    builds = build_many([s.request(arch) for s in specs], workers=workers) if check_sass else [None] * len(specs)
    rows = []
    for spec, build in zip(specs, builds):
        recipes = spec.recipes_on(arch)  # a dense GEMM's from the plan; a MoE grouped kernel's: its experts'
        expected = spec.expected_mma(arch) or "none"
        precision = spec.precision.value if spec.precision is not None else "-"
        if build is None:
            rows.append(KernelRow(spec.name, recipes, precision, expected, "-", None, spec.what))
            continue
        problems = spec.check(build)
        found = "build failed" if not build.ok else (", ".join(build.mma_classes) or "none")
        notes = list(problems) if build.ok else [build.error.splitlines()[-1] if build.error else "error"]
        if build.ok and build.spills:
            notes.append(f"spills: {build.stack_bytes} B stack, {build.local_memory_ops} local ld/st, "
                         f"{build.registers} regs")
        rows.append(KernelRow(spec.name, recipes, precision, expected, found, not problems, "; ".join(notes)))
    for kernel, instead in catalog.NOT_TRITON.items():
        recipes = tuple(recipe_usage(kernel).get(arch, ()))
        if recipes:
            rows.append(KernelRow(kernel, recipes, "bf16", ARCHS[arch].mma_bf16 or "-", "-", None, instead))
    return rows


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, rows)])


def render(arch: str | None = None, check_sass: bool = True) -> str:
    """The text of `surogate info`: environment, recipes on `arch`, kernels and their SASS MMA class.

    `arch=None` reads the GPU of this machine; on a machine without one, pass an arch
    ("sm_89", "sm_90", "sm_100", "sm_120") to see what would run there.
    """
    env = environment()
    out = ["environment:"] + [f"  {k:<13} {v}" for k, v in env.items()] + [f"  {'distributed':<13} {distributed_line()}"]
    target = normalize_arch(arch) if arch is not None else env["arch"]
    if target != "cpu" and target not in ARCHS:  # a GPU surogate has no kernels for
        out += ["", f"this GPU ({target}) is not a surogate target ({', '.join(ARCHS)}); "
                    "the plain-torch reference runs. Pass --arch to see a target."]
        target = "cpu"
    where = f"{target} ({ARCHS[target].gpus})" if target in ARCHS else "cpu (plain-torch reference)"
    out += ["", f"recipes on {where}:"]
    out.append(_indent(_table(("recipe", "support", "output GEMM", "grad_input GEMM", "grad_lora GEMM", "note"),
                              [(r.recipe, r.support, r.output, r.grad_input, r.grad_lora, r.note)
                               for r in recipe_table(target)])))
    if target in ARCHS:
        out += ["", f"routes on {target} (kernels/variants.py: where a call leaves its kernel, by shape):",
                _indent(_table(("kernel", "shape rule"), route_table(target)))]
    if target not in ARCHS:
        out += ["", "kernels: no GPU here; pass --arch sm_89 | sm_90 | sm_100 | sm_120 to build every kernel "
                    "for that arch ahead of time and check its SASS"]
        return "\n".join(out) + "\n"
    ptx = ARCHS[target].ptx_target
    title = (f"kernels on {target}, built ahead of time for {ptx} (Triton {env['triton']}), MMA class from SASS:"
             if check_sass else f"kernels on {target} (SASS not checked):")
    try:
        rows = kernel_table(target, check_sass=check_sass)
    except Exception as e:  # a kernel module that does not import must not hide the rest of the report
        out += ["", f"kernels: the catalog could not be built: {type(e).__name__}: {e}"]
        return "\n".join(out) + "\n"
    mark = {True: "ok", False: "WRONG", None: "-"}
    out += ["", title, _indent(_table(
        ("kernel", "recipes", "precision", "expected MMA", "found MMA", "ok", "note"),
        [(r.kernel, ",".join(r.recipes), r.precision, r.expected_mma, r.found_mma, mark[r.ok], r.note)
         for r in rows]))]
    bad = [r.kernel for r in rows if r.ok is False]
    if bad:
        out += ["", f"{len(bad)} kernel(s) not as expected on {target}: {', '.join(bad)}"]
    return "\n".join(out) + "\n"


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())
